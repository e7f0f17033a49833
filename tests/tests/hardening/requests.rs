//! Defects 7 and 8: CNI networks with a second interface, and a repeated attach with other
//! parameters.

use super::support::*;

// ---- 7. CNI: networks and a second interface --------------------------------------------------------

/// Whether `id` has the shape `cni-<8 hex>-<16 hex>-<readable>`; returns the network part.
fn cni_id_parts(id: &str) -> Option<(String, String, String)> {
    let rest = id.strip_prefix("cni-")?;
    let (network, rest) = rest.split_once('-')?;
    let (attachment, readable) = rest.split_once('-')?;
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    (hex(network, 8) && hex(attachment, 16)).then(|| {
        (
            network.to_string(),
            attachment.to_string(),
            readable.to_string(),
        )
    })
}

#[test]
fn a_second_cni_network_adds_net1_beside_eth0_and_gc_is_per_network() {
    let lab = hlab(hosts(2, &[]));
    let ctr = "0123456789abcdef0123";
    let ns = format!("{}-cni", lab.prefix);
    sh::run("ip", &["netns", "add", &ns]).unwrap();
    let path = format!("/run/netns/{ns}");
    let config = |name: &str| {
        json!({
            "cniVersion": "1.1.0", "name": name, "type": "weft-cni",
            "socket": lab.hosts[0].socket,
        })
    };
    let (a, b) = (config("weft-a"), config("weft-b"));
    let (ok, added_a) = cni_as("ADD", ctr, &path, "eth0", &a);
    assert!(ok, "ADD weft-a eth0: {added_a}");
    let (ok, added_b) = cni_as("ADD", ctr, &path, "net1", &b);
    assert!(ok, "ADD weft-b net1: {added_b}");
    assert_eq!(added_b["interfaces"][0]["name"], "net1", "{added_b}");
    let address = |r: &Value| {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_string()
    };
    let (ip_a, ip_b) = (address(&added_a), address(&added_b));
    assert_ne!(ip_a, ip_b);

    assert_eq!(
        route_dev(&ns, OUTSIDE_IP),
        "eth0",
        "the default route stays on eth0: {}",
        sh::run("ip", &["-n", &ns, "route"]).unwrap()
    );
    let (ok, err) = cni_as("CHECK", ctr, &path, "eth0", &a);
    assert!(ok, "CHECK of (weft-a, eth0) after adding net1: {err}");

    // From another host: replies leave through the interface of their source address.
    let (remote, _) = lab.attach(1, "remote").unwrap();
    for ip in [&ip_a, &ip_b] {
        lab.eventually(
            &format!("a container on another host reaches {ip}"),
            Duration::from_secs(15),
            || sh::ping(&remote, ip),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; routes in the container: {}",
                sh::run("ip", &["-n", &ns, "route"]).unwrap()
            )
        });
    }

    let ids: Vec<String> = listed(&lab, 0)
        .iter()
        .map(|e| e["container_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let parts: Vec<(String, String, String)> = ids
        .iter()
        .map(|id| {
            cni_id_parts(id).unwrap_or_else(|| {
                panic!("{id} is not cni-<8 hex network>-<16 hex attachment>-<container>")
            })
        })
        .collect();
    assert_ne!(parts[0].0, parts[1].0, "the network part differs: {ids:?}");
    assert!(
        parts.iter().all(|p| p.2 == ctr[..12]),
        "the first 12 characters of the container id: {ids:?}"
    );

    // GC of weft-a keeps what weft-b made.
    let mut gc = a.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": ctr, "ifname": "eth0"}]);
    let (ok, err) = cni_as("GC", "", "", "", &gc);
    assert!(ok, "GC weft-a: {err}");
    assert_eq!(
        listed(&lab, 0).len(),
        2,
        "GC of weft-a leaves net1 attached"
    );
    assert!(link_index(&ns, "net1").is_some());
    // GC of weft-b with nothing valid detaches net1 only.
    let mut gc = b.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (ok, err) = cni_as("GC", "", "", "", &gc);
    assert!(ok, "GC weft-b: {err}");
    let left = listed(&lab, 0);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["ifname"], "eth0");
    lab.eventually("net1 removed", Duration::from_secs(5), || {
        link_index(&ns, "net1").is_none()
    })
    .unwrap();
    assert!(link_index(&ns, "eth0").is_some());
    assert!(sh::ping(&remote, &ip_a));
}

