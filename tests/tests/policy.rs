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
    // Before any policy everything reaches everything (routes may still settle: retry once).
    let open = matrix(&lab);
    let closed: Vec<_> = open.iter().filter(|(_, ok)| !ok).collect();
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
}

/// Waits until `from` reaches (or stops reaching) `ip` with `probe`, up to 3 s; returns whether
/// it ended as wanted.
fn becomes(from: &str, ip: &str, probe: Probe, reached: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if probe::reach(from, ip, probe) == reached {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
}

/// A host's filter table (no counters) and its `weft-` sets with their members.
type HostPolicyState = (
    Vec<String>,
    BTreeMap<String, std::collections::BTreeSet<String>>,
);

/// Every host's filter table and sets.
fn kernel_state(lab: &Lab) -> Vec<HostPolicyState> {
    (0..lab.hosts.len())
        .map(|i| (pl::filter_rules(lab, i).unwrap(), pl::sets(lab, i).unwrap()))
        .collect()
}

#[test]
fn deleting_policies_restores_behaviour_and_leaves_nothing_behind() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let (a_ns, a_ip) = attach(&lab, 0, "a", &["app=a"], &[]).unwrap();
    let (b_ns, _) = attach(&lab, 1, "b", &["role=b"], &[]).unwrap();
    serve(&mut lab, &a_ns);
    assert!(becomes(&b_ns, &a_ip, Probe::Tcp(80), true));
    let before = kernel_state(&lab);
    pl::apply(&lab, &json!([
        {"name": "p1", "selector": "app == 'a'", "ingress": [
            {"action": "allow", "protocol": "udp", "source": {"selector": "role == 'b'", "nets": ["10.0.0.0/8"]}}]},
        {"name": "p2", "order": 1, "selector": "all()", "egress": [{"action": "deny", "destination": {"nets": ["203.0.113.0/24"]}}, {"action": "allow"}]}
    ])).unwrap();
    assert!(
        becomes(&b_ns, &a_ip, Probe::Tcp(80), false),
        "policy in force"
    );
    let during = kernel_state(&lab);
    // h1 and h2 hold endpoints (h3 none: nothing to enforce there).
    for (i, (rules, sets)) in during.iter().take(2).enumerate() {
        assert!(
            rules.iter().any(|r| r.contains("WEFT-PO-")),
            "h{}: p2 selects every endpoint: {rules:#?}",
            i + 1
        );
        assert!(!sets.is_empty(), "h{}: sets in use", i + 1);
    }
    pl::delete(&lab, "p1").unwrap();
    pl::delete(&lab, "p2").unwrap();
    assert!(
        becomes(&b_ns, &a_ip, Probe::Tcp(80), true),
        "previous behaviour restored"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while kernel_state(&lab) != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        kernel_state(&lab),
        before,
        "no chain, rule or set left after the policies went"
    );
    // Deleting what does not exist says so.
    let out = pl::weftctl_etcd(&lab, &["policy", "delete", "p1"]).unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tampering_is_repaired_and_leftovers_are_removed_at_start() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let (a_ns, a_ip) = attach(&lab, 0, "a", &["app=a"], &[]).unwrap();
    let (b_ns, b_ip) = attach(&lab, 1, "b", &["role=b"], &[]).unwrap();
    serve(&mut lab, &a_ns);
    pl::apply(
        &lab,
        &json!({"name": "a", "selector": "app == 'a'", "ingress": [
        {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'b'"}}]}),
    )
    .unwrap();
    let h1 = lab.hosts[0].name.clone();
    let deadline = Instant::now() + Duration::from_secs(3);
    while pl::policy_chain_lines(&lab, 0).unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(becomes(&b_ns, &a_ip, Probe::Tcp(80), true));
    let good = kernel_state(&lab);

    // A set member deleted by hand: b is refused until the next resync puts it back.
    let set = pl::sets(&lab, 0)
        .unwrap()
        .into_iter()
        .find(|(_, m)| m.contains(&b_ip))
        .unwrap()
        .0;
    sh::run_in(&h1, &["ipset", "del", &set, &b_ip]).unwrap();
    assert!(
        !probe::reach(&b_ns, &a_ip, Probe::Tcp(80)),
        "the member is gone"
    );
    let started = Instant::now();
    assert!(
        becomes(&b_ns, &a_ip, Probe::Tcp(80), true),
        "set member repaired"
    );
    println!(
        "set member repaired after {:.0} ms (resync interval 2 s)",
        started.elapsed().as_secs_f64() * 1e3
    );

    // A rule deleted by hand (the policy's allow): repaired within one resync interval.
    let rule = pl::policy_chain_lines(&lab, 0)
        .unwrap()
        .into_iter()
        .find(|l| l.starts_with("-A WEFT-PI-") && l.contains("MARK"))
        .unwrap();
    let mut args = vec!["iptables", "-w"];
    let delete = rule.replacen("-A ", "-D ", 1);
    let words = weft_tests::invariants::rule_words(&delete);
    args.extend(words.iter().map(String::as_str));
    sh::run_in(&h1, &args).unwrap();
    let started = Instant::now();
    assert!(becomes(&b_ns, &a_ip, Probe::Tcp(80), true), "rule repaired");
    println!(
        "deleted rule repaired after {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while kernel_state(&lab) != good && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(kernel_state(&lab), good, "everything back as it was");

    // Leftovers of an earlier agent (a chain and a set of ours nothing wants) and a foreign set
    // and chain: ours go at the next start, the foreign ones stay.
    lab.stop_agent(0, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let restore = "*filter\n:WEFT-TW-weftdeadbeef00 - [0:0]\n:OTHER-CHAIN - [0:0]\n-A WEFT-TW-weftdeadbeef00 -j DROP\nCOMMIT\n";
    let mut restore_cmd = sh::command_in_ns(&h1, "iptables-restore").unwrap();
    restore_cmd
        .arg("--noflush")
        .stdin(std::process::Stdio::piped());
    let mut child = restore_cmd.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), restore.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    sh::run_in(
        &h1,
        &["ipset", "create", "weft-4s-0000000000000000", "hash:ip"],
    )
    .unwrap();
    sh::run_in(&h1, &["ipset", "create", "other-set", "hash:ip"]).unwrap();
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let rules = pl::filter_rules(&lab, 0).unwrap();
    assert!(
        !rules.iter().any(|r| r.contains("weftdeadbeef00")),
        "leftover chain removed: {rules:#?}"
    );
    assert!(
        rules.iter().any(|r| r.contains("OTHER-CHAIN")),
        "foreign chain kept"
    );
    let sets = sh::run_in(&h1, &["ipset", "list", "-n"]).unwrap();
    assert!(
        !sets.contains("weft-4s-0000000000000000"),
        "leftover set removed: {sets}"
    );
    assert!(sets.contains("other-set"), "foreign set kept");
    sh::run_in(&h1, &["ipset", "destroy", "other-set"]).unwrap();
    assert!(
        probe::reach(&b_ns, &a_ip, Probe::Tcp(80)),
        "policy kept across the restart"
    );
}

#[test]
fn hostile_policies_are_refused_naming_the_field_and_change_nothing() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    attach(&lab, 0, "a", &["app=a"], &[]).unwrap();
    pl::apply(
        &lab,
        &json!({"name": "keep", "selector": "app == 'a'", "ingress": [{"action": "allow"}]}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let etcd_before = lab.etcd_keys().unwrap();
    let kernel_before = kernel_state(&lab);
    let rule = |r: serde_json::Value| json!({"name": "bad", "selector": "all()", "ingress": [r]});
    let huge = json!({"name": "huge", "selector": "all()", "ingress": vec![json!({"action": "allow"}); 10_000]});
    let cases: Vec<(String, &str, &str)> = vec![
        (json!({"name": "bad", "selector": "app == ", "ingress": []}).to_string(), "json", "selector"),
        (json!({"name": "bad", "selector": "all()", "ingress": [], "priority": 1}).to_string(), "json", "priority"),
        (rule(json!({"action": "permit"})).to_string(), "json", "ingress[0].action"),
        (rule(json!({"action": "allow", "protocol": "tcp", "destination": {"ports": [0]}})).to_string(), "json", "ingress[0].destination.ports[0]"),
        (rule(json!({"action": "allow", "protocol": "tcp", "destination": {"ports": [65536]}})).to_string(), "json", "ingress[0].destination.ports[0]"),
        (rule(json!({"action": "allow", "protocol": "icmp", "destination": {"ports": [80]}})).to_string(), "json", "ingress[0].destination.ports"),
        (rule(json!({"action": "allow", "destination": {"ports": [80]}})).to_string(), "json", "ingress[0].destination.ports"),
        (rule(json!({"action": "deny", "source": {"nets": ["10.0.0.0/33"]}})).to_string(), "json", "ingress[0].source.nets[0]"),
        (json!({"name": "a/b", "selector": "all()"}).to_string(), "json", "name"),
        (huge.to_string(), "json", "ingress"),
        // A list is all or nothing: the valid first policy is not written either.
        (json!([{"name": "fine", "selector": "all()", "egress": []}, {"name": "worse", "selector": "x in {"}]).to_string(), "json", "[1].selector"),
        ("name: bad\nselector: all()\negress:\n  - action: allow\n    protocl: tcp\n".to_string(), "yaml", "egress[0].protocl"),
    ];
    for (text, extension, field) in &cases {
        let out = pl::apply_text(&lab, text, extension).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "refused as invalid: {stderr}");
        assert!(
            stderr.contains(&format!("{field}:")),
            "the error names {field}: {stderr}"
        );
        println!("refused: {}", stderr.trim());
    }
    assert_eq!(
        lab.etcd_keys().unwrap(),
        etcd_before,
        "nothing changed in etcd"
    );
    assert_eq!(
        kernel_state(&lab),
        kernel_before,
        "nothing changed in any kernel"
    );
    // Hostile labels are refused by weftctl and, sent straight over the API, by the agent.
    let out = lab.ctl(0, &["attach", "x", "--label", "a b=c"]).unwrap();
    assert!(!out.status.success(), "a key with a space");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refused = runtime.block_on(async {
        let mut client = lab.client(0).await.unwrap();
        let request = weft_proto::v1::AttachRequest {
            container_id: "x".into(),
            labels: [("app".to_string(), "v".repeat(64))].into(),
            ..Default::default()
        };
        client.attach(request).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("label \"app\""),
        "{}",
        refused.message()
    );
    assert_eq!(
        lab.etcd_keys().unwrap(),
        etcd_before,
        "nothing changed in etcd"
    );
    // The limit is documented and exact: 1,000 rules are accepted.
    let limit = json!({"name": "big", "selector": "app == 'nobody'", "ingress": vec![json!({"action": "allow"}); 1000]});
    pl::apply(&lab, &limit).unwrap();
}

#[test]
fn rendered_policy_chains_match_what_iptables_prints_so_resyncs_write_nothing() {
    use weft_agent::firewall::iptables::Iptables;
    use weft_agent::firewall::{Backend, FirewallSpec, SyncMode};
    use weft_agent::policy::plan::{plan, Family};
    use weft_agent::policy::render::render;
    use weft_agent::policy::sets::{Ipset, SetBackend};
    weft_tests::require_root();
    let ns = format!("wpol{}", std::process::id());
    sh::run("ip", &["netns", "add", &ns]).unwrap();
    let web: weft_etcd::records::EndpointRecord = serde_json::from_value(json!({
        "container_id": "web", "host": "h1", "ip": "10.65.0.2", "host_ifname": "weft0123456789a",
        "ifname": "eth0", "mac": "02:00:00:00:00:01", "netns": "/x", "owns_netns": false,
        "created": 0, "labels": {"app": "web"},
    }))
    .unwrap();
    let ports: Vec<serde_json::Value> = (1..=20).map(|p| json!(p * 100)).collect();
    let policy = weft_etcd::policy::policy_from_value(&json!({"name": "web", "selector": "all()",
        "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "has(app)", "nets": ["10.0.0.0/8", "203.0.113.7/32"]},
             "destination": {"ports": ports}},
            {"action": "deny", "protocol": "udp", "source": {"ports": ["1000:2000"]}},
            {"action": "allow", "protocol": "icmp", "source": {"nets": ["0.0.0.0/0"]}}],
        "egress": [{"action": "deny", "destination": {"nets": ["203.0.113.0/24"]}}, {"action": "allow"}]}), "").unwrap();
    let planned = plan(Family::V4, &[&policy], &[&web], &[&web]);
    let path = format!("/run/netns/{ns}");
    let result = std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sets = Ipset::default();
        sets.sync(&planned.sets, SyncMode::Verify).unwrap();
        let spec = FirewallSpec {
            policy: render(&planned),
            ..Default::default()
        };
        let firewall = Iptables::default();
        let first = firewall.sync(&spec, SyncMode::Verify).unwrap();
        let again = firewall.sync(&spec, SyncMode::Verify).unwrap();
        let sets_again = sets.sync(&planned.sets, SyncMode::Verify).unwrap();
        // Nothing wanted any more: chains and sets go.
        let empty = FirewallSpec::default();
        firewall.sync(&empty, SyncMode::Verify).unwrap();
        let destroyed = sets.prune(&Default::default()).unwrap();
        let save = std::process::Command::new("iptables-save")
            .output()
            .unwrap();
        (
            first.tables_written,
            again.tables_written,
            sets_again,
            destroyed,
            String::from_utf8_lossy(&save.stdout).to_string(),
        )
    })
    .join();
    sh::run("ip", &["netns", "del", &ns]).unwrap();
    let (first, again, sets_again, destroyed, save) = result.unwrap();
    assert_eq!(first, 3);
    assert_eq!(again, 0, "verified policy chains are not written again");
    assert_eq!(sets_again, 0, "verified sets are not written again");
    assert_eq!(
        destroyed, 3,
        "the selector's set and both rules' network sets"
    );
    assert!(
        !save.contains("WEFT-PI-") && !save.contains("WEFT-TW-"),
        "{save}"
    );
}
