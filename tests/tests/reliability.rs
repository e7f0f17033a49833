//! Reliability and security: restarts without disruption, etcd outages, dead hosts and leaks,
//! tampering, spoofing, concurrency, hostile input, and access control.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use weft_proto::v1 as pb;
use weft_tests::lab::bin;
use weft_tests::{sh, Lab, LabOptions};

fn lab(options: LabOptions) -> Lab {
    Lab::new(options).expect("lab")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn weft_routes(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "route", "show", "proto", "119"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `weft*` links in service (retired ones, in their own group, are being deleted).
fn weft_links(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "-o", "link", "show", "group", "default"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("weft"))
        .collect()
}

fn iptables_save(ns: &str, table: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "iptables-save", "-t", table]).unwrap()
}

fn sysctl(ns: &str, path: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "cat", path])
        .unwrap()
        .trim()
        .to_string()
}

fn set_sysctl(ns: &str, path: &str, value: &str) {
    sh::run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ],
    )
    .unwrap();
}

/// Checks that host `i` holds exactly what its endpoints need: one veth and one /32 route per
/// endpoint, one blackhole per local block, no duplicated rule or jump.
fn assert_host_consistent(lab: &Lab, i: usize) {
    let ns = &lab.hosts[i].name;
    let endpoints = lab.ctl_json(i, &["ls"]).unwrap();
    let endpoints = endpoints.as_array().unwrap();
    let mut links = weft_links(ns);
    links.sort();
    let mut wanted: Vec<String> = endpoints
        .iter()
        .map(|e| e["host_ifname"].as_str().unwrap().to_string())
        .collect();
    wanted.sort();
    assert_eq!(links, wanted, "links of {ns}");
    let routes = weft_routes(ns);
    for e in endpoints {
        let ip = e["ip"].as_str().unwrap();
        let n = routes
            .iter()
            .filter(|r| r.starts_with(&format!("{ip} dev ")))
            .count();
        assert_eq!(n, 1, "one route for {ip} on {ns}: {routes:?}");
    }
    let status = lab.status(i).unwrap();
    let blocks = status["local_blocks"].as_array().unwrap();
    let blackholes = routes.iter().filter(|r| r.starts_with("blackhole")).count();
    assert_eq!(blackholes, blocks.len(), "{routes:?}");
    let nat = iptables_save(ns, "nat");
    for jump in ["-j WEFT-POSTROUTING", "-j WEFT-PORTS"] {
        let n = nat
            .lines()
            .filter(|l| !l.starts_with("-A WEFT") && l.ends_with(jump))
            .count();
        let expected = if jump == "-j WEFT-PORTS" { 2 } else { 1 };
        assert_eq!(n, expected, "jumps {jump} on {ns}: {nat}");
    }
    let filter = iptables_save(ns, "filter");
    assert_eq!(filter.matches("-j WEFT-FORWARD").count(), 1, "{filter}");
    let mut rules: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A WEFT")).collect();
    let all = rules.len();
    rules.sort();
    rules.dedup();
    assert_eq!(rules.len(), all, "duplicated rules on {ns}: {nat}");
}

/// Checks etcd: endpoint records and ips/ keys agree one to one, and no address or block is
/// held twice.
fn assert_etcd_consistent(lab: &Lab) -> BTreeMap<String, String> {
    let keys = lab.etcd_keys().unwrap();
    let mut endpoint_ips = vec![];
    let mut ip_keys = HashSet::new();
    for (key, value) in &keys {
        if key.contains("/endpoints/") {
            let record: serde_json::Value = serde_json::from_str(value).unwrap();
            endpoint_ips.push(record["ip"].as_str().unwrap().to_string());
        } else if let Some(ip) = key.split("/ips/").nth(1) {
            ip_keys.insert(ip.to_string());
        }
    }
    let unique: HashSet<&String> = endpoint_ips.iter().collect();
    assert_eq!(
        unique.len(),
        endpoint_ips.len(),
        "an address handed out twice"
    );
    let endpoint_set: HashSet<String> = endpoint_ips.into_iter().collect();
    assert_eq!(
        endpoint_set, ip_keys,
        "endpoint records and ips/ keys disagree"
    );
    keys
}

/// `count` pings every 10 ms in the background; `finish` waits for the last reply and returns
/// (sent, received). Ping stops by itself, so no request is cut off in flight.
struct Pinger(std::process::Child);

