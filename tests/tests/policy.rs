//! Network policy end to end (issue 16) on a 3-host lab: the isolation matrix against the policy
//! table, Calico's defaults, order and first match, changes reaching every host within a second
//! without dropping established connections, clean deletion, repair of tampering, and hostile
//! policies refused without a trace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_tests::lab::policy::{self as pl, attach, becomes, serve};
use weft_tests::lab::OUTSIDE_IP;
use weft_tests::probe::{self, Probe};
use weft_tests::{Lab, LabOptions};

const PROBES: [Probe; 5] = [
    Probe::Tcp(80),
    Probe::Tcp(5432),
    Probe::Udp(80),
    Probe::Udp(5432),
    Probe::Icmp,
];

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
            for to in ["frontend", "web", "db", "outside"]
                .into_iter()
                .filter(|t| *t != from)
            {
                for probe in PROBES {
                    cases.push((from, to, probe));
                }
            }
        }
        let probes: Vec<_> = cases
            .iter()
            .map(|(from, to, probe)| {
                (
                    endpoints[from].0.to_string(),
                    endpoints[to].1.to_string(),
                    *probe,
                )
            })
            .collect();
        let _ = lab;
        cases
            .into_iter()
            .zip(probe::all(&probes))
            .collect::<Vec<_>>()
    };
    // Before any policy everything reaches everything (the services and routes may still be
    // starting: a few tries).
    let mut closed = vec![];
    for _ in 0..5 {
        closed = matrix(&lab).into_iter().filter(|(_, ok)| !ok).collect();
        if closed.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        closed.is_empty(),
        "default allow: blocked before any policy: {closed:?}"
    );

    pl::apply(&lab, &table()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let results = matrix(&lab);
    let wrong: Vec<String> = results
        .iter()
        .filter(|((from, to, probe), ok)| expected(from, to, *probe) != *ok)
        .map(|((from, to, probe), ok)| {
            format!(
                "{from} -> {to} {probe}: {}",
                if *ok { "passed" } else { "blocked" }
            )
        })
        .collect();
    println!(
        "isolation matrix: {} probes, {} allowed, checked in {:.1}s",
        results.len(),
        results.iter().filter(|(_, ok)| *ok).count(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "the matrix differs from the policy table:\n{}",
        wrong.join("\n")
    );

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
    assert!(
        probe::reach(&lab.hosts[2].name, &db_ip, Probe::Tcp(5432)),
        "db's own host reaches it"
    );
    assert!(
        !probe::reach(&lab.hosts[0].name, &db_ip, Probe::Tcp(5432)),
        "another host does not"
    );
    // Every host's chains and sets agree with etcd's policies and labels.
    let covered = weft_tests::invariants::assert_quiet(&lab);
    println!("invariants hold: {covered}");
}

#[test]
fn defaults_order_and_first_match_decide() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let (a_ns, a_ip) = attach(&lab, 0, "a", &["app=a"], &[]).unwrap();
    let (b_ns, _) = attach(&lab, 1, "b", &["role=b"], &[]).unwrap();
    let (c_ns, _) = attach(&lab, 2, "c", &["role=c"], &[]).unwrap();
    serve(&mut lab, &a_ns);
    let check = |what: &str, from: &str, probe: Probe, reached: bool| {
        assert!(
            becomes(from, &a_ip, probe, reached),
            "{what}: {from} -> a {probe} should be {}",
            if reached { "allowed" } else { "blocked" }
        );
    };
    // No policy selects a: everything is allowed, both directions.
    check("default allow", &b_ns, Probe::Tcp(80), true);
    assert!(
        probe::reach(&a_ns, &lab.hosts[1].ip.to_string(), Probe::Icmp),
        "a's egress is open"
    );

    // Selected for ingress only, with no rule: everything in is denied, egress stays open.
    pl::apply(
        &lab,
        &json!({"name": "a-closed", "order": 100, "selector": "app == 'a'", "ingress": []}),
    )
    .unwrap();
    check("default deny once selected", &b_ns, Probe::Tcp(80), false);
    assert!(
        probe::reach(&a_ns, &lab.hosts[1].ip.to_string(), Probe::Icmp),
        "egress is not covered"
    );

    // A deny before a broader allow, in one policy: b is refused TCP/80 but gets 5432; c gets both.
    pl::apply(&lab, &json!({"name": "a-rules", "order": 10, "selector": "app == 'a'", "ingress": [
        {"action": "deny", "protocol": "tcp", "source": {"selector": "role == 'b'"}, "destination": {"ports": [80]}},
        {"action": "allow", "protocol": "tcp"}
    ]})).unwrap();
    check("deny before allow", &b_ns, Probe::Tcp(80), false);
    check("the broader allow", &b_ns, Probe::Tcp(5432), true);
    check("the broader allow", &c_ns, Probe::Tcp(80), true);
    check("no rule matches UDP: denied", &c_ns, Probe::Udp(80), false);

    // A policy of lower order applies first: its allow wins over a-rules' deny.
    pl::apply(
        &lab,
        &json!({"name": "a-first", "order": 5, "selector": "app == 'a'", "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'b'"}}
        ]}),
    )
    .unwrap();
    check("lower order first", &b_ns, Probe::Tcp(80), true);
    // The same policy with a higher order comes after the deny.
    pl::apply(
        &lab,
        &json!({"name": "a-first", "order": 50, "selector": "app == 'a'", "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'b'"}}
        ]}),
    )
    .unwrap();
    check("higher order later", &b_ns, Probe::Tcp(80), false);
    // Equal orders: by name. "a-first" (order 10) now sorts before "a-rules" (order 10).
    pl::apply(
        &lab,
        &json!({"name": "a-first", "order": 10, "selector": "app == 'a'", "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'b'"}}
        ]}),
    )
    .unwrap();
    check("ties by name", &b_ns, Probe::Tcp(80), true);

    // Egress is enforced on the source's host: a may call c's host but nothing else once
    // selected for egress.
    pl::apply(&lab, &json!({"name": "a-out", "order": 1, "selector": "app == 'a'", "egress": [
        {"action": "allow", "protocol": "icmp", "destination": {"nets": [format!("{}/32", lab.hosts[2].ip)]}}
    ]})).unwrap();
    assert!(
        becomes(&a_ns, &lab.hosts[1].ip.to_string(), Probe::Icmp, false),
        "egress denied"
    );
    assert!(
        becomes(&a_ns, &lab.hosts[2].ip.to_string(), Probe::Icmp, true),
        "egress allowed"
    );
    // Replies of allowed connections pass although a's egress allows no TCP.
    check("replies pass", &b_ns, Probe::Tcp(80), true);
}

