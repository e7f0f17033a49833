//! Agent restarts without disruption, etcd outages and a member of a three-member etcd down.

use super::support::*;

#[test]
fn agent_restarts_lose_no_packet_and_leave_exact_state() {
    let mut lab = lab(LabOptions::default());
    // 50 containers over 3 hosts, one of them with a published port.
    let mut containers = vec![];
    for i in 0..50 {
        containers.push(lab.attach(i % 3, &format!("c{i:02}")).unwrap());
    }
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    let (src_ns, _) = &containers[0]; // on h1
    let (_, dst_ip) = &containers[1]; // on h2
    lab.eventually("cross-host path", Duration::from_secs(10), || {
        sh::ping(src_ns, dst_ip)
    })
    .unwrap();

    // 800 pings: about 8 s, longer than the three restarts below.
    let pinger = Pinger::start(src_ns, dst_ip, 800);
    std::thread::sleep(Duration::from_millis(500));
    for (host, signal) in [
        (0, Signal::SIGKILL),
        (1, Signal::SIGKILL),
        (0, Signal::SIGTERM),
    ] {
        lab.stop_agent(host, signal).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        lab.start_agent(host).unwrap();
        lab.wait_agent(host, Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    let (sent, received) = pinger.finish();
    eprintln!("restart under load: {sent} pings sent, {received} received");
    assert_eq!(sent, 800, "the pinger ran to the end");
    assert_eq!(sent, received, "no ping may be lost across agent restarts");

    for i in 0..3 {
        assert_host_consistent(&lab, i);
    }
    let keys = assert_etcd_consistent(&lab);
    let endpoints = keys.keys().filter(|k| k.contains("/endpoints/")).count();
    assert_eq!(endpoints, 51);
    // Attach works again after the restarts.
    let (ns, ip) = lab.attach(0, "after").unwrap();
    assert!(sh::ping(&ns, dst_ip));
    assert!(sh::ping(&containers[2].0, &ip));
}

#[tokio::test]
async fn an_etcd_outage_keeps_traffic_fails_attach_fast_and_catches_up_after() {
    let mut lab = lab(LabOptions::default());
    let (ns1, ip1) = lab.attach(0, "a").unwrap();
    let (ns2, ip2) = lab.attach(1, "b").unwrap();
    let (_, ip3) = lab.attach(2, "c").unwrap();
    // Every path used below, the pinged one included: a ping only counts once its reply route
    // is in place too.
    lab.eventually("fabric up", Duration::from_secs(10), || {
        sh::ping(&ns1, &ip3) && sh::ping(&ns1, &ip2)
    })
    .unwrap();

    let outage = Instant::now();
    lab.etcd[0].stop();
    // 3,000 pings: about 30 s, the length of the outage.
    let pinger = Pinger::start(&ns1, &ip2, 3000);
    let mut client = lab.client(0).await.unwrap();
    let started = Instant::now();
    let status = client
        .attach(pb::AttachRequest {
            container_id: "during-outage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "attach during the outage failed after {took:?}: {}",
        status.message()
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took <= Duration::from_secs(5),
        "attach must fail within 5s, took {took:?}"
    );
    assert_eq!(
        weft_links(&lab.hosts[0].name).len(),
        1,
        "nothing left by the failed attach"
    );
    assert!(!lab
        .container_namespaces()
        .iter()
        .any(|n| n.ends_with("during-outage")));
    let status = lab.status(0).unwrap();
    assert_eq!(status["etcd_connected"], false);

    // Hold the outage for (at least) 30 s while traffic keeps flowing.
    let (sent, received) = pinger.finish();
    while outage.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("during a 30 s etcd outage: {sent} pings sent, {received} received");
    assert!(
        sent == 3000 && sent == received,
        "traffic must not notice etcd: {sent}/{received}"
    );
    assert!(sh::ping(&ns2, &ip1) && sh::ping(&ns2, &ip3));

    lab.etcd[0].restart().unwrap();
    // h1 comes back: registered and alive again, and attach works.
    let h1 = lab.hosts[0].name.clone();
    lab.eventually("h1 alive again", Duration::from_secs(20), || {
        lab.etcd_keys()
            .unwrap()
            .keys()
            .any(|k| k.ends_with(&format!("/alive/{h1}")))
    })
    .unwrap();
    lab.eventually("attach works again", Duration::from_secs(20), || {
        lab.ctl(0, &["attach", "after-outage"])
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .unwrap();

    // Catch-up: cut h1 off etcd, remove h3 meanwhile, reconnect: h1 drops h3's routes.
    // Both directions: etcd's watch events must not get in either.
    let router = weft_tests::lab::ROUTER_IP;
    let cuts = [
        ["OUTPUT", "-d", router, "--dport"],
        ["INPUT", "-s", router, "--sport"],
    ];
    let ipt = |op: &str| {
        for [chain, addr_flag, addr, port_flag] in cuts {
            let all = [
                "netns",
                "exec",
                h1.as_str(),
                "iptables",
                op,
                chain,
                "-p",
                "tcp",
                addr_flag,
                addr,
                port_flag,
                "2379",
                "-j",
                "DROP",
            ];
            sh::run("ip", &all).unwrap();
        }
    };
    ipt("-I");
    lab.stop_agent(2, Signal::SIGKILL).unwrap();
    let weftctl = bin("weftctl");
    let h3 = lab.hosts[2].name.clone();
    let mut remove = vec![weftctl.to_str().unwrap(), "host", "remove", &h3];
    let etcd_args = lab.etcd_client_args();
    remove.extend(etcd_args.iter().map(String::as_str));
    let out = sh::in_ns(&lab.hosts[1].name, &remove).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cut off (packets dropped, not refused), an attach still fails within the bound.
    let started = Instant::now();
    let cut_off = lab.ctl(0, &["attach", "while-cut-off"]).unwrap();
    let took = started.elapsed();
    eprintln!("attach with etcd unreachable (dropped packets) failed after {took:?}");
    assert_eq!(cut_off.status.code(), Some(6), "UNAVAILABLE");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    std::thread::sleep(Duration::from_secs(3));
    let via_h3 = format!("via {}", lab.hosts[2].ip);
    assert!(
        weft_routes(&h1).iter().any(|r| r.contains(&via_h3)),
        "cut off from etcd, h1 keeps what it knew"
    );
    ipt("-D");
    let took = lab
        .eventually("h1 drops h3's routes", Duration::from_secs(30), || {
            !weft_routes(&h1).iter().any(|r| r.contains(&via_h3))
        })
        .unwrap();
    eprintln!("caught up {took:?} after reconnecting");
}

#[test]
fn an_agent_started_while_etcd_is_down_waits_for_it() {
    let mut lab = lab(LabOptions {
        hosts: 1,
        start_agents: false,
        ..Default::default()
    });
    lab.etcd[0].stop();
    lab.start_agent(0).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.agent_running(0),
        "the agent must wait, not exit:\n{}",
        lab.agent_log(0)
    );
    assert!(
        lab.agent_log(0).contains("waiting for it"),
        "{}",
        lab.agent_log(0)
    );
    lab.etcd[0].restart().unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let (ns, _) = lab.attach(0, "after-wait").unwrap();
    assert!(sh::ping(&ns, &lab.hosts[0].ip.to_string()));
}

#[test]
fn one_member_of_a_three_member_etcd_cluster_down_disturbs_nobody() {
    let mut lab = lab(LabOptions {
        etcd_members: 3,
        ..Default::default()
    });
    let (ns1, _) = lab.attach(0, "a").unwrap();
    // The leader, so that the cluster has to elect a new one while the agents carry on: requests
    // meanwhile get "leader changed" or "no leader", and the agents must wait that out.
    let leader = (0..3)
        .find(|&i| lab.etcd[i].is_leader().unwrap())
        .expect("a leader");
    lab.etcd[leader].stop();
    let started = Instant::now();
    let (_, ip2) = lab.attach(1, "b").unwrap();
    let (ns3, ip3) = lab.attach(2, "c").unwrap();
    eprintln!(
        "two attaches with a member down took {:?}",
        started.elapsed()
    );
    lab.eventually("new containers reachable", Duration::from_secs(15), || {
        sh::ping(&ns1, &ip2) && sh::ping(&ns1, &ip3) && sh::ping(&ns3, &ip2)
    })
    .unwrap();
    for i in 0..3 {
        let status = lab.status(i).unwrap();
        assert_eq!(status["etcd_connected"], true, "host {i}: {status}");
        assert!(status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["alive"] == true));
    }
    lab.etcd[leader].restart().unwrap();
}
