//! Network policy end to end (issue 16), its lifecycle: deleting policies leaves nothing
//! behind, detached replicas leave their profiles, tampering is repaired and leftovers go at
//! start, hostile policies and labels are refused naming the field with nothing changed, and
//! rendered rules round-trip through iptables-save.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_tests::lab::policy::{self as pl, attach, becomes, serve};
use weft_tests::probe::{self, Probe};
use weft_tests::{sh, Lab, LabOptions};

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

/// Whether some `weft-` set of host `i` still holds a pair of `veth`.
fn holds_veth(lab: &Lab, i: usize, veth: &str) -> bool {
    let suffix = format!(",{veth}");
    pl::sets(lab, i).is_ok_and(|s| s.values().flatten().any(|m| m.ends_with(&suffix)))
}

/// Waits up to 3 s for `done`.
fn soon(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Attaches a replica of `app=web` on h1: (netns name, ip, host veth).
fn replica(lab: &Lab, id: &str) -> (String, String, String) {
    let endpoint = lab
        .ctl_json(0, &["attach", id, "--label", "app=web"])
        .unwrap();
    let field = |k: &str| endpoint[k].as_str().unwrap().to_string();
    let netns = field("netns").rsplit('/').next().unwrap().to_string();
    (netns, field("ip"), field("host_ifname"))
}

#[test]
fn a_detached_replica_leaves_its_profile_and_the_last_one_takes_the_profile_away() {
    let mut lab = Lab::new(LabOptions {
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    // No periodic sync during the test (its plan could take a departed replica's pairs out
    // before the leave does): every plan here is one something asked for.
    for i in 0..lab.hosts.len() {
        let quiet = ["--resync-interval", "60s"];
        lab.start_agent_env(i, &quiet, &[("WEFT_LOG", "info,weft_agent::policy=debug")])
            .unwrap();
        lab.wait_agent(i, Duration::from_secs(30)).unwrap();
    }
    let (_, _, veth1) = replica(&lab, "w1");
    let (w2_ns, w2_ip, veth2) = replica(&lab, "w2");
    let (c_ns, _) = attach(&lab, 1, "c", &["role=client"], &[]).unwrap();
    serve(&mut lab, &w2_ns);
    pl::apply(
        &lab,
        &json!({"name": "web", "selector": "app == 'web'", "ingress": [
        {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'client'"}}]}),
    )
    .unwrap();
    assert!(soon(
        || holds_veth(&lab, 0, &veth1) && holds_veth(&lab, 0, &veth2)
    ));
    let chain = pl::profile_chain(&lab, 0, &veth2, "weft-4t-").unwrap();
    assert_eq!(
        pl::profile_chain(&lab, 0, &veth1, "weft-4t-"),
        Some(chain.clone())
    );
    assert!(becomes(&c_ns, &w2_ip, Probe::Tcp(80), true));

    // One replica goes: its pairs leave the profile's sets, by the policy loop's leave (no
    // plan of the host needed), and the other is policed by the same chain as before.
    let before = lab.agent_log(0).len();
    lab.ctl_json(0, &["detach", "w1"]).unwrap();
    assert!(
        soon(|| !holds_veth(&lab, 0, &veth1)),
        "w1's pairs left: {:#?}",
        pl::sets(&lab, 0)
    );
    assert!(
        lab.agent_log(0)[before..].contains("endpoints left their profiles' sets"),
        "the leave took them out"
    );
    assert_eq!(
        pl::profile_chain(&lab, 0, &veth2, "weft-4t-"),
        Some(chain.clone())
    );
    assert!(
        probe::reach(&c_ns, &w2_ip, Probe::Tcp(80)),
        "w2 still served"
    );

    // The last replica goes: the profile's sets and chain go with it.
    lab.ctl_json(0, &["detach", "w2"]).unwrap();
    assert!(
        soon(|| !holds_veth(&lab, 0, &veth2)
            && !pl::filter_rules(&lab, 0)
                .unwrap()
                .iter()
                .any(|r| r.contains(&chain))),
        "the profile's chain and sets are gone: {:#?}",
        pl::filter_rules(&lab, 0)
    );
    // A replica attached again is policed from its first packet, as any first one.
    let (_, _, veth1) = replica(&lab, "w1");
    assert_eq!(pl::profile_chain(&lab, 0, &veth1, "weft-4t-"), Some(chain));
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
    // The invariant checker names it. The agent may repair the member while the lab is read
    // (a resync every 2 s), so the reading is made to show the tampered set either way.
    let mut snapshot = weft_tests::invariants::snapshot(&lab).unwrap();
    let added = ["add", set.as_str(), b_ip.as_str()];
    assert_eq!(snapshot.hosts[0].name, h1);
    let kernel = snapshot.hosts[0].kernel.as_mut().unwrap();
    kernel.ipsets = kernel
        .ipsets
        .lines()
        .filter(|l| !l.split_whitespace().take(3).eq(added))
        .map(|l| format!("{l}\n"))
        .collect();
    let violations = weft_tests::invariants::check(&snapshot);
    assert!(
        violations
            .iter()
            .any(|v| v.object == format!("ipset {set}")),
        "the checker sees the missing member: {violations:?}"
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
    use weft_agent::firewall::chains::FamilyChains;
    use weft_agent::firewall::iptables::Iptables;
    use weft_agent::firewall::{Backend, FirewallSpec, PoolRule, SyncMode};
    use weft_agent::policy::plan::{plan, Family};
    use weft_agent::policy::render::render;
    use weft_agent::policy::sets::{Ipset, SetBackend};
    weft_tests::require_root();
    let ns = format!("wpol{}", std::process::id());
    sh::run("ip", &["netns", "add", &ns]).unwrap();
    let web: weft_etcd::records::EndpointRecord = serde_json::from_value(json!({
        "container_id": "web", "host": "h1", "ip": "10.65.0.2", "host_ifname": "weft0123456789a",
        "ifname": "eth0", "mac": "02:00:00:00:00:01", "netns": "/x", "owns_netns": false,
        "created": 0, "labels": {"app": "web"}, "ipv6": "fd65::2",
    }))
    .unwrap();
    let ports: Vec<serde_json::Value> = (1..=20).map(|p| json!(p * 100)).collect();
    let policy = weft_etcd::policy::policy_from_value(&json!({"name": "web", "selector": "all()",
        "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "has(app)", "nets": ["10.0.0.0/8", "203.0.113.7/32"]},
             "destination": {"ports": ports}},
            {"action": "deny", "protocol": "udp", "source": {"ports": ["1000:2000"]}},
            {"action": "allow", "protocol": "icmp", "source": {"nets": ["0.0.0.0/0"]}},
            {"action": "allow", "protocol": "icmpv6", "source": {"nets": ["2001:db8::/32"]}}],
        "egress": [{"action": "deny", "destination": {"nets": ["203.0.113.0/24"]}}, {"action": "allow"}]}), "").unwrap();
    // Dual-stack: both families' chains and sets, the IPv6 ones through ip6tables.
    let v4 = plan(Family::V4, &[&policy], &[&web], &[&web]);
    let v6 = plan(Family::V6, &[&policy], &[&web], &[&web]);
    let mut all_sets = v4.sets.clone();
    all_sets.extend(v6.sets.clone());
    let pools = vec![PoolRule {
        name: "default-v6".into(),
        cidr: "fd65::/48".parse().unwrap(),
        nat_outgoing: true,
    }];
    let path = format!("/run/netns/{ns}");
    let result = std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sets = Ipset::default();
        sets.sync(&all_sets, SyncMode::Verify).unwrap();
        let spec = FirewallSpec {
            pools: pools.clone(),
            policy: FamilyChains {
                v4: render(&v4),
                v6: render(&v6),
            },
            ..Default::default()
        };
        let firewall = Iptables::default();
        let first = firewall.sync(&spec, SyncMode::Verify).unwrap();
        let again = firewall.sync(&spec, SyncMode::Verify).unwrap();
        let sets_again = sets.sync(&all_sets, SyncMode::Verify).unwrap();
        // Nothing wanted any more: chains and sets go.
        let empty = FirewallSpec {
            pools,
            ..Default::default()
        };
        firewall.sync(&empty, SyncMode::Verify).unwrap();
        let destroyed = sets.prune(&Default::default()).unwrap();
        let save: String = ["iptables-save", "ip6tables-save"]
            .iter()
            .map(|save| std::process::Command::new(save).output().unwrap())
            .map(|out| String::from_utf8_lossy(&out.stdout).to_string())
            .collect();
        (
            first.tables_written,
            again.tables_written,
            sets_again,
            destroyed,
            save,
        )
    })
    .join();
    sh::run("ip", &["netns", "del", &ns]).unwrap();
    let (first, again, sets_again, destroyed, save) = result.unwrap();
    // nat, policy's chains and filter of each family, and IPv6's raw table.
    assert_eq!(first, 7);
    assert_eq!(again, 0, "verified policy chains are not written again");
    assert_eq!(sets_again, 0, "verified sets are not written again");
    assert_eq!(
        destroyed, 8,
        "IPv4: the selector's set and both rules' network sets; IPv6: the ICMPv6 rule's \
         networks (the first rule names IPv4 networks only, so it makes no IPv6 set); and the \
         endpoint's profile sets, ingress and egress in each family"
    );
    assert!(
        !save.contains("WEFT-PI-") && !save.contains("WEFT-TW-"),
        "{save}"
    );
}
