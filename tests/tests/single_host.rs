//! Single-host behaviour of the agent (the foundation issue): real etcd, real kernel, the agent
//! running inside a lab host namespace.

use std::time::Duration;

use weft_proto::v1 as pb;
use weft_tests::{sh, Lab, LabOptions};

fn one_host(default_route: bool, agent_args: &[&str]) -> Lab {
    Lab::new(LabOptions {
        hosts: 1,
        default_route,
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab")
}

/// `weft*` links in a namespace.
fn weft_links(ns: &str) -> Vec<String> {
    let out = sh::run("ip", &["-n", ns, "-o", "link", "show"]).unwrap();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("weft"))
        .collect()
}

/// `proto weft` routes in a namespace.
fn weft_routes(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "route", "show", "proto", "119"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn keys_under(lab: &Lab, part: &str) -> Vec<String> {
    lab.etcd_keys()
        .unwrap()
        .into_keys()
        .filter(|k| k.contains(part))
        .collect()
}

#[test]
fn two_containers_reach_each_other_and_the_host_without_a_host_default_route() {
    let lab = one_host(false, &[]);
    let host = &lab.hosts[0];
    let no_default = sh::run("ip", &["-n", &host.name, "route", "show", "default"]).unwrap();
    assert!(
        no_default.trim().is_empty(),
        "host must have no default route"
    );

    let (ns_a, ip_a) = lab.attach(0, "a").unwrap();
    let (ns_b, ip_b) = lab.attach(0, "b").unwrap();
    assert_ne!(ip_a, ip_b);

    assert!(sh::ping(&ns_a, &ip_b), "a -> b");
    assert!(sh::ping(&ns_b, &ip_a), "b -> a");
    assert!(sh::ping(&ns_a, &host.ip.to_string()), "a -> host");
    assert!(sh::ping(&host.name, &ip_a), "host -> a");

    let lo = sh::run("ip", &["-n", &ns_a, "link", "show", "lo"]).unwrap();
    assert!(lo.contains("UP"), "lo must be up inside: {lo}");
    assert!(
        sh::ping(&ns_a, "127.0.0.1"),
        "loopback inside the container"
    );

    let neigh = sh::run("ip", &["-n", &ns_a, "neigh", "show", "169.254.1.1"]).unwrap();
    assert!(
        neigh.contains("ee:ee:ee:ee:ee:ee") && neigh.contains("PERMANENT"),
        "gateway neighbour: {neigh}"
    );
    let addr = sh::run("ip", &["-n", &ns_a, "-4", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains(&format!("{ip_a}/32")), "{addr}");

    // Host side: proxy ARP, strict rp_filter, a /32 route tagged proto weft, a blackhole block.
    let veth = lab.ctl_json(0, &["get", "a"]).unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    for (knob, want) in [("proxy_arp", "1"), ("rp_filter", "1"), ("forwarding", "1")] {
        let value = sh::run(
            "ip",
            &[
                "netns",
                "exec",
                &host.name,
                "cat",
                &format!("/proc/sys/net/ipv4/conf/{veth}/{knob}"),
            ],
        )
        .unwrap();
        assert_eq!(value.trim(), want, "{knob} of {veth}");
    }
    let routes = weft_routes(&host.name);
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with(&format!("{ip_a} dev {veth}"))),
        "{routes:?}"
    );
    assert!(
        routes.iter().any(|r| r.starts_with("blackhole 10.65.")),
        "{routes:?}"
    );
}

#[test]
fn reattach_is_idempotent_and_repairs_and_detach_leaves_nothing() {
    // No periodic resync during the test: the damage must stay until `check` has seen it.
    let lab = one_host(true, &["--resync-interval", "1h"]);
    let ns = &lab.hosts[0].name;
    let first = lab
        .ctl_json(0, &["attach", "web", "-p", "18080:80"])
        .unwrap();
    let again = lab
        .ctl_json(0, &["attach", "web", "-p", "18080:80"])
        .unwrap();
    assert_eq!(
        first, again,
        "the same attach again returns the same endpoint"
    );
    assert_eq!(weft_links(ns).len(), 1);
    let checked = lab.ctl_json(0, &["check", "web"]).unwrap();
    assert_eq!(checked["problems"], serde_json::json!([]), "{checked}");

    // Damage on both sides and in the port rules, behind the agent's back: `check` names every
    // piece and exits 1; a re-attach repairs them all.
    let veth = first["host_ifname"].as_str().unwrap();
    let container_ns = first["netns"].as_str().unwrap().rsplit('/').next().unwrap();
    let proxy_delay = format!("net.ipv4.neigh.{veth}.proxy_delay=80");
    let damage: [(&str, &[&str]); 4] = [
        (container_ns, &["ip", "route", "del", "default"]),
        (
            container_ns,
            &["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"],
        ),
        // Not proxy_arp: the kernel announces that one and the agent puts it back at once.
        (ns, &["sysctl", "-qw", &proxy_delay]),
        (ns, &["iptables", "-t", "nat", "-F", "WEFT-PORTS"]),
    ];
    for (target, command) in damage {
        sh::run_in(target, command).unwrap();
    }
    let out = lab.ctl(0, &["--json", "check", "web"]).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "check of a damaged endpoint fails"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = report["problems"].to_string();
    for needle in [
        "no default route",
        "no permanent neighbour",
        "proxy_delay is 80",
        "--dport 18080",
    ] {
        assert!(problems.contains(needle), "{needle} not in {problems}");
    }
    assert_eq!(
        report["problems"].as_array().unwrap().len(),
        4,
        "nothing else is reported: {problems}"
    );
    lab.ctl_json(0, &["attach", "web", "-p", "18080:80"])
        .unwrap();
    let checked = lab.ctl_json(0, &["check", "web"]).unwrap();
    assert_eq!(checked["problems"], serde_json::json!([]), "{checked}");
    assert!(sh::ping(container_ns, &lab.hosts[0].ip.to_string()));

    // A deleted veth is rebuilt.
    sh::run("ip", &["-n", ns, "link", "del", veth]).unwrap();
    let repaired = lab
        .ctl_json(0, &["attach", "web", "-p", "18080:80"])
        .unwrap();
    assert_eq!(repaired["ip"], first["ip"]);
    assert!(
        sh::ping(container_ns, &lab.hosts[0].ip.to_string()),
        "repaired container works"
    );

    lab.ctl_json(0, &["detach", "web"]).unwrap();
    lab.ctl_json(0, &["detach", "web"]).unwrap(); // idempotent
                                                  // The veth is retired at once (no route, no rules) and deleted in the background.
    lab.eventually("veth deleted", Duration::from_secs(2), || {
        sh::run("ip", &["-n", ns, "-o", "link"])
            .unwrap()
            .matches(": weft")
            .count()
            == 0
    })
    .unwrap();
    let routes = weft_routes(ns);
    assert!(
        routes.iter().all(|r| r.starts_with("blackhole")),
        "only the block's blackhole may stay: {routes:?}"
    );
    assert!(keys_under(&lab, "/endpoints/").is_empty());
    assert!(keys_under(&lab, "/ips/").is_empty());
    assert!(
        lab.container_namespaces().is_empty(),
        "agent-made netns must go on detach"
    );
    let missing = lab.ctl(0, &["get", "web"]).unwrap();
    assert_eq!(
        missing.status.code(),
        Some(3),
        "get of a detached container is NOT_FOUND"
    );
    let missing = lab.ctl(0, &["check", "web"]).unwrap();
    assert_eq!(
        missing.status.code(),
        Some(3),
        "check of a detached one too"
    );
    let bad = lab.ctl(0, &["check", "../web"]).unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a malformed id is INVALID_ARGUMENT"
    );
}

