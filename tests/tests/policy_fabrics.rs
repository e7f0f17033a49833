//! Network policy over the other ways a packet crosses the fabric: hosts on two segments joined
//! by VXLAN (policy sees the inner addresses; allowing everything never opens VXLAN to
//! containers) and BGP (the outside network reaches containers by their own addresses, and
//! ingress rules decide by that address).

use std::time::Duration;

use serde_json::json;
use weft_tests::lab::policy::{self as pl, attach, becomes, serve};
use weft_tests::probe::{self, Probe};
use weft_tests::{invariants, sh, Lab, LabOptions};

/// Packets counted by the rule of `chain` on host `i` whose comment holds `comment`.
fn counted(lab: &Lab, i: usize, chain: &str, comment: &str) -> u64 {
    let listing = sh::run_in(
        &lab.hosts[i].name,
        &["iptables", "-t", "filter", "-L", chain, "-v", "-x", "-n"],
    )
    .unwrap();
    listing
        .lines()
        .find(|l| l.contains(comment))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rule {comment:?} in {chain}:\n{listing}"))
}

#[test]
fn policy_holds_across_vxlan_and_never_opens_vxlan_to_containers() {
    // h1 and h3 on 198.51.100.0/24, h2 on 198.18.0.0/24: h1 and h3 reach h2 through VXLAN.
    let mut lab = Lab::new(LabOptions {
        hosts: 3,
        subnets: 2,
        ..Default::default()
    })
    .expect("lab");
    let (front_ns, _) = attach(&lab, 0, "front", &["role=frontend"], &[]).unwrap();
    let (web_ns, web_ip) = attach(&lab, 1, "web", &["app=web"], &[]).unwrap();
    let (other_ns, _) = attach(&lab, 2, "other", &["role=other"], &[]).unwrap();
    serve(&mut lab, &web_ns);
    lab.eventually(
        "h1 routes to web through VXLAN",
        Duration::from_secs(10),
        || {
            sh::run_in(&lab.hosts[0].name, &["ip", "route", "get", &web_ip])
                .is_ok_and(|r| r.contains("dev weft.vxlan"))
        },
    )
    .unwrap();
    for ns in [&front_ns, &other_ns] {
        assert!(
            becomes(ns, &web_ip, Probe::Tcp(80), true),
            "{ns} -> web before any policy"
        );
    }

    // Web takes TCP/80 from frontends only; every endpoint may send anything (an explicit
    // allow-all egress, which must not open VXLAN).
    pl::apply(
        &lab,
        &json!([
            {"name": "web", "order": 10, "selector": "app == 'web'",
             "ingress": [{"action": "allow", "protocol": "tcp",
                          "source": {"selector": "role == 'frontend'"},
                          "destination": {"ports": [80]}}]},
            {"name": "send-anything", "order": 20, "selector": "all()",
             "egress": [{"action": "allow"}]}
        ]),
    )
    .unwrap();
    assert!(
        becomes(&other_ns, &web_ip, Probe::Tcp(80), false),
        "other -> web once web is selected"
    );
    let probes = [
        (front_ns.clone(), web_ip.clone(), Probe::Tcp(80)),
        (front_ns.clone(), web_ip.clone(), Probe::Tcp(5432)),
        (front_ns.clone(), web_ip.clone(), Probe::Udp(80)),
        (other_ns.clone(), web_ip.clone(), Probe::Tcp(80)),
    ];
    assert_eq!(
        probe::all(&probes),
        [true, false, false, false],
        "{probes:?} over VXLAN"
    );

    // A container whose egress allows everything still cannot send VXLAN to a peer.
    let comment = "containers never send VXLAN";
    let before = counted(&lab, 0, "WEFT-FORWARD", comment);
    let peer = lab.hosts[1].ip.to_string();
    let send = format!("echo spoof | nc -u -w1 {peer} 4789");
    let _ = sh::in_ns(&front_ns, &["sh", "-c", &send]);
    lab.eventually("the drop counted", Duration::from_secs(3), || {
        counted(&lab, 0, "WEFT-FORWARD", comment) > before
    })
    .unwrap();
    // Chains, sets and the VXLAN guard agree with etcd on every host.
    invariants::assert_quiet(&lab);
}

#[test]
fn with_bgp_the_outside_reaches_containers_only_as_ingress_policy_allows() {
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        bgp: true,
        ..Default::default()
    })
    .expect("lab");
    let (web_ns, web_ip) = attach(&lab, 1, "web", &["app=web"], &[]).unwrap();
    let (db_ns, db_ip) = attach(&lab, 0, "db", &["app=db"], &[]).unwrap();
    serve(&mut lab, &web_ns);
    serve(&mut lab, &db_ns);
    let outside = lab.outside.clone();
    // Before any policy the outside reaches both by the routes the router learned.
    lab.eventually("routes announced", Duration::from_secs(30), || {
        probe::reach(&outside, &web_ip, Probe::Tcp(80))
            && probe::reach(&outside, &db_ip, Probe::Tcp(5432))
    })
    .unwrap();

    // Web takes TCP/80 from the outside network, db TCP/5432 from web only.
    pl::apply(
        &lab,
        &json!([
            {"name": "web", "selector": "app == 'web'",
             "ingress": [{"action": "allow", "protocol": "tcp",
                          "source": {"nets": ["203.0.113.0/24"]},
                          "destination": {"ports": [80]}}]},
            {"name": "db", "selector": "app == 'db'",
             "ingress": [{"action": "allow", "protocol": "tcp",
                          "source": {"selector": "app == 'web'"},
                          "destination": {"ports": [5432]}}]}
        ]),
    )
    .unwrap();
    assert!(
        becomes(&outside, &db_ip, Probe::Tcp(5432), false),
        "outside -> db once db is selected"
    );
    let probes = [
        (outside.clone(), web_ip.clone(), Probe::Tcp(80)),
        (outside.clone(), web_ip.clone(), Probe::Tcp(5432)),
        (outside.clone(), web_ip.clone(), Probe::Icmp),
        (outside.clone(), db_ip.clone(), Probe::Tcp(5432)),
        (web_ns.clone(), db_ip.clone(), Probe::Tcp(5432)),
        (web_ns.clone(), db_ip.clone(), Probe::Tcp(80)),
    ];
    assert_eq!(
        probe::all(&probes),
        [true, false, false, false, true, false],
        "{probes:?} with BGP"
    );
    // Policy changes nothing of what the router learned.
    assert_eq!(
        lab.router_bgp_routes().unwrap().len(),
        2,
        "one block per host"
    );
    invariants::assert_quiet(&lab);
}
