//! The invariant checker and the seeded chaos run: the checker passes on a calm lab after
//! ordinary operations and names each violation injected by hand; the chaos run (seeded,
//! `WEFT_CHAOS_SEED` replays, `WEFT_CHAOS_MINUTES` lengthens, odd seeds run dual-stack unless
//! `WEFT_CHAOS_STACK` says otherwise) keeps every invariant.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use weft_tests::chaos::{self, ChaosOptions};
use weft_tests::cni::run as cni;
use weft_tests::invariants::{self, Violation};
use weft_tests::{sh, Lab, LabOptions};

fn render(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("\n  {v}"))
        .collect::<String>()
}

/// Asserts that every violation is one the test caused (`allowed`) and that `wanted` is among
/// them: the checker names what is wrong, and nothing else.
fn assert_names(
    violations: &[Violation],
    wanted: impl Fn(&Violation) -> bool,
    allowed: impl Fn(&Violation) -> bool,
) {
    assert!(
        violations.iter().any(&wanted),
        "the injected violation is not named; found:{}",
        render(violations)
    );
    let strays: Vec<Violation> = violations
        .iter()
        .filter(|v| !wanted(v) && !allowed(v))
        .cloned()
        .collect();
    assert!(
        strays.is_empty(),
        "violations nobody injected:{}",
        render(&strays)
    );
}

/// A lab whose agents keep their liveness through a short freeze.
fn lab_for_injection() -> Lab {
    Lab::new(LabOptions {
        agent_args: vec!["--alive-ttl".into(), "30s".into()],
        ..Default::default()
    })
    .unwrap()
}

fn endpoint(lab: &Lab, host: usize, id: &str) -> invariants::Endpoint {
    invariants::Endpoint::from_json(&lab.ctl_json(host, &["get", id]).unwrap()).unwrap()
}

/// The agent of the frozen host cannot answer; that one violation is expected.
fn frozen_api(host: &str) -> impl Fn(&Violation) -> bool + '_ {
    move |v| v.scope == host && v.object == "agent API"
}

#[test]
fn a_calm_lab_after_ordinary_operations_has_no_violation() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    lab.attach(0, "plain").unwrap();
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80", "-p", "5353:53/udp"])
        .unwrap();
    // Attaching again is idempotent and changes nothing.
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80", "-p", "5353:53/udp"])
        .unwrap();
    lab.ctl_json(1, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    lab.attach(1, "gone").unwrap();
    lab.ctl_json(1, &["detach", "gone"]).unwrap();
    lab.attach(2, "c").unwrap();
    // Two CNI containers on h3, one publishing a port; one is deleted again.
    let config = |ports: Value| {
        json!({
            "cniVersion": "1.1.0", "name": "weft-a", "type": "weft-cni",
            "socket": lab.hosts[2].socket, "runtimeConfig": {"portMappings": ports},
        })
    };
    let pods: Vec<String> = (0..2).map(|i| format!("{}-pod{i}", lab.prefix)).collect();
    for pod in &pods {
        sh::run("ip", &["netns", "add", pod]).unwrap();
    }
    let path = |i: usize| format!("/run/netns/{}", pods[i]);
    let published = config(json!([{"hostPort": 9090, "containerPort": 80, "protocol": "tcp"}]));
    let (ok, result) = cni("ADD", "pod0", &path(0), &published);
    assert!(ok, "{result}");
    let (ok, result) = cni("ADD", "pod1", &path(1), &config(json!([])));
    assert!(ok, "{result}");
    let (ok, result) = cni("DEL", "pod1", &path(1), &config(json!([])));
    assert!(ok, "{result}");

    let coverage = invariants::assert_quiet(&lab);
    eprintln!("calm lab checked: {coverage}");
    assert_eq!(coverage.hosts, 3);
    assert_eq!(coverage.endpoints, 5, "plain, web, web, c, pod0");
    assert_eq!(coverage.published_ports, 4);
    assert_eq!(coverage.container_namespaces, 5);
    // 5 container routes, a blackhole per host, two peer blocks per host.
    assert_eq!(coverage.routes, 5 + 3 + 3 * 2);
    for pod in &pods {
        sh::run("ip", &["netns", "del", pod]).unwrap();
    }
}