/// Measures, in parallel, how long after `since` `from` takes to reach (or stop reaching) port
/// 9000 of every address; fails the test past `LIMIT`.
fn measure(what: &str, from: &str, ips: &[String], reached: bool, since: Instant) -> Duration {
    const LIMIT: Duration = Duration::from_secs(1);
    let handles: Vec<_> = ips
        .iter()
        .map(|ip| {
            let (from, addr) = (from.to_string(), format!("{ip}:9000").parse().unwrap());
            std::thread::spawn(move || {
                probe::tcp_becomes(&from, addr, reached, since, Duration::from_secs(5))
            })
        })
        .collect();
    let times: Vec<Option<Duration>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let shown: Vec<String> = times
        .iter()
        .zip(ips)
        .map(|(t, ip)| {
            format!(
                "{ip}: {}",
                t.map_or("never".into(), |t| format!(
                    "{:.0} ms",
                    t.as_secs_f64() * 1e3
                ))
            )
        })
        .collect();
    println!("{what}: {}", shown.join(", "));
    let slowest = times
        .iter()
        .map(|t| t.unwrap_or(Duration::MAX))
        .max()
        .unwrap();
    assert!(
        slowest <= LIMIT,
        "{what} took longer than {LIMIT:?} on some host: {shown:?}"
    );
    slowest
}

