//! Hosts on different subnets: VXLAN where it is needed, plain routes where it is not, and the
//! right MTU. Labs of four hosts on two underlay segments (h1 and h3 on 198.51.100.0/24, h2 and h4
//! on 198.18.0.0/24) behind a router that forwards between the segments and knows no pool: a
//! container packet reaching it unencapsulated is lost.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use weft_tests::lab::{OUTSIDE_IP, ROUTER_IP};
use weft_tests::{capture, invariants, sh, Lab, LabOptions};

fn two_segments(hosts: usize, agent_args: &[&str]) -> Lab {
    Lab::new(LabOptions {
        hosts,
        subnets: 2,
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab")
}

/// One container per host: (netns name, ip).
fn one_each(lab: &Lab) -> Vec<(String, String)> {
    (0..lab.hosts.len())
        .map(|i| lab.attach(i, &format!("c{}", i + 1)).unwrap())
        .collect()
}

fn json(ns: &str, args: &[&str]) -> Value {
    let mut all = vec!["-n", ns, "-j"];
    all.extend_from_slice(args);
    let out = sh::run("ip", &all).unwrap();
    serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap()
}

fn bridge_fdb(ns: &str) -> Value {
    let out = sh::run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "bridge",
            "-j",
            "fdb",
            "show",
            "dev",
            "weft.vxlan",
        ],
    )
    .unwrap_or_default();
    serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap()
}

#[test]
fn containers_reach_every_container_and_host_across_segments() {
    let lab = two_segments(4, &[]);
    let containers = one_each(&lab);
    for (from, _) in &containers {
        for (_, to) in &containers {
            assert!(sh::ping(from, to), "{from} reaches {to}");
        }
        for host in &lab.hosts {
            assert!(
                sh::ping(from, &host.ip.to_string()),
                "{from} reaches {}",
                host.ip
            );
        }
    }
    let status = lab.status(0).unwrap();
    assert_eq!(status["mtu"], 1450, "{status}");
    assert!(status["tunnel_ip"].as_str().is_some_and(|t| !t.is_empty()));
    let mode = |host: &str| {
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["host"] == host)
            .map(|p| (p["mode"].clone(), p["encapsulated"].clone()))
            .unwrap()
    };
    assert_eq!(mode(&lab.hosts[1].name), ("vxlan".into(), true.into()));
    assert_eq!(mode(&lab.hosts[2].name), ("direct".into(), false.into()));
    let covered = invariants::assert_quiet(&lab);
    eprintln!("invariants hold: {covered:?}");
}

#[test]
fn only_traffic_between_segments_is_encapsulated_and_the_router_never_sees_a_pool_address() {
    let lab = two_segments(3, &[]);
    let c = one_each(&lab);
    // h1 -> h2 crosses segments: VXLAN on h1's router port, and never a pool address outside.
    let vxlan = capture::on_router(&lab, "h1", "udp port 4789", 4, || {
        for _ in 0..5 {
            assert!(sh::ping(&c[0].0, &c[1].1));
        }
    });
    assert!(
        vxlan.len() >= 10,
        "requests and replies encapsulated: {vxlan:?}"
    );
    let bare = capture::on_router(&lab, "any", "net 10.65.0.0/16", 4, || {
        for _ in 0..5 {
            assert!(sh::ping(&c[0].0, &c[1].1));
        }
    });
    assert!(
        bare.is_empty(),
        "no pool address as an outer address on the router: {bare:?}"
    );
    // h1 -> h3 share a segment: plain routing, no VXLAN.
    let same = capture::on_router(&lab, "h1", "udp port 4789", 4, || {
        for _ in 0..5 {
            assert!(sh::ping(&c[0].0, &c[2].1));
        }
    });
    assert!(
        same.is_empty(),
        "no VXLAN between hosts of one segment: {same:?}"
    );
}

