//! Leaving and entering the fabric: SNAT to the outside, published ports (DNAT) from everywhere,
//! the FORWARD policy, and iptables ownership.

use std::time::Duration;

use nix::sys::signal::Signal;
use weft_proto::v1 as pb;
use weft_tests::lab::{bin, OUTSIDE_IP};
use weft_tests::{sh, Lab, LabOptions};

fn lab_with_forward_drop(agent_args: &[&str]) -> Lab {
    let lab = Lab::new(LabOptions {
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab");
    // As Docker does: nothing is forwarded unless a rule accepts it.
    for host in &lab.hosts {
        sh::run(
            "ip",
            &[
                "netns", "exec", &host.name, "iptables", "-P", "FORWARD", "DROP",
            ],
        )
        .unwrap();
    }
    lab
}

/// Connects to ip:port over TCP (or sends a UDP datagram) from `ns` and returns the answer of a
/// weft-echo service, retrying briefly while routes and rules settle.
fn ask(ns: &str, ip: &str, port: u16, udp: bool) -> Option<String> {
    ask_tries(ns, ip, port, udp, 20)
}

fn ask_tries(ns: &str, ip: &str, port: u16, udp: bool, tries: usize) -> Option<String> {
    let port = port.to_string();
    for _ in 0..tries {
        let out = if udp {
            sh::in_ns(
                ns,
                &["sh", "-c", &format!("echo q | nc -u -n -w 1 {ip} {port}")],
            )
        } else {
            sh::in_ns(ns, &["nc", "-n", "-w", "1", ip, &port])
        }
        .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if let Some(peer) = text.strip_prefix("peer=") {
            return Some(
                peer.rsplit_once(':')
                    .map(|(a, _)| a.to_string())
                    .unwrap_or_default(),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn nat_rules(ns: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "iptables-save", "-t", "nat"]).unwrap()
}

#[test]
fn containers_reach_the_outside_through_snat_and_keep_their_address_inside() {
    let mut lab = lab_with_forward_drop(&[]);
    let (ns1, ip1) = lab.attach(0, "c1").unwrap();
    let (ns2, _) = lab.attach(1, "c2").unwrap();
    let echo = bin("weft-echo");
    let outside = lab.outside.clone();
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    lab.spawn_in(&ns1, echo.to_str().unwrap(), &["7000"])
        .unwrap();

    assert!(sh::ping(&ns1, OUTSIDE_IP), "container -> outside (ping)");
    let seen = ask(&ns1, OUTSIDE_IP, 7000, false).expect("container -> outside (tcp)");
    assert_eq!(
        seen,
        lab.hosts[0].ip.to_string(),
        "outside sees the host's underlay address"
    );
    let seen = ask(&ns1, OUTSIDE_IP, 7000, true).expect("container -> outside (udp)");
    assert_eq!(seen, lab.hosts[0].ip.to_string());

    // Inside the fabric the real address survives, even with FORWARD DROP.
    let seen = ask(&ns2, &ip1, 7000, false).expect("container -> container across hosts");
    let ip2 = lab.ctl_json(1, &["get", "c2"]).unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(seen, ip2);
}

#[test]
fn a_pool_without_nat_outgoing_is_never_masqueraded() {
    let lab = lab_with_forward_drop(&["--nat-outgoing", "false"]);
    let (ns1, _) = lab.attach(0, "c1").unwrap();
    let (_, ip2) = lab.attach(1, "c2").unwrap();
    let rules = nat_rules(&lab.hosts[0].name);
    assert!(!rules.contains("-j WEFT-NAT-OUTGOING"), "{rules}");
    // The outside network has no route back to the pool: without SNAT nothing comes back.
    assert!(!sh::ping(&ns1, OUTSIDE_IP), "must not be masqueraded");
    assert!(sh::ping(&ns1, &ip2), "the fabric still works");
}

#[tokio::test]
async fn published_ports_are_reachable_from_everywhere_and_conflicts_are_refused() {
    let mut lab = lab_with_forward_drop(&[]);
    let web = lab
        .ctl_json(0, &["attach", "web", "-p", "8080:80", "-p", "5353:53/udp"])
        .unwrap();
    let web_ns = web["netns"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let echo = bin("weft-echo");
    // TCP and UDP on one port number inside; published as 8080/tcp and 5353/udp.
    lab.spawn_in(&web_ns, echo.to_str().unwrap(), &["80"])
        .unwrap();
    lab.spawn_in(&web_ns, echo.to_str().unwrap(), &["53"])
        .unwrap();
    let (peer_ns, _) = lab.attach(0, "neighbour").unwrap();
    let (remote_ns, _) = lab.attach(1, "remote").unwrap();
    let host_ip = lab.hosts[0].ip.to_string();

    let from: Vec<(&str, String)> = vec![
        ("outside host", lab.outside.clone()),
        ("another host", lab.hosts[1].name.clone()),
        ("the same host", lab.hosts[0].name.clone()),
        ("a container on the same host", peer_ns.clone()),
        ("a container on another host", remote_ns.clone()),
        ("the container itself (hairpin)", web_ns.clone()),
    ];
    for (what, ns) in &from {
        assert!(ask(ns, &host_ip, 8080, false).is_some(), "tcp from {what}");
        assert!(ask(ns, &host_ip, 5353, true).is_some(), "udp from {what}");
    }

    // A taken host port is refused cleanly.
    let mut client = lab.client(0).await.unwrap();
    let status = client
        .attach(pb::AttachRequest {
            container_id: "thief".into(),
            ports: vec![pb::PortMapping {
                protocol: "tcp".into(),
                host_port: 8080,
                container_port: 80,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    let keys = lab.etcd_keys().unwrap();
    assert!(
        !keys.keys().any(|k| k.contains("thief")),
        "no record of the refused attach"
    );
    assert!(!keys.values().any(|v| v.contains("thief")));
    assert!(!lab
        .container_namespaces()
        .iter()
        .any(|n| n.ends_with("-thief")));
    let links = sh::run("ip", &["-n", &lab.hosts[0].name, "-o", "link"]).unwrap();
    let veths = links.lines().filter(|l| l.contains(": weft")).count();
    assert_eq!(veths, 2, "only web and neighbour: {links}");

    // Detach removes the DNAT rules and the reservation.
    lab.ctl_json(0, &["detach", "web"]).unwrap();
    let rules = nat_rules(&lab.hosts[0].name);
    assert!(!rules.contains("--dport 8080"), "{rules}");
    assert!(!rules.contains("--dport 5353"), "{rules}");
    assert!(ask_tries(&lab.outside, &host_ip, 8080, false, 1).is_none());
    assert!(!lab
        .etcd_keys()
        .unwrap()
        .keys()
        .any(|k| k.contains("/ports/")));
    // The port is free again.
    lab.ctl_json(0, &["attach", "heir", "-p", "8080:80"])
        .unwrap();
}

#[test]
fn rules_are_restored_foreign_rules_survive_and_stale_rules_go_at_start() {
    let mut lab = lab_with_forward_drop(&[]);
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    let h1 = lab.hosts[0].name.clone();
    let ipt = |args: &[&str]| {
        let mut all = vec!["netns", "exec", h1.as_str(), "iptables"];
        all.extend_from_slice(args);
        sh::run("ip", &all).unwrap()
    };
    // Foreign rules and a foreign chain.
    ipt(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "192.0.2.0/24",
        "-j",
        "RETURN",
    ]);
    ipt(&["-t", "nat", "-N", "FOREIGN"]);
    ipt(&[
        "-t",
        "nat",
        "-A",
        "FOREIGN",
        "-d",
        "192.0.2.1/32",
        "-j",
        "RETURN",
    ]);
    ipt(&["-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "ACCEPT"]);

    // Delete our DNAT rule and the POSTROUTING and FORWARD jumps behind the agent's back.
    ipt(&["-t", "nat", "-F", "WEFT-PORTS"]);
    let postrouting = nat_rules(&h1)
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING") && l.ends_with("-j WEFT-POSTROUTING"))
        .unwrap()
        .to_string();
    let mut delete: Vec<String> = postrouting.split_whitespace().map(String::from).collect();
    delete[0] = "-D".into();
    let mut args = vec!["-t", "nat"];
    args.extend(delete.iter().map(String::as_str));
    // iptables-save quotes comments; pass the comment unquoted as one argument.
    let line = args.join(" ");
    sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &h1,
            "sh",
            "-c",
            &format!("iptables {line}"),
        ],
    )
    .unwrap();
    assert!(!nat_rules(&h1).contains("-j WEFT-POSTROUTING"));
    let took = lab
        .eventually("rules restored", Duration::from_secs(10), || {
            let rules = nat_rules(&h1);
            rules.contains("--dport 8080") && rules.contains("-j WEFT-POSTROUTING")
        })
        .unwrap();
    eprintln!("rules restored after {took:?}");

    // Stopping the agent removes nothing; a stale rule planted meanwhile goes at start.
    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    assert!(
        nat_rules(&h1).contains("--dport 8080"),
        "stop must leave rules in place"
    );
    ipt(&[
        "-t",
        "nat",
        "-A",
        "WEFT-PORTS",
        "-p",
        "tcp",
        "--dport",
        "9999",
        "-j",
        "DNAT",
        "--to-destination",
        "10.65.0.250:80",
    ]);
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    lab.eventually("stale rule removed", Duration::from_secs(10), || {
        !nat_rules(&h1).contains("--dport 9999")
    })
    .unwrap();
    let rules = nat_rules(&h1);
    assert!(rules.contains("--dport 8080"), "{rules}");
    assert!(
        rules.contains("-A POSTROUTING -s 192.0.2.0/24 -j RETURN"),
        "{rules}"
    );
    assert!(
        rules.contains("-A FOREIGN -d 192.0.2.1/32 -j RETURN"),
        "{rules}"
    );
    let filter = sh::run(
        "ip",
        &["netns", "exec", &h1, "iptables-save", "-t", "filter"],
    )
    .unwrap();
    assert!(
        filter.contains("-A FORWARD -s 192.0.2.0/24 -j ACCEPT"),
        "{filter}"
    );
    assert_eq!(
        rules.matches("-j WEFT-POSTROUTING").count(),
        1,
        "jumps are never duplicated: {rules}"
    );
}

#[test]
fn rendered_rules_match_what_iptables_prints_so_resyncs_write_nothing() {
    use weft_agent::firewall::iptables::Iptables;
    use weft_agent::firewall::{Backend, FirewallSpec, PoolRule, PortRule, SyncMode};
    use weft_agent::model::{ContainerId, Protocol};
    weft_tests::require_root();
    let ns = format!("wfw{}", std::process::id());
    sh::run("ip", &["netns", "add", &ns]).unwrap();
    let path = format!("/run/netns/{ns}");
    // iptables runs as a child of this thread, so it inherits the thread's namespace.
    let result = std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let spec = FirewallSpec {
            pools: vec![
                PoolRule {
                    name: "default".into(),
                    cidr: "10.65.0.0/16".parse().unwrap(),
                    nat_outgoing: true,
                },
                PoolRule {
                    name: "quiet".into(),
                    cidr: "10.66.0.0/16".parse().unwrap(),
                    nat_outgoing: false,
                },
            ],
            ports: vec![
                PortRule {
                    container_id: ContainerId::new("web").unwrap(),
                    ip: "10.65.0.5".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    host_port: 8080,
                    container_port: 80,
                },
                PortRule {
                    container_id: ContainerId::new("dns").unwrap(),
                    ip: "10.65.0.6".parse().unwrap(),
                    protocol: Protocol::Udp,
                    host_port: 5353,
                    container_port: 53,
                },
            ],
            protected: vec![
                "198.51.100.100:2379".parse().unwrap(),
                "0.0.0.0:9099".parse().unwrap(),
            ],
            vxlan_peers: Some(vec!["198.18.0.2".parse().unwrap()]),
            policy: Default::default(),
        };
        let firewall = Iptables::default();
        let first = firewall.sync(&spec, SyncMode::Verify).unwrap();
        let again = firewall.sync(&spec, SyncMode::Verify).unwrap();
        (first.tables_written, again.tables_written)
    })
    .join();
    sh::run("ip", &["netns", "del", &ns]).unwrap();
    let (first, again) = result.unwrap();
    assert_eq!(
        first, 3,
        "both tables (and policy's chains) written the first time"
    );
    assert_eq!(again, 0, "a verified, unchanged state is not written again");
}
