//! BGP on a dual-stack lab (issues 14 and 15): every host announces its IPv6 blocks beside its
//! IPv4 ones over the same (IPv4) session, with its IPv6 underlay address as next hop, and the
//! outside host reaches a container's IPv6 address directly, without NAT.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_tests::lab::{bin, OUTSIDE_IP6};
use weft_tests::{sh, Lab, LabOptions};

/// Every block in etcd of one family, with its owner's underlay address of that family.
fn expected_routes(lab: &Lab, v6: bool) -> BTreeMap<String, String> {
    let mut routes = BTreeMap::new();
    for (key, value) in lab.etcd_keys().unwrap() {
        let Some(rest) = key.strip_prefix("/weft/v1/blocks/") else {
            continue;
        };
        let (_, block) = rest.split_once('/').unwrap();
        let block = block.replacen('-', "/", 1);
        if block.contains(':') != v6 {
            continue;
        }
        let owner: serde_json::Value = serde_json::from_str(&value).unwrap();
        let host = lab
            .hosts
            .iter()
            .find(|h| h.name == owner["host"].as_str().unwrap())
            .unwrap();
        let next_hop = match v6 {
            true => host.ip6.unwrap().to_string(),
            false => host.ip.to_string(),
        };
        routes.insert(block, next_hop);
    }
    routes
}

/// What a weft-echo at [ip]:port saw a TCP connection from `ns` come from.
fn source_seen(ns: &str, ip: &str, port: u16) -> Option<String> {
    let out = sh::in_ns(ns, &["nc", "-n", "-w", "2", ip, &port.to_string()]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (address, _) = text.strip_prefix("peer=")?.rsplit_once(':')?;
    Some(address.trim_matches(['[', ']']).to_string())
}

#[test]
fn ipv6_blocks_are_announced_over_the_existing_sessions_and_the_outside_reaches_containers() {
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        bgp: true,
        ..Default::default()
    })
    .expect("lab");
    for i in 0..2 {
        lab.eventually("bgp session established", Duration::from_secs(30), || {
            lab.router_session(i)
                .is_ok_and(|s| s.state == "Established")
        })
        .unwrap();
    }
    // Sessions as they are before any block exists: announcing must not reset them.
    let sessions: Vec<_> = (0..2).map(|i| lab.router_session(i).unwrap()).collect();
    assert!(lab.router_bgp_routes6().unwrap().is_empty());

    let (_, _, a6) = lab.attach_dual(0, "a").unwrap();
    let (web, _, web6) = lab.attach_dual(1, "web").unwrap();
    assert!(!a6.is_empty() && !web6.is_empty(), "{a6:?} {web6:?}");
    let wanted6 = expected_routes(&lab, true);
    assert_eq!(wanted6.len(), 2, "one IPv6 block per host: {wanted6:?}");
    lab.eventually(
        "the router's IPv6 routes = the hosts' IPv6 blocks",
        Duration::from_secs(5),
        || lab.router_bgp_routes6().unwrap() == wanted6,
    )
    .unwrap();
    // Next hops are the hosts' IPv6 underlay addresses, and IPv4 is announced as before.
    assert!(
        wanted6.values().any(|v| v == "2001:db8:100::2"),
        "{wanted6:?}"
    );
    assert_eq!(
        lab.router_bgp_routes().unwrap(),
        expected_routes(&lab, false)
    );
    for (i, session) in sessions.iter().enumerate() {
        assert_eq!(
            &lab.router_session(i).unwrap(),
            session,
            "h{}'s session was not reset",
            i + 1
        );
    }
    // The agent's Status lists both families as announced.
    let bgp = lab.status(1).unwrap()["bgp"].clone();
    let announced: Vec<String> = bgp["announced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    let mut blocks: Vec<String> = lab.status(1).unwrap()["local_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    blocks.sort();
    let mut sorted = announced.clone();
    sorted.sort();
    assert_eq!(sorted, blocks, "{bgp}");
    assert!(announced.iter().any(|b| b.contains(':')), "{bgp}");

    // The outside host (default route via the router) reaches the container's IPv6 address
    // through the route the router learned, and the container sees its real address.
    let outside = lab.outside.clone();
    lab.eventually(
        "outside -> container (IPv6)",
        Duration::from_secs(5),
        || sh::ping(&outside, &web6),
    )
    .unwrap();
    let echo = bin("weft-echo");
    lab.spawn_in(&web, echo.to_str().unwrap(), &["7000", "::"])
        .unwrap();
    let mut seen = None;
    lab.eventually(
        "the container's echo answers",
        Duration::from_secs(5),
        || {
            seen = source_seen(&outside, &web6, 7000);
            seen.is_some()
        },
    )
    .unwrap();
    assert_eq!(seen.as_deref(), Some(OUTSIDE_IP6), "no NAT on the way in");
}