#[test]
fn a_full_size_packet_and_tcp_cross_segments() {
    let mut lab = two_segments(2, &[]);
    let c = one_each(&lab);
    // 1,400 bytes of payload + 28 of headers, DF set: fits the 1,450 MTU, no fragmentation.
    sh::run(
        "ip",
        &[
            "netns", "exec", &c[0].0, "ping", "-c", "3", "-W", "2", "-M", "do", "-s", "1400",
            &c[1].1,
        ],
    )
    .expect("a 1,400-byte DF ping crosses");
    let refused = sh::output(
        "ip",
        &[
            "netns", "exec", &c[0].0, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1500",
            &c[1].1,
        ],
    )
    .unwrap();
    assert!(
        !refused.status.success(),
        "a packet over the MTU is not sent whole"
    );
    lab.spawn_in(&c[1].0, "iperf3", &["-s", "-1"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = sh::run(
        "ip",
        &[
            "netns", "exec", &c[0].0, "iperf3", "-c", &c[1].1, "-t", "2", "-J",
        ],
    )
    .expect("iperf3 across segments");
    let report: Value = serde_json::from_str(&out).unwrap();
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    eprintln!("TCP across segments over VXLAN: {:.2} Gbit/s", bits / 1e9);
    assert!(bits > 1e6);
}

/// The tunnel state of host `i`: (routes through weft.vxlan, neighbours, FDB entries).
fn tunnel_state(lab: &Lab, i: usize) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let ns = &lab.hosts[i].name;
    let routes: Vec<Value> = json(ns, &["route", "show", "proto", "119"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dev"] == "weft.vxlan")
        .cloned()
        .collect();
    let neighbours = json(ns, &["neigh", "show", "dev", "weft.vxlan"])
        .as_array()
        .cloned()
        .unwrap_or_default();
    let fdb = bridge_fdb(ns)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["dst"].is_string())
        .cloned()
        .collect();
    (routes, neighbours, fdb)
}

fn wait(lab: &Lab, what: &str, check: impl FnMut() -> bool) -> Duration {
    let took = lab.eventually(what, Duration::from_secs(5), check).unwrap();
    eprintln!("{what}: {took:?}");
    took
}

#[test]
fn exactly_one_route_neighbour_and_fdb_entry_per_remote_host_each_repaired_within_a_second() {
    let lab = two_segments(4, &[]);
    one_each(&lab);
    let h1 = lab.hosts[0].name.clone();
    let peers: Vec<Value> = lab.status(0).unwrap()["peers"].as_array().unwrap().clone();
    let remote: Vec<&Value> = peers.iter().filter(|p| p["encapsulated"] == true).collect();
    assert_eq!(remote.len(), 2, "h2 and h4 are on the other segment");
    let (routes, neighbours, fdb) = tunnel_state(&lab, 0);
    assert_eq!(routes.len(), 2, "one block each: {routes:?}");
    assert_eq!(neighbours.len(), 2, "{neighbours:?}");
    assert_eq!(fdb.len(), 2, "{fdb:?}");
    for peer in &remote {
        let status = lab
            .status(
                lab.hosts
                    .iter()
                    .position(|h| peer["host"] == h.name.as_str())
                    .unwrap(),
            )
            .unwrap();
        let (tunnel, vtep) = (status["tunnel_ip"].clone(), status["vtep_mac"].clone());
        assert!(routes.iter().any(|r| r["gateway"] == tunnel
            && r["flags"].as_array().unwrap().iter().any(|f| f == "onlink")));
        assert!(neighbours.iter().any(|n| n["dst"] == tunnel
            && n["lladdr"] == vtep
            && n["state"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "PERMANENT")));
        assert!(fdb
            .iter()
            .any(|e| e["mac"] == vtep && e["dst"] == peer["underlay_ip"]));
    }
    let limit = Duration::from_secs(1);
    let route = routes[0]["dst"].as_str().unwrap().to_string();
    sh::run("ip", &["-n", &h1, "route", "del", &route, "proto", "119"]).unwrap();
    let took = wait(&lab, "tunnel route back", || {
        tunnel_state(&lab, 0).0.len() == 2
    });
    assert!(took <= limit, "route repaired in {took:?}");
    let neighbour = neighbours[0]["dst"].as_str().unwrap().to_string();
    sh::run(
        "ip",
        &["-n", &h1, "neigh", "del", &neighbour, "dev", "weft.vxlan"],
    )
    .unwrap();
    let took = wait(&lab, "neighbour back", || {
        tunnel_state(&lab, 0).1.len() == 2
    });
    assert!(took <= limit, "neighbour repaired in {took:?}");
    let (mac, dst) = (
        fdb[0]["mac"].as_str().unwrap(),
        fdb[0]["dst"].as_str().unwrap(),
    );
    sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &h1,
            "bridge",
            "fdb",
            "del",
            mac,
            "dev",
            "weft.vxlan",
            "dst",
            dst,
        ],
    )
    .unwrap();
    let took = wait(&lab, "fdb entry back", || {
        tunnel_state(&lab, 0).2.len() == 2
    });
    assert!(took <= limit, "fdb entry repaired in {took:?}");
    sh::run("ip", &["-n", &h1, "link", "del", "weft.vxlan"]).unwrap();
    let took = wait(&lab, "device and all its entries back", || {
        let (r, n, f) = tunnel_state(&lab, 0);
        (r.len(), n.len(), f.len()) == (2, 2, 2)
    });
    assert!(took <= limit, "device repaired in {took:?}");
    invariants::assert_quiet(&lab);
}