impl Pinger {
    fn start(ns: &str, target: &str, count: u32) -> Self {
        let count = count.to_string();
        let child = sh::command_in_ns(ns, "ping")
            .unwrap()
            .args(["-i", "0.01", "-W", "2", "-q", "-c", &count, target])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Pinger(child)
    }

    fn finish(self) -> (u64, u64) {
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, ..."
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("");
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        (
            numbers.first().copied().unwrap_or(0),
            numbers.get(1).copied().unwrap_or(0),
        )
    }
}

#[test]
fn agent_restarts_lose_no_packet_and_leave_exact_state() {
    let mut lab = lab(LabOptions::default());
    // 50 containers over 3 hosts, one of them with a published port.
    let mut containers = vec![];
    for i in 0..50 {
        containers.push(lab.attach(i % 3, &format!("c{i:02}")).unwrap());
    }
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    let (src_ns, _) = &containers[0]; // on h1
    let (_, dst_ip) = &containers[1]; // on h2
    lab.eventually("cross-host path", Duration::from_secs(10), || {
        sh::ping(src_ns, dst_ip)
    })
    .unwrap();

    // 800 pings: about 8 s, longer than the three restarts below.
    let pinger = Pinger::start(src_ns, dst_ip, 800);
    std::thread::sleep(Duration::from_millis(500));
    for (host, signal) in [
        (0, Signal::SIGKILL),
        (1, Signal::SIGKILL),
        (0, Signal::SIGTERM),
    ] {
        lab.stop_agent(host, signal).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        lab.start_agent(host).unwrap();
        lab.wait_agent(host, Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    let (sent, received) = pinger.finish();
    eprintln!("restart under load: {sent} pings sent, {received} received");
    assert_eq!(sent, 800, "the pinger ran to the end");
    assert_eq!(sent, received, "no ping may be lost across agent restarts");

    for i in 0..3 {
        assert_host_consistent(&lab, i);
    }
    let keys = assert_etcd_consistent(&lab);
    let endpoints = keys.keys().filter(|k| k.contains("/endpoints/")).count();
    assert_eq!(endpoints, 51);
    // Attach works again after the restarts.
    let (ns, ip) = lab.attach(0, "after").unwrap();
    assert!(sh::ping(&ns, dst_ip));
    assert!(sh::ping(&containers[2].0, &ip));
}

#[tokio::test]
async fn an_etcd_outage_keeps_traffic_fails_attach_fast_and_catches_up_after() {
    let mut lab = lab(LabOptions::default());
    let (ns1, ip1) = lab.attach(0, "a").unwrap();
    let (ns2, ip2) = lab.attach(1, "b").unwrap();
    let (_, ip3) = lab.attach(2, "c").unwrap();
    // Every path used below, the pinged one included: a ping only counts once its reply route
    // is in place too.
    lab.eventually("fabric up", Duration::from_secs(10), || {
        sh::ping(&ns1, &ip3) && sh::ping(&ns1, &ip2)
    })
    .unwrap();

    let outage = Instant::now();
    lab.etcd[0].stop();
    // 3,000 pings: about 30 s, the length of the outage.
    let pinger = Pinger::start(&ns1, &ip2, 3000);
    let mut client = lab.client(0).await.unwrap();
    let started = Instant::now();
    let status = client
        .attach(pb::AttachRequest {
            container_id: "during-outage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "attach during the outage failed after {took:?}: {}",
        status.message()
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took <= Duration::from_secs(5),
        "attach must fail within 5s, took {took:?}"
    );
    assert_eq!(
        weft_links(&lab.hosts[0].name).len(),
        1,
        "nothing left by the failed attach"
    );
    assert!(!lab
        .container_namespaces()
        .iter()
        .any(|n| n.ends_with("during-outage")));
    let status = lab.status(0).unwrap();
    assert_eq!(status["etcd_connected"], false);

    // Hold the outage for (at least) 30 s while traffic keeps flowing.
    let (sent, received) = pinger.finish();
    while outage.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("during a 30 s etcd outage: {sent} pings sent, {received} received");
    assert!(
        sent == 3000 && sent == received,
        "traffic must not notice etcd: {sent}/{received}"
    );
    assert!(sh::ping(&ns2, &ip1) && sh::ping(&ns2, &ip3));

    lab.etcd[0].restart().unwrap();
    // h1 comes back: registered and alive again, and attach works.
    let h1 = lab.hosts[0].name.clone();
    lab.eventually("h1 alive again", Duration::from_secs(20), || {
        lab.etcd_keys()
            .unwrap()
            .keys()
            .any(|k| k.ends_with(&format!("/alive/{h1}")))
    })
    .unwrap();
    lab.eventually("attach works again", Duration::from_secs(20), || {
        lab.ctl(0, &["attach", "after-outage"])
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .unwrap();

    // Catch-up: cut h1 off etcd, remove h3 meanwhile, reconnect: h1 drops h3's routes.
    // Both directions: etcd's watch events must not get in either.
    let router = weft_tests::lab::ROUTER_IP;
    let cuts = [
        ["OUTPUT", "-d", router, "--dport"],
        ["INPUT", "-s", router, "--sport"],
    ];
    let ipt = |op: &str| {
        for [chain, addr_flag, addr, port_flag] in cuts {
            let all = [
                "netns",
                "exec",
                h1.as_str(),
                "iptables",
                op,
                chain,
                "-p",
                "tcp",
                addr_flag,
                addr,
                port_flag,
                "2379",
                "-j",
                "DROP",
            ];
            sh::run("ip", &all).unwrap();
        }
    };
    ipt("-I");
    lab.stop_agent(2, Signal::SIGKILL).unwrap();
    let weftctl = bin("weftctl");
    let h3 = lab.hosts[2].name.clone();
    let mut remove = vec![weftctl.to_str().unwrap(), "host", "remove", &h3];
    let etcd_args = lab.etcd_client_args();
    remove.extend(etcd_args.iter().map(String::as_str));
    let out = sh::in_ns(&lab.hosts[1].name, &remove).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cut off (packets dropped, not refused), an attach still fails within the bound.
    let started = Instant::now();
    let cut_off = lab.ctl(0, &["attach", "while-cut-off"]).unwrap();
    let took = started.elapsed();
    eprintln!("attach with etcd unreachable (dropped packets) failed after {took:?}");
    assert_eq!(cut_off.status.code(), Some(6), "UNAVAILABLE");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    std::thread::sleep(Duration::from_secs(3));
    let via_h3 = format!("via {}", lab.hosts[2].ip);
    assert!(
        weft_routes(&h1).iter().any(|r| r.contains(&via_h3)),
        "cut off from etcd, h1 keeps what it knew"
    );
    ipt("-D");
    let took = lab
        .eventually("h1 drops h3's routes", Duration::from_secs(30), || {
            !weft_routes(&h1).iter().any(|r| r.contains(&via_h3))
        })
        .unwrap();
    eprintln!("caught up {took:?} after reconnecting");
}

#[test]
fn an_agent_started_while_etcd_is_down_waits_for_it() {
    let mut lab = lab(LabOptions {
        hosts: 1,
        start_agents: false,
        ..Default::default()
    });
    lab.etcd[0].stop();
    lab.start_agent(0).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.agent_running(0),
        "the agent must wait, not exit:\n{}",
        lab.agent_log(0)
    );
    assert!(
        lab.agent_log(0).contains("waiting for it"),
        "{}",
        lab.agent_log(0)
    );
    lab.etcd[0].restart().unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let (ns, _) = lab.attach(0, "after-wait").unwrap();
    assert!(sh::ping(&ns, &lab.hosts[0].ip.to_string()));
}

#[test]
fn one_member_of_a_three_member_etcd_cluster_down_disturbs_nobody() {
    let mut lab = lab(LabOptions {
        etcd_members: 3,
        ..Default::default()
    });
    let (ns1, _) = lab.attach(0, "a").unwrap();
    // The leader, so that the cluster has to elect a new one while the agents carry on: requests
    // meanwhile get "leader changed" or "no leader", and the agents must wait that out.
    let leader = (0..3)
        .find(|&i| lab.etcd[i].is_leader().unwrap())
        .expect("a leader");
    lab.etcd[leader].stop();
    let started = Instant::now();
    let (_, ip2) = lab.attach(1, "b").unwrap();
    let (ns3, ip3) = lab.attach(2, "c").unwrap();
    eprintln!(
        "two attaches with a member down took {:?}",
        started.elapsed()
    );
    lab.eventually("new containers reachable", Duration::from_secs(15), || {
        sh::ping(&ns1, &ip2) && sh::ping(&ns1, &ip3) && sh::ping(&ns3, &ip2)
    })
    .unwrap();
    for i in 0..3 {
        let status = lab.status(i).unwrap();
        assert_eq!(status["etcd_connected"], true, "host {i}: {status}");
        assert!(status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["alive"] == true));
    }
    lab.etcd[leader].restart().unwrap();
}

#[test]
fn dead_hosts_are_removed_when_asked_and_leaks_are_collected() {
    let mut lab = lab(LabOptions {
        agent_args: args(&["--remove-dead-hosts-after", "5s"]),
        ..Default::default()
    });
    let (ns1, _) = lab.attach(0, "a").unwrap();
    let (_, ip3) = lab.attach(2, "c").unwrap();
    let h1 = lab.hosts[0].name.clone();

    // An endpoint whose namespace is deleted behind the agent's back is released.
    let (leaky_ns, leaky_ip) = lab.attach(0, "leaky").unwrap();
    sh::run("ip", &["netns", "del", &leaky_ns]).unwrap();
    let took = lab
        .eventually("leaked endpoint released", Duration::from_secs(20), || {
            !lab.etcd_keys()
                .unwrap()
                .keys()
                .any(|k| k.ends_with(&format!("/ips/{leaky_ip}")))
        })
        .unwrap();
    eprintln!("vanished endpoint released after {took:?}");
    assert!(lab.ctl(0, &["get", "leaky"]).unwrap().status.code() == Some(3));

    // A weft* link with no endpoint behind it is removed after a grace period.
    sh::run(
        "ip",
        &[
            "-n",
            &h1,
            "link",
            "add",
            "weftdeadbeef01",
            "type",
            "veth",
            "peer",
            "name",
            "strayp",
        ],
    )
    .unwrap();
    let took = lab
        .eventually("orphan link removed", Duration::from_secs(20), || {
            !weft_links(&h1).contains(&"weftdeadbeef01".to_string())
        })
        .unwrap();
    eprintln!("orphan link removed after {took:?}");
    assert_host_consistent(&lab, 0);

    // A dead host keeps its routes for a while, then is removed automatically.
    lab.stop_agent(2, Signal::SIGKILL).unwrap();
    let via_h3 = format!("via {}", lab.hosts[2].ip);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        weft_routes(&h1).iter().any(|r| r.contains(&via_h3)),
        "kept while merely down"
    );
    assert!(sh::ping(&ns1, &ip3));
    let took = lab
        .eventually("dead host removed", Duration::from_secs(30), || {
            !weft_routes(&h1).iter().any(|r| r.contains(&via_h3))
        })
        .unwrap();
    eprintln!("dead host removed {took:?} after its TTL ran out");
    let h3 = lab.hosts[2].name.clone();
    assert!(!lab
        .etcd_keys()
        .unwrap()
        .iter()
        .any(|(k, v)| k.contains(&h3) || v.contains(&h3)));
}

#[test]
fn tampering_is_repaired() {
    // A long resync interval shows which repairs are event-driven.
    let lab = lab(LabOptions {
        agent_args: args(&["--resync-interval", "5s"]),
        ..Default::default()
    });
    let (ns1, ip1) = lab.attach(0, "a").unwrap();
    let (ns2, ip2) = lab.attach(1, "b").unwrap();
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    lab.eventually("fabric up", Duration::from_secs(10), || {
        sh::ping(&ns1, &ip2)
    })
    .unwrap();
    let h1 = lab.hosts[0].name.clone();

    // A deleted peer route and a deleted container route: repaired by netlink events.
    let peer_route = weft_routes(&h1)
        .into_iter()
        .find(|r| r.contains(" via "))
        .unwrap();
    let dst = peer_route.split_whitespace().next().unwrap().to_string();
    sh::run("ip", &["-n", &h1, "route", "del", &dst]).unwrap();
    let took = lab
        .eventually("peer route back", Duration::from_secs(1), || {
            weft_routes(&h1)
                .iter()
                .any(|r| r.starts_with(&format!("{dst} ")))
        })
        .unwrap();
    eprintln!("peer route restored in {took:?}");
    sh::run("ip", &["-n", &h1, "route", "del", &format!("{ip1}/32")]).unwrap();
    let took = lab
        .eventually("container route back", Duration::from_secs(1), || {
            weft_routes(&h1)
                .iter()
                .any(|r| r.starts_with(&format!("{ip1} dev")))
        })
        .unwrap();
    eprintln!("container route restored in {took:?}");
    assert!(sh::ping(&ns2, &ip1));

    // Flipped sysctls: announced by the kernel (RTM_NEWNETCONF) and put back at once.
    let veth = lab.ctl_json(0, &["get", "a"]).unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let knobs = [
        (
            format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp"),
            "0",
            "1",
        ),
        (
            format!("/proc/sys/net/ipv4/conf/{veth}/rp_filter"),
            "0",
            "1",
        ),
        ("/proc/sys/net/ipv4/ip_forward".to_string(), "0", "1"),
    ];
    for (path, bad, _) in &knobs {
        set_sysctl(&h1, path, bad);
    }
    let took = lab
        .eventually("sysctls back", Duration::from_secs(1), || {
            knobs
                .iter()
                .all(|(path, _, good)| sysctl(&h1, path) == *good)
        })
        .unwrap();
    eprintln!("sysctls restored in {took:?} (resync interval 5s)");

    // proxy_delay is never announced, and neither are deleted rules: the resync restores them.
    let delay = format!("/proc/sys/net/ipv4/neigh/{veth}/proxy_delay");
    set_sysctl(&h1, &delay, "80");
    sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &h1,
            "iptables",
            "-t",
            "nat",
            "-F",
            "WEFT-PORTS",
        ],
    )
    .unwrap();
    sh::run(
        "ip",
        &["netns", "exec", &h1, "iptables", "-F", "WEFT-FORWARD"],
    )
    .unwrap();
    let took = lab
        .eventually("proxy_delay and rules back", Duration::from_secs(8), || {
            sysctl(&h1, &delay) == "0"
                && iptables_save(&h1, "nat").contains("--dport 8080")
                && iptables_save(&h1, "filter").contains("-A WEFT-FORWARD -i weft+")
        })
        .unwrap();
    eprintln!("proxy_delay and iptables restored in {took:?} (resync interval 5s)");
    assert!(sh::ping(&ns2, &ip1));
}

