//! Several pools end to end (issue 17): containers choose their pool (API, weftctl, CNI), each
//! pool's own nat-outgoing decides SNAT, and a disabled pool refuses new addresses while what it
//! gave keeps working.

use std::io::Write;

use nix::sys::signal::Signal;
use serde_json::json;
use tonic::Code;
use weft_proto::v1 as pb;
use weft_tests::cni::run as cni;
use weft_tests::lab::{bin, OUTSIDE_IP};
use weft_tests::{invariants, sh, Lab, LabOptions};

/// Writes the agents' configuration: `web` masquerades, `db` does not; `db` possibly
/// disabled.
fn write_pools(path: &std::path::Path, db_disabled: bool) {
    let mut file = std::fs::File::create(path).unwrap();
    write!(
        file,
        r#"
[[pools]]
name = "web"
cidr = "10.65.0.0/16"
block-size = 28

[[pools]]
name = "db"
cidr = "10.66.0.0/16"
block-size = 28
nat-outgoing = false
disabled = {db_disabled}
"#
    )
    .unwrap();
}

/// The answer of a weft-echo service at ip:port to a TCP connection from `ns`: the address it
/// saw the connection come from.
fn source_seen(ns: &str, ip: &str, port: u16) -> Option<String> {
    let out = sh::in_ns(ns, &["nc", "-n", "-w", "2", ip, &port.to_string()]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let peer = text.strip_prefix("peer=")?;
    peer.rsplit_once(':').map(|(a, _)| a.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_choose_their_pool_nat_follows_each_pool_and_a_disabled_pool_keeps_what_it_gave()
{
    let file = tempfile::NamedTempFile::new().unwrap();
    write_pools(file.path(), false);
    let config = file.path().to_str().unwrap().to_string();
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        agent_args: vec!["--config".into(), config.clone()],
        ..Default::default()
    })
    .unwrap();
    let in_pool = |ip: &str, cidr: &str| {
        cidr.parse::<ipnetwork::IpNetwork>()
            .unwrap()
            .contains(ip.parse().unwrap())
    };
    // The default is the first pool; weftctl --pool, the API and CNI args choose another.
    let (web_ns, web_ip) = lab.attach(0, "web").unwrap();
    assert!(in_pool(&web_ip, "10.65.0.0/16"), "{web_ip}");
    let db = lab.ctl_json(0, &["attach", "db", "--pool", "db"]).unwrap();
    let db_ip = db["ip"].as_str().unwrap().to_string();
    assert!(in_pool(&db_ip, "10.66.0.0/16"), "{db}");
    let mut c1 = lab.client(1).await.unwrap();
    let replica = c1
        .attach(pb::AttachRequest {
            container_id: "replica".into(),
            pools: vec!["db".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .endpoint
        .unwrap();
    assert!(in_pool(&replica.ip, "10.66.0.0/16"), "{replica:?}");
    let netns = format!("{}-cni", lab.prefix);
    sh::run("ip", &["netns", "add", &netns]).unwrap();
    let conf = json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
        "socket": lab.hosts[1].socket, "args": {"cni": {"pools": ["db"]}},
    });
    let (ok, result) = cni("ADD", "ctr", &format!("/run/netns/{netns}"), &conf);
    assert!(ok, "{result}");
    let cni_ip = result["ips"][0]["address"].as_str().unwrap();
    assert!(in_pool(cni_ip.trim_end_matches("/32"), "10.66.0.0/16"));

    // Both pools are one fabric.
    let replica_ns = lab
        .container_namespaces()
        .into_iter()
        .find(|n| n.ends_with("-replica"))
        .unwrap();
    // The hosts learn each other's new blocks through etcd within milliseconds: a ping sent
    // before that has no way back, so each direction is given a moment.
    let converged = |from: &str, to: &str| {
        lab.eventually(
            &format!("{from} reaching {to}"),
            std::time::Duration::from_secs(3),
            || sh::ping(from, to),
        )
    };
    converged(&replica_ns, &web_ip).expect("db pool -> web pool");
    converged(&web_ns, &replica.ip).expect("web pool -> db pool");

    // SNAT follows each pool's nat-outgoing: web leaves as its host; db is not masqueraded, and
    // the outside network has no route back to a pool, so nothing comes back.
    let echo = bin("weft-echo");
    let outside = lab.outside.clone();
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    lab.eventually(
        "the outside echo answers",
        std::time::Duration::from_secs(5),
        || source_seen(&web_ns, OUTSIDE_IP, 7000).is_some(),
    )
    .unwrap();
    let seen = source_seen(&web_ns, OUTSIDE_IP, 7000).unwrap();
    assert_eq!(seen, lab.hosts[0].ip.to_string(), "web is masqueraded");
    let db_ns = lab
        .container_namespaces()
        .into_iter()
        .find(|n| n.ends_with("-db"))
        .unwrap();
    assert_eq!(
        source_seen(&db_ns, OUTSIDE_IP, 7000),
        None,
        "db keeps its address"
    );
    let rules = sh::run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.hosts[0].name,
            "iptables-save",
            "-t",
            "nat",
        ],
    )
    .unwrap();
    assert!(
        rules.contains("-A WEFT-POSTROUTING -s 10.65.0.0/16"),
        "{rules}"
    );
    assert!(
        !rules.contains("-A WEFT-POSTROUTING -s 10.66.0.0/16"),
        "{rules}"
    );

    // Unknown and badly named pools are refused, leaving nothing.
    let mut c0 = lab.client(0).await.unwrap();
    for (pool, code) in [
        ("nope", Code::InvalidArgument),
        ("a b", Code::InvalidArgument),
    ] {
        let status = c0
            .attach(pb::AttachRequest {
                container_id: "stray".into(),
                pools: vec![pool.into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{pool}: {status:?}");
    }

    // Disabled on host 1 (a restart with the new configuration): no new address from db, a
    // requested one included; what db gave keeps working; the default still works.
    write_pools(file.path(), true);
    lab.stop_agent(1, Signal::SIGTERM).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_agent(1, std::time::Duration::from_secs(20))
        .unwrap();
    let mut c1 = lab.client(1).await.unwrap();
    for (request, what) in [
        (vec![], vec!["db".to_string()]),
        (vec!["10.66.200.1".to_string()], vec![]),
    ] {
        let status = c1
            .attach(pb::AttachRequest {
                container_id: "late".into(),
                ips: request,
                pools: what,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("disabled"), "{status:?}");
    }
    let (_, late_ip) = lab.attach(1, "late").unwrap();
    assert!(in_pool(&late_ip, "10.65.0.0/16"), "{late_ip}");
    assert!(
        sh::ping(&replica_ns, &web_ip),
        "db's containers keep working"
    );
    assert!(sh::ping(&web_ns, &replica.ip));
    let keys = lab.etcd_keys().unwrap();
    assert!(!keys
        .iter()
        .any(|(k, v)| k.contains("stray") || v.contains("stray")));
    for i in 0..2 {
        lab.ipam_check(i).unwrap();
    }
    invariants::assert_quiet(&lab);
}
