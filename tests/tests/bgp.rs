//! BGP (issue 15), end to end with real bird2 processes: the lab's router is a top-of-rack
//! router in AS 64513 with one eBGP session per host (AS 64512), installing what it learns into
//! its kernel; every agent runs its own bird under the lab's directory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use weft_agent::bgp::render::{render, BirdSpec};
use weft_tests::lab::{bin, OUTSIDE_IP, ROUTER_IP};
use weft_tests::{capture, invariants, sh, Lab, LabOptions};

fn bgp_lab(hosts: usize, agent_args: &[&str]) -> Lab {
    Lab::new(LabOptions {
        hosts,
        bgp: true,
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab")
}

/// What the router should have learned: every block in etcd via its owner's underlay address.
fn expected_routes(lab: &Lab) -> BTreeMap<String, String> {
    let keys = lab.etcd_keys().unwrap();
    let mut routes = BTreeMap::new();
    for (key, value) in &keys {
        let Some(block) = key.strip_prefix("/weft/v1/blocks/default/") else {
            continue;
        };
        let owner: serde_json::Value = serde_json::from_str(value).unwrap();
        let host = owner["host"].as_str().unwrap();
        let ip = lab.hosts.iter().find(|h| h.name == host).unwrap().ip;
        routes.insert(block.replacen('-', "/", 1), ip.to_string());
    }
    routes
}

fn established(lab: &Lab, i: usize) -> bool {
    lab.router_session(i)
        .is_ok_and(|s| s.state == "Established")
}

fn wait_established(lab: &Lab, hosts: usize) {
    for i in 0..hosts {
        lab.eventually("bgp session established", Duration::from_secs(30), || {
            established(lab, i)
        })
        .unwrap();
    }
}

/// A host's session as its agent's Status shows it.
fn agent_session(lab: &Lab, i: usize) -> serde_json::Value {
    lab.status(i).unwrap()["bgp"]["sessions"][0].clone()
}

#[test]
fn rendered_configurations_parse_with_bird() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BirdSpec {
        router_id: "198.51.100.1".parse().unwrap(),
        asn: weft_agent::config::Asn::new(64512).unwrap(),
        hold_time: 9,
        local_v4: Some("198.51.100.1".parse().unwrap()),
        local_v6: None,
        blocks: vec!["10.65.7.0/26".parse().unwrap()],
        peers: vec!["198.51.100.100:64513".parse().unwrap()],
    };
    let mut specs = vec![spec.clone()];
    spec.local_v6 = Some("2001:db8:100::1".parse().unwrap());
    spec.blocks.push("fd00:65::/122".parse().unwrap());
    spec.peers
        .push("[2001:db8:100::100]:64513".parse().unwrap());
    spec.hold_time = 0;
    specs.push(spec.clone());
    spec.blocks.clear();
    specs.push(spec);
    for (n, spec) in specs.iter().enumerate() {
        let path = dir.path().join(format!("bird{n}.conf"));
        std::fs::write(&path, render(spec)).unwrap();
        let out = sh::output("bird", &["-p", "-c", path.to_str().unwrap()]).unwrap();
        assert!(
            out.status.success(),
            "bird rejects:\n{}\n{}",
            render(spec),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_router_learns_exactly_each_hosts_blocks_and_follows_claims_and_releases() {
    // /30 blocks: a few attaches make a host claim another one.
    let lab = bgp_lab(3, &["--block-size", "30"]);
    for i in 0..3 {
        lab.attach(i, &format!("c{}", i + 1)).unwrap();
    }
    wait_established(&lab, 3);
    lab.eventually(
        "router routes = etcd blocks",
        Duration::from_secs(5),
        || lab.router_bgp_routes().unwrap() == expected_routes(&lab),
    )
    .unwrap();
    let routes = lab.router_bgp_routes().unwrap();
    assert_eq!(routes.len(), 3, "one block per host: {routes:?}");
    let all = sh::run("ip", &["-n", &lab.router, "route", "show"]).unwrap();
    assert_eq!(
        all.lines().filter(|l| l.contains("proto bird")).count(),
        3,
        "nothing else learned:\n{all}"
    );

    // A claim: attach until h1 holds a second block; the router must know it within 1 s.
    let before = lab.status(0).unwrap()["local_blocks"]
        .as_array()
        .unwrap()
        .len();
    let mut n = 0;
    let (claim_started, new_block) = loop {
        n += 1;
        let started = Instant::now();
        lab.attach(0, &format!("more{n}")).unwrap();
        let blocks = lab.status(0).unwrap()["local_blocks"].clone();
        if blocks.as_array().unwrap().len() > before {
            let block = blocks
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_string())
                .find(|b| !routes.contains_key(b))
                .unwrap();
            break (started, block);
        }
        assert!(n < 10, "no new block after {n} attaches");
    };
    let h1 = lab.hosts[0].ip.to_string();
    while lab.router_bgp_routes().unwrap().get(&new_block) != Some(&h1) {
        assert!(
            claim_started.elapsed() < Duration::from_secs(1),
            "{new_block} not announced within 1 s of its claim"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "announced {new_block} {:?} after the attach that claimed it started",
        claim_started.elapsed()
    );
    assert_eq!(lab.router_bgp_routes().unwrap(), expected_routes(&lab));

    // A release: the block's containers go, then its claim (what IPAM's release of an empty
    // block does). The router must forget it within 1 s.
    lab.ctl(0, &["detach", &format!("more{n}")]).unwrap();
    let key = format!("/weft/v1/blocks/default/{}", new_block.replace('/', "-"));
    let released = Instant::now();
    lab.etcd_delete(&key).unwrap();
    while lab.router_bgp_routes().unwrap().contains_key(&new_block) {
        assert!(
            released.elapsed() < Duration::from_secs(1),
            "{new_block} still announced 1 s after its release"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "withdrew {new_block} {:?} after its release",
        released.elapsed()
    );
    assert_eq!(lab.router_bgp_routes().unwrap(), expected_routes(&lab));
    // And no session was reset on the way.
    for i in 0..3 {
        assert_eq!(agent_session(&lab, i)["state"], "Established");
    }
}

/// Connects to ip:port over TCP from `ns` and returns what a weft-echo saw as our address.
fn ask(ns: &str, ip: &str, port: u16) -> Option<String> {
    for _ in 0..20 {
        let out = sh::in_ns(ns, &["nc", "-n", "-w", "1", ip, &port.to_string()]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if let Some(peer) = text.strip_prefix("peer=") {
            return peer.rsplit_once(':').map(|(a, _)| a.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn the_outside_reaches_containers_directly_and_sees_their_own_addresses() {
    let mut lab = bgp_lab(2, &[]);
    let (ns, ip) = lab.attach(1, "web").unwrap();
    let echo = bin("weft-echo");
    lab.spawn_in(&ns, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    wait_established(&lab, 2);
    let outside = lab.outside.clone();
    lab.eventually("outside -> container", Duration::from_secs(5), || {
        sh::ping(&outside, &ip)
    })
    .unwrap();
    assert_eq!(
        ask(&outside, &ip, 7000).as_deref(),
        Some(OUTSIDE_IP),
        "the container sees the outside host's real address"
    );
    // With nat-outgoing on, a connection the container opens is still masqueraded.
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7001"])
        .unwrap();
    let host_ip = lab.hosts[1].ip.to_string();
    assert_eq!(ask(&ns, OUTSIDE_IP, 7001), Some(host_ip));
}

#[test]
fn without_nat_outgoing_containers_reach_the_outside_with_their_own_address() {
    let mut lab = bgp_lab(2, &["--nat-outgoing", "false"]);
    let (ns, ip) = lab.attach(0, "client").unwrap();
    let echo = bin("weft-echo");
    let outside = lab.outside.clone();
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    wait_established(&lab, 2);
    lab.eventually("container -> outside", Duration::from_secs(5), || {
        sh::ping(&ns, OUTSIDE_IP)
    })
    .unwrap();
    assert_eq!(ask(&ns, OUTSIDE_IP, 7000), Some(ip));
}

#[test]
fn two_segments_without_encapsulation_are_carried_by_the_routes_the_router_learned() {
    // h1 and h3 on 198.51.100.0/24, h2 and h4 on 198.18.0.0/24, each peering with the router's
    // address on its own segment; no tunnel anywhere: the router forwards pool addresses
    // because BGP told it where every block lives.
    let mut lab = Lab::new(LabOptions {
        hosts: 4,
        subnets: 2,
        bgp: true,
        agent_args: vec!["--encapsulation".into(), "none".into()],
        ..Default::default()
    })
    .expect("lab");
    let containers: Vec<(String, String)> = (0..4)
        .map(|i| lab.attach(i, &format!("c{}", i + 1)).unwrap())
        .collect();
    wait_established(&lab, 4);
    lab.eventually(
        "router routes = etcd blocks",
        Duration::from_secs(5),
        || lab.router_bgp_routes().unwrap() == expected_routes(&lab),
    )
    .unwrap();
    let tunnelled = capture::on_router(&lab, "any", "udp port 4789", 4, || {
        for (from, _) in &containers {
            for (_, to) in &containers {
                assert!(sh::ping(from, to), "{from} reaches {to}");
            }
        }
    });
    assert!(tunnelled.is_empty(), "no VXLAN on the wire: {tunnelled:?}");
    // Inside the fabric nobody is masqueraded: c2 (segment 2) sees c1's own address.
    let echo = bin("weft-echo");
    lab.spawn_in(&containers[1].0, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    assert_eq!(
        ask(&containers[0].0, &containers[1].1, 7000),
        Some(containers[0].1.clone())
    );
    for host in &lab.hosts {
        let link = sh::run("ip", &["-n", &host.name, "link", "show", "weft.vxlan"]);
        assert!(link.is_err(), "{} has no tunnel: {link:?}", host.name);
    }
    let status = lab.status(0).unwrap();
    assert_eq!(status["tunnel_ip"], "", "{status}");
    let mode = |i: usize| {
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["host"] == lab.hosts[i].name.as_str())
            .map(|p| p["mode"].clone())
            .unwrap()
    };
    assert_eq!((mode(1), mode(2)), ("underlay".into(), "direct".into()));
    let covered = invariants::assert_quiet(&lab);
    eprintln!("invariants hold: {covered:?}");
}

/// Sends `count` pings from `ns` to `target`, one every 10 ms; returns (sent, received).
fn ping_flood(ns: &str, target: &str, count: u32) -> (u32, u32) {
    let out = sh::in_ns(
        ns,
        &[
            "ping",
            "-q",
            "-i",
            "0.01",
            "-W",
            "1",
            "-c",
            &count.to_string(),
            target,
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let numbers: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn kill_9_and_restart_of_an_agent_lose_no_ping_and_keep_the_session() {
    let mut lab = bgp_lab(2, &[]);
    let (_, ip) = lab.attach(0, "c1").unwrap();
    wait_established(&lab, 2);
    let outside = lab.outside.clone();
    lab.eventually("outside -> container", Duration::from_secs(5), || {
        sh::ping(&outside, &ip)
    })
    .unwrap();
    let session = lab.router_session(0).unwrap();
    let bird = lab.host_bird_pid(0).expect("h1's bird");

    let pinger = {
        let (outside, ip) = (outside.clone(), ip.clone());
        std::thread::spawn(move || ping_flood(&outside, &ip, 500))
    };
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let (sent, received) = pinger.join().unwrap();
    eprintln!("pings across kill -9 and restart: {received}/{sent}");
    assert_eq!((sent, received), (500, 500), "no ping may be lost");

    assert_eq!(lab.host_bird_pid(0), Some(bird), "bird kept running");
    assert_eq!(
        lab.router_session(0).unwrap(),
        session,
        "the router's session was not reset"
    );
    assert!(lab.agent_log(0).contains("Adopted"), "{}", lab.agent_log(0));
    assert_eq!(agent_session(&lab, 0)["state"], "Established");
    assert_eq!(lab.router_bgp_routes().unwrap(), expected_routes(&lab));
}

#[test]
fn a_stopped_bird_is_withdrawn_within_the_hold_time_and_a_dead_one_started_again() {
    // Two hosts: a top-of-rack router always has other sessions (bird 2.0.12 with one idle
    // session only notices that the NOTIFICATION it sent went out at its next wake-up, up to
    // another hold time later).
    let lab = bgp_lab(2, &["--bgp-hold-time", "3s"]);
    lab.attach(0, "c1").unwrap();
    wait_established(&lab, 2);
    lab.eventually("announced", Duration::from_secs(5), || {
        !lab.router_bgp_routes().unwrap().is_empty()
    })
    .unwrap();

    // A session stopped in its first moments has a NOTIFICATION stuck on the way and stays in
    // bird's Close state for another hold time; a hung bird is one that ran for a while.
    std::thread::sleep(Duration::from_secs(2));
    // A hung bird: the router's hold timer (3 s, as the host offered) withdraws its blocks.
    lab.signal_host_bird(0, Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let withdrawn = lab
        .eventually("withdrawn", Duration::from_secs(10), || {
            lab.router_bgp_routes().unwrap().is_empty()
        })
        .unwrap();
    eprintln!("a stopped bird's routes withdrawn after {withdrawn:?} (hold time 3 s)");
    assert!(
        withdrawn <= Duration::from_millis(3000 + 300),
        "withdrawn after {withdrawn:?} ({:?} since the stop), hold time 3 s",
        stopped.elapsed()
    );
    let status = lab.status(0).unwrap();
    assert_eq!(status["bgp"]["daemon_running"], false, "{status}");
    lab.signal_host_bird(0, Signal::SIGCONT).unwrap();
    wait_established(&lab, 1);

    // A dead bird: the agent starts another one, which announces again.
    let old = lab.host_bird_pid(0).unwrap();
    lab.signal_host_bird(0, Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    lab.eventually("a new bird", Duration::from_secs(10), || {
        lab.host_bird_pid(0).is_some_and(|pid| pid != old)
    })
    .unwrap();
    lab.eventually("announced again", Duration::from_secs(30), || {
        !lab.router_bgp_routes().unwrap().is_empty()
    })
    .unwrap();
    eprintln!(
        "announced again {:?} after bird was killed",
        killed.elapsed()
    );
    assert_eq!(lab.router_bgp_routes().unwrap(), expected_routes(&lab));
}

#[test]
fn a_wrong_peer_asn_is_shown_down_and_the_corrected_one_comes_up_without_restarting_bird() {
    let mut lab = Lab::new(LabOptions {
        hosts: 1,
        bgp: true,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let wrong = format!("{ROUTER_IP}:64999");
    lab.start_agent_with(0, &["--bgp-peer", &wrong]).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let bird = lab.host_bird_pid(0).expect("the agent started bird");
    // Long enough for several connection attempts (connect retry 5 s on the host).
    std::thread::sleep(Duration::from_secs(6));
    let session = agent_session(&lab, 0);
    eprintln!("with the wrong ASN, Status shows {session}");
    assert_eq!(session["address"], ROUTER_IP, "{session}");
    assert_eq!(session["asn"], 64999, "{session}");
    assert_ne!(session["state"], "Established", "{session}");
    assert!(!established(&lab, 0));
    let metrics = http_get(&lab.hosts[0].name, "/metrics");
    assert!(
        metrics.contains("weft_bgp_sessions{state=\"Established\"} 0"),
        "{metrics}"
    );

    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    let corrected = Instant::now();
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    lab.eventually("established", Duration::from_secs(30), || {
        agent_session(&lab, 0)["state"] == "Established"
    })
    .unwrap();
    eprintln!(
        "established {:?} after the corrected start",
        corrected.elapsed()
    );
    assert_eq!(agent_session(&lab, 0)["asn"], 64513);
    assert!(established(&lab, 0));
    assert_eq!(lab.host_bird_pid(0), Some(bird), "bird was not restarted");
    let metrics = http_get(&lab.hosts[0].name, "/metrics");
    assert!(
        metrics.contains("weft_bgp_sessions{state=\"Established\"} 1"),
        "{metrics}"
    );
    let text = String::from_utf8_lossy(&lab.ctl(0, &["status"]).unwrap().stdout).to_string();
    assert!(
        text.contains("198.51.100.100  64513  Established"),
        "{text}"
    );
}

/// GET `path` from the agent's metrics listener (127.0.0.1:9099 inside host namespace `ns`).
fn http_get(ns: &str, path: &str) -> String {
    sh::http_get(ns, 9099, path).unwrap().1
}
