use super::*;
use serde_json::json;
use weft_etcd::policy::policy_from_value;

fn endpoint(host: &str, id: &str, ip: &str, labels: &[(&str, &str)]) -> EndpointRecord {
    let mut record: EndpointRecord = serde_json::from_value(json!({
        "container_id": id, "host": host, "ip": ip, "host_ifname": format!("weft{id}"),
        "ifname": "eth0", "mac": "02:00:00:00:00:01", "netns": "/x", "owns_netns": false,
        "created": 0,
    }))
    .unwrap();
    record.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    record
}

fn policy(doc: serde_json::Value) -> Policy {
    policy_from_value(&doc, "").unwrap()
}

struct Fabric {
    web: EndpointRecord,
    front: EndpointRecord,
    remote_front: EndpointRecord,
    db: EndpointRecord,
}

fn fabric() -> Fabric {
    Fabric {
        web: endpoint("h1", "web", "10.65.0.2", &[("app", "web")]),
        front: endpoint("h1", "front", "10.65.0.3", &[("role", "frontend")]),
        remote_front: endpoint("h2", "front2", "10.65.1.2", &[("role", "frontend")]),
        db: endpoint("h2", "db", "10.65.1.3", &[("app", "db")]),
    }
}

fn web_policy() -> Policy {
    policy(json!({
        "name": "web", "order": 100, "selector": "app == 'web'",
        "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'frontend'"},
             "destination": {"ports": [80]}},
            {"action": "allow", "source": {"nets": ["203.0.113.0/24", "2001:db8::/64"]}},
            {"action": "allow", "protocol": "icmpv6"},
            {"action": "allow", "source": {"nets": ["2001:db8::/64"]}}
        ]
    }))
}

#[test]
fn each_family_plans_with_the_endpoints_addresses_of_that_family() {
    let mut web = endpoint("h1", "web", "10.65.0.2", &[("app", "web")]);
    web.ipv6 = Some("fd65::2".parse().unwrap());
    // Dual-stack, IPv4-only and IPv6-only frontends.
    let mut front = endpoint("h1", "front", "10.65.0.3", &[("role", "frontend")]);
    front.ipv6 = Some("fd65::3".parse().unwrap());
    let v4_front = endpoint("h2", "front2", "10.65.1.2", &[("role", "frontend")]);
    let v6_front = endpoint("h2", "front3", "fd65:0:0:1::2", &[("role", "frontend")]);
    let web_policy = web_policy();
    let all = [&web, &front, &v4_front, &v6_front];
    let members = |p: &PolicyPlan, family| -> Vec<String> {
        let name = selector_set_name(family, &Selector::parse("role == 'frontend'").unwrap());
        p.sets[&name]
            .members
            .iter()
            .map(|m| m.net.ip().to_string())
            .collect()
    };
    let v4 = plan(Family::V4, &[&web_policy], &all, &[&web]);
    let v6 = plan(Family::V6, &[&web_policy], &all, &[&web]);
    assert_eq!(members(&v4, Family::V4), ["10.65.0.3", "10.65.1.2"]);
    assert_eq!(members(&v6, Family::V6), ["fd65::3", "fd65:0:0:1::2"]);
    assert_eq!(
        v6.sets.values().filter(|s| s.family != Family::V6).count(),
        0
    );
    // The dual-stack endpoint's profile has its chain in both families, with the same name,
    // and a set of each family; over IPv6 its link-local source on its veth is policed too.
    assert_eq!(v4.profiles[0].chain, v6.profiles[0].chain);
    assert_eq!(v4.sets[&v4.profiles[0].set].family, Family::V4);
    let member = |text: &str| text.parse::<crate::policy::member::Member>().unwrap();
    assert_eq!(
        v6.sets[&v6.profiles[0].set].members,
        [member("fd65::2,weftweb")].into(),
        "ingress: its address on its veth"
    );
    // In IPv6: the selector rule, the IPv6 network (alone from the mixed list), ICMPv6 and the
    // IPv6-only network; no rule of IPv4 only is left.
    let indexes: Vec<usize> = v6.policies[0].rules.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    let rendered = crate::policy::render::render(&v6);
    let icmp: Vec<&String> = rendered[&v6.policies[0].chain]
        .rules
        .iter()
        .filter(|r| r.contains(" -p "))
        .collect();
    assert!(
        icmp.iter().any(|r| r.contains("-p ipv6-icmp ")),
        "ICMPv6 rendered as ip6tables-save prints it: {icmp:#?}"
    );
    // An IPv4-only host plans nothing in IPv6: no endpoint, no chain, no set.
    let only_v4 = endpoint("h1", "web4", "10.65.0.9", &[("app", "web")]);
    let none = plan(Family::V6, &[&web_policy], &[&only_v4], &[&only_v4]);
    assert!(none.profiles.is_empty() && none.policies.is_empty() && none.sets.is_empty());
}

