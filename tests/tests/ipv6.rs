//! Dual-stack end to end (issue 14): the lab's IPv6 underlay, IPv6 pools beside IPv4 ones,
//! containers with one address of each family.

use std::time::Duration;

use weft_tests::lab::{OUTSIDE_IP6, ROUTER_IP6};
use weft_tests::{sh, Lab, LabOptions};

#[test]
fn a_dual_stack_lab_carries_ipv6_between_hosts_and_to_the_outside_host() {
    let lab = Lab::new(LabOptions {
        hosts: 3,
        subnets: 2,
        ipv6: true,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let ip6 = |i: usize| {
        lab.hosts[i]
            .ip6
            .expect("an IPv6 underlay address")
            .to_string()
    };
    assert_eq!(ip6(0), "2001:db8:100::1");
    assert_eq!(ip6(1), "2001:db8:118::2", "the second segment");
    for (i, host) in lab.hosts.iter().enumerate() {
        for target in [ROUTER_IP6, OUTSIDE_IP6, &ip6((i + 1) % 3)] {
            // The router's first forwarded packet may wait for neighbour discovery: allow a moment.
            lab.eventually(
                &format!("{} reaching {target}", host.name),
                Duration::from_secs(5),
                || sh::ping(&host.name, target),
            )
            .unwrap();
        }
        assert!(sh::ping(&host.name, &lab.hosts[(i + 1) % 3].ip.to_string()));
    }
}

#[test]
fn hostile_ipv6_pool_settings_stop_the_agent_at_start_leaving_nothing() {
    let mut lab = Lab::new(LabOptions {
        hosts: 1,
        ipv6: true,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--pool", "10.65.0.0/16,fd65::ff80/124"],
            "/122 blocks do not fit in pool fd65::ff80/124",
        ),
        (&["--pool", "fd65::/48,fd65:0:0:1::/64"], "two IPv6 pools"),
        (&["--pool", "10.65.0.0/16,10.66.0.0/16"], "two IPv4 pools"),
        (
            &["--pool", "10.65.0.0/16,fd65::/48", "--block-size-v6", "115"],
            "/115 is not an IPv6 block size (116 to 128)",
        ),
        (
            &["--pool", "fd65::/48", "--block-size-v6", "129"],
            "/129 is not an IPv6 block size (116 to 128)",
        ),
    ];
    for (args, message) in cases {
        let _ = std::fs::remove_file(&lab.hosts[0].log);
        lab.start_agent_with(0, args).unwrap();
        wait_exit(&mut lab);
        let log = lab.agent_log(0);
        assert!(log.contains(message), "{args:?}: {message:?} not in\n{log}");
        assert_eq!(lab.etcd_keys().unwrap().len(), 0, "{args:?} wrote to etcd");
        let host = &lab.hosts[0].name;
        for family in ["-4", "-6"] {
            let routes = sh::run("ip", &[family, "-n", host, "route", "show", "proto", "119"]);
            assert_eq!(routes.unwrap().trim(), "", "{args:?} left routes");
        }
        let links = sh::run("ip", &["-n", host, "-o", "link"]).unwrap();
        assert!(!links.contains("weft"), "{args:?} left links:\n{links}");
    }
    // Overlapping pools of the two families cannot exist; the same pools in a list can.
    let overlap = "[[pools]]\nname = \"a\"\ncidr = \"fd65::/48\"\n\
                   [[pools]]\nname = \"b\"\ncidr = \"fd65:0:0:1::/64\"\n";
    let file = lab.dir.join("overlap.toml");
    std::fs::write(&file, overlap).unwrap();
    lab.start_agent_with(0, &["--config", file.to_str().unwrap()])
        .unwrap();
    wait_exit(&mut lab);
    assert!(lab.agent_log(0).contains("overlap"), "{}", lab.agent_log(0));
    assert_eq!(lab.etcd_keys().unwrap().len(), 0);
}

/// Waits (10 s at most) for host 0's agent to exit.
fn wait_exit(lab: &mut Lab) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.agent_running(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A container: its namespace, its IPv4 and its IPv6 address (empty when it has none).
struct Container {
    netns: String,
    ip: String,
    ip6: String,
}

fn attach(lab: &Lab, host: usize, id: &str) -> Container {
    let (netns, ip, ip6) = lab.attach_dual(host, id).unwrap();
    assert!(!ip6.is_empty(), "{id} got no IPv6 address");
    Container { netns, ip, ip6 }
}

/// Waits until every container reaches every other one over IPv6 (routes arrive through etcd).
fn wait_ipv6_paths(lab: &Lab, containers: &[Container]) {
    for a in containers {
        for b in containers {
            lab.eventually(
                &format!("{} reaching {}", a.ip6, b.ip6),
                Duration::from_secs(10),
                || sh::ping(&a.netns, &b.ip6),
            )
            .unwrap();
        }
    }
}

/// What a weft-echo service at [ip]:port saw a TCP connection from `ns` come from.
fn source_seen(ns: &str, ip: &str, port: u16) -> Option<String> {
    let out = sh::in_ns(ns, &["nc", "-n", "-w", "2", ip, &port.to_string()]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let peer = text.strip_prefix("peer=")?;
    let (address, _) = peer.rsplit_once(':')?;
    Some(address.trim_matches(['[', ']']).to_string())
}

#[test]
fn dual_stack_containers_reach_each_other_and_the_hosts_over_ipv6_with_their_own_source() {
    let mut lab = Lab::new(LabOptions {
        hosts: 3,
        ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let containers: Vec<Container> = (0..6)
        .map(|i| attach(&lab, i % 3, &format!("c{i}")))
        .collect();
    for c in &containers {
        assert!(c.ip.starts_with("10.65."), "{}", c.ip);
        assert!(c.ip6.starts_with("fd65:"), "{}", c.ip6);
    }
    wait_ipv6_paths(&lab, &containers);
    // Every container reaches every host's IPv6 underlay address, and IPv4 still works.
    for c in &containers {
        for host in &lab.hosts {
            let ip6 = host.ip6.unwrap().to_string();
            assert!(sh::ping(&c.netns, &ip6), "{} -> {ip6}", c.ip6);
        }
        assert!(sh::ping(&c.netns, &containers[1].ip), "{} -> IPv4", c.ip);
    }
    // Across hosts, TCP over IPv6 arrives from the container's own address.
    let echo = weft_tests::lab::bin("weft-echo");
    let server = containers[1].netns.clone();
    lab.spawn_in(&server, echo.to_str().unwrap(), &["7000", "::"])
        .unwrap();
    let (client, target) = (&containers[0], &containers[1].ip6);
    lab.eventually("the echo answers", Duration::from_secs(5), || {
        source_seen(&client.netns, target, 7000).is_some()
    })
    .unwrap();
    assert_eq!(
        source_seen(&client.netns, target, 7000).unwrap(),
        client.ip6
    );
    // The API and weftctl show both families.
    let status = lab.status(0).unwrap();
    assert_eq!(status["underlay_ipv6"], "2001:db8:100::1");
    let peers = status["peers"].as_array().unwrap();
    assert!(peers
        .iter()
        .any(|p| p["underlay_ipv6"] == "2001:db8:100::2"));
    let endpoint = lab.ctl_json(0, &["get", "c0"]).unwrap();
    assert_eq!(endpoint["gateway_v6"], "fe80::ecee:eeff:feee:eeee");
    assert_eq!(endpoint["ipv6"], containers[0].ip6.as_str());
    let check = lab.ctl(0, &["check", "c0"]).unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    weft_tests::invariants::assert_quiet(&lab);
}

#[test]
fn an_ipv6_only_lab_gives_containers_ipv6_only() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        agent_args: vec!["--pool".into(), "fd66::/48".into()],
        ..Default::default()
    })
    .unwrap();
    let (a_ns, a_ip, a_ip6) = lab.attach_dual(0, "a").unwrap();
    let (_, b_ip, b_ip6) = lab.attach_dual(1, "b").unwrap();
    assert_eq!((a_ip.as_str(), b_ip.as_str()), ("", ""));
    assert!(a_ip6.starts_with("fd66:") && b_ip6.starts_with("fd66:"));
    lab.eventually("a reaching b over IPv6", Duration::from_secs(10), || {
        sh::ping(&a_ns, &b_ip6)
    })
    .unwrap();
    let routes = sh::run("ip", &["-n", &lab.hosts[0].name, "-4", "route"]).unwrap();
    assert!(
        !routes.contains("proto 119"),
        "IPv4 routes of weft:\n{routes}"
    );
    weft_tests::invariants::assert_quiet(&lab);
}

/// `count` pings every 10 ms from `ns`; returns (sent, received) once the last reply is due.
fn ping_every_10ms(ns: &str, target: &str, count: u32) -> std::process::Child {
    sh::command_in_ns(ns, "ping")
        .unwrap()
        .args([
            "-i",
            "0.01",
            "-W",
            "2",
            "-q",
            "-c",
            &count.to_string(),
            target,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn sent_and_received(pinger: std::process::Child) -> (u64, u64) {
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn kill_9_and_restart_of_agents_loses_no_ipv6_ping() {
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let containers = [attach(&lab, 0, "a"), attach(&lab, 1, "b")];
    wait_ipv6_paths(&lab, &containers);
    // 600 pings: about 6 s, longer than the kills and restarts below.
    let pinger = ping_every_10ms(&containers[0].netns, &containers[1].ip6, 600);
    std::thread::sleep(Duration::from_millis(500));
    for host in [0, 1] {
        lab.stop_agent(host, nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        lab.start_agent(host).unwrap();
        lab.wait_agent(host, Duration::from_secs(30)).unwrap();
    }
    let (sent, received) = sent_and_received(pinger);
    assert_eq!(
        (sent, received),
        (600, 600),
        "IPv6 pings lost across kill -9"
    );
    // The restarted agents kept every route: containers are still fully wired.
    for (host, id) in [(0, "a"), (1, "b")] {
        let check = lab.ctl(host, &["check", id]).unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    weft_tests::invariants::assert_quiet(&lab);
}

#[test]
fn nat66_masquerades_to_the_outside_and_a_spoofed_ipv6_source_is_dropped() {
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let containers = [attach(&lab, 0, "a"), attach(&lab, 1, "b")];
    wait_ipv6_paths(&lab, &containers);
    // Leaving the fabric, a container's IPv6 traffic takes its host's IPv6 address.
    let echo = weft_tests::lab::bin("weft-echo");
    let outside = lab.outside.clone();
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7000", "::"])
        .unwrap();
    lab.eventually("the outside echo answers", Duration::from_secs(5), || {
        source_seen(&containers[0].netns, OUTSIDE_IP6, 7000).is_some()
    })
    .unwrap();
    let seen = source_seen(&containers[0].netns, OUTSIDE_IP6, 7000).unwrap();
    assert_eq!(seen, "2001:db8:100::1", "NAT66 to the host's address");
    // Inside the fabric the source stays the container's own.
    let server = containers[1].netns.clone();
    lab.spawn_in(&server, echo.to_str().unwrap(), &["7001", "::"])
        .unwrap();
    lab.eventually("b's echo answers", Duration::from_secs(5), || {
        source_seen(&containers[0].netns, &containers[1].ip6, 7001).is_some()
    })
    .unwrap();
    // A container that gives itself another address of the pool and sends from it is dropped
    // on its own host, before routing: nothing arrives at b.
    let forged = "fd65::ffff";
    let ns = &containers[0].netns;
    sh::run(
        "ip",
        &[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{forged}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .unwrap();
    let log = lab.dir.join("echo-b.log");
    lab.spawn_logged(&server, echo.to_str().unwrap(), &["7002", "::"], Some(&log))
        .unwrap();
    // From its own address (given explicitly: the forged one may now be the preferred source).
    let from = |source: &str| {
        let out = sh::in_ns(
            ns,
            &[
                "nc",
                "-n",
                "-w",
                "1",
                "-s",
                source,
                &containers[1].ip6,
                "7002",
            ],
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("peer=")
    };
    let own = containers[0].ip6.clone();
    lab.eventually("b's second echo answers", Duration::from_secs(5), || {
        from(&own)
    })
    .unwrap();
    assert!(
        !from(forged),
        "a connection from the forged source was answered"
    );
    // UDP shows what arrives at all (TCP could not complete without a way back): a datagram
    // from the container's own address arrives, one from the forged address does not.
    let datagram = |source: &str| {
        let send = format!(
            "echo x | nc -u -n -w 1 -s {source} {} 7002",
            containers[1].ip6
        );
        sh::in_ns(ns, &["sh", "-c", &send]).unwrap();
    };
    datagram(&own);
    datagram(forged);
    lab.eventually("the own datagram logged", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&format!("udp [{own}]")))
    })
    .unwrap();
    let arrived = std::fs::read_to_string(&log).unwrap();
    assert!(
        !arrived.contains(forged),
        "the forged source arrived:\n{arrived}"
    );
    let raw = sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.hosts[0].name,
            "ip6tables-save",
            "-t",
            "raw",
        ],
    )
    .unwrap();
    assert!(raw.contains("-A PREROUTING -i weft+"), "{raw}");
    weft_tests::invariants::assert_quiet(&lab);
}

#[test]
fn a_published_port_answers_on_the_hosts_ipv6_address() {
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let web = lab
        .ctl_json(0, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    let ns = web["netns"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let echo = weft_tests::lab::bin("weft-echo");
    lab.spawn_in(&ns, echo.to_str().unwrap(), &["80", "::"])
        .unwrap();
    let host6 = lab.hosts[0].ip6.unwrap().to_string();
    let outside = lab.outside.clone();
    // From the outside host (its own address seen: DNAT only) and from a container on the other
    // host, over IPv6; the IPv4 address keeps working.
    lab.eventually(
        "the port answers on the host's IPv6 address",
        Duration::from_secs(5),
        || source_seen(&outside, &host6, 8080).is_some(),
    )
    .unwrap();
    assert_eq!(source_seen(&outside, &host6, 8080).unwrap(), OUTSIDE_IP6);
    let other = attach(&lab, 1, "client");
    lab.eventually("a container reaches it", Duration::from_secs(5), || {
        source_seen(&other.netns, &host6, 8080).is_some()
    })
    .unwrap();
    let host4 = lab.hosts[0].ip.to_string();
    assert!(
        source_seen(&outside, &host4, 8080).is_some(),
        "IPv4 still published"
    );
    let check = lab.ctl(0, &["check", "web"]).unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Both families' DNAT and hairpin of the port, as the checker expects them.
    weft_tests::invariants::assert_quiet(&lab);
    // Detach removes the IPv6 rules too.
    lab.ctl(0, &["detach", "web"]).unwrap();
    let nat = sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.hosts[0].name,
            "ip6tables-save",
            "-t",
            "nat",
        ],
    )
    .unwrap();
    assert!(!nat.contains("--dport 8080"), "{nat}");
    weft_tests::invariants::assert_quiet(&lab);
}
