//! Dead hosts removed and leaks collected, tampering repaired, spoofed sources dropped.

use super::support::*;

#[test]
fn dead_hosts_are_removed_when_asked_and_leaks_are_collected() {
    let mut lab = lab(LabOptions {
        agent_args: args(&["--remove-dead-hosts-after", "5s"]),
        ..Default::default()
    });
    let (ns1, _) = lab.attach(0, "a").unwrap();
    let (_, ip3) = lab.attach(2, "c").unwrap();
    let h1 = lab.hosts[0].name.clone();

    // An endpoint whose namespace is deleted behind the agent's back is released.
    let (leaky_ns, leaky_ip) = lab.attach(0, "leaky").unwrap();
    sh::run("ip", &["netns", "del", &leaky_ns]).unwrap();
    let took = lab
        .eventually("leaked endpoint released", Duration::from_secs(20), || {
            !lab.etcd_keys()
                .unwrap()
                .keys()
                .any(|k| k.ends_with(&format!("/ips/{leaky_ip}")))
        })
        .unwrap();
    eprintln!("vanished endpoint released after {took:?}");
    assert!(lab.ctl(0, &["get", "leaky"]).unwrap().status.code() == Some(3));

    // A weft* link with no endpoint behind it is removed after a grace period.
    sh::run(
        "ip",
        &[
            "-n",
            &h1,
            "link",
            "add",
            "weftdeadbeef01",
            "type",
            "veth",
            "peer",
            "name",
            "strayp",
        ],
    )
    .unwrap();
    let took = lab
        .eventually("orphan link removed", Duration::from_secs(20), || {
            !weft_links(&h1).contains(&"weftdeadbeef01".to_string())
        })
        .unwrap();
    eprintln!("orphan link removed after {took:?}");
    assert_host_consistent(&lab, 0);

    // A dead host keeps its routes for a while, then is removed automatically.
    lab.stop_agent(2, Signal::SIGKILL).unwrap();
    let via_h3 = format!("via {}", lab.hosts[2].ip);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        weft_routes(&h1).iter().any(|r| r.contains(&via_h3)),
        "kept while merely down"
    );
    assert!(sh::ping(&ns1, &ip3));
    let took = lab
        .eventually("dead host removed", Duration::from_secs(30), || {
            !weft_routes(&h1).iter().any(|r| r.contains(&via_h3))
        })
        .unwrap();
    eprintln!("dead host removed {took:?} after its TTL ran out");
    let h3 = lab.hosts[2].name.clone();
    assert!(!lab
        .etcd_keys()
        .unwrap()
        .iter()
        .any(|(k, v)| k.contains(&h3) || v.contains(&h3)));
}

#[test]
fn tampering_is_repaired() {
    // A long resync interval shows which repairs are event-driven.
    let lab = lab(LabOptions {
        agent_args: args(&["--resync-interval", "5s"]),
        ..Default::default()
    });
    let (ns1, ip1) = lab.attach(0, "a").unwrap();
    let (ns2, ip2) = lab.attach(1, "b").unwrap();
    lab.ctl_json(0, &["attach", "web", "-p", "8080:80"])
        .unwrap();
    lab.eventually("fabric up", Duration::from_secs(10), || {
        sh::ping(&ns1, &ip2)
    })
    .unwrap();
    let h1 = lab.hosts[0].name.clone();

    // A deleted peer route and a deleted container route: repaired by netlink events.
    let peer_route = weft_routes(&h1)
        .into_iter()
        .find(|r| r.contains(" via "))
        .unwrap();
    let dst = peer_route.split_whitespace().next().unwrap().to_string();
    sh::run("ip", &["-n", &h1, "route", "del", &dst]).unwrap();
    let took = lab
        .eventually("peer route back", Duration::from_secs(1), || {
            weft_routes(&h1)
                .iter()
                .any(|r| r.starts_with(&format!("{dst} ")))
        })
        .unwrap();
    eprintln!("peer route restored in {took:?}");
    sh::run("ip", &["-n", &h1, "route", "del", &format!("{ip1}/32")]).unwrap();
    let took = lab
        .eventually("container route back", Duration::from_secs(1), || {
            weft_routes(&h1)
                .iter()
                .any(|r| r.starts_with(&format!("{ip1} dev")))
        })
        .unwrap();
    eprintln!("container route restored in {took:?}");
    assert!(sh::ping(&ns2, &ip1));

    // Flipped sysctls: announced by the kernel (RTM_NEWNETCONF) and put back at once.
    let veth = lab.ctl_json(0, &["get", "a"]).unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let knobs = [
        (
            format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp"),
            "0",
            "1",
        ),
        (
            format!("/proc/sys/net/ipv4/conf/{veth}/rp_filter"),
            "0",
            "1",
        ),
        ("/proc/sys/net/ipv4/ip_forward".to_string(), "0", "1"),
    ];
    for (path, bad, _) in &knobs {
        set_sysctl(&h1, path, bad);
    }
    let took = lab
        .eventually("sysctls back", Duration::from_secs(1), || {
            knobs
                .iter()
                .all(|(path, _, good)| sysctl(&h1, path) == *good)
        })
        .unwrap();
    eprintln!("sysctls restored in {took:?} (resync interval 5s)");

    // proxy_delay is never announced, and neither are deleted rules: the resync restores them.
    let delay = format!("/proc/sys/net/ipv4/neigh/{veth}/proxy_delay");
    set_sysctl(&h1, &delay, "80");
    sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &h1,
            "iptables",
            "-t",
            "nat",
            "-F",
            "WEFT-PORTS",
        ],
    )
    .unwrap();
    sh::run(
        "ip",
        &["netns", "exec", &h1, "iptables", "-F", "WEFT-FORWARD"],
    )
    .unwrap();
    let took = lab
        .eventually("proxy_delay and rules back", Duration::from_secs(8), || {
            sysctl(&h1, &delay) == "0"
                && iptables_save(&h1, "nat").contains("--dport 8080")
                && iptables_save(&h1, "filter").contains("-A WEFT-FORWARD -i weft+")
        })
        .unwrap();
    eprintln!("proxy_delay and iptables restored in {took:?} (resync interval 5s)");
    assert!(sh::ping(&ns2, &ip1));
}