#[test]
fn spoofed_sources_are_dropped() {
    let mut lab = lab(LabOptions::default());
    let (attacker, attacker_ip) = lab.attach(0, "attacker").unwrap();
    let (_, neighbour_ip) = lab.attach(0, "neighbour").unwrap();
    let (remote_ns, remote_ip) = lab.attach(1, "remote").unwrap();
    let (local_victim_ns, local_victim_ip) = lab.attach(0, "victim").unwrap();
    lab.eventually("fabric up", Duration::from_secs(10), || {
        sh::ping(&attacker, &remote_ip)
    })
    .unwrap();
    let echo = bin("weft-echo");
    let logs: Vec<(String, std::path::PathBuf)> = vec![
        (remote_ns.clone(), lab.dir.join("remote.log")),
        (local_victim_ns.clone(), lab.dir.join("victim.log")),
        (lab.hosts[1].name.clone(), lab.dir.join("h2.log")),
    ];
    for (ns, log) in &logs {
        lab.spawn_logged(ns, echo.to_str().unwrap(), &["7000"], Some(log))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let targets = [
        remote_ip.clone(),
        local_victim_ip.clone(),
        lab.hosts[1].ip.to_string(),
    ];

    // The legitimate source arrives everywhere (masqueraded to h1's address when it leaves the
    // fabric for a host).
    let h1_ip = lab.hosts[0].ip.to_string();
    let expected = [attacker_ip.clone(), attacker_ip.clone(), h1_ip.clone()];
    for (target, seen) in targets.iter().zip(&expected) {
        let out = sh::in_ns(&attacker, &["nc", "-n", "-w", "1", target, "7000"]).unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(
            answer.contains(&format!("peer={seen}:")),
            "to {target}: {answer}"
        );
    }

    // Forged sources: a neighbour's address, an unused address of our block, another host's
    // container, and an address outside every pool.
    let unused = {
        let mut octets: Vec<u8> = attacker_ip.split('.').map(|o| o.parse().unwrap()).collect();
        octets[3] += 40;
        octets
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(".")
    };
    let forged = [
        neighbour_ip.clone(),
        unused,
        remote_ip.clone(),
        "192.0.2.77".to_string(),
    ];
    let mut attempts = vec![];
    for source in &forged {
        sh::run(
            "ip",
            &[
                "-n",
                &attacker,
                "addr",
                "add",
                &format!("{source}/32"),
                "dev",
                "eth0",
            ],
        )
        .unwrap();
        for target in targets.iter().filter(|t| *t != source) {
            attempts.push(format!(
                "(echo x | nc -u -n -w 1 -s {source} {target} 7000) & \
                 nc -n -w 1 -s {source} {target} 7000 & \
                 ping -q -c 1 -W 1 -I {source} {target} &"
            ));
        }
    }
    // All at once: each forged attempt can only time out.
    let script = format!("{}\nwait", attempts.join("\n"));
    let _ = sh::in_ns(&attacker, &["sh", "-c", &script]);
    std::thread::sleep(Duration::from_millis(500));
    for ((ns, log), seen) in logs.iter().zip(&expected) {
        let text = std::fs::read_to_string(log).unwrap();
        for source in &forged {
            assert!(
                !text.contains(&format!(" {source}:")),
                "forged source {source} was delivered to {ns}: {text}"
            );
        }
        // Only the one legitimate connection arrived: forged packets were not masqueraded
        // into legitimate-looking ones either.
        let arrivals = text.lines().count();
        assert_eq!(arrivals, 1, "{ns} got {arrivals} arrivals: {text}");
        assert!(
            text.contains(&format!(" {seen}:")),
            "legitimate traffic reached {ns}: {text}"
        );
    }
}

#[tokio::test]
async fn concurrent_attaches_on_three_hosts_never_share_an_address_or_block() {
    // Small blocks: many claims, so hosts race for blocks as well as addresses.
    let lab = lab(LabOptions {
        agent_args: args(&["--block-size", "28"]),
        ..Default::default()
    });
    let started = Instant::now();
    let mut tasks = vec![];
    for host in 0..3 {
        for worker in 0..10 {
            let client = lab.client(host).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut client = client;
                let mut endpoints = vec![];
                for n in 0..10 {
                    let id = format!("h{host}-w{worker}-{n}");
                    let response = client
                        .attach(pb::AttachRequest {
                            container_id: id.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap_or_else(|e| panic!("attach {id}: {e:?}"));
                    endpoints.push(response.into_inner().endpoint.unwrap());
                }
                endpoints
            }));
        }
    }
    let mut endpoints = vec![];
    for task in tasks {
        endpoints.extend(task.await.unwrap());
    }
    eprintln!(
        "300 concurrent attaches on 3 hosts took {:?}",
        started.elapsed()
    );
    assert_eq!(endpoints.len(), 300);
    let ips: HashSet<&str> = endpoints.iter().map(|e| e.ip.as_str()).collect();
    assert_eq!(ips.len(), 300, "an address was handed out twice");

    // etcd: every block has one owner, and each address sits in a block of its own host.
    let keys = assert_etcd_consistent(&lab);
    let blocks: Vec<(ipnetwork_free::Net, String)> = keys
        .iter()
        .filter_map(|(k, v)| {
            let block = k.split("/blocks/").nth(1)?.split('/').nth(1)?;
            let owner: serde_json::Value = serde_json::from_str(v).ok()?;
            Some((
                ipnetwork_free::Net::parse(block)?,
                owner["host"].as_str()?.to_string(),
            ))
        })
        .collect();
    for e in &endpoints {
        let ip: std::net::Ipv4Addr = e.ip.parse().unwrap();
        let owners: Vec<&String> = blocks
            .iter()
            .filter(|(b, _)| b.contains(ip))
            .map(|(_, h)| h)
            .collect();
        assert_eq!(owners, vec![&e.host], "block of {ip}");
    }
    // Kernels: the addresses inside the containers are the ones recorded, each once.
    let mut seen = HashSet::new();
    for e in &endpoints {
        let ns = e.netns.rsplit('/').next().unwrap();
        let addr = sh::run("ip", &["-n", ns, "-4", "-o", "addr", "show", "eth0"]).unwrap();
        assert!(addr.contains(&format!("{}/32", e.ip)), "{addr}");
        assert!(seen.insert(e.ip.clone()));
    }
    // Every container is reachable: one container on each host pings all of them.
    let sources: Vec<&pb::Endpoint> = (0..3)
        .map(|h| {
            endpoints
                .iter()
                .find(|e| e.host == lab.hosts[h].name)
                .unwrap()
        })
        .collect();
    let mut unreachable = vec![];
    for (i, e) in endpoints.iter().enumerate() {
        let from = sources[i % 3].netns.rsplit('/').next().unwrap();
        if !sh::ping(from, &e.ip) {
            unreachable.push(e.ip.clone());
        }
    }
    assert!(unreachable.is_empty(), "unreachable: {unreachable:?}");
}