#[test]
fn attach_into_existing_namespaces_by_path_and_by_pid() {
    let lab = one_host(true, &[]);
    // By path: a namespace made with `ip netns add`.
    let by_path = format!("{}-byp", lab.prefix);
    sh::run("ip", &["netns", "add", &by_path]).unwrap();
    let ep = lab
        .ctl_json(
            0,
            &[
                "attach",
                "path-c",
                "--netns",
                &format!("/run/netns/{by_path}"),
            ],
        )
        .unwrap();
    assert!(sh::ping(&by_path, &lab.hosts[0].ip.to_string()));

    // By pid: a process started with `unshare --net`.
    let mut sleeper = std::process::Command::new("unshare")
        .args(["--net", "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = sleeper.id().to_string();
    let result = (|| -> anyhow::Result<()> {
        let ep2 = lab.ctl_json(0, &["attach", "pid-c", "--pid", &pid])?;
        assert_eq!(ep2["netns"], format!("/proc/{pid}/ns/net"));
        let ip = ep["ip"].as_str().unwrap();
        let ping = sh::output(
            "nsenter",
            &[
                "--net",
                &format!("--target={pid}"),
                "ping",
                "-c1",
                "-W1",
                ip,
            ],
        )?;
        assert!(ping.status.success(), "pid container -> path container");
        lab.ctl_json(0, &["detach", "pid-c"])?;
        Ok(())
    })();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    result.unwrap();

    // Detach and attach again at once (a runtime restarting a container): the retired veth
    // still waiting for the reaper must not be in the way.
    lab.ctl_json(0, &["detach", "path-c"]).unwrap();
    lab.ctl_json(
        0,
        &[
            "attach",
            "path-c",
            "--netns",
            &format!("/run/netns/{by_path}"),
        ],
    )
    .unwrap();
    assert!(sh::ping(&by_path, &lab.hosts[0].ip.to_string()));
    lab.ctl_json(0, &["detach", "path-c"]).unwrap();
    // A namespace the agent did not create is left in place, without our interface.
    lab.eventually(
        "eth0 gone from the namespace",
        Duration::from_secs(2),
        || {
            !sh::run("ip", &["-n", &by_path, "-o", "link"])
                .unwrap()
                .contains("eth0")
        },
    )
    .unwrap();
    sh::run("ip", &["netns", "del", &by_path]).unwrap();
}

#[tokio::test]
async fn pool_exhaustion_is_resource_exhausted_and_leaves_nothing() {
    // A /30 pool in /31 blocks: exactly four addresses.
    let lab = one_host(true, &["--pool", "10.99.0.0/30", "--block-size", "31"]);
    for i in 0..4 {
        lab.attach(0, &format!("c{i}")).unwrap();
    }
    let mut client = lab.client(0).await.unwrap();
    let status = client
        .attach(pb::AttachRequest {
            container_id: "one-too-many".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(keys_under(&lab, "/endpoints/").len(), 4);
    assert_eq!(keys_under(&lab, "/ips/").len(), 4);
    assert_eq!(keys_under(&lab, "/blocks/").len(), 2);
    assert_eq!(weft_links(&lab.hosts[0].name).len(), 4);
    assert_eq!(
        lab.container_namespaces().len(),
        4,
        "no namespace left by the failed attach"
    );

    // Freed addresses are handed out again.
    lab.ctl_json(0, &["detach", "c2"]).unwrap();
    lab.attach(0, "again").unwrap();
}

#[tokio::test]
async fn checks_and_repairs_during_reconciliation_never_collide_on_netlink() {
    // Checks, repairs (re-attaches) and reconciliation passes all list links and routes on the
    // agent's one netlink socket; the kernel runs one dump per socket at a time and answers a
    // second with EBUSY, so the agent must take turns. Deleting the block's blackhole route over
    // and over keeps the event-driven passes (and their dumps) coming.
    let lab = one_host(true, &[]);
    let ns = lab.hosts[0].name.clone();
    for i in 0..4 {
        lab.attach(0, &format!("c{i}")).unwrap();
    }
    let blackhole = weft_routes(&ns)
        .into_iter()
        .find(|r| r.starts_with("blackhole"))
        .expect("the block's blackhole route");
    let dst = blackhole.split_whitespace().nth(1).unwrap().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tamper = {
        let (ns, stop) = (ns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Fails harmlessly while the agent has not put it back yet.
                let _ = sh::output("ip", &["-n", &ns, "route", "del", "blackhole", &dst]);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let client = lab.client(0).await.unwrap();
    let mut failures = vec![];
    for round in 0..40 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..4 {
            let mut client = client.clone();
            let container_id = format!("c{i}");
            calls.spawn(async move {
                if (round + i) % 4 == 0 {
                    client
                        .attach(pb::AttachRequest {
                            container_id,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                } else {
                    client
                        .check(pb::CheckRequest { container_id })
                        .await
                        .map(|_| ())
                }
            });
        }
        while let Some(result) = calls.join_next().await {
            if let Err(status) = result.unwrap() {
                failures.push(status.message().to_string());
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tamper.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} calls failed: {failures:?}",
        failures.len()
    );
}

/// One dual-stack host whose agent makes no full pass during a test (`--resync-interval 1h`):
/// what happens comes from events.
fn quiet_dual_stack_host() -> Lab {
    Lab::new(LabOptions {
        hosts: 1,
        ipv6: true,
        agent_args: ["--resync-interval", "1h"].map(String::from).to_vec(),
        ..Default::default()
    })
    .expect("lab")
}

/// A detach retires its veth: the routes and link that go with it are the agent's own doing and
/// set off no repair pass (with thousands of endpoints each pass costs the kernel tens of
/// milliseconds), while a veth someone else deletes is repaired at once.
#[test]
fn detaches_set_off_no_repair_pass_and_a_veth_deleted_by_hand_does() {
    let lab = quiet_dual_stack_host();
    let host = lab.hosts[0].name.clone();
    for i in 0..10 {
        lab.ctl_json(0, &["attach", &format!("c{i}")]).unwrap();
    }
    let passes = || sh::reconcile_totals(&host).unwrap().1;
    // Let the passes the attaches set off (if any) settle.
    let mut before = passes();
    lab.eventually("the reconciler quiet", Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = passes();
        std::mem::replace(&mut before, now) == now
    })
    .unwrap();
    for i in 0..9 {
        lab.ctl_json(0, &["detach", &format!("c{i}")]).unwrap();
    }
    lab.eventually("every retired veth deleted", Duration::from_secs(5), || {
        weft_links(&host).len() == 1
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(passes(), before, "detaches set off repair passes");
    // The last container's veth, deleted by someone else: a pass puts it back.
    let veth = weft_links(&host).remove(0);
    sh::run("ip", &["-n", &host, "link", "del", &veth]).unwrap();
    lab.eventually("the veth repaired", Duration::from_secs(3), || {
        weft_links(&host).contains(&veth)
    })
    .unwrap();
    assert!(passes() > before);
    weft_tests::invariants::assert_quiet(&lab);
}

/// IPv6's `forwarding` and `proxy_ndp` of a veth, flipped behind the agent's back, are put
/// back as the kernel announces the change, long before the next full pass.
#[test]
fn flipped_ipv6_sysctls_of_a_veth_are_put_back_at_once() {
    let lab = quiet_dual_stack_host();
    let host = lab.hosts[0].name.clone();
    let endpoint = lab.ctl_json(0, &["attach", "c1"]).unwrap();
    let veth = endpoint["host_ifname"].as_str().unwrap().to_string();
    for knob in ["forwarding", "proxy_ndp"] {
        let path = format!("/proc/sys/net/ipv6/conf/{veth}/{knob}");
        let read = || {
            sh::run_in(&host, &["cat", &path])
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(read(), "1", "{knob}");
        sh::run_in(&host, &["sh", "-c", &format!("echo 0 > {path}")]).unwrap();
        lab.eventually(&format!("{knob} put back"), Duration::from_secs(1), || {
            read() == "1"
        })
        .unwrap();
    }
}

/// A second interface in a namespace routes its own addresses of both families through its own
/// table (`ip rule from <address>`, `ip -6 rule` for IPv6): traffic from its IPv6 address
/// leaves through it, and reaches a container on another host; detach removes the rules.
#[test]
fn a_second_dual_stack_interface_sends_from_its_own_ipv6_address() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let ns = format!("{}-two", lab.prefix);
    sh::run("ip", &["netns", "add", &ns]).unwrap();
    let path = format!("/run/netns/{ns}");
    let first = lab.ctl_json(0, &["attach", "a", "--netns", &path]).unwrap();
    let second = lab
        .ctl_json(0, &["attach", "b", "--netns", &path, "--ifname", "net1"])
        .unwrap();
    let peer = lab.ctl_json(1, &["attach", "p"]).unwrap();
    let v6 = |e: &serde_json::Value| e["ipv6"].as_str().unwrap().to_string();
    let (v6_first, v6_second) = (v6(&first), v6(&second));
    let rules = sh::run_in(&ns, &["ip", "-6", "rule"]).unwrap();
    assert!(
        rules.contains(&format!("from {v6_second} lookup")),
        "{rules}"
    );
    assert!(
        !rules.contains(&v6_first),
        "the first interface uses the main table: {rules}"
    );
    let route = sh::run_in(
        &ns,
        &["ip", "-6", "route", "get", &v6(&peer), "from", &v6_second],
    )
    .unwrap();
    assert!(route.contains("dev net1"), "{route}");
    // The reverse-path match on the host lets it through: it is net1's own address on net1.
    // (h1 learns the peer's new block through etcd within milliseconds: a ping sent before
    // that is lost, so it is given a moment.)
    let ping = ["ping", "-c", "1", "-W", "1", "-I", &v6_second, &v6(&peer)];
    lab.eventually(
        "net1 reaching the peer over IPv6",
        Duration::from_secs(3),
        || sh::in_ns(&ns, &ping).is_ok_and(|o| o.status.success()),
    )
    .unwrap();
    lab.ctl_json(0, &["detach", "b"]).unwrap();
    let rules = sh::run_in(&ns, &["ip", "-6", "rule"]).unwrap();
    assert!(!rules.contains(&v6_second), "{rules}");
    lab.ctl_json(0, &["detach", "a"]).unwrap();
    sh::run("ip", &["netns", "del", &ns]).unwrap();
}