#[test]
fn changes_reach_every_host_within_a_second_and_established_connections_survive() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    let mut webs = vec![];
    for host in 0..3 {
        let (ns, ip) = attach(&lab, host, &format!("web{host}"), &["app=web"], &[]).unwrap();
        probe::serve_echo(&ns, 9000).unwrap();
        webs.push((ns, ip));
    }
    let ips: Vec<String> = webs.iter().map(|(_, ip)| ip.clone()).collect();
    pl::apply(&lab, &json!({"name": "web", "selector": "app == 'web'", "ingress": [
        {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'frontend'"}, "destination": {"ports": [9000]}}
    ]})).unwrap();
    let (front_ns, _) = attach(&lab, 2, "front", &["role=frontend"], &[]).unwrap();
    let (client_ns, _) = attach(&lab, 1, "client", &[], &[]).unwrap();
    measure(
        "a new frontend reaches every web",
        &front_ns,
        &ips,
        true,
        Instant::now(),
    );
    // Established connections from the frontend to every web, kept open throughout.
    let mut connections: Vec<probe::Connection> = ips
        .iter()
        .map(|ip| {
            probe::Connection::open(&front_ns, format!("{ip}:9000").parse().unwrap()).unwrap()
        })
        .collect();
    let still_open = |connections: &mut Vec<probe::Connection>, after: &str| {
        for (i, c) in connections.iter_mut().enumerate() {
            c.echo(&format!("{after} {i}")).unwrap_or_else(|e| {
                panic!("established connection to web{i} dropped after {after}: {e:#}")
            });
        }
    };
    measure(
        "an unlabelled client is refused everywhere",
        &client_ns,
        &ips,
        false,
        Instant::now(),
    );

    // 1. A label change on h2 takes effect on h1, h2 and h3.
    let started = Instant::now();
    attach(&lab, 1, "client", &["role=frontend"], &[]).unwrap();
    measure(
        "label change (client on h2 becomes a frontend)",
        &client_ns,
        &ips,
        true,
        started,
    );
    still_open(&mut connections, "the label change");

    // 2. A new matching container on another host.
    let started = Instant::now();
    let (late_ns, _) = attach(&lab, 0, "late", &["role=frontend"], &[]).unwrap();
    measure(
        "new matching container on h1",
        &late_ns,
        &ips,
        true,
        started,
    );
    still_open(&mut connections, "the new container");

    // 3. A policy change: frontends lose new connections, established ones stay (conntrack).
    let started = Instant::now();
    pl::apply(&lab, &json!({"name": "web", "selector": "app == 'web'", "ingress": [
        {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'admin'"}, "destination": {"ports": [9000]}}
    ]})).unwrap();
    measure(
        "policy change (frontends refused)",
        &client_ns,
        &ips,
        false,
        started,
    );
    measure(
        "policy change seen for the late frontend",
        &late_ns,
        &ips,
        false,
        started,
    );
    still_open(&mut connections, "the policy change");
    weft_tests::invariants::assert_quiet(&lab);
}

#[test]
fn cni_labels_come_from_args_and_policy_selects_by_them() {
    let lab = Lab::new(LabOptions {
        hosts: 1,
        ..Default::default()
    })
    .unwrap();
    // Namespaces named after the lab go with it.
    let (good, bad) = (
        format!("{}-cni1", lab.prefix),
        format!("{}-cni2", lab.prefix),
    );
    for ns in [&good, &bad] {
        weft_tests::sh::run("ip", &["netns", "add", ns]).unwrap();
    }
    let config = |labels: serde_json::Value| {
        json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
               "socket": lab.hosts[0].socket, "args": {"cni": {"labels": labels}}})
    };
    pl::apply(
        &lab,
        &json!({"name": "cni", "selector": "app == 'cni-web'", "ingress": []}),
    )
    .unwrap();
    let (ok, result) = weft_tests::cni::run(
        "ADD",
        "pod1",
        &format!("/run/netns/{good}"),
        &config(json!([
        {"key": "app", "value": "cni-web"}, {"key": "team", "value": "a"}])),
    );
    assert!(ok, "{result}");
    let listed = lab.ctl_json(0, &["ls"]).unwrap();
    let endpoint = &listed.as_array().unwrap()[0];
    assert_eq!(endpoint["labels"], json!({"app": "cni-web", "team": "a"}));
    let veth = endpoint["host_ifname"].as_str().unwrap();
    // The policy reaches the agent through its watch, which may deliver it after the attach:
    // the endpoint joins its profile (whose chain is written) within the second changes are
    // promised in.
    let mut chains = Vec::new();
    let waited = lab.eventually(
        "the endpoint's profile and its chain",
        Duration::from_secs(2),
        || {
            chains = pl::policy_chain_lines(&lab, 0).unwrap();
            pl::profile_chain(&lab, 0, veth, "weft-4t-")
                .is_some_and(|chain| chains.iter().any(|l| l.starts_with(&format!(":{chain}"))))
        },
    );
    assert!(waited.is_ok(), "{waited:?}: {chains:#?}");
    let (ok, error) = weft_tests::cni::run(
        "ADD",
        "pod2",
        &format!("/run/netns/{bad}"),
        &config(json!([{"key": "a b", "value": "x"}])),
    );
    assert!(!ok);
    assert_eq!(error["code"], 7, "{error}");
    assert!(
        error["msg"].as_str().unwrap().contains("args.cni.labels"),
        "{error}"
    );
}
