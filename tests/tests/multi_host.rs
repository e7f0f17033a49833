//! The multi-host fabric: blocks announced through etcd, routes to peers, liveness, host removal.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use weft_tests::lab::bin;
use weft_tests::{sh, Lab, LabOptions};

fn three_hosts() -> Lab {
    Lab::new(LabOptions::default()).expect("lab")
}

fn weft_routes(ns: &str) -> String {
    sh::run("ip", &["-n", ns, "route", "show", "proto", "119"]).unwrap()
}

/// Waits until every host holds a route to every block another host owns in etcd.
fn wait_converged(lab: &Lab) {
    let blocks: Vec<(String, String)> = lab
        .etcd_keys()
        .unwrap()
        .into_iter()
        .filter_map(|(key, value)| {
            let block = key
                .split("/blocks/")
                .nth(1)?
                .split('/')
                .nth(1)?
                .replace('-', "/");
            let owner: serde_json::Value = serde_json::from_str(&value).ok()?;
            Some((block, owner["host"].as_str()?.to_string()))
        })
        .collect();
    for host in &lab.hosts {
        for (block, owner) in blocks.iter().filter(|(_, owner)| *owner != host.name) {
            let owner_ip = lab.hosts.iter().find(|h| h.name == *owner).unwrap().ip;
            let want = format!("{block} via {owner_ip}");
            lab.eventually(
                &format!("{want} on {}", host.name),
                Duration::from_secs(10),
                || weft_routes(&host.name).contains(&want),
            )
            .unwrap();
        }
    }
}

#[test]
fn every_container_reaches_every_container_and_host_across_hosts() {
    let lab = three_hosts();
    let mut containers = vec![];
    for host in 0..3 {
        for n in 0..2 {
            containers.push(lab.attach(host, &format!("c{host}{n}")).unwrap());
        }
    }
    wait_converged(&lab);
    let mut failures = vec![];
    for (from_ns, from_ip) in &containers {
        for (_, to_ip) in &containers {
            if from_ip != to_ip && !sh::ping(from_ns, to_ip) {
                failures.push(format!("{from_ip} -> {to_ip}"));
            }
        }
        for host in &lab.hosts {
            if !sh::ping(from_ns, &host.ip.to_string()) {
                failures.push(format!("{from_ip} -> host {}", host.ip));
            }
        }
    }
    assert!(failures.is_empty(), "unreachable: {failures:?}");

    // Routes to peers are plain kernel routes via the peer's underlay address: no overlay.
    let routes = weft_routes(&lab.hosts[0].name);
    for peer in &lab.hosts[1..] {
        assert!(
            routes.contains(&format!("via {} dev eth0", peer.ip)),
            "{routes}"
        );
    }
}

