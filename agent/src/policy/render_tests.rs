use super::*;
use crate::policy::plan::{plan, Family};
use serde_json::json;
use weft_etcd::policy::policy_from_value;
use weft_etcd::records::EndpointRecord;

#[test]
fn chains_are_rendered_as_iptables_save_prints_them() {
    let web: EndpointRecord = serde_json::from_value(json!({
        "container_id": "web", "host": "h1", "ip": "10.65.0.2", "host_ifname": "weftaaa",
        "ifname": "eth0", "mac": "02:00:00:00:00:01", "netns": "/x", "owns_netns": false,
        "created": 0, "labels": {"app": "web"},
    }))
    .unwrap();
    let policy = policy_from_value(
        &json!({"name": "web", "selector": "app == 'web'", "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'frontend'"},
             "destination": {"ports": [80, "8000:8080"]}},
            {"action": "deny", "protocol": "icmp"}
        ]}),
        "",
    )
    .unwrap();
    let planned = plan(Family::V4, &[&policy], &[&web], &[&web]);
    let chains = render(&planned);
    let set = planned.policies[0].rules[0]
        .source
        .selector_set
        .clone()
        .unwrap();
    let pchain = planned.policies[0].chain.clone();
    let profile = &planned.profiles[0];
    let (tw, tw_set) = (&profile.chain, &profile.set);
    assert_eq!(
        chains[TO_WORKLOADS].rules,
        [format!(
            "-A WEFT-TO-WL -m set --match-set {tw_set} dst,dst -j {tw}"
        )]
    );
    assert_eq!(
        planned.sets[tw_set].members,
        ["10.65.0.2,weftaaa".parse().unwrap()].into()
    );
    assert!(chains[FROM_WORKLOADS].rules.is_empty());
    assert_eq!(
        chains[tw].rules,
        [
            format!("-A {tw} -m comment --comment \"weft: ingress policy\" -j MARK --set-xmark 0x0/0x20000"),
            format!("-A {tw} -m comment --comment \"weft: policy web\" -j {pchain}"),
            format!("-A {tw} -m mark --mark 0x20000/0x20000 -j RETURN"),
            format!("-A {tw} -m comment --comment \"weft: no ingress policy allowed it\" -j DROP"),
        ]
    );
    assert_eq!(
        chains[&pchain].rules,
        [
            format!("-A {pchain} -p tcp -m set --match-set {set} src -m multiport --dports 80,8000:8080 -m comment --comment \"weft: policy web ingress 0\" -j MARK --set-xmark 0x20000/0x20000"),
            format!("-A {pchain} -m mark --mark 0x20000/0x20000 -j RETURN"),
            format!("-A {pchain} -p icmp -m comment --comment \"weft: policy web ingress 1\" -j DROP"),
        ]
    );
}

#[test]
fn long_port_lists_are_split_across_multiport_matches() {
    let ports: Vec<PortRange> = (1..=20).map(|p| PortRange { lo: p, hi: p }).collect();
    let chunks = port_chunks(&ports, "--dports");
    assert_eq!(chunks.len(), 2);
    assert!(chunks[0].contains("1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 "));
    let ranges: Vec<PortRange> = (0..8)
        .map(|i| PortRange {
            lo: i * 10 + 1,
            hi: i * 10 + 5,
        })
        .collect();
    assert_eq!(
        port_chunks(&ranges, "--sports").len(),
        2,
        "a range counts twice"
    );
}

#[test]
fn endpoints_of_one_profile_share_its_chains_and_join_by_their_set() {
    let record = |id: &str, ip: &str, app: &str| -> EndpointRecord {
        serde_json::from_value(json!({
            "container_id": id, "host": "h1", "ip": ip, "host_ifname": format!("weft{id}"),
            "ifname": "eth0", "mac": "02:00:00:00:00:01", "netns": "/x", "owns_netns": false,
            "created": 0, "labels": {"app": app},
        }))
        .unwrap()
    };
    let policy = |name: &str, order: u32, ingress: bool| {
        let mut doc = json!({"name": name, "order": order, "selector": "app == 'web'",
            "egress": [{"action": "allow", "source": {"selector": "app == 'db'"}}]});
        if ingress {
            doc["ingress"] = json!([{"action": "deny", "protocol": "icmp"}]);
        }
        policy_from_value(&doc, "").unwrap()
    };
    let (a, b, c) = (
        policy("a", 2, true),
        policy("b", 1, false),
        policy("c", 3, true),
    );
    let policies = [&a, &b, &c];
    let first = record("one", "10.65.0.2", "web");
    let second = record("two", "10.65.0.3", "web");
    let alone = plan(Family::V4, &policies, &[&first], &[&first]);
    let both = plan(
        Family::V4,
        &policies,
        &[&first, &second],
        &[&first, &second],
    );
    // The second web endpoint changes no chain, only its profiles' sets.
    assert_eq!(render(&alone), render(&both));
    assert_ne!(alone.sets, both.sets);
    // What an attach of the second adds in place is exactly what the whole plan puts there.
    let joins = crate::policy::plan::endpoint_plan(Family::V4, &policies, &second);
    let mut wanted: Vec<_> = joins.iter().map(|(p, _)| p.clone()).collect();
    wanted.sort_by(|a, b| a.chain.cmp(&b.chain));
    assert_eq!(wanted, both.profiles);
    for (profile, members) in &joins {
        let held = &both.sets[&profile.set].members;
        assert!(members.iter().all(|m| held.contains(m)), "{members:?}");
    }
    // Egress: b then a then c (by order), ingress: a then c.
    let egress = &both
        .profiles
        .iter()
        .find(|p| p.direction == Direction::Egress)
        .unwrap();
    let names: Vec<&str> = egress.policies.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "a", "c"]);
    let rendered = render(&both);
    assert_eq!(
        rendered[FROM_WORKLOADS].rules,
        [format!(
            "-A WEFT-FROM-WL -m set --match-set {} src,src -j {}",
            egress.set, egress.chain
        )]
    );
}
