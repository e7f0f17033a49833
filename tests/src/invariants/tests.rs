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