#[test]
fn a_deleted_route_is_named_until_the_agent_repairs_it() {
    let lab = lab_for_injection();
    lab.attach(0, "a").unwrap();
    lab.attach(1, "b").unwrap();
    invariants::assert_quiet(&lab);
    let h1 = lab.hosts[0].name.clone();
    let a = endpoint(&lab, 0, "a");

    lab.freeze_agent(0).unwrap();
    sh::run("ip", &["-n", &h1, "route", "del", &format!("{}/32", a.ip)]).unwrap();
    let violations = invariants::check_now(&lab).unwrap();
    lab.thaw_agent(0).unwrap();
    assert_names(
        &violations,
        |v| {
            v.scope == h1
                && v.object == format!("route {}/32 (endpoint a)", a.ip)
                && v.expected.contains(&format!("dev {}", a.host_ifname))
                && v.found == "none"
        },
        frozen_api(&h1),
    );
    invariants::assert_quiet(&lab);
}

#[test]
fn a_stray_address_key_is_named() {
    let lab = lab_for_injection();
    lab.attach(0, "a").unwrap();
    invariants::assert_quiet(&lab);
    let h1 = lab.hosts[0].name.clone();
    let key = "/weft/v1/ips/10.65.250.9";

    // Frozen, so that no agent can tidy the key away before the check reads it.
    lab.freeze_agent(0).unwrap();
    lab.etcd()
        .put(
            key,
            &json!({"host": h1, "container_id": "ghost"}).to_string(),
        )
        .unwrap();
    let violations = invariants::check_now(&lab).unwrap();
    lab.thaw_agent(0).unwrap();
    assert_names(
        &violations,
        |v| {
            v.scope == h1
                && v.object == "etcd ips/10.65.250.9"
                && v.expected == format!("an endpoint record endpoints/{h1}/ghost")
        },
        frozen_api(&h1),
    );
    lab.etcd_delete(key).unwrap();
    invariants::assert_quiet(&lab);
}