/// A VXLAN packet carrying a UDP datagram to `dst` (from `src`), for the VTEP `vtep_mac`.
fn vxlan_packet(
    vtep_mac: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mac: Vec<u8> = vtep_mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let mut packet = vec![0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0]; // flags I, VNI 4096
    packet.extend(&mac);
    packet.extend([0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend(ip);
    let udp_len = (8 + payload.len()) as u16;
    packet.extend(40000u16.to_be_bytes());
    packet.extend(port.to_be_bytes());
    packet.extend(udp_len.to_be_bytes());
    packet.extend([0, 0]);
    packet.extend(payload);
    packet
}

#[test]
fn spoofed_vxlan_from_a_container_or_an_unknown_address_never_reaches_the_fabric() {
    let mut lab = two_segments(2, &[]);
    let c = one_each(&lab);
    let victim_ns = c[1].0.clone();
    let received = lab.dir.join("received");
    lab.spawn_logged(
        &victim_ns,
        "nc",
        &["-u", "-l", "-k", "9999"],
        Some(&received),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let h2 = lab.status(1).unwrap();
    let packet = |tag: &str| {
        vxlan_packet(
            h2["vtep_mac"].as_str().unwrap(),
            c[0].1.parse().unwrap(),
            c[1].1.parse().unwrap(),
            9999,
            format!("{tag}\n").as_bytes(),
        )
    };
    let send = |ns: &str, tag: &str| {
        let file = lab.dir.join(format!("packet-{tag}"));
        std::fs::write(&file, packet(tag)).unwrap();
        sh::run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &format!("nc -u -w1 {} 4789 < {}", lab.hosts[1].ip, file.display()),
            ],
        )
        .unwrap();
    };
    send(&c[0].0, "from-a-container");
    send(&lab.outside, "from-outside");
    // The control: the same packet from a peer's underlay address is delivered.
    send(&lab.hosts[0].name, "from-a-peer");
    lab.eventually("the peer's packet arrives", Duration::from_secs(5), || {
        std::fs::read_to_string(&received).is_ok_and(|t| t.contains("from-a-peer"))
    })
    .unwrap();
    let text = std::fs::read_to_string(&received).unwrap();
    assert!(!text.contains("from-a-container"), "{text}");
    assert!(!text.contains("from-outside"), "{text}");
    let _ = (OUTSIDE_IP, ROUTER_IP);
}

#[test]
fn a_mode_mismatch_refuses_start_and_vxlan_mode_puts_same_segment_peers_on_the_tunnel() {
    let mut lab = two_segments(3, &[]);
    let c = one_each(&lab);
    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    lab.start_agent_with(0, &["--encapsulation", "vxlan"])
        .unwrap();
    let refused = lab.wait_agent(0, Duration::from_secs(15));
    let message = format!("{refused:?}");
    assert!(
        refused.is_err(),
        "an agent configured differently must not start"
    );
    assert!(
        message.contains("encapsulation=cross-subnet") && message.contains("encapsulation=vxlan"),
        "the message names both settings: {message}"
    );
    // Switch the pool: every agent with the new setting, the record changed.
    for i in 1..3 {
        lab.stop_agent(i, Signal::SIGTERM).unwrap();
    }
    let key = "/weft/v1/pools/default";
    let pool: Value = serde_json::from_str(&lab.etcd_keys().unwrap()[key]).unwrap();
    let mut pool = pool.as_object().unwrap().clone();
    pool.insert("encapsulation".into(), "vxlan".into());
    lab.etcd()
        .put(key, &Value::Object(pool).to_string())
        .unwrap();
    for i in 0..3 {
        lab.start_agent_with(i, &["--encapsulation", "vxlan"])
            .unwrap();
    }
    for i in 0..3 {
        lab.wait_agent(i, Duration::from_secs(30)).unwrap();
    }
    let started = Instant::now();
    lab.eventually(
        "h3 is reached through the tunnel",
        Duration::from_secs(10),
        || {
            lab.status(0).unwrap()["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["mode"] == "vxlan")
                && tunnel_state(&lab, 0).0.len() == 2
        },
    )
    .unwrap();
    eprintln!(
        "same-segment peers on the tunnel after {:?}",
        started.elapsed()
    );
    for (from, _) in &c {
        for (_, to) in &c {
            assert!(sh::ping(from, to), "{from} reaches {to}");
        }
    }
}

/// On a dual-stack lab, IPv6 crosses segments through the same tunnel (inner IPv6, outer IPv4):
/// a peer's IPv6 blocks are routed via the link-local address of its VTEP MAC on the tunnel
/// device, with a permanent neighbour for it; peers on this host's segment keep plain routes.
#[test]
fn ipv6_crosses_segments_through_the_tunnel() {
    let lab = Lab::new(LabOptions {
        hosts: 3,
        subnets: 2,
        ipv6: true,
        ..Default::default()
    })
    .expect("lab");
    let endpoints: Vec<Value> = (0..3)
        .map(|i| {
            lab.ctl_json(i, &["attach", &format!("c{}", i + 1)])
                .unwrap()
        })
        .collect();
    let v6 = |i: usize| endpoints[i]["ipv6"].as_str().unwrap().to_string();
    let netns = |i: usize| {
        let path = endpoints[i]["netns"].as_str().unwrap();
        path.rsplit('/').next().unwrap().to_string()
    };
    // h1 and h3 share a segment, h2 is on the other one.
    for (from, to) in [(0, 1), (1, 0), (0, 2), (2, 1)] {
        lab.eventually(
            &format!("c{} reaching c{} over IPv6", from + 1, to + 1),
            Duration::from_secs(5),
            || sh::ping(&netns(from), &v6(to)),
        )
        .unwrap();
    }
    let h1 = &lab.hosts[0].name;
    let routes = json(h1, &["-6", "route", "show", "proto", "weft"]);
    let route_of = |host: usize| {
        let block = lab.status(0).unwrap()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["host"] == lab.hosts[host].name)
            .and_then(|p| {
                p["blocks"]
                    .as_array()?
                    .iter()
                    .find(|b| b.as_str().is_some_and(|b| b.contains(':')))
                    .cloned()
            })
            .unwrap();
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["dst"] == block)
            .cloned()
            .unwrap_or_else(|| panic!("no route to {block} in {routes}"))
    };
    let tunnelled = route_of(1);
    assert_eq!(tunnelled["dev"], "weft.vxlan", "{tunnelled}");
    let via = tunnelled["gateway"].as_str().unwrap().to_string();
    assert!(via.starts_with("fe80::"), "{tunnelled}");
    assert_eq!(
        route_of(2)["gateway"],
        "2001:db8:100::3",
        "same segment: plain"
    );
    let neighbours = json(h1, &["-6", "neigh", "show", "dev", "weft.vxlan"]);
    let entry = neighbours
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["dst"] == via.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no neighbour {via}: {neighbours}"));
    assert!(entry["state"].to_string().contains("PERMANENT"), "{entry}");
    invariants::assert_quiet(&lab);
}
