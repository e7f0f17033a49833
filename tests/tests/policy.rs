//! Network policy end to end (issue 16) on a 3-host lab: the isolation matrix against the policy
//! table, Calico's defaults, order and first match, changes reaching every host within a second
//! without dropping established connections, clean deletion, repair of tampering, and hostile
//! policies refused without a trace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_tests::lab::{bin, OUTSIDE_IP};
use weft_tests::policy_lab::{self as pl, attach};
use weft_tests::probe::{self, Probe};
use weft_tests::{sh, Lab, LabOptions};

const PROBES: [Probe; 5] = [
    Probe::Tcp(80),
    Probe::Tcp(5432),
    Probe::Udp(80),
    Probe::Udp(5432),
    Probe::Icmp,
];

/// Starts weft-echo on ports 80 and 5432 (TCP and UDP) in `ns`.
fn serve(lab: &mut Lab, ns: &str) {
    let echo = bin("weft-echo");
    for port in ["80", "5432"] {
        lab.spawn_in(ns, echo.to_str().unwrap(), &[port]).unwrap();
    }
}

/// The policy table of the matrix: web takes TCP/80 and ICMP from frontends and TCP/80 from the
/// outside network, and may not call the outside; db takes TCP and UDP 5432 from web only and
/// calls nothing; frontends are selected by no policy.
fn table() -> serde_json::Value {
    json!([
        {"name": "web", "order": 10, "selector": "app == 'web'",
         "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'frontend'"},
             "destination": {"ports": [80]}},
            {"action": "allow", "protocol": "icmp", "source": {"selector": "role == 'frontend'"}},
            {"action": "allow", "protocol": "tcp", "source": {"nets": ["203.0.113.0/24"]},
             "destination": {"ports": [80]}}
         ],
         "egress": [
            {"action": "deny", "destination": {"nets": ["203.0.113.0/24"]}},
            {"action": "allow"}
         ]},
        {"name": "db", "order": 20, "selector": "app == 'db'",
         "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "app == 'web'"},
             "destination": {"ports": [5432]}},
            {"action": "allow", "protocol": "udp", "source": {"selector": "app == 'web'"},
             "destination": {"ports": [5432]}}
         ],
         "egress": []}
    ])
}

/// What the table allows, written out by hand: (from, to) → the probes that pass.
fn expected(from: &str, to: &str, probe: Probe) -> bool {
    match (from, to) {
        ("frontend", "web") => matches!(probe, Probe::Tcp(80) | Probe::Icmp),
        ("frontend", "db") => false,
        ("frontend", "outside") => true,
        ("web", "frontend") => true,
        ("web", "db") => matches!(probe, Probe::Tcp(5432) | Probe::Udp(5432)),
        ("web", "outside") => false,
        ("db", _) => false,
        _ => unreachable!("{from} -> {to}"),
    }
}

#[test]
fn the_isolation_matrix_matches_the_policy_table_across_hosts() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let (front_ns, front_ip) = attach(&lab, 0, "frontend", &["role=frontend"], &[]).unwrap();
    let (web_ns, web_ip) = attach(&lab, 1, "web", &["app=web"], &["-p", "8080:80"]).unwrap();
    let (db_ns, db_ip) = attach(&lab, 2, "db", &["app=db"], &[]).unwrap();
    let (other_ns, _) = attach(&lab, 0, "other", &[], &[]).unwrap();
    let outside = lab.outside.clone();
    for ns in [&front_ns, &web_ns, &db_ns, &outside] {
        serve(&mut lab, ns);
    }
    let endpoints: BTreeMap<&str, (&str, &str)> = [
        ("frontend", (front_ns.as_str(), front_ip.as_str())),
        ("web", (web_ns.as_str(), web_ip.as_str())),
        ("db", (db_ns.as_str(), db_ip.as_str())),
        ("outside", (outside.as_str(), OUTSIDE_IP)),
    ]
    .into();
    let matrix = |lab: &Lab| {
        let mut cases = vec![];
        for from in ["frontend", "web", "db"] {
            for to in ["frontend", "web", "db", "outside"].into_iter().filter(|t| *t != from) {
                for probe in PROBES {
                    cases.push((from, to, probe));
                }
            }
        }
        let probes: Vec<_> = cases
            .iter()
            .map(|(from, to, probe)| (endpoints[from].0.to_string(), endpoints[to].1.to_string(), *probe))
            .collect();
        let _ = lab;
        cases.into_iter().zip(probe::all(&probes)).collect::<Vec<_>>()
    };
    // Before any policy everything reaches everything (routes may still settle: retry once).
    let open = matrix(&lab);
    let closed: Vec<_> = open.iter().filter(|(_, ok)| !ok).collect();
    assert!(closed.is_empty(), "default allow: blocked before any policy: {closed:?}");

    pl::apply(&lab, &table()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let results = matrix(&lab);
    let wrong: Vec<String> = results
        .iter()
        .filter(|((from, to, probe), ok)| expected(from, to, *probe) != *ok)
        .map(|((from, to, probe), ok)| format!("{from} -> {to} {probe}: {}", if *ok { "passed" } else { "blocked" }))
        .collect();
    println!(
        "isolation matrix: {} probes, {} allowed, checked in {:.1}s",
        results.len(),
        results.iter().filter(|(_, ok)| *ok).count(),
        started.elapsed().as_secs_f64()
    );
    assert!(wrong.is_empty(), "the matrix differs from the policy table:\n{}", wrong.join("\n"));

    // Published ports: web's ingress sees the client's real address (DNAT happens before
    // FORWARD), so the outside network may use web's published port. A container of another
    // host reaching a host address leaves the fabric and is masqueraded by its own host: web
    // sees that host's address, which no rule allows, whatever the container's labels.
    let host2 = lab.hosts[1].ip.to_string();
    let published = [
        (outside.as_str(), true),
        (front_ns.as_str(), false),
        (other_ns.as_str(), false),
        (db_ns.as_str(), false),
    ];
    let probes: Vec<_> = published
        .iter()
        .map(|(ns, _)| (ns.to_string(), host2.clone(), Probe::Tcp(8080)))
        .collect();
    for ((ns, want), got) in published.iter().zip(probe::all(&probes)) {
        assert_eq!(got, *want, "{ns} -> {host2}:8080 (published)");
    }
    // The host of an endpoint always reaches it (health checks), whatever policy says.
    assert!(probe::reach(&lab.hosts[2].name, &db_ip, Probe::Tcp(5432)), "db's own host reaches it");
    assert!(!probe::reach(&lab.hosts[0].name, &db_ip, Probe::Tcp(5432)), "another host does not");
}