// ---- 8. repeated attach with different parameters ---------------------------------------------------

#[tokio::test]
async fn attaching_an_id_again_with_other_parameters_applies_or_refuses_them() {
    let mut lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let host_ip = lab.hosts[0].ip.to_string();
    let outside = lab.outside.clone();
    let mut client = lab.client(0).await.unwrap();
    let mut req = request("web");
    req.ports = vec![tcp_port(8080, 80)];
    let web = attach(&mut client, req).await.unwrap();
    let web_ns = ns_name(&web.netns);
    let echo = bin("weft-echo");
    lab.spawn_in(&web_ns, echo.to_str().unwrap(), &["80"])
        .unwrap();
    lab.eventually("8080 published", Duration::from_secs(10), || {
        echo_answers(&outside, &host_ip, 8080)
    })
    .unwrap();

    // Other ports: applied.
    let mut req = request("web");
    req.ports = vec![tcp_port(9090, 80)];
    let moved = attach(&mut client, req).await.unwrap();
    let listed_ports = &listed_one(&lab, 0, "web").unwrap()["ports"];
    assert_eq!(
        listed_ports,
        &json!([{"protocol": "tcp", "host_port": 9090, "container_port": 80}]),
        "List shows the new ports"
    );
    assert_eq!(moved.ip, web.ip, "same endpoint");
    lab.eventually("9090 published", Duration::from_secs(10), || {
        echo_answers(&outside, &host_ip, 9090)
    })
    .unwrap();
    let all = keys(&lab);
    assert!(all.contains_key(&format!("{PREFIX}/ports/{h1}/tcp/9090")));
    assert!(
        !all.contains_key(&format!("{PREFIX}/ports/{h1}/tcp/8080")),
        "the old host port is freed in etcd"
    );
    let rules = nat_rules(&h1);
    assert!(!rules.contains("--dport 8080"), "old DNAT gone: {rules}");
    assert!(rules.contains("--dport 9090"), "{rules}");

    // Other ifname: refused.
    let mut req = request("web");
    req.ports = vec![tcp_port(9090, 80)];
    req.ifname = "eth1".into();
    let status = attach(&mut client, req).await.expect_err("other ifname");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("ifname"), "{status:?}");

    // Other netns while the recorded one exists: refused.
    let other = format!("{}-other", lab.prefix);
    sh::run("ip", &["netns", "add", &other]).unwrap();
    let mut req = request("web");
    req.ports = vec![tcp_port(9090, 80)];
    req.netns = format!("/run/netns/{other}");
    let status = attach(&mut client, req).await.expect_err("other netns");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("netns"), "{status:?}");
    assert!(
        link_index(&other, "eth0").is_none(),
        "nothing wired into {other}"
    );

    // Other netns once the recorded one is gone: re-wired there. The old namespace is held
    // by a process, so its veth lives on and only its path disappears, as when a runtime
    // replaces a container's sandbox.
    let (old, new) = (format!("{}-old", lab.prefix), format!("{}-new", lab.prefix));
    for n in [&old, &new] {
        sh::run("ip", &["netns", "add", n]).unwrap();
    }
    lab.spawn_in(&old, "sleep", &["600"]).unwrap();
    let mut req = request("mover");
    req.netns = format!("/run/netns/{old}");
    let mover = attach(&mut client, req).await.unwrap();
    assert!(sh::ping(&h1, &mover.ip));
    sh::run("ip", &["netns", "del", &old]).unwrap();
    let mut req = request("mover");
    req.netns = format!("/run/netns/{new}");
    let rewired = attach(&mut client, req)
        .await
        .expect("re-wired into the new namespace");
    assert_eq!(rewired.netns, format!("/run/netns/{new}"));
    let record: Value =
        serde_json::from_str(&keys(&lab)[&format!("{PREFIX}/endpoints/{h1}/mover")]).unwrap();
    assert_eq!(
        record["netns"],
        json!(format!("/run/netns/{new}")),
        "{record}"
    );
    let inside = sh::run("ip", &["-n", &new, "-4", "-o", "addr", "show", "eth0"]).unwrap();
    assert!(inside.contains(&format!("{}/32", rewired.ip)), "{inside}");
    lab.eventually(
        "the re-wired container answers",
        Duration::from_secs(10),
        || sh::ping(&new, &host_ip) && sh::ping(&h1, &rewired.ip),
    )
    .unwrap();
}
