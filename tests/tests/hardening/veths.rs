//! Defects 2–4: veth names that collide, churn, and deleted links repaired in place rather than
//! released.

use super::support::*;

// ---- 2. veth-name clash ----------------------------------------------------------------------------

#[test]
fn containers_whose_ids_collide_under_the_veth_naming_get_distinct_veths() {
    let (a, b) = ("victim-476022", "victim-3507330");
    let first_name = |id: &str| {
        weft_agent::model::veth_name(&weft_agent::model::ContainerId::new(id).unwrap(), 0)
    };
    assert_eq!(
        first_name(a),
        first_name(b),
        "the two ids must collide under the first naming choice, or this test proves nothing"
    );
    let lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let (ns_a, ip_a) = lab.attach(0, a).unwrap();
    let veth_a = listed_one(&lab, 0, a).unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let index_a = link_index(&h1, &veth_a).expect("veth of a");
    let (ns_b, ip_b) = lab.attach(0, b).unwrap();

    let all = listed(&lab, 0);
    let veth_of = |id: &str| {
        all.iter()
            .find(|e| e["container_id"] == json!(id))
            .unwrap_or_else(|| panic!("{id} listed: {all:?}"))["host_ifname"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let veth_b = veth_of(b);
    assert_eq!(veth_of(a), veth_a);
    assert_ne!(veth_a, veth_b, "two containers, two host veths");
    assert_eq!(
        link_index(&h1, &veth_a),
        Some(index_a),
        "the first container's veth must not be deleted or replaced"
    );
    assert!(link_index(&h1, &veth_b).is_some(), "veth of b");
    assert_eq!(route_dev(&h1, &ip_a), veth_a);
    assert_eq!(route_dev(&h1, &ip_b), veth_b);
    let host_ip = lab.hosts[0].ip.to_string();
    for (ns, ip) in [(&ns_a, &ip_b), (&ns_b, &ip_a)] {
        assert!(sh::ping(ns, ip), "{ns} reaches {ip}");
        assert!(sh::ping(&h1, ip), "the host reaches {ip}");
        assert!(sh::ping(ns, &host_ip));
    }
    // A repair (attach again) of one never deletes the other's link: b's pair is broken, so
    // its repair builds a new one.
    sh::run_in(&ns_b, &["ip", "link", "del", "eth0"]).unwrap();
    lab.ctl_json(0, &["attach", b]).unwrap();
    lab.eventually("b repaired", Duration::from_secs(10), || {
        sh::ping(&ns_a, &ip_b)
    })
    .unwrap();
    assert_eq!(
        link_index(&h1, &veth_a),
        Some(index_a),
        "repairing b must leave a's veth alone"
    );
    let veth_b = listed_one(&lab, 0, b).unwrap()["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(veth_b, veth_a);
    let index_b = link_index(&h1, &veth_b).expect("b's veth after its repair");
    lab.ctl_json(0, &["attach", a]).unwrap();
    assert_eq!(link_index(&h1, &veth_a), Some(index_a));
    assert_eq!(
        link_index(&h1, &veth_b),
        Some(index_b),
        "repairing a must leave b's veth alone"
    );
    assert_eq!(route_dev(&h1, &ip_b), veth_b);
    assert!(sh::ping(&ns_a, &ip_b) && sh::ping(&ns_b, &ip_a));
}

// ---- 3. churn ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_attach_and_detach_leaks_no_block_and_no_address() {
    let lab = hlab(hosts(1, &["--block-size", "28"]));
    let h1 = host_ns(&lab, 0);
    let until = Instant::now() + Duration::from_secs(20);
    let mut tasks = vec![];
    for worker in 0..8 {
        let mut client = lab.client(0).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let (mut cycles, mut errors) = (0u32, vec![]);
            while Instant::now() < until {
                let id = format!("churn-{worker}-{cycles}");
                if let Err(e) = attach(&mut client, request(&id)).await {
                    errors.push(format!("attach {id}: {e:?}"));
                }
                if let Err(e) = detach(&mut client, &id).await {
                    errors.push(format!("detach {id}: {e:?}"));
                }
                cycles += 1;
            }
            (cycles, errors)
        }));
    }
    let (mut cycles, mut errors) = (0, vec![]);
    for task in tasks {
        let (c, e) = task.await.unwrap();
        cycles += c;
        errors.extend(e);
    }
    eprintln!(
        "{cycles} attach/detach cycles by 8 clients, {} errors",
        errors.len()
    );
    assert!(cycles >= 16, "the churn ran ({cycles} cycles)");

    let all = keys(&lab);
    let blocks: Vec<&String> = all
        .iter()
        .filter(|(k, v)| k.contains("/blocks/") && v.contains(&format!("\"{h1}\"")))
        .map(|(k, _)| k)
        .collect();
    assert!(
        blocks.len() <= 2,
        "peak use needs one /28; the host holds {}: {blocks:?}",
        blocks.len()
    );
    let leaked: Vec<&String> = all
        .iter()
        .filter(|(k, v)| {
            k.contains("/ips/")
                && serde_json::from_str::<Value>(v).is_ok_and(|r| {
                    let owner = format!(
                        "{PREFIX}/endpoints/{}/{}",
                        r["host"].as_str().unwrap_or_default(),
                        r["container_id"].as_str().unwrap_or_default()
                    );
                    !all.contains_key(&owner)
                })
        })
        .map(|(k, _)| k)
        .collect();
    assert!(
        leaked.is_empty(),
        "ips/ keys without an endpoint: {leaked:?}"
    );
    let remaining: Vec<&String> = all.keys().filter(|k| k.contains("/endpoints/")).collect();
    assert!(
        remaining.is_empty(),
        "everything was detached, but {remaining:?} remain; {} errors: {errors:?}",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

// ---- 4. deleted links are repaired, not released -----------------------------------------------------

#[test]
fn deleting_a_host_veth_or_the_containers_eth0_repairs_the_endpoint_in_place() {
    let lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let endpoint = lab.ctl_json(0, &["attach", "c1"]).unwrap();
    let netns = endpoint["netns"].as_str().unwrap().to_string();
    let ns = ns_name(&netns);
    let ip = endpoint["ip"].as_str().unwrap().to_string();
    let veth = endpoint["host_ifname"].as_str().unwrap().to_string();
    let key = format!("{PREFIX}/endpoints/{h1}/c1");
    let (created, _) = key_meta(&lab, &key).expect("endpoint record");
    let ns_inode = inode(&netns).expect("agent-owned namespace");
    assert!(sh::ping(&h1, &ip));

    let host_veth_gone = vec![
        "-n".to_string(),
        h1.clone(),
        "link".into(),
        "del".into(),
        veth,
    ];
    let eth0_gone = vec![
        "netns".to_string(),
        "exec".into(),
        ns.clone(),
        "ip".into(),
        "link".into(),
        "del".into(),
        "eth0".into(),
    ];
    for (what, command) in [
        ("the host veth", host_veth_gone),
        ("the container's eth0", eth0_gone),
    ] {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        sh::run("ip", &args).unwrap();
        let took = lab
            .eventually(
                &format!("c1 repaired after deleting {what}"),
                Duration::from_secs(3) + SLACK,
                || {
                    lab.ctl(0, &["check", "c1"])
                        .is_ok_and(|o| o.status.success())
                },
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{e}; check says {:?}; records {:?}",
                    lab.ctl(0, &["check", "c1"]).map(|o| format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    keys_of_host(&lab, &h1)
                )
            });
        eprintln!("repaired {took:?} after deleting {what}");
        let again = lab.ctl_json(0, &["get", "c1"]).unwrap();
        assert_eq!(again["ip"], json!(ip), "same address");
        assert_eq!(again["netns"], json!(netns), "same namespace");
        assert_eq!(
            key_meta(&lab, &key).map(|(c, _)| c),
            Some(created),
            "the same record, never released and written again"
        );
        assert_eq!(
            inode(&netns),
            Some(ns_inode),
            "the agent-owned namespace is kept"
        );
        lab.eventually("ping works again", Duration::from_secs(10), || {
            sh::ping(&h1, &ip)
        })
        .unwrap();
    }

    // Release happens when the namespace is really gone.
    sh::run("ip", &["netns", "del", &ns]).unwrap();
    lab.eventually(
        "c1 released once its namespace is gone",
        Duration::from_secs(15),
        || {
            let all = keys(&lab);
            !all.contains_key(&key) && !all.contains_key(&format!("{PREFIX}/ips/{ip}"))
        },
    )
    .unwrap();
}