#[test]
fn spoofed_sources_are_dropped() {
    let mut lab = lab(LabOptions::default());
    let (attacker, attacker_ip) = lab.attach(0, "attacker").unwrap();
    let (_, neighbour_ip) = lab.attach(0, "neighbour").unwrap();
    let (remote_ns, remote_ip) = lab.attach(1, "remote").unwrap();
    let (local_victim_ns, local_victim_ip) = lab.attach(0, "victim").unwrap();
    lab.eventually("fabric up", Duration::from_secs(10), || {
        sh::ping(&attacker, &remote_ip)
    })
    .unwrap();
    let echo = bin("weft-echo");
    let logs: Vec<(String, std::path::PathBuf)> = vec![
        (remote_ns.clone(), lab.dir.join("remote.log")),
        (local_victim_ns.clone(), lab.dir.join("victim.log")),
        (lab.hosts[1].name.clone(), lab.dir.join("h2.log")),
    ];
    for (ns, log) in &logs {
        lab.spawn_logged(ns, echo.to_str().unwrap(), &["7000"], Some(log))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let targets = [
        remote_ip.clone(),
        local_victim_ip.clone(),
        lab.hosts[1].ip.to_string(),
    ];

    // The legitimate source arrives everywhere (masqueraded to h1's address when it leaves the
    // fabric for a host).
    let h1_ip = lab.hosts[0].ip.to_string();
    let expected = [attacker_ip.clone(), attacker_ip.clone(), h1_ip.clone()];
    for (target, seen) in targets.iter().zip(&expected) {
        let out = sh::in_ns(&attacker, &["nc", "-n", "-w", "1", target, "7000"]).unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(
            answer.contains(&format!("peer={seen}:")),
            "to {target}: {answer}"
        );
    }

    // Forged sources: a neighbour's address, an unused address of our block, another host's
    // container, and an address outside every pool.
    let unused = {
        let mut octets: Vec<u8> = attacker_ip.split('.').map(|o| o.parse().unwrap()).collect();
        octets[3] += 40;
        octets
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(".")
    };
    let forged = [
        neighbour_ip.clone(),
        unused,
        remote_ip.clone(),
        "192.0.2.77".to_string(),
    ];
    let mut attempts = vec![];
    for source in &forged {
        sh::run(
            "ip",
            &[
                "-n",
                &attacker,
                "addr",
                "add",
                &format!("{source}/32"),
                "dev",
                "eth0",
            ],
        )
        .unwrap();
        for target in targets.iter().filter(|t| *t != source) {
            attempts.push(format!(
                "(echo x | nc -u -n -w 1 -s {source} {target} 7000) & \
                 nc -n -w 1 -s {source} {target} 7000 & \
                 ping -q -c 1 -W 1 -I {source} {target} &"
            ));
        }
    }
    // All at once: each forged attempt can only time out.
    let script = format!("{}\nwait", attempts.join("\n"));
    let _ = sh::in_ns(&attacker, &["sh", "-c", &script]);
    std::thread::sleep(Duration::from_millis(500));
    for ((ns, log), seen) in logs.iter().zip(&expected) {
        let text = std::fs::read_to_string(log).unwrap();
        for source in &forged {
            assert!(
                !text.contains(&format!(" {source}:")),
                "forged source {source} was delivered to {ns}: {text}"
            );
        }
        // Only the one legitimate connection arrived: forged packets were not masqueraded
        // into legitimate-looking ones either.
        let arrivals = text.lines().count();
        assert_eq!(arrivals, 1, "{ns} got {arrivals} arrivals: {text}");
        assert!(
            text.contains(&format!(" {seen}:")),
            "legitimate traffic reached {ns}: {text}"
        );
    }
}
