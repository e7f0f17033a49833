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

#[test]
fn ipv6_prefixes_parse_as_block_keys_routes_and_addresses() {
    let block = Net::parse("fd65::c093:fcc6:570f:32f2:d0c0-122").unwrap();
    assert_eq!(
        block,
        Net::parse("fd65::c093:fcc6:570f:32f2:d0c0/122").unwrap()
    );
    assert_eq!(block.to_string(), "fd65::c093:fcc6:570f:32f2:d0c0/122");
    assert_eq!(block.family(), Family::V6);
    assert!(block.aligned());
    assert!(!Net::parse("fd65::c093:fcc6:570f:32f2:d0c1/122")
        .unwrap()
        .aligned());
    assert!(block.contains("fd65::c093:fcc6:570f:32f2:d0ff".parse().unwrap()));
    assert!(!block.contains("fd65::c093:fcc6:570f:32f2:d100".parse().unwrap()));
    assert!(
        !block.contains("10.65.0.1".parse().unwrap()),
        "never across families"
    );
    assert_eq!(Net::parse("fd65::1").unwrap().len, 128);
    assert_eq!(
        Net::host("fd65::1".parse().unwrap()).to_string(),
        "fd65::1/128"
    );
    let pool = Net::parse("fd65::/48").unwrap();
    assert!(pool.contains_net(&block) && !block.contains_net(&pool));
    assert!(!pool.overlaps(&Net::parse("10.65.0.0/16").unwrap()));
    assert!(Net::parse("::/0")
        .unwrap()
        .contains("fd65::1".parse().unwrap()));
    assert!(Net::parse("fd65::/129").is_none());
}

