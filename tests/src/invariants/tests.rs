use super::*;

#[test]
fn nets_parse_both_notations_and_compare() {
    let a = Net::parse("10.65.3.64-26").unwrap();
    assert_eq!(a, Net::parse("10.65.3.64/26").unwrap());
    assert_eq!(a.to_string(), "10.65.3.64/26");
    assert!(a.aligned());
    assert!(!Net::parse("10.65.3.65/26").unwrap().aligned());
    assert!(a.contains("10.65.3.127".parse().unwrap()));
    assert!(!a.contains("10.65.3.128".parse().unwrap()));
    assert_eq!(Net::parse("10.65.3.7").unwrap().len, 32);
    let pool = Net::parse("10.65.0.0/16").unwrap();
    assert!(pool.contains_net(&a) && !a.contains_net(&pool) && a.overlaps(&pool));
    assert!(Net::parse("10.65.0.0/33").is_none());
}

#[test]
fn dnat_rules_are_read_from_iptables_save() {
    let line = "-A WEFT-PORTS -p udp -m udp --dport 5353 -m comment --comment \"weft: a b\" \
                -j DNAT --to-destination 10.65.34.1:53";
    let words = rule_words(line);
    assert!(words.contains(&"weft: a b".to_string()), "{words:?}");
    assert_eq!(
        parse_dnat(&words),
        Some(("udp".into(), 5353, "10.65.34.1:53".into()))
    );
    assert_eq!(parse_dnat(&rule_words("-A WEFT-PORTS -j RETURN")), None);
}

fn records(pairs: &[(&str, &str)]) -> Records {
    Records::parse(
        &pairs
            .iter()
            .map(|(k, v)| (format!("{ETCD_PREFIX}{k}"), v.to_string()))
            .collect(),
    )
}

#[test]
fn records_parse_and_malformed_ones_are_named() {
    let r = records(&[
        (
            "pools/default",
            r#"{"cidr":"10.65.0.0/16","block_size":26,"nat_outgoing":true}"#,
        ),
        (
            "hosts/h1",
            r#"{"underlay_ip":"198.51.100.1","version":"x","first_seen":0}"#,
        ),
        ("blocks/default/10.65.0.0-26", r#"{"host":"h1"}"#),
        ("blocks/default/10.65.0.1-26", r#"{"host":"h1"}"#),
        ("ips/10.65.0.1", r#"{"host":"h1","container_id":"a"}"#),
        (
            "endpoints/h1/b",
            r#"{"container_id":"a","host":"h1","ip":"10.65.0.1","host_ifname":"weftx","netns":"/x"}"#,
        ),
        ("ports/h1/tcp/80", r#"{"container_id":"a"}"#),
        ("future/thing", "whatever"),
    ]);
    assert_eq!(r.pools["default"].block_size, 26);
    assert_eq!(r.blocks.len(), 1);
    assert_eq!(r.ips.len(), 1);
    assert_eq!(r.ports.len(), 1);
    let objects: Vec<&str> = r.malformed.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(
        objects,
        vec!["etcd blocks/default/10.65.0.1-26", "etcd endpoints/h1/b"],
        "{:?}",
        r.malformed
    );
}

/// A filter table as iptables-save prints it, from rule bodies.
fn filter(rules: &[&str]) -> HostKernel {
    HostKernel {
        filter: rules.iter().map(|r| format!("-A {r}\n")).collect(),
        ..Default::default()
    }
}

const CONTAINER_VXLAN_DROP: &str =
    "-i weft+ -p udp -m udp --dport 4789 -m comment --comment \"weft: containers never send VXLAN\" -j DROP";

#[test]
fn the_vxlan_guard_follows_the_pools_and_peers() {
    let pool = |encapsulation: &str| {
        format!(
            r#"{{"cidr":"10.65.0.0/16","block_size":26,"nat_outgoing":true,"encapsulation":"{encapsulation}"}}"#
        )
    };
    let host = |ip: &str| format!(r#"{{"underlay_ip":"{ip}","version":"x","first_seen":0}}"#);
    let (h1, h2) = (host("198.51.100.1"), host("198.18.0.2"));
    let cross = pool("cross-subnet");
    let r = records(&[
        ("pools/default", &cross),
        ("hosts/h1", &h1),
        ("hosts/h2", &h2),
    ]);
    let guarded = filter(&[
        &format!("WEFT-FORWARD {CONTAINER_VXLAN_DROP}"),
        &format!("WEFT-INPUT {CONTAINER_VXLAN_DROP}"),
        "WEFT-INPUT -p udp -m udp --dport 4789 -j WEFT-VXLAN",
        "WEFT-VXLAN -s 198.18.0.2/32 -j RETURN",
        "WEFT-VXLAN -j DROP",
    ]);
    let mut v = vec![];
    check_vxlan_rules(&r, "h1", &guarded, &mut v);
    assert_eq!(v, vec![], "h1 accepts VXLAN from h2 only");
    check_vxlan_rules(&r, "h2", &guarded, &mut v);
    assert_eq!(v.len(), 1, "h2's peer is h1: {v:?}");
    assert_eq!(v[0].object, "iptables filter WEFT-VXLAN");

    let none = pool("none");
    let r = records(&[("pools/default", &none), ("hosts/h1", &h1)]);
    let mut v = vec![];
    check_vxlan_rules(&r, "h1", &filter(&[]), &mut v);
    assert_eq!(v, vec![], "no encapsulation, no guard");
    check_vxlan_rules(&r, "h1", &guarded, &mut v);
    let objects: Vec<&str> = v.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(objects.len(), 4, "{objects:?}");
}

#[test]
fn every_drop_comes_before_policy() {
    let established = "WEFT-FORWARD -i weft+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT";
    let egress = "WEFT-INPUT -i weft+ -m conntrack ! --ctstate RELATED,ESTABLISHED -j WEFT-FROM-WL";
    let forward_drop = format!("WEFT-FORWARD {CONTAINER_VXLAN_DROP}");
    let input_drop = format!("WEFT-INPUT {CONTAINER_VXLAN_DROP}");
    let mut v = vec![];
    let drops_first = |k: &HostKernel, v: &mut Vec<Violation>| {
        policy::check_drops_first("h1", "iptables", &k.filter, v)
    };
    drops_first(
        &filter(&[&forward_drop, established, &input_drop, egress]),
        &mut v,
    );
    assert_eq!(v, vec![]);
    drops_first(
        &filter(&[established, &forward_drop, egress, &input_drop]),
        &mut v,
    );
    let objects: Vec<&str> = v.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(
        objects,
        ["iptables filter WEFT-FORWARD", "iptables filter WEFT-INPUT"]
    );
    let mut v = vec![];
    drops_first(&filter(&[]), &mut v);
    assert_eq!(v.len(), 2, "no policy dispatch at all: {v:?}");
}
