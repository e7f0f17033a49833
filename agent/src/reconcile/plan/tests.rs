use super::*;
use weft_etcd::records::HostRecord;
use weft_etcd::ClusterEvent;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn route(dst: &str, target: RouteTarget) -> Route {
    Route {
        dst: net(dst),
        target,
    }
}

fn endpoint(id: &str, ip: &str, veth: &str) -> EndpointRecord {
    crate::testing::endpoint("a", id, ip, veth)
}

fn cluster() -> ClusterView {
    let mut view = ClusterView::default();
    for (host, ip) in [("a", "198.51.100.1"), ("b", "198.51.100.2")] {
        view.apply(ClusterEvent::HostPut(
            host.into(),
            HostRecord {
                underlay_ip: ip.parse().unwrap(),
                version: "test".into(),
                first_seen: 0,
                underlay_prefix: Some(24),
                vtep_mac: None,
                tunnel_ip: None,
                underlay_ipv6: None,
            },
        ));
    }
    for (block, host) in [
        ("10.65.0.0/26", "a"),
        ("10.65.0.64/26", "b"),
        ("10.65.0.128/26", "gone"),
    ] {
        view.apply(ClusterEvent::BlockPut {
            pool: "default".into(),
            block: net(block),
            host: host.into(),
        });
    }
    view.alive.insert("a".into());
    view
}

#[test]
fn desired_routes_are_containers_blackholes_and_peer_blocks() {
    let endpoints = [
        endpoint("web", "10.65.0.5", "weft1"),
        endpoint("gone", "10.65.0.6", "weft2"),
    ];
    let links = BTreeMap::from([("weft1".to_string(), 4)]);
    let view = cluster();
    let paths = peers::peer_paths(
        "a",
        "198.51.100.1/24".parse().unwrap(),
        weft_etcd::records::Encapsulation::CrossSubnet,
        &view.hosts,
    );
    let desired = desired_routes("a", &view, &endpoints, &links, &paths, None);
    assert_eq!(
        desired,
        BTreeMap::from([
            (net("10.65.0.0/26"), RouteTarget::Blackhole),
            (net("10.65.0.5/32"), RouteTarget::Dev(4)),
            (
                net("10.65.0.64/26"),
                RouteTarget::Via("198.51.100.2".parse().unwrap())
            ),
        ]),
        "no route for a container without a veth, nor for a block whose host is unknown"
    );
}

#[test]
fn converged_state_needs_nothing() {
    let desired = BTreeMap::from([
        (net("10.65.0.0/26"), RouteTarget::Blackhole),
        (net("10.65.0.5/32"), RouteTarget::Dev(4)),
    ]);
    let actual = [
        route("10.65.0.5/32", RouteTarget::Dev(4)),
        route("10.65.0.0/26", RouteTarget::Blackhole),
    ];
    assert!(route_diff(&desired, &actual).is_empty());
}

#[test]
fn missing_changed_stale_and_duplicate_routes() {
    let peer = RouteTarget::Via("198.51.100.2".parse().unwrap());
    let moved = RouteTarget::Via("198.51.100.3".parse().unwrap());
    let desired = BTreeMap::from([
        (net("10.65.0.64/26"), moved),
        (net("10.65.0.128/26"), peer),
        (net("10.65.0.5/32"), RouteTarget::Dev(4)),
    ]);
    let actual = [
        route("10.65.0.64/26", peer),
        route("10.65.0.5/32", RouteTarget::Dev(4)),
        route("10.65.0.5/32", RouteTarget::Dev(4)),
        route("10.65.1.0/26", RouteTarget::Blackhole),
    ];
    let d = route_diff(&desired, &actual);
    assert_eq!(
        d.replace,
        vec![route("10.65.0.64/26", moved), route("10.65.0.128/26", peer)]
    );
    assert_eq!(
        d.delete,
        vec![
            route("10.65.0.64/26", peer),
            route("10.65.0.5/32", RouteTarget::Dev(4)),
            route("10.65.1.0/26", RouteTarget::Blackhole),
        ]
    );
}