#[test]
fn dual_stack_records_parse_with_both_addresses() {
    let r = Records::parse(&fixture::etcd());
    assert_eq!(r.malformed, vec![]);
    assert_eq!(r.pools["default-v6"].cidr.to_string(), "fd65::/48");
    assert_eq!(r.hosts_v6["h2"].to_string(), "2001:db8:100::2");
    assert_eq!(r.blocks_of("h1").len(), 2);
    let a = &r.endpoints[&("h1".to_string(), "a".to_string())];
    assert_eq!(
        a.addresses(),
        vec![
            "10.65.0.1".parse::<IpAddr>().unwrap(),
            "fd65::1".parse().unwrap()
        ]
    );
    assert_eq!(r.ips.len(), 2);
    // The List of an IPv6-only endpoint: `ip` empty, `ipv6` set; etcd's: `ip` is the IPv6 one.
    let listed = Endpoint::from_json(&serde_json::json!({
        "container_id": "b", "host": "h1", "ip": "", "ipv6": "fd65::2",
        "host_ifname": "weft2", "netns": "/x",
    }))
    .unwrap();
    assert_eq!(
        (listed.ip.to_string(), listed.ipv6),
        ("fd65::2".into(), None)
    );
    let bad = records(&[
        ("blocks/default-v6/fd65::1-122", r#"{"host":"h1"}"#),
        ("ips/fd65::zz", r#"{"host":"h1","container_id":"a"}"#),
        (
            "endpoints/h1/c",
            r#"{"container_id":"c","host":"h1","ip":"fd65::3","ipv6":"fd65::4","host_ifname":"w","netns":"/x"}"#,
        ),
    ]);
    assert_eq!(bad.malformed.len(), 3, "{:?}", bad.malformed);
}

/// The objects of a check's violations.
fn objects(v: &[Violation]) -> Vec<String> {
    v.iter()
        .map(|v| format!("[{}] {}", v.scope, v.object))
        .collect()
}

#[test]
fn a_healthy_dual_stack_lab_passes_every_check() {
    let v = check(&fixture::snapshot());
    assert_eq!(v, vec![], "{:#?}", objects(&v));
}

#[test]
fn a_missing_ipv6_host_route_and_peer_route_are_reported() {
    let mut s = fixture::snapshot();
    let k = s.hosts[0].kernel.as_mut().unwrap();
    k.routes
        .retain(|r| r["dst"] != "fd65::1" && r["dst"] != "fd65::40/122");
    assert_eq!(
        objects(&check(&s)),
        [
            "[h1] route fd65::1/128 (endpoint a)",
            "[h1] route fd65::40/122 (block of h2)"
        ]
    );
    // An IPv6 route that nothing claims is named too.
    let mut s = fixture::snapshot();
    let k = s.hosts[1].kernel.as_mut().unwrap();
    k.routes
        .push(serde_json::json!({"dst": "fd65::7", "dev": "weft9"}));
    assert_eq!(objects(&check(&s)), ["[h2] route fd65::7/128"]);
}

#[test]
fn stale_and_missing_ipv6_guards_are_reported() {
    let mut etcd = fixture::etcd();
    etcd.insert(
        format!("{ETCD_PREFIX}ips/fd65::99"),
        r#"{"host":"h1","container_id":"gone"}"#.into(),
    );
    etcd.remove(&format!("{ETCD_PREFIX}ips/fd65::1"));
    let v = check(&fixture::snapshot_of(etcd));
    assert_eq!(
        objects(&v),
        ["[h1] etcd endpoints/h1/a", "[h1] etcd ips/fd65::99"],
        "{v:#?}"
    );
    assert_eq!(v[0].expected, "a guard key ips/fd65::1");
}

#[test]
fn the_containers_ipv6_side_is_checked_per_family() {
    let mut s = fixture::snapshot();
    let c = s.hosts[0]
        .containers
        .get_mut(fixture::NETNS)
        .unwrap()
        .as_mut()
        .unwrap();
    c.routes6.retain(|r| r["dst"] != "default");
    c.neighbours6.clear();
    c.links[1]["addr_info"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["local"] != "fd65::1");
    let net = fixture::NETNS;
    assert_eq!(
        objects(&check(&s)),
        [
            format!("[h1] container a ({net}) interface eth0 address"),
            format!("[h1] container a ({net}) neighbour {GATEWAY_V6} dev eth0"),
            format!("[h1] namespace {net} default route (V6)"),
        ]
    );
}

#[test]
fn a_secondary_interface_needs_a_source_rule_per_family() {
    let mut etcd = fixture::etcd();
    let key = format!("{ETCD_PREFIX}endpoints/h1/a");
    let mut a: serde_json::Value = serde_json::from_str(&etcd[&key]).unwrap();
    a["secondary"] = true.into();
    etcd.insert(key, a.to_string());
    let mut s = fixture::snapshot_of(etcd);
    let c = s.hosts[0]
        .containers
        .get_mut(fixture::NETNS)
        .unwrap()
        .as_mut()
        .unwrap();
    // The IPv4 address has its rule and table; the IPv6 one has neither (what the agent did).
    c.rules
        .push(serde_json::json!({"priority": 1000, "src": "10.65.0.1", "table": "1003"}));
    c.routes.push(
        serde_json::json!({"dst": "default", "gateway": GATEWAY, "dev": "eth0", "table": "1003"}),
    );
    c.routes6.push(
        serde_json::json!({"dst": "default", "gateway": GATEWAY_V6, "dev": "eth0", "table": "1003"}),
    );
    let v = check(&s);
    assert_eq!(
        objects(&v),
        [format!(
            "[h1] container a ({}) source rule of fd65::1 (secondary eth0)",
            fixture::NETNS
        )]
    );
    assert_eq!(v[0].found, "no rule");
    c_rule6(&mut s);
    let v = check(&s);
    assert_eq!(v, vec![], "{:#?}", objects(&v));
}

/// Gives the fixture's container the IPv6 source rule a secondary interface needs.
fn c_rule6(s: &mut Snapshot) {
    let c = s.hosts[0]
        .containers
        .get_mut(fixture::NETNS)
        .unwrap()
        .as_mut()
        .unwrap();
    c.rules6
        .push(serde_json::json!({"priority": 1000, "src": "fd65::1", "table": "1003"}));
}

#[test]
fn ipv6_sysctls_tables_and_status_are_checked() {
    let mut s = fixture::snapshot();
    let k = s.hosts[0].kernel.as_mut().unwrap();
    k.sysctls
        .insert("/proc/sys/net/ipv6/conf/weft1/proxy_ndp".into(), "0".into());
    k.filter6 = k.filter6.replace("-A FORWARD -j WEFT-FORWARD\n", "");
    k.raw6 = k.raw6.replace("--invert ", "");
    k.nat6 = k.nat6.replace("[fd65::1]:80", "[fd65::2]:80");
    if let AgentView::Answered { status, .. } = &mut s.hosts[1].agent {
        status["local_blocks"] = serde_json::json!(["10.65.0.64/26"]);
        status["underlay_ipv6"] = "".into();
    }
    assert_eq!(
        objects(&check(&s)),
        [
            "[h1] ip6tables filter FORWARD jump to WEFT-FORWARD",
            "[h1] ip6tables nat WEFT-PORTS tcp/8080",
            "[h1] ip6tables nat WEFT-PORTS tcp/8080 of a",
            "[h1] ip6tables raw WEFT-PREROUTING",
            "[h1] sysctl /proc/sys/net/ipv6/conf/weft1/proxy_ndp",
            "[h2] Status.local_blocks",
            "[h2] Status.underlay_ipv6",
        ]
    );
}

#[test]
fn without_an_ipv6_pool_nothing_of_ipv6_is_expected_and_leftovers_are_named() {
    let mut etcd = fixture::etcd();
    etcd.retain(|k, _| !k.contains("v6") && !k.contains("fd65"));
    let endpoint = format!("{ETCD_PREFIX}endpoints/h1/a");
    let mut a: serde_json::Value = serde_json::from_str(&etcd[&endpoint]).unwrap();
    a.as_object_mut().unwrap().remove("ipv6");
    etcd.insert(endpoint, a.to_string());
    let mut s = fixture::snapshot_of(etcd);
    // The kernels still hold the IPv6 side (left over), the agents answer without it.
    for host in &mut s.hosts {
        if let AgentView::Answered { list, status } = &mut host.agent {
            for e in list.iter_mut() {
                e["ipv6"] = "".into();
            }
            let kept: Vec<serde_json::Value> = status["local_blocks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| !b.as_str().unwrap().contains(':'))
                .cloned()
                .collect();
            status["local_blocks"] = kept.into();
            for p in status["peers"].as_array_mut().unwrap() {
                p["blocks"] = serde_json::json!([p["blocks"][0].clone()]);
            }
        }
    }
    let found = objects(&check(&s));
    for expected in [
        "[h1] route fd65::1/128",
        "[h1] route fd65::/122",
        "[h2] route fd65::/122",
        "[h1] ip6tables raw",
        "[h1] ip6tables nat",
        "[h2] ip6tables filter",
        "[h1] namespace /run/netns/c-a default route (V6)",
        "[h1] sysctl /proc/sys/net/ipv6/conf/weft1/disable_ipv6",
    ] {
        assert!(
            found.contains(&expected.to_string()),
            "{expected}: {found:#?}"
        );
    }
    // And the IPv4 side alone, stripped of the IPv6 leftovers, passes.
    for host in &mut s.hosts {
        let k = host.kernel.as_mut().unwrap();
        k.routes
            .retain(|r| !r["dst"].as_str().unwrap().contains(':'));
        (k.raw6, k.nat6, k.filter6) = Default::default();
        for (f, v) in VETH_SYSCTLS_V4_ONLY {
            k.sysctls.insert(f.replace("{}", "weft1"), v.to_string());
        }
        if let Some(Ok(c)) = host.containers.get_mut(fixture::NETNS) {
            c.routes6.clear();
        }
    }
    let v = check(&s);
    assert_eq!(v, vec![], "{:#?}", objects(&v));
}

#[test]
fn a_vtep_mac_gives_the_link_local_address_ipv6_is_tunnelled_via() {
    use super::model::eui64_link_local;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        eui64_link_local("ee:ee:ee:ee:ee:ee"),
        Some(ip("fe80::ecee:eeff:feee:eeee"))
    );
    assert_eq!(
        eui64_link_local("02:00:00:00:00:0b"),
        Some(ip("fe80::ff:fe00:b"))
    );
    assert_eq!(eui64_link_local("02:00:00"), None);
}
