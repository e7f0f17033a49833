//! Requested addresses end to end (issue 17): given through the API, weftctl and the CNI `ips`
//! capability, kept across a re-created container, and refused by cause with the right code and
//! nothing left behind.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use weft_proto::v1 as pb;
use weft_tests::cni::run as cni;
use weft_tests::{invariants, sh, Lab, LabOptions};

fn request(id: &str, ips: &[&str]) -> pb::AttachRequest {
    pb::AttachRequest {
        container_id: id.into(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Asserts that a refused attach of `id` left no record, guard, namespace or veth behind.
fn assert_nothing_of(lab: &Lab, id: &str, veths: &[usize]) {
    let keys = lab.etcd_keys().unwrap();
    assert!(
        !keys.iter().any(|(k, v)| k.contains(id) || v.contains(id)),
        "a record of the refused {id}"
    );
    assert!(!lab.container_namespaces().iter().any(|n| n.ends_with(id)));
    for (i, expected) in veths.iter().enumerate() {
        let links = sh::run("ip", &["-n", &lab.hosts[i].name, "-o", "link"]).unwrap();
        let count = links.lines().filter(|l| l.contains(": weft")).count();
        assert_eq!(count, *expected, "veths on host {i}: {links}");
    }
}

fn reaches(lab: &Lab, from: &str, ip: &str) {
    lab.eventually(
        &format!("{from} reaches {ip}"),
        Duration::from_secs(10),
        || sh::ping(from, ip),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_addresses_are_given_kept_and_refused_by_cause() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        agent_args: vec!["--block-size".into(), "28".into()],
        ..Default::default()
    })
    .unwrap();
    let h1 = lab.hosts[0].name.clone();
    // weftctl: an address in a block of nobody; h1 claims the block and peers route it.
    let db = lab
        .ctl_json(0, &["attach", "db", "--ip", "10.65.200.5"])
        .unwrap();
    assert_eq!(db["ip"], "10.65.200.5", "{db}");
    let block_key = "/weft/v1/blocks/default/10.65.200.0-28";
    let keys = lab.etcd_keys().unwrap();
    assert!(keys[block_key].contains(&h1), "{:?}", keys.get(block_key));
    let (client_ns, _) = lab.attach(1, "client").unwrap();
    reaches(&lab, &client_ns, "10.65.200.5");

    let mut c0 = lab.client(0).await.unwrap();
    let c1 = lab.client(1).await.unwrap();
    // The same request again is the same endpoint; another address for it is refused.
    let again = c0.attach(request("db", &["10.65.200.5"])).await.unwrap();
    assert_eq!(again.into_inner().endpoint.unwrap().ip, "10.65.200.5");
    let moved = c0
        .attach(request("db", &["10.65.200.6"]))
        .await
        .unwrap_err();
    assert_eq!(moved.code(), Code::FailedPrecondition, "{moved:?}");

    // Every refusal, with its code and what it names.
    let refusals: [(&str, usize, &[&str], Code, &str); 5] = [
        ("thief", 0, &["10.65.200.5"], Code::AlreadyExists, "db"),
        (
            "stranger",
            1,
            &["10.65.200.6"],
            Code::FailedPrecondition,
            &h1,
        ),
        ("lost", 0, &["10.99.0.1"], Code::InvalidArgument, "pool"),
        (
            "typo",
            0,
            &["10.65.200"],
            Code::InvalidArgument,
            "10.65.200",
        ),
        (
            "greedy",
            0,
            &["10.65.200.7", "10.65.200.8"],
            Code::InvalidArgument,
            "one per family",
        ),
    ];
    let mut clients = [c0.clone(), c1];
    for (id, host, ips, code, named) in refusals {
        let status = clients[host].attach(request(id, ips)).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
        assert!(status.message().contains(named), "{id}: {status:?}");
        assert_nothing_of(&lab, id, &[1, 1]);
    }

    // Re-created: the same request on the same host gets the same address back.
    lab.ctl_json(0, &["detach", "db"]).unwrap();
    let db2 = lab
        .ctl_json(0, &["attach", "db-2", "--ip", "10.65.200.5"])
        .unwrap();
    assert_eq!(db2["ip"], "10.65.200.5", "{db2}");
    reaches(&lab, &client_ns, "10.65.200.5");

    // The CNI `ips` capability, with the prefix length runtimes pass.
    let netns = format!("{}-cni", lab.prefix);
    sh::run("ip", &["netns", "add", &netns]).unwrap();
    let config = json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
        "socket": lab.hosts[0].socket,
        "runtimeConfig": {"ips": ["10.65.200.9/24"]},
    });
    let (ok, result) = cni("ADD", "ctr-ip", &format!("/run/netns/{netns}"), &config);
    assert!(ok, "{result}");
    assert_eq!(result["ips"][0]["address"], "10.65.200.9/32", "{result}");
    reaches(&lab, &client_ns, "10.65.200.9");

    for i in 0..2 {
        lab.ipam_check(i).unwrap();
    }
    invariants::assert_quiet(&lab);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dual_stack_host_gives_a_requested_pair_atomically_and_completes_a_single_one() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        agent_args: vec!["--block-size".into(), "28".into()],
        ..Default::default()
    })
    .unwrap();
    let h1 = lab.hosts[0].name.clone();
    // weftctl with one address of each family: both given, in blocks h1 claims for them.
    let db = lab
        .ctl_json(
            0,
            &["attach", "db", "--ip", "10.65.200.5", "--ip", "fd65::200:5"],
        )
        .unwrap();
    assert_eq!(
        (&db["ip"], &db["ipv6"]),
        (&json!("10.65.200.5"), &json!("fd65::200:5"))
    );
    let keys = lab.etcd_keys().unwrap();
    for block in ["default/10.65.200.0-28", "default-v6/fd65::200:0-122"] {
        let key = format!("/weft/v1/blocks/{block}");
        assert!(keys[&key].contains(&h1), "{key}: {:?}", keys.get(&key));
    }
    let (client_ns, _, _) = lab.attach_dual(1, "client").unwrap();
    reaches(&lab, &client_ns, "10.65.200.5");
    reaches(&lab, &client_ns, "fd65::200:5");

    // Either address of a pair refused: the attach is refused by that address's cause, and the
    // other address is not kept (no record, no guard).
    let mut clients = [lab.client(0).await.unwrap(), lab.client(1).await.unwrap()];
    let refusals: [(&str, usize, [&str; 2], Code, &str); 4] = [
        (
            "thief",
            0,
            ["10.65.200.6", "fd65::200:5"],
            Code::AlreadyExists,
            "db",
        ),
        (
            "thief4",
            0,
            ["10.65.200.5", "fd65::200:6"],
            Code::AlreadyExists,
            "db",
        ),
        (
            "stranger",
            1,
            ["10.65.201.1", "fd65::200:6"],
            Code::FailedPrecondition,
            &h1,
        ),
        (
            "lost",
            0,
            ["10.65.200.7", "fd66::1"],
            Code::InvalidArgument,
            "pool",
        ),
    ];
    for (id, host, ips, code, named) in refusals {
        let status = clients[host].attach(request(id, &ips)).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
        assert!(status.message().contains(named), "{id}: {status:?}");
        assert_nothing_of(&lab, id, &[1, 1]);
        let keys = lab.etcd_keys().unwrap();
        for ip in ips
            .iter()
            .filter(|ip| !["10.65.200.5", "fd65::200:5"].contains(ip))
        {
            let guard = format!("/weft/v1/ips/{ip}");
            assert!(!keys.contains_key(&guard), "{id}: {guard} kept");
        }
    }
    let twice = clients[0]
        .attach(request("greedy", &["fd65::200:7", "fd65::200:8"]))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::InvalidArgument, "{twice:?}");
    // The refused addresses are free: a pair of them is given at once.
    let freed = clients[0]
        .attach(request("freed", &["10.65.200.6", "fd65::200:6"]))
        .await
        .unwrap()
        .into_inner()
        .endpoint
        .unwrap();
    assert_eq!(
        (freed.ip.as_str(), freed.ipv6.as_str()),
        ("10.65.200.6", "fd65::200:6")
    );

    // One requested address on a dual-stack host: the other family is given automatically.
    let single = lab
        .ctl_json(0, &["attach", "single", "--ip", "fd65::200:9"])
        .unwrap();
    assert_eq!(single["ipv6"], "fd65::200:9", "{single}");
    let auto = single["ip"].as_str().unwrap().to_string();
    assert!(auto.starts_with("10.65."), "{single}");
    let single_ns = single["netns"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    reaches(&lab, single_ns, &lab.hosts[1].ip.to_string());
    reaches(&lab, &client_ns, &auto);

    // The CNI `ips` capability with both families.
    let netns = format!("{}-cni", lab.prefix);
    sh::run("ip", &["netns", "add", &netns]).unwrap();
    let config = json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
        "socket": lab.hosts[0].socket,
        "runtimeConfig": {"ips": ["10.65.200.10/24", "fd65::200:a/64"]},
    });
    let (ok, result) = cni("ADD", "ctr-ips", &format!("/run/netns/{netns}"), &config);
    assert!(ok, "{result}");
    let addresses: Vec<&str> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addresses,
        ["10.65.200.10/32", "fd65::200:a/128"],
        "{result}"
    );
    reaches(&lab, &client_ns, "fd65::200:a");

    for i in 0..2 {
        lab.ipam_check(i).unwrap();
    }
}