#[test]
fn selected_endpoints_get_chains_and_selectors_get_fabric_wide_sets() {
    let f = fabric();
    let web = web_policy();
    let all = [&f.web, &f.front, &f.remote_front, &f.db];
    let local = [&f.web, &f.front];
    let p = plan(Family::V4, &[&web], &all, &local);
    // Only web is selected, only for ingress (the policy has no egress key): one profile, whose
    // set holds web's address on its veth.
    assert_eq!(p.profiles.len(), 1);
    let profile = &p.profiles[0];
    assert!(profile.chain.starts_with("WEFT-TW-"), "{}", profile.chain);
    assert!(profile.set.starts_with("weft-4t-"), "{}", profile.set);
    assert_eq!(profile.direction, Direction::Ingress);
    assert_eq!(p.sets[&profile.set].kind, SetKind::Profile);
    assert_eq!(
        p.sets[&profile.set].members,
        ["10.65.0.2,weftweb".parse().unwrap()].into()
    );
    assert_eq!(p.policies.len(), 1);
    // ICMPv6 and IPv6-only networks cannot match in IPv4: those rules are left out.
    let indexes: Vec<usize> = p.policies[0].rules.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1]);
    let frontends = selector_set_name(Family::V4, &Selector::parse("role == 'frontend'").unwrap());
    let members: Vec<String> = p.sets[&frontends]
        .members
        .iter()
        .map(|m| m.net.ip().to_string())
        .collect();
    assert_eq!(
        members,
        ["10.65.0.3", "10.65.1.2"],
        "frontends of every host"
    );
    let nets = p.policies[0].rules[1].source.nets_set.clone().unwrap();
    assert_eq!(p.sets[&nets].members.len(), 1, "only the IPv4 network");
    assert_eq!(p.sets.len(), 3, "frontends, networks, the profile");
}

#[test]
fn policies_apply_in_order_and_unselected_endpoints_get_nothing() {
    let f = fabric();
    let late = policy(
        json!({"name": "a-late", "order": 200, "selector": "all()", "ingress": [], "egress": []}),
    );
    let early = policy(
        json!({"name": "z-early", "order": 1, "selector": "has(app)", "egress": [{"action": "allow"}]}),
    );
    let p = plan(
        Family::V4,
        &[&late, &web_policy(), &early],
        &[&f.web, &f.front],
        &[&f.web, &f.front],
    );
    // The profile whose set holds web's pair, for a direction: its policies in order.
    let of_web = |direction| -> Vec<&str> {
        let web: crate::policy::member::Member = "10.65.0.2,weftweb".parse().unwrap();
        p.profiles
            .iter()
            .find(|e| e.direction == direction && p.sets[&e.set].members.contains(&web))
            .unwrap()
            .policies
            .iter()
            .map(|(n, _)| n.as_str())
            .collect()
    };
    assert_eq!(of_web(Direction::Ingress), ["web", "a-late"]);
    assert_eq!(of_web(Direction::Egress), ["z-early", "a-late"]);
    // front (no app label) is selected by a-late alone: a profile of its own each way.
    assert_eq!(p.profiles.len(), 4);
    let nothing = plan(Family::V4, &[&web_policy()], &[&f.front], &[&f.front]);
    assert_eq!(nothing, PolicyPlan::default());
}

#[test]
fn a_label_change_moves_set_members_not_chains() {
    let f = fabric();
    let web = web_policy();
    let before = plan(Family::V4, &[&web], &[&f.web, &f.db], &[&f.web]);
    let mut db = f.db.clone();
    db.labels.insert("role".into(), "frontend".into());
    let after = plan(Family::V4, &[&web], &[&f.web, &db], &[&f.web]);
    assert_eq!(before.profiles, after.profiles);
    assert_eq!(before.policies, after.policies);
    assert_ne!(before.sets, after.sets);
}

/// The bench's scale (1,000 endpoints over 3 hosts, 200 policies) plans the same every time
/// and puts every local endpoint in a profile; its timing is the bench's (`deploy/bench/run
/// --only policy` reports planning time from the agents' logs).
#[test]
fn plan_at_scale_is_stable_and_renders_every_local_endpoint() {
    let endpoints: Vec<EndpointRecord> = (0..1000)
        .map(|i| {
            let app = format!("app{}", i % 100);
            let tier = format!("t{}", i % 5);
            let ip = format!("10.65.{}.{}", i / 250, i % 250);
            endpoint(
                &format!("h{}", i % 3),
                &format!("e{i}"),
                &ip,
                &[("app", &app), ("tier", &tier)],
            )
        })
        .collect();
    let policies: Vec<Policy> = (0..200)
        .map(|k| {
            policy(json!({
                "name": format!("bench-{k}"), "order": k, "selector": format!("app == 'app{}'", k % 100),
                "ingress": [
                    {"action": "allow", "protocol": "tcp", "source": {"selector": format!("tier == 't{}'", k % 5)}, "destination": {"ports": [80, "8000:8080"]}},
                    {"action": "allow", "source": {"selector": format!("app in {{'app{}', 'app{}'}}", (k + 1) % 100, (k + 2) % 100)}},
                    {"action": "deny", "protocol": "icmp"}
                ],
                "egress": [{"action": "allow", "destination": {"nets": ["10.0.0.0/8"]}}]
            }))
        })
        .collect();
    let all: Vec<&EndpointRecord> = endpoints.iter().collect();
    let local: Vec<&EndpointRecord> = endpoints.iter().filter(|e| e.host == "h0").collect();
    let refs: Vec<&Policy> = policies.iter().collect();
    let first = plan(Family::V4, &refs, &all, &local);
    let again = plan(Family::V4, &refs, &all, &local);
    assert_eq!(first, again);
    // Every local endpoint is selected in both directions (each app has ingress and egress),
    // by the two policies of its app: one profile per app and direction, not per endpoint.
    assert_eq!(first.profiles.len(), 2 * 100);
    let members: usize = first
        .profiles
        .iter()
        .map(|p| first.sets[&p.set].members.len())
        .sum();
    // Ingress: its address; egress: its address and the unspecified one, on its veth.
    assert_eq!(members, 3 * local.len());
    let rules: usize = crate::policy::render::render(&first)
        .values()
        .map(|c| c.rules.len())
        .sum();
    assert!(rules > 0);
}