#[test]
fn an_extra_rule_is_named_until_the_agent_rewrites_its_chain() {
    let lab = lab_for_injection();
    lab.ctl_json(1, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    invariants::assert_quiet(&lab);
    let h2 = lab.hosts[1].name.clone();

    lab.freeze_agent(1).unwrap();
    sh::run_in(
        &h2,
        &[
            "iptables",
            "-w",
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
            "10.65.250.9:80",
        ],
    )
    .unwrap();
    let violations = invariants::check_now(&lab).unwrap();
    lab.thaw_agent(1).unwrap();
    assert_names(
        &violations,
        |v| {
            v.scope == h2
                && v.object == "iptables nat WEFT-PORTS tcp/9999"
                && v.found == "1 DNAT to 10.65.250.9:80"
        },
        frozen_api(&h2),
    );
    invariants::assert_quiet(&lab);
}

#[test]
fn a_flipped_sysctl_is_named_until_the_agent_puts_it_back() {
    let lab = lab_for_injection();
    lab.attach(2, "a").unwrap();
    invariants::assert_quiet(&lab);
    let h3 = lab.hosts[2].name.clone();
    let a = endpoint(&lab, 2, "a");
    let knob = format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", a.host_ifname);

    lab.freeze_agent(2).unwrap();
    sh::run_in(&h3, &["sh", "-c", &format!("echo 0 > {knob}")]).unwrap();
    let violations = invariants::check_now(&lab).unwrap();
    lab.thaw_agent(2).unwrap();
    assert_names(
        &violations,
        |v| v.scope == h3 && v.object == format!("sysctl {knob}") && v.found == "0",
        frozen_api(&h3),
    );
    invariants::assert_quiet(&lab);
}

/// A dual-stack lab (IPv4 and IPv6 pools) whose agents keep their liveness through a freeze.
fn dual_stack_lab_for_injection() -> Lab {
    Lab::new(LabOptions {
        ipv6: true,
        agent_args: vec!["--alive-ttl".into(), "30s".into()],
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn on_a_dual_stack_lab_ipv6_violations_are_named_until_repaired() {
    let lab = dual_stack_lab_for_injection();
    let (_, _, a6) = lab.attach_dual(0, "a").unwrap();
    lab.ctl_json(1, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    let coverage = invariants::assert_quiet(&lab);
    // Both addresses of both containers, a blackhole per local block (h1 and h2 own one of
    // each family, h3 none), and every host a route to each block of the others (2 + 2 + 4).
    assert_eq!(coverage.routes, 4 + 4 + 8);
    let h1 = lab.hosts[0].name.clone();
    let a = endpoint(&lab, 0, "a");
    assert_eq!(a.ipv6.map(|ip| ip.to_string()), Some(a6.clone()));

    // The IPv6 host route deleted, a stray IPv6 guard, a flipped IPv6 sysctl: each named.
    let key = "/weft/v1/ips/fd65::ffff:9";
    let knob = format!("/proc/sys/net/ipv6/conf/{}/proxy_ndp", a.host_ifname);
    lab.freeze_agent(0).unwrap();
    sh::run(
        "ip",
        &["-n", &h1, "-6", "route", "del", &format!("{a6}/128")],
    )
    .unwrap();
    lab.etcd()
        .put(
            key,
            &json!({"host": h1, "container_id": "ghost"}).to_string(),
        )
        .unwrap();
    sh::run_in(&h1, &["sh", "-c", &format!("echo 0 > {knob}")]).unwrap();
    let violations = invariants::check_now(&lab).unwrap();
    lab.thaw_agent(0).unwrap();
    let route = format!("route {a6}/128 (endpoint a)");
    let wanted = |v: &Violation| {
        v.scope == h1
            && ((v.object == route && v.found == "none")
                || v.object == "etcd ips/fd65::ffff:9"
                || (v.object == format!("sysctl {knob}") && v.found == "0"))
    };
    assert_eq!(
        violations.iter().filter(|v| wanted(v)).count(),
        3,
        "{}",
        render(&violations)
    );
    assert_names(&violations, wanted, frozen_api(&h1));
    lab.etcd_delete(key).unwrap();
    invariants::assert_quiet(&lab);
}

#[test]
fn a_dead_agent_is_named() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    lab.attach(1, "b").unwrap();
    invariants::assert_quiet(&lab);
    let h2 = lab.hosts[1].name.clone();

    lab.stop_agent(1, Signal::SIGKILL).unwrap();
    // Longer than the lab's 3 s TTL: once the lease is gone, the dead agent is all that is left.
    let unquiet = invariants::wait_quiet(&lab, Duration::from_secs(6))
        .expect_err("a dead agent must be a violation");
    assert_eq!(
        unquiet.violations,
        vec![Violation::new(
            &h2,
            "agent",
            "a running agent",
            "no agent process"
        )],
        "{unquiet}"
    );
    lab.start_agent(1).unwrap();
    lab.wait_agent(1, Duration::from_secs(30)).unwrap();
    invariants::assert_quiet(&lab);
}

/// The faults the chaos run uses are what they claim: a partition cuts a host off etcd (and
/// nothing else), a pause freezes etcd for everyone, and both undo without residue.
#[test]
fn the_lab_etcd_faults_cut_what_they_claim_and_undo_cleanly() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let url = lab.etcd_endpoints();
    let reaches_etcd = |ns: &str| {
        sh::in_ns(
            ns,
            &[
                "etcdctl",
                "--endpoints",
                &url,
                "--command-timeout=1s",
                "get",
                "x",
            ],
        )
        .unwrap()
        .status
        .success()
    };
    let (h1, h2) = (lab.hosts[0].name.clone(), lab.hosts[1].name.clone());
    // iptables-save without its timestamped comment lines.
    let rules = |ns: &str| {
        sh::run_in(ns, &["iptables-save", "-t", "filter"])
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = rules(&h1);
    assert!(reaches_etcd(&h1) && reaches_etcd(&h2));

    lab.partition_from_etcd(0).unwrap();
    assert!(!reaches_etcd(&h1), "h1 is cut off");
    assert!(reaches_etcd(&h2), "h2 is not");
    assert!(
        sh::ping(&h1, weft_tests::lab::ROUTER_IP),
        "only etcd is cut"
    );
    lab.heal_partition(0).unwrap();
    assert!(reaches_etcd(&h1));
    assert_eq!(rules(&h1), before, "no rule of the partition is left");

    lab.pause_etcd().unwrap();
    assert!(
        !reaches_etcd(&h1) && !reaches_etcd(&h2),
        "etcd answers nobody"
    );
    lab.resume_etcd().unwrap();
    assert!(reaches_etcd(&h1) && reaches_etcd(&h2));
}

/// The CI run: about 100 s of chaos (the whole test stays under 3 minutes on the 2-core
/// reference machine). `WEFT_CHAOS_SEED=N` replays a run, `WEFT_CHAOS_MINUTES=M` lengthens it.
#[test]
fn a_seeded_chaos_run_keeps_every_invariant() {
    // `run` prints the seed first, before it builds anything.
    let options = ChaosOptions::from_env(Duration::from_secs(100)).unwrap();
    let report = chaos::run(&options).expect("the chaos lab");
    eprintln!("{}", report.summary());
    assert!(report.passed(), "{}", report.render());
    assert!(
        report.quiet_points >= 3 && report.ops.len() >= 20,
        "the run did too little to mean anything:\n{}",
        report.render()
    );
}
