//! Address management end to end (issue 17): blocks that stay empty go back to the pool after
//! the grace, on every host, and releasing them never races an allocation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use serde_json::Value;
use weft_proto::v1 as pb;
use weft_tests::{invariants, sh, Lab, LabOptions};

const PREFIX: &str = "/weft/v1";

fn lab(hosts: usize, agent_args: &[&str]) -> Lab {
    Lab::new(LabOptions {
        hosts,
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab")
}

/// Blocks in etcd with their owner.
fn blocks(lab: &Lab) -> BTreeMap<IpNetwork, String> {
    lab.etcd_keys()
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| {
            let block = k.strip_prefix(&format!("{PREFIX}/blocks/default/"))?;
            let owner: Value = serde_json::from_str(&v).ok()?;
            Some((
                block.replacen('-', "/", 1).parse().ok()?,
                owner["host"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Routes of proto weft in host `i`'s kernel, as `ip route` prints them.
fn weft_routes(lab: &Lab, i: usize) -> String {
    sh::run(
        "ip",
        &["-n", &lab.hosts[i].name, "route", "show", "proto", "weft"],
    )
    .unwrap()
}

#[test]
fn an_emptied_block_is_released_after_the_grace_and_its_routes_vanish_on_peers() {
    let lab = lab(2, &["--block-size", "30", "--block-release-after", "3s"]);
    let ids: Vec<String> = (0..5).map(|n| format!("c{n}")).collect();
    let ips: Vec<String> = ids.iter().map(|id| lab.attach(0, id).unwrap().1).collect();
    let h1 = lab.hosts[0].name.clone();
    let mine: Vec<IpNetwork> = blocks(&lab)
        .into_iter()
        .filter(|(_, owner)| owner == &h1)
        .map(|(b, _)| b)
        .collect();
    assert_eq!(
        mine.len(),
        2,
        "4 addresses per block, 5 containers: {mine:?}"
    );
    let second = *mine
        .iter()
        .find(|b| b.contains(ips[4].parse().unwrap()))
        .unwrap();
    lab.eventually(
        "h2 routes h1's second block",
        Duration::from_secs(5),
        || weft_routes(&lab, 1).contains(&second.to_string()),
    )
    .unwrap();

    lab.ctl(0, &["detach", "c4"]).unwrap();
    // Shown as waiting, and not released before the grace: 3 s of emptiness.
    let show = lab.ctl_operator(0, &["--json", "ipam", "show"]).unwrap();
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    let row = show[0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == h1.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (
            &row["blocks"],
            &row["used"],
            &row["free"],
            &row["waiting_release"]
        ),
        (&2.into(), &4.into(), &4.into(), &1.into()),
        "{show}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        blocks(&lab).contains_key(&second),
        "released before its grace"
    );
    lab.eventually(
        "the emptied block is released",
        Duration::from_secs(10),
        || !blocks(&lab).contains_key(&second),
    )
    .unwrap();
    lab.eventually("its routes vanish", Duration::from_secs(5), || {
        !weft_routes(&lab, 0).contains(&second.to_string())
            && !weft_routes(&lab, 1).contains(&second.to_string())
    })
    .unwrap();
    assert!(lab
        .agent_log(0)
        .contains("released a block that held no address"));

    // Emptied entirely, h1 keeps one block of the pool; the other containers kept working.
    assert!(sh::ping(
        &lab.container_namespaces()[0],
        &lab.hosts[1].ip.to_string()
    ));
    for id in &ids[..4] {
        lab.ctl(0, &["detach", id]).unwrap();
    }
    std::thread::sleep(Duration::from_secs(5));
    let left: Vec<IpNetwork> = blocks(&lab)
        .into_iter()
        .filter(|(_, owner)| owner == &h1)
        .map(|(b, _)| b)
        .collect();
    // The block that stays is the one not released above (blocks are claimed at random, so it
    // need not be the lower one).
    let first = *mine.iter().find(|b| **b != second).unwrap();
    assert_eq!(left, [first], "the last block of the pool stays");
    lab.ipam_check(0).unwrap();
    invariants::assert_quiet(&lab);
}

/// One attach of the storm: the address it got, when the attach answered and when the detach
/// was asked for. The container held its address at least over that span.
struct Held {
    id: String,
    ip: String,
    attached: Instant,
    detaching: Instant,
}

/// One client's churn on one host: attaches a wave of containers, holds them a moment,
/// detaches them.
async fn churn(lab: &Lab, host: usize, worker: usize, rounds: usize) -> (Vec<Held>, Vec<String>) {
    let mut client = lab.client(host).await.unwrap();
    let (mut held, mut errors) = (vec![], vec![]);
    for round in 0..rounds {
        // Waves of 1 to 6 containers: blocks of 8 fill, empty and are released meanwhile.
        let wave = 1 + (worker + round * 5) % 6;
        let mut live = vec![];
        for n in 0..wave {
            let id = format!("s{host}-{worker}-{round}-{n}");
            let req = pb::AttachRequest {
                container_id: id.clone(),
                ..Default::default()
            };
            match client.attach(req).await {
                Ok(r) => live.push((id, r.into_inner().endpoint.unwrap().ip, Instant::now())),
                Err(e) => errors.push(format!("attach {id}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(300 * (round % 4) as u64)).await;
        for (id, ip, attached) in live {
            let detaching = Instant::now();
            let req = pb::DetachRequest {
                container_id: id.clone(),
            };
            if let Err(e) = client.detach(req).await {
                errors.push(format!("detach {id}: {e}"));
            }
            held.push(Held {
                id,
                ip,
                attached,
                detaching,
            });
        }
        // Now and then a pause longer than the grace, so that emptied blocks go mid-storm.
        if round % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(3500)).await;
        }
    }
    (held, errors)
}

/// Pairs of containers that held one address at the same time: the later one's attach
/// answered before the earlier one's detach was even asked for.
fn overlapping(held: &[Held]) -> Vec<String> {
    let mut by_ip: HashMap<&str, Vec<&Held>> = HashMap::new();
    for h in held {
        by_ip.entry(h.ip.as_str()).or_default().push(h);
    }
    let mut found = vec![];
    for (ip, mut holders) in by_ip {
        holders.sort_by_key(|h| h.attached);
        for pair in holders.windows(2) {
            if pair[1].attached < pair[0].detaching {
                found.push(format!("{ip}: {} and {}", pair[0].id, pair[1].id));
            }
        }
    }
    found
}

#[test]
fn a_leaked_address_record_is_released_only_when_nothing_holds_it() {
    let lab = lab(1, &[]);
    let (_, held) = lab.attach(0, "db").unwrap();
    let release = |ip: &str| lab.ctl_operator(0, &["ipam", "release", ip]).unwrap();
    let refused = release(&held);
    assert_eq!(refused.status.code(), Some(7), "FAILED_PRECONDITION");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("endpoint db"));
    let keys = lab.etcd_keys().unwrap();
    assert!(keys.contains_key(&format!("{PREFIX}/ips/{held}")));

    let leaked = format!("{PREFIX}/ips/10.65.250.9");
    lab.etcd()
        .put(&leaked, "{\"host\":\"ghost\",\"container_id\":\"gone\"}")
        .unwrap();
    let out = release("10.65.250.9");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lab.etcd_keys().unwrap().contains_key(&leaked));
    assert_eq!(release("10.65.250.9").status.code(), Some(3), "NOT_FOUND");
    assert_eq!(
        release("10.65.250").status.code(),
        Some(2),
        "not an address"
    );
    lab.ipam_check(0).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attach_storm_while_blocks_are_released_gives_no_duplicate_and_nothing_in_a_released_block(
) {
    let lab = lab(3, &["--block-size", "29", "--block-release-after", "3s"]);
    // Long-lived containers keep one block per host in use throughout.
    let anchors: Vec<(String, String)> = (0..3)
        .map(|i| lab.attach(i, &format!("anchor{i}")).unwrap())
        .collect();
    let lab = std::sync::Arc::new(lab);
    let mut tasks = vec![];
    for host in 0..3 {
        for worker in 0..3 {
            let lab = lab.clone();
            tasks.push(tokio::spawn(
                async move { churn(&lab, host, worker, 10).await },
            ));
        }
    }
    let (mut given, mut errors) = (vec![], vec![]);
    for task in tasks {
        let (g, e) = task.await.unwrap();
        given.extend(g);
        errors.extend(e);
    }
    eprintln!("{} attaches, {} errors", given.len(), errors.len());
    assert!(
        given.len() >= 200,
        "the storm ran: {} attaches",
        given.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    let released: usize = (0..3)
        .map(|i| {
            lab.agent_log(i)
                .matches("released a block that held no address")
                .count()
        })
        .sum();
    eprintln!("{released} blocks released during the storm");
    assert!(
        released > 0,
        "blocks must have been released during the storm"
    );

    let reused = given.len() - given.iter().map(|h| &h.ip).collect::<BTreeSet<_>>().len();
    eprintln!("{reused} attaches got an address used before");
    let twice = overlapping(&given);
    assert!(twice.is_empty(), "addresses held twice at once: {twice:?}");
    // Every address record left is unique and lies in a block its host owns.
    let keys = lab.etcd_keys().unwrap();
    let owners = blocks(&lab);
    let mut seen = BTreeSet::new();
    for (key, value) in &keys {
        let Some(ip) = key.strip_prefix(&format!("{PREFIX}/ips/")) else {
            continue;
        };
        let ip: std::net::IpAddr = ip.parse().unwrap();
        assert!(seen.insert(ip));
        let record: Value = serde_json::from_str(value).unwrap();
        let block = owners.iter().find(|(b, _)| b.contains(ip));
        assert!(
            block.is_some_and(|(_, owner)| record["host"] == owner.as_str()),
            "address {ip} of {record} lies in no block of its host ({block:?})"
        );
    }
    let endpoints: Vec<&String> = keys.keys().filter(|k| k.contains("/endpoints/")).collect();
    assert_eq!(endpoints.len(), 3, "only the anchors remain: {endpoints:?}");
    for (ns, ip) in &anchors {
        for (_, other) in &anchors {
            assert!(sh::ping(ns, other), "{ip} reaches {other}");
        }
    }
    for i in 0..3 {
        lab.ipam_check(i).unwrap();
    }
    invariants::assert_quiet(&lab);
}