/// A tiny CIDR type for the test (the lab crate does not depend on ipnetwork).
mod ipnetwork_free {
    use std::net::Ipv4Addr;

    pub struct Net(u32, u32);

    impl Net {
        /// Parses `a.b.c.d-len` as stored in block keys.
        pub fn parse(text: &str) -> Option<Self> {
            let (addr, len) = text.split_once('-')?;
            let addr: Ipv4Addr = addr.parse().ok()?;
            let len: u32 = len.parse().ok()?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some(Net(u32::from(addr) & mask, mask))
        }

        pub fn contains(&self, ip: Ipv4Addr) -> bool {
            u32::from(ip) & self.1 == self.0
        }
    }
}

#[tokio::test]
async fn hostile_requests_get_the_right_code_and_leave_nothing() {
    let lab = lab(LabOptions {
        hosts: 1,
        ..Default::default()
    });
    let ns = lab.hosts[0].name.clone();
    let busy = format!("{}-busy", lab.prefix);
    sh::run("ip", &["netns", "add", &busy]).unwrap();
    sh::run(
        "ip",
        &[
            "-n", &busy, "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
        ],
    )
    .unwrap();
    let file = lab.dir.join("not-a-netns");
    std::fs::write(&file, "x").unwrap();
    let file = file.to_str().unwrap().to_string();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let busy_path = format!("/run/netns/{busy}");

    let req = |id: &str, netns: &str, pid: Option<u32>, ifname: &str| pb::AttachRequest {
        container_id: id.into(),
        netns: netns.into(),
        pid,
        ifname: ifname.into(),
        ..Default::default()
    };
    let with_ports = |ports: Vec<(&str, u32, u32)>| pb::AttachRequest {
        container_id: "ported".into(),
        ports: ports
            .into_iter()
            .map(|(protocol, host_port, container_port)| pb::PortMapping {
                protocol: protocol.into(),
                host_port,
                container_port,
            })
            .collect(),
        ..Default::default()
    };
    use tonic::Code::{InvalidArgument, OutOfRange};
    let long_id = "x".repeat(65);
    let huge_id = "y".repeat(100_000);
    let cases: Vec<(&str, pb::AttachRequest, tonic::Code)> = vec![
        ("empty id", req("", "", None, ""), InvalidArgument),
        ("over-long id", req(&long_id, "", None, ""), InvalidArgument),
        (
            "unicode id",
            req("контейнер", "", None, ""),
            InvalidArgument,
        ),
        ("path id", req("../etc", "", None, ""), InvalidArgument),
        ("slash id", req("a/b", "", None, ""), InvalidArgument),
        ("NUL id", req("a\0b", "", None, ""), InvalidArgument),
        ("space id", req("a b", "", None, ""), InvalidArgument),
        ("leading space id", req(" a", "", None, ""), InvalidArgument),
        ("newline id", req("a\n", "", None, ""), InvalidArgument),
        (
            "regular file netns",
            req("c", &file, None, ""),
            InvalidArgument,
        ),
        (
            "directory netns",
            req("c", "/run", None, ""),
            InvalidArgument,
        ),
        (
            "mount namespace",
            req("c", "/proc/self/ns/mnt", None, ""),
            InvalidArgument,
        ),
        (
            "missing netns",
            req("c", "/run/netns/nope-nope", None, ""),
            InvalidArgument,
        ),
        (
            "relative netns",
            req("c", "run/netns/x", None, ""),
            InvalidArgument,
        ),
        (
            "NUL in netns",
            req("c", "/run/netns/a\0b", None, ""),
            InvalidArgument,
        ),
        (
            "agent's own netns",
            req("c", "/proc/self/ns/net", None, ""),
            InvalidArgument,
        ),
        (
            "machine's netns",
            req("c", "/proc/1/ns/net", None, ""),
            InvalidArgument,
        ),
        (
            "dead pid",
            req("c", "", Some(dead_pid), ""),
            InvalidArgument,
        ),
        ("pid 0", req("c", "", Some(0), ""), InvalidArgument),
        (
            "netns and pid",
            req("c", &busy_path, Some(1), ""),
            InvalidArgument,
        ),
        (
            "ifname too long",
            req("c", "", None, "abcdefghijklmnop"),
            InvalidArgument,
        ),
        (
            "ifname with slash",
            req("c", "", None, "a/b"),
            InvalidArgument,
        ),
        ("ifname lo", req("c", "", None, "lo"), InvalidArgument),
        (
            "ifname present",
            req("c", &busy_path, None, "eth0"),
            InvalidArgument,
        ),
        ("port 0", with_ports(vec![("tcp", 0, 80)]), InvalidArgument),
        (
            "port 65536",
            with_ports(vec![("tcp", 65536, 80)]),
            InvalidArgument,
        ),
        (
            "container port 0",
            with_ports(vec![("udp", 53, 0)]),
            InvalidArgument,
        ),
        (
            "duplicate mapping",
            with_ports(vec![("tcp", 80, 80), ("", 80, 81)]),
            InvalidArgument,
        ),
        (
            "unknown protocol",
            with_ports(vec![("sctp", 80, 80)]),
            InvalidArgument,
        ),
        ("oversized request", req(&huge_id, "", None, ""), OutOfRange),
    ];
    assert!(cases.len() >= 25);
    let mut client = lab.client(0).await.unwrap();
    for (what, request, code) in cases {
        let status = client.attach(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}: a message");
    }
    let status = client
        .detach(pb::DetachRequest {
            container_id: "../x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), InvalidArgument);

    // Nothing was left behind.
    assert!(weft_links(&ns).is_empty(), "{:?}", weft_links(&ns));
    let keys = lab.etcd_keys().unwrap();
    assert!(!keys
        .keys()
        .any(|k| k.contains("/endpoints/") || k.contains("/ips/")));
    assert!(!keys.keys().any(|k| k.contains("/ports/")));
    assert!(lab.container_namespaces().is_empty());
    let busy_links = sh::run("ip", &["-n", &busy, "-o", "link"]).unwrap();
    assert_eq!(
        busy_links.lines().count(),
        3,
        "busy netns untouched: {busy_links}"
    );
    sh::run("ip", &["netns", "del", &busy]).unwrap();
    assert!(
        lab.ctl(0, &["status"]).unwrap().status.success(),
        "agent still serving"
    );
}

#[test]
fn malformed_records_in_etcd_are_skipped_not_fatal() {
    let mut lab = lab(LabOptions::default());
    let (ns1, _) = lab.attach(0, "a").unwrap();
    let (_, ip2) = lab.attach(1, "b").unwrap();
    let h1 = lab.hosts[0].name.clone();
    for (key, value) in [
        (
            "/weft/v1/hosts/garbage".to_string(),
            "{not json".to_string(),
        ),
        (
            "/weft/v1/blocks/default/10.65.255.0-26".to_string(),
            "[]".to_string(),
        ),
        (
            "/weft/v1/blocks/default/not-a-block".to_string(),
            "{\"host\":\"x\"}".to_string(),
        ),
        (
            format!("/weft/v1/endpoints/{h1}/junk"),
            "\u{1}\u{2}".to_string(),
        ),
        ("/weft/v1/ips/10.65.0.999".to_string(), "{}".to_string()),
    ] {
        lab.etcd().put(&key, &value).unwrap();
    }
    // The agents keep serving and routing, and a restart reads past the junk.
    std::thread::sleep(Duration::from_secs(1));
    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    lab.attach(0, "after-junk").unwrap();
    assert!(sh::ping(&ns1, &ip2));
    for i in 0..3 {
        assert!(lab.ctl(i, &["status"]).unwrap().status.success());
    }
    let log = lab.agent_log(0);
    assert!(
        log.contains("skipping malformed record"),
        "reported in the log"
    );
}

#[test]
fn the_api_socket_is_root_only_and_etcd_tls_works_without_leaking_secrets() {
    let lab = lab(LabOptions {
        hosts: 2,
        etcd_tls: true,
        ..Default::default()
    });
    let socket = &lab.hosts[0].socket;
    let mode = std::fs::metadata(socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        dir_mode & 0o002,
        0,
        "socket directory must not be world-writable"
    );

    // The agents reached etcd over TLS with client certificates.
    let (ns1, _) = lab.attach(0, "a").unwrap();
    let (_, ip2) = lab.attach(1, "b").unwrap();
    lab.eventually("fabric over TLS etcd", Duration::from_secs(10), || {
        sh::ping(&ns1, &ip2)
    })
    .unwrap();
    // Without a client certificate etcd refuses.
    let tls = lab.etcd_tls.clone().unwrap();
    let url = lab.etcd_endpoints();
    let denied = sh::in_ns(
        &lab.router,
        &[
            "etcdctl",
            "--endpoints",
            &url,
            "--cacert",
            tls.ca.to_str().unwrap(),
            "get",
            "/weft",
        ],
    )
    .unwrap();
    assert!(
        !denied.status.success(),
        "etcd must demand a client certificate"
    );

    // No secret in the logs.
    let key = std::fs::read_to_string(&tls.client_key).unwrap();
    let key_body: String = key.lines().nth(1).unwrap().to_string();
    for i in 0..2 {
        let log = lab.agent_log(i);
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains(&key_body),
            "log {i} leaks the key"
        );
    }
}