#[test]
fn the_receiver_sees_the_real_container_address() {
    let lab = three_hosts();
    let (sender_ns, sender_ip) = lab.attach(0, "sender").unwrap();
    let (receiver_ns, receiver_ip) = lab.attach(2, "receiver").unwrap();
    wait_converged(&lab);

    let listener = sh::command_in_ns(&receiver_ns, "nc")
        .unwrap()
        .args(["-l", "-n", "-v", "-w", "5", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sent = sh::in_ns(
        &sender_ns,
        &[
            "sh",
            "-c",
            &format!("echo hello | nc -n -w 2 -N {receiver_ip} 5000"),
        ],
    )
    .unwrap();
    let received = listener.wait_with_output().unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let stdout = String::from_utf8_lossy(&received.stdout);
    let stderr = String::from_utf8_lossy(&received.stderr);
    assert!(stdout.contains("hello"), "payload: {stdout}");
    assert!(
        stderr.contains(&format!("Connection received on {sender_ip} ")),
        "the listener must see the sender's container address {sender_ip}: {stderr}"
    );
}

#[test]
fn new_containers_and_removed_routes_converge_without_restarts() {
    let lab = three_hosts();
    let (ns_c, _) = lab.attach(2, "early").unwrap();
    wait_converged(&lab);
    // A container attached later on host 1 is reachable from host 3 right away.
    let (ns_a, ip_a) = lab.attach(0, "late").unwrap();
    lab.eventually("late container reachable", Duration::from_secs(5), || {
        sh::ping(&ns_c, &ip_a)
    })
    .unwrap();
    // A container reaches another host's underlay address.
    assert!(sh::ping(&ns_a, &lab.hosts[1].ip.to_string()));

    // A peer route deleted by hand comes back.
    let h3 = &lab.hosts[2].name;
    let route = weft_routes(h3)
        .lines()
        .find(|l| l.contains(&format!("via {}", lab.hosts[0].ip)))
        .unwrap()
        .to_string();
    let dst = route.split_whitespace().next().unwrap().to_string();
    sh::run("ip", &["-n", h3, "route", "del", &dst]).unwrap();
    let took = lab
        .eventually("deleted route restored", Duration::from_secs(10), || {
            weft_routes(h3).contains(&dst)
        })
        .unwrap();
    eprintln!("route restored after {took:?}");
    assert!(sh::ping(&ns_c, &ip_a));

    // Routes of other protocols are never touched.
    sh::run(
        "ip",
        &[
            "-n",
            h3,
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            &lab.hosts[0].ip.to_string(),
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let all = sh::run("ip", &["-n", h3, "route"]).unwrap();
    assert!(
        all.contains("192.0.2.0/24"),
        "foreign route must survive: {all}"
    );
}

#[test]
fn a_dead_agent_shows_down_but_its_containers_stay_reachable_until_the_host_is_removed() {
    let mut lab = three_hosts();
    let (ns_1, ip_1) = lab.attach(0, "stays").unwrap();
    let (ns_3, ip_3) = lab.attach(2, "doomed").unwrap();
    wait_converged(&lab);
    assert!(sh::ping(&ns_1, &ip_3));

    lab.stop_agent(2, Signal::SIGKILL).unwrap();
    let h3 = lab.hosts[2].name.clone();
    let took = lab
        .eventually("h3 shown as down", Duration::from_secs(15), || {
            let status = lab.status(0).unwrap();
            status["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["host"] == h3 && p["alive"] == false)
        })
        .unwrap();
    eprintln!("down after {took:?} (alive TTL 3s)");
    // Liveness is not ownership: routes stay and traffic keeps flowing.
    assert!(weft_routes(&lab.hosts[0].name).contains(&format!("via {}", lab.hosts[2].ip)));
    assert!(
        sh::ping(&ns_1, &ip_3),
        "dead agent's container still reachable"
    );
    assert!(sh::ping(&ns_3, &ip_1), "and still reaches out");

    // Removing the host releases everything it held; every peer drops its routes.
    let weftctl = bin("weftctl");
    let mut args = vec![weftctl.to_str().unwrap(), "host", "remove", &h3];
    let etcd_args = lab.etcd_client_args();
    args.extend(etcd_args.iter().map(String::as_str));
    let out = sh::in_ns(&lab.hosts[0].name, &args).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for peer in &lab.hosts[..2] {
        lab.eventually("routes to h3 withdrawn", Duration::from_secs(5), || {
            !weft_routes(&peer.name).contains(&format!("via {}", lab.hosts[2].ip))
        })
        .unwrap();
    }
    let keys = lab.etcd_keys().unwrap();
    let h3_keys: Vec<_> = keys
        .iter()
        .filter(|(k, v)| k.contains(&h3) || v.contains(&format!("\"{h3}\"")))
        .collect();
    assert!(h3_keys.is_empty(), "records of h3 left: {h3_keys:?}");
    assert!(!keys.keys().any(|k| k.ends_with(&format!("/ips/{ip_3}"))));
    let status = lab.status(0).unwrap();
    assert!(
        !status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["host"] == h3),
        "{status}"
    );
}
