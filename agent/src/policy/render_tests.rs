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
    let set = planned.sets.keys().next().unwrap().clone();
    let pchain = planned.policies[0].chain.clone();
    assert_eq!(
        chains[TO_WORKLOADS].rules,
        ["-A WEFT-TO-WL -o weftaaa -m comment --comment \"weft: web\" -j WEFT-TW-weftaaa"]
    );
    assert!(chains[FROM_WORKLOADS].rules.is_empty());
    assert_eq!(
        chains["WEFT-TW-weftaaa"].rules,
        [
            "-A WEFT-TW-weftaaa -m comment --comment \"weft: ingress policy of web\" -j MARK --set-xmark 0x0/0x20000".to_string(),
            format!("-A WEFT-TW-weftaaa -m comment --comment \"weft: policy web\" -j {pchain}"),
            "-A WEFT-TW-weftaaa -m mark --mark 0x20000/0x20000 -j RETURN".to_string(),
            "-A WEFT-TW-weftaaa -m comment --comment \"weft: no ingress policy allowed it\" -j DROP".to_string(),
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
