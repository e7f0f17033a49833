//! Requested addresses end to end (issue 17): given through the API, weftctl and the CNI `ips`
//! capability, kept across a re-created container, and refused by cause with the right code and
//! nothing left behind.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use weft_proto::v1 as pb;
use weft_tests::cni::run as cni;
use weft_tests::{invariants, sh, Lab, LabOptions};

fn request(id: &str, ips: &[&str]) -> pb::AttachRequest {
    pb::AttachRequest {
        container_id: id.into(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Asserts that a refused attach of `id` left no record, guard, namespace or veth behind.
fn assert_nothing_of(lab: &Lab, id: &str, veths: &[usize]) {
    let keys = lab.etcd_keys().unwrap();
    assert!(
        !keys.iter().any(|(k, v)| k.contains(id) || v.contains(id)),
        "a record of the refused {id}"
    );
    assert!(!lab.container_namespaces().iter().any(|n| n.ends_with(id)));
    for (i, expected) in veths.iter().enumerate() {
        let links = sh::run("ip", &["-n", &lab.hosts[i].name, "-o", "link"]).unwrap();
        let count = links.lines().filter(|l| l.contains(": weft")).count();
        assert_eq!(count, *expected, "veths on host {i}: {links}");
    }
}

fn reaches(lab: &Lab, from: &str, ip: &str) {
    lab.eventually(
        &format!("{from} reaches {ip}"),
        Duration::from_secs(10),
        || sh::ping(from, ip),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_addresses_are_given_kept_and_refused_by_cause() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        agent_args: vec!["--block-size".into(), "28".into()],
        ..Default::default()
    })
    .unwrap();
    let h1 = lab.hosts[0].name.clone();
    // weftctl: an address in a block of nobody; h1 claims the block and peers route it.
    let db = lab
        .ctl_json(0, &["attach", "db", "--ip", "10.65.200.5"])
        .unwrap();
    assert_eq!(db["ip"], "10.65.200.5", "{db}");
    let block_key = "/weft/v1/blocks/default/10.65.200.0-28";
    let keys = lab.etcd_keys().unwrap();
    assert!(keys[block_key].contains(&h1), "{:?}", keys.get(block_key));
    let (client_ns, _) = lab.attach(1, "client").unwrap();
    reaches(&lab, &client_ns, "10.65.200.5");

    let mut c0 = lab.client(0).await.unwrap();
    let c1 = lab.client(1).await.unwrap();
    // The same request again is the same endpoint; another address for it is refused.
    let again = c0.attach(request("db", &["10.65.200.5"])).await.unwrap();
    assert_eq!(again.into_inner().endpoint.unwrap().ip, "10.65.200.5");
    let moved = c0
        .attach(request("db", &["10.65.200.6"]))
        .await
        .unwrap_err();
    assert_eq!(moved.code(), Code::FailedPrecondition, "{moved:?}");

    // Every refusal, with its code and what it names.
    let refusals: [(&str, usize, &[&str], Code, &str); 5] = [
        ("thief", 0, &["10.65.200.5"], Code::AlreadyExists, "db"),
        (
            "stranger",
            1,
            &["10.65.200.6"],
            Code::FailedPrecondition,
            &h1,
        ),
        ("lost", 0, &["10.99.0.1"], Code::InvalidArgument, "pool"),
        (
            "typo",
            0,
            &["10.65.200"],
            Code::InvalidArgument,
            "10.65.200",
        ),
        (
            "greedy",
            0,
            &["10.65.200.7", "10.65.200.8"],
            Code::InvalidArgument,
            "one per family",
        ),
    ];
    let mut clients = [c0.clone(), c1];
    for (id, host, ips, code, named) in refusals {
        let status = clients[host].attach(request(id, ips)).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
        assert!(status.message().contains(named), "{id}: {status:?}");
        assert_nothing_of(&lab, id, &[1, 1]);
    }

    // Re-created: the same request on the same host gets the same address back.
    lab.ctl_json(0, &["detach", "db"]).unwrap();
    let db2 = lab
        .ctl_json(0, &["attach", "db-2", "--ip", "10.65.200.5"])
        .unwrap();
    assert_eq!(db2["ip"], "10.65.200.5", "{db2}");
    reaches(&lab, &client_ns, "10.65.200.5");

    // The CNI `ips` capability, with the prefix length runtimes pass.
    let netns = format!("{}-cni", lab.prefix);
    sh::run("ip", &["netns", "add", &netns]).unwrap();
    let config = json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
        "socket": lab.hosts[0].socket,
        "runtimeConfig": {"ips": ["10.65.200.9/24"]},
    });
    let (ok, result) = cni("ADD", "ctr-ip", &format!("/run/netns/{netns}"), &config);
    assert!(ok, "{result}");
    assert_eq!(result["ips"][0]["address"], "10.65.200.9/32", "{result}");
    reaches(&lab, &client_ns, "10.65.200.9");

    for i in 0..2 {
        lab.ipam_check(i).unwrap();
    }
    invariants::assert_quiet(&lab);
}