#[test]
fn busy_endpoints_are_never_missing() {
    let endpoints = [
        endpoint("a1", "10.65.0.5", "weft1"),
        endpoint("a2", "10.65.0.6", "weft2"),
    ];
    let links = BTreeMap::new();
    let busy = HashSet::from(["a2".to_string()]);
    let missing: Vec<&str> = missing_veths(&endpoints, &links, &busy)
        .iter()
        .map(|e| e.container_id.as_str())
        .collect();
    assert_eq!(missing, vec!["a1"]);
}

#[test]
fn live_containers_are_repaired_at_once_gone_ones_released_after_two_passes() {
    let mut tracker = LeakTracker::default();
    let (now, grace) = (Instant::now(), Duration::from_secs(10));
    let links = BTreeMap::new();
    let claimed = HashSet::new();
    let inputs = |missing| LeakInputs {
        missing,
        links: &links,
        claimed: &claimed,
        stray_namespaces: &[],
    };
    let missing = vec![("alive".to_string(), true), ("gone".to_string(), false)];
    let first = tracker.plan(&inputs(&missing), now, grace);
    assert_eq!(first.repair, vec!["alive".to_string()]);
    assert!(first.release.is_empty(), "one sighting is not enough");
    let second = tracker.plan(&inputs(&missing), now, grace);
    assert_eq!(second.release, vec!["gone".to_string()]);
    tracker.done(&second);
    // A namespace that came back in between resets the count.
    let mut tracker = LeakTracker::default();
    let flaky = vec![("flaky".to_string(), false)];
    tracker.plan(&inputs(&flaky), now, grace);
    tracker.plan(&inputs(&[]), now, grace);
    let third = tracker.plan(&inputs(&flaky), now, grace);
    assert!(third.release.is_empty());
}

#[test]
fn unclaimed_links_and_namespaces_are_removed_after_the_grace_period() {
    let mut tracker = LeakTracker::default();
    let start = Instant::now();
    let grace = Duration::from_secs(10);
    let links = BTreeMap::from([("weft1".to_string(), 4), ("weft2".to_string(), 5)]);
    let claimed = HashSet::from(["weft1".to_string()]);
    let claimed_both = HashSet::from(["weft1".to_string(), "weft2".to_string()]);
    let strays = ["/run/netns/weft-a-x".to_string()];
    let inputs = |claimed| LeakInputs {
        missing: &[],
        links: &links,
        claimed,
        stray_namespaces: &strays,
    };
    let first = tracker.plan(&inputs(&claimed), start, grace);
    assert!(first.orphans.is_empty() && first.namespaces.is_empty());
    let later = tracker.plan(&inputs(&claimed), start + Duration::from_secs(9), grace);
    assert!(later.orphans.is_empty());
    let due = tracker.plan(&inputs(&claimed), start + grace, grace);
    assert_eq!(due.orphans, vec!["weft2".to_string()]);
    assert_eq!(due.namespaces, strays.to_vec());
    // Claimed meanwhile (an attach finished): no longer an orphan, and the clock restarts.
    assert!(tracker
        .plan(&inputs(&claimed_both), start + grace, grace)
        .orphans
        .is_empty());
    assert!(tracker
        .plan(&inputs(&claimed), start + grace, grace)
        .orphans
        .is_empty());
}

#[test]
fn peers_down_longer_than_the_limit_are_removed() {
    let mut tracker = DeadHostTracker::default();
    let start = Instant::now();
    let after = Duration::from_secs(60);
    let mut view = cluster();
    assert!(
        tracker.plan(&view, "a", start, after).is_empty(),
        "b is down from now on"
    );
    assert_eq!(
        tracker.plan(&view, "a", start + after, after),
        vec!["b".to_string()]
    );
    // Alive again: the clock restarts.
    view.alive.insert("b".into());
    assert!(tracker.plan(&view, "a", start + after, after).is_empty());
    view.alive.remove("b");
    assert!(tracker
        .plan(&view, "a", start + after + Duration::from_secs(1), after)
        .is_empty());
    // This host is never a candidate, however long it shows as down.
    let mut alone = cluster();
    alone.alive.clear();
    let mut tracker = DeadHostTracker::default();
    tracker.plan(&alone, "a", start, after);
    assert_eq!(
        tracker.plan(&alone, "a", start + after, after),
        vec!["b".to_string()]
    );
}

