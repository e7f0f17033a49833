//! Defect 1: liveness and records removed behind a live host's back: re-granted leases,
//! re-registration from the table or the journal, never a live veth deleted for a missing record.

use super::support::*;

// ---- 1. liveness and records removed behind a live host's back ------------------------------------

#[test]
fn an_etcd_paused_longer_than_the_ttl_sees_every_host_alive_again_within_a_ttl() {
    let lab = hlab(hosts(2, &[]));
    let names = [host_ns(&lab, 0), host_ns(&lab, 1)];
    let alive = |n: &str| format!("{PREFIX}/alive/{n}");
    let leases: Vec<i64> = names
        .iter()
        .map(|n| key_meta(&lab, &alive(n)).expect("alive before the pause").1)
        .collect();
    assert!(leases.iter().all(|l| *l != 0), "alive keys on leases");

    let mut pause = EtcdPause::new(&lab);
    std::thread::sleep(TTL * 2);
    pause.resume();
    let took = lab
        .eventually("every alive/ key back on a new lease", TTL + SLACK, || {
            names.iter().zip(&leases).all(|(n, old)| {
                key_meta(&lab, &alive(n)).is_some_and(|(_, lease)| lease != 0 && lease != *old)
            })
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}; alive keys now: {:?}",
                names
                    .iter()
                    .map(|n| key_meta(&lab, &alive(n)))
                    .collect::<Vec<_>>()
            )
        });
    eprintln!("alive again {took:?} after etcd was resumed");
    for old in &leases {
        assert!(
            lease_expired(&lab, *old),
            "the pause outlived lease {old:x}"
        );
    }
    lab.eventually(
        "peers see each other alive",
        Duration::from_secs(10),
        || peer_alive(&lab, 0, &names[1]) && peer_alive(&lab, 1, &names[0]),
    )
    .unwrap();
}

/// Sets up h1 with a container publishing a port and h2 with a container, and waits until h2's
/// container reaches h1's. Returns (h1 container ns, h1 container ip, h2 container ns).
fn two_hosts_with_containers(lab: &Lab) -> (String, String, String) {
    let c1 = lab.ctl_json(0, &["attach", "c1", "-p", "8080:80"]).unwrap();
    let ns1 = ns_name(c1["netns"].as_str().unwrap());
    let ip1 = c1["ip"].as_str().unwrap().to_string();
    let (ns2, ip2) = lab.attach(1, "c2").unwrap();
    lab.eventually("cross-host path", Duration::from_secs(15), || {
        sh::ping(&ns2, &ip1) && sh::ping(&ns1, &ip2)
    })
    .unwrap();
    (ns1, ip1, ns2)
}

/// Waits until every key h1 held before is back, then checks what a re-registration must give:
/// the same ifindex for its veth, cross-host traffic, peers seeing it alive, no problem left.
fn assert_re_registered(
    lab: &Lab,
    before: &BTreeSet<String>,
    veth: (&str, u32),
    from_ns: &str,
    ip1: &str,
) {
    let h1 = host_ns(lab, 0);
    let h2 = host_ns(lab, 1);
    lab.eventually(
        "h1's host, alive, block, address, endpoint and port keys back",
        Duration::from_secs(10),
        || keys_of_host(lab, &h1).is_superset(before),
    )
    .unwrap_or_else(|e| {
        let now = keys_of_host(lab, &h1);
        panic!(
            "{e}; missing: {:?}",
            before.difference(&now).collect::<Vec<_>>()
        )
    });
    let record: Value = serde_json::from_str(&keys(lab)[&format!("{PREFIX}/endpoints/{h1}/c1")])
        .expect("endpoint record");
    assert_eq!(record["ip"], json!(ip1), "same address: {record}");
    // Two resync intervals: a link the agent took for an orphan would be gone by then.
    std::thread::sleep(RESYNC * 2 + SLACK);
    assert_eq!(
        link_index(&h1, veth.0),
        Some(veth.1),
        "the veth of c1 must never be deleted or replaced"
    );
    lab.eventually(
        "h2's container reaches h1's again",
        Duration::from_secs(15),
        || sh::ping(from_ns, ip1),
    )
    .unwrap();
    lab.eventually("h2 sees h1 alive", Duration::from_secs(10), || {
        peer_alive(lab, 1, &h1)
    })
    .unwrap();
    assert!(peer_alive(lab, 0, &h2));
    assert_eq!(problems(lab, 0), Vec::<String>::new(), "h1 is fine again");
    assert_eq!(http_status(&h1, 9099, "/readyz"), Some(200));
}

#[test]
fn a_live_host_whose_records_were_removed_re_registers_without_touching_its_veths() {
    let lab = hlab(hosts(2, &[]));
    let h1 = host_ns(&lab, 0);
    let (_, ip1, ns2) = two_hosts_with_containers(&lab);
    let before = keys_of_host(&lab, &h1);
    for needle in [
        "/hosts/",
        "/alive/",
        "/blocks/",
        "/ips/",
        "/endpoints/",
        "/ports/",
    ] {
        assert!(
            before.iter().any(|k| k.contains(needle)),
            "h1 holds a {needle} key: {before:?}"
        );
    }
    let veth = listed_one(&lab, 0, "c1").unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let index = link_index(&h1, &veth).expect("veth of c1");

    remove_host(&lab, 1, &h1);
    let removed = Instant::now();
    // h1 notices within one resync interval and registers its host again.
    let host_key = format!("{PREFIX}/hosts/{h1}");
    let took = lab
        .eventually("h1 registers its host again", RESYNC + SLACK, || {
            keys(&lab).contains_key(&host_key)
        })
        .unwrap();
    eprintln!(
        "host record back {took:?} after removal ({:?} since)",
        removed.elapsed()
    );
    assert_re_registered(&lab, &before, (&veth, index), &ns2, &ip1);
}