#[test]
fn stray_namespaces_are_ours_unused_and_idle() {
    let paths: Vec<String> = [
        "weft-h1-used",
        "weft-h1-busy",
        "weft-h1-left",
        "weft-h1-x-other",
        "weft-h2-theirs",
        "unrelated",
    ]
    .iter()
    .map(|n| format!("/run/netns/{n}"))
    .collect();
    let (h1, h1x) = ("h1".to_string(), "h1-x".to_string());
    let used = HashSet::from(["/run/netns/weft-h1-used".to_string()]);
    let busy = HashSet::from(["busy".to_string()]);
    assert_eq!(
        stray_namespaces(&paths, "h1", &[&h1, &h1x], &used, &busy),
        vec!["/run/netns/weft-h1-left".to_string()]
    );
}

#[test]
fn ipv6_blocks_route_via_the_peers_ipv6_underlay_and_containers_get_a_128() {
    let mut view = cluster();
    let mut b = view.hosts["b"].clone();
    b.underlay_ipv6 = Some("2001:db8:100::2".parse().unwrap());
    view.apply(ClusterEvent::HostPut("b".into(), b));
    for (block, host) in [("fd65::/122", "a"), ("fd65::40/122", "b")] {
        view.apply(ClusterEvent::BlockPut {
            pool: "default-v6".into(),
            block: net(block),
            host: host.into(),
        });
    }
    let mut web = endpoint("web", "10.65.0.5", "weft1");
    web.ipv6 = Some("fd65::5".parse().unwrap());
    let links = BTreeMap::from([("weft1".to_string(), 4)]);
    let paths = peers::peer_paths(
        "a",
        "198.51.100.1/24".parse().unwrap(),
        weft_etcd::records::Encapsulation::CrossSubnet,
        &view.hosts,
    );
    let desired = desired_routes("a", &view, &[web], &links, &paths, None);
    let via = |ip: &str| RouteTarget::Via(ip.parse().unwrap());
    assert_eq!(desired[&net("fd65::40/122")], via("2001:db8:100::2"));
    assert_eq!(desired[&net("fd65::/122")], RouteTarget::Blackhole);
    assert_eq!(desired[&net("fd65::5/128")], RouteTarget::Dev(4));
    assert_eq!(desired[&net("10.65.0.5/32")], RouteTarget::Dev(4));
    // A peer that has no IPv6 underlay address gets no route for its IPv6 blocks.
    let mut b = view.hosts["b"].clone();
    b.underlay_ipv6 = None;
    view.apply(ClusterEvent::HostPut("b".into(), b));
    let desired = desired_routes("a", &view, &[], &links, &paths, None);
    assert!(!desired.contains_key(&net("fd65::40/122")));
}

#[test]
fn ipv6_blocks_of_a_tunnelled_peer_go_through_the_tunnel_via_its_vtep_link_local() {
    let mut view = cluster();
    let mut b = view.hosts["b"].clone();
    b.underlay_ip = "198.18.0.2".parse().unwrap();
    b.tunnel_ip = Some("10.65.1.1".parse().unwrap());
    b.vtep_mac = Some("02:00:00:00:00:0b".into());
    view.apply(ClusterEvent::HostPut("b".into(), b));
    view.apply(ClusterEvent::BlockPut {
        pool: "default-v6".into(),
        block: net("fd65::40/122"),
        host: "b".into(),
    });
    let paths = peers::peer_paths(
        "a",
        "198.51.100.1/24".parse().unwrap(),
        weft_etcd::records::Encapsulation::CrossSubnet,
        &view.hosts,
    );
    let desired = desired_routes("a", &view, &[], &BTreeMap::new(), &paths, Some(7));
    assert_eq!(
        desired[&net("fd65::40/122")],
        RouteTarget::Onlink {
            via: "fe80::ff:fe00:b".parse().unwrap(),
            dev: 7
        }
    );
    // No route through a tunnel device that does not exist yet.
    let desired = desired_routes("a", &view, &[], &BTreeMap::new(), &paths, None);
    assert!(!desired.contains_key(&net("fd65::40/122")));
}