#[test]
fn a_host_removed_while_its_agent_was_down_re_registers_from_its_journal() {
    let mut lab = hlab(hosts(2, &[]));
    let h1 = host_ns(&lab, 0);
    let (_, ip1, ns2) = two_hosts_with_containers(&lab);
    let before = keys_of_host(&lab, &h1);
    let veth = listed_one(&lab, 0, "c1").unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let index = link_index(&h1, &veth).expect("veth of c1");

    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    remove_host(&lab, 1, &h1);
    assert!(keys_of_host(&lab, &h1).is_empty());
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let restarted = Instant::now();
    let endpoint_key = format!("{PREFIX}/endpoints/{h1}/c1");
    lab.eventually(
        "h1 re-registers c1 from its journal",
        Duration::from_secs(10),
        || keys(&lab).contains_key(&endpoint_key),
    )
    .unwrap();
    eprintln!(
        "c1 registered again {:?} after the restart",
        restarted.elapsed()
    );
    assert!(
        listed_one(&lab, 0, "c1").is_some(),
        "the agent serves c1 again"
    );
    assert_re_registered(&lab, &before, (&veth, index), &ns2, &ip1);
}

#[test]
fn an_endpoint_whose_address_was_taken_meanwhile_stays_unregistered_reported_and_wired() {
    let mut lab = hlab(hosts(2, &[]));
    let h1 = host_ns(&lab, 0);
    let (ns1, ip1, _) = two_hosts_with_containers(&lab);
    let ns1_inode = inode(&format!("/run/netns/{ns1}")).expect("c1's namespace");
    let veth = listed_one(&lab, 0, "c1").unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let index = link_index(&h1, &veth).expect("veth of c1");

    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    remove_host(&lab, 1, &h1);
    // Someone else takes c1's address while h1 is away (a host that runs no agent here, so
    // that no agent of the lab owns the claim or collects it).
    let ip_key = format!("{PREFIX}/ips/{ip1}");
    let thief = json!({"host": "elsewhere", "container_id": "thief"}).to_string();
    lab.etcd().put(&ip_key, &thief).unwrap();
    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();

    // Two resync intervals: a link taken for an orphan would be gone by then.
    std::thread::sleep(RESYNC * 2 + SLACK);
    assert_eq!(
        link_index(&h1, &veth),
        Some(index),
        "the veth of the unregistered endpoint must not be deleted"
    );
    assert_eq!(
        inode(&format!("/run/netns/{ns1}")),
        Some(ns1_inode),
        "nor its namespace"
    );
    let now = keys(&lab);
    assert_eq!(
        now.get(&ip_key),
        Some(&thief),
        "the thief's claim is left alone"
    );
    assert!(
        !now.contains_key(&format!("{PREFIX}/endpoints/{h1}/c1")),
        "c1 stays unregistered while its address is taken"
    );
    let named = |p: &Vec<String>| p.iter().any(|p| p.contains("c1") || p.contains(&ip1));
    lab.eventually("Status.problems names c1", RESYNC + SLACK, || {
        named(&problems(&lab, 0))
    })
    .unwrap_or_else(|e| panic!("{e}: problems {:?}", lab.status(0).unwrap()["problems"]));
    assert_eq!(
        http_status(&h1, 9099, "/readyz"),
        Some(503),
        "not ready while c1 is unregistered"
    );
    // The host itself registered again.
    assert!(now.contains_key(&format!("{PREFIX}/hosts/{h1}")));
}

#[test]
fn a_partitioned_host_removed_by_its_peers_is_alive_within_a_ttl_and_re_registers() {
    let mut lab = hlab(hosts(2, &[]));
    let h1 = host_ns(&lab, 0);
    // Only h2 removes dead hosts: it is the one that sees h1 go away.
    lab.stop_agent(1, Signal::SIGTERM).unwrap();
    lab.start_agent_with(1, &["--remove-dead-hosts-after", "5s"])
        .unwrap();
    lab.wait_agent(1, Duration::from_secs(30)).unwrap();
    let (_, ip1, ns2) = two_hosts_with_containers(&lab);
    let before = keys_of_host(&lab, &h1);
    let veth = listed_one(&lab, 0, "c1").unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let index = link_index(&h1, &veth).expect("veth of c1");
    let alive_key = format!("{PREFIX}/alive/{h1}");
    let (_, old_lease) = key_meta(&lab, &alive_key).expect("alive/h1");

    let mut partition = Partition::new(&h1);
    let host_key = format!("{PREFIX}/hosts/{h1}");
    lab.eventually(
        "h2 removes the partitioned h1",
        Duration::from_secs(30),
        || !keys(&lab).contains_key(&host_key),
    )
    .unwrap();
    assert!(lease_expired(&lab, old_lease));
    partition.heal();
    let healed = Instant::now();
    let took = lab
        .eventually("alive/h1 back on a new lease", TTL + SLACK, || {
            key_meta(&lab, &alive_key).is_some_and(|(_, l)| l != 0 && l != old_lease)
        })
        .unwrap();
    eprintln!("h1 alive again {took:?} after the partition healed");
    assert_re_registered(&lab, &before, (&veth, index), &ns2, &ip1);
    eprintln!("re-registered; {:?} since healing", healed.elapsed());
}
