//! Concurrent attaches on several hosts, and hostile requests answered with the right code
//! leaving nothing.

use super::support::*;

#[tokio::test]
async fn concurrent_attaches_on_three_hosts_never_share_an_address_or_block() {
    // Small blocks: many claims, so hosts race for blocks as well as addresses.
    let lab = lab(LabOptions {
        agent_args: args(&["--block-size", "28"]),
        ..Default::default()
    });
    let started = Instant::now();
    let mut tasks = vec![];
    for host in 0..3 {
        for worker in 0..10 {
            let client = lab.client(host).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut client = client;
                let mut endpoints = vec![];
                for n in 0..10 {
                    let id = format!("h{host}-w{worker}-{n}");
                    let response = client
                        .attach(pb::AttachRequest {
                            container_id: id.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap_or_else(|e| panic!("attach {id}: {e:?}"));
                    endpoints.push(response.into_inner().endpoint.unwrap());
                }
                endpoints
            }));
        }
    }
    let mut endpoints = vec![];
    for task in tasks {
        endpoints.extend(task.await.unwrap());
    }
    eprintln!(
        "300 concurrent attaches on 3 hosts took {:?}",
        started.elapsed()
    );
    assert_eq!(endpoints.len(), 300);
    let ips: HashSet<&str> = endpoints.iter().map(|e| e.ip.as_str()).collect();
    assert_eq!(ips.len(), 300, "an address was handed out twice");

    // etcd: every block has one owner, and each address sits in a block of its own host.
    let keys = assert_etcd_consistent(&lab);
    let blocks: Vec<(ipnetwork_free::Net, String)> = keys
        .iter()
        .filter_map(|(k, v)| {
            let block = k.split("/blocks/").nth(1)?.split('/').nth(1)?;
            let owner: serde_json::Value = serde_json::from_str(v).ok()?;
            Some((
                ipnetwork_free::Net::parse(block)?,
                owner["host"].as_str()?.to_string(),
            ))
        })
        .collect();
    for e in &endpoints {
        let ip: std::net::Ipv4Addr = e.ip.parse().unwrap();
        let owners: Vec<&String> = blocks
            .iter()
            .filter(|(b, _)| b.contains(ip))
            .map(|(_, h)| h)
            .collect();
        assert_eq!(owners, vec![&e.host], "block of {ip}");
    }
    // Kernels: the addresses inside the containers are the ones recorded, each once.
    let mut seen = HashSet::new();
    for e in &endpoints {
        let ns = e.netns.rsplit('/').next().unwrap();
        let addr = sh::run("ip", &["-n", ns, "-4", "-o", "addr", "show", "eth0"]).unwrap();
        assert!(addr.contains(&format!("{}/32", e.ip)), "{addr}");
        assert!(seen.insert(e.ip.clone()));
    }
    // Every container is reachable: one container on each host pings all of them.
    let sources: Vec<&pb::Endpoint> = (0..3)
        .map(|h| {
            endpoints
                .iter()
                .find(|e| e.host == lab.hosts[h].name)
                .unwrap()
        })
        .collect();
    let mut unreachable = vec![];
    for (i, e) in endpoints.iter().enumerate() {
        let from = sources[i % 3].netns.rsplit('/').next().unwrap();
        if !sh::ping(from, &e.ip) {
            unreachable.push(e.ip.clone());
        }
    }
    assert!(unreachable.is_empty(), "unreachable: {unreachable:?}");
}

/// A tiny CIDR type for the test (the lab crate does not depend on ipnetwork).
mod ipnetwork_free {
    use std::net::Ipv4Addr;

    pub struct Net(u32, u32);

    impl Net {
        /// Parses `a.b.c.d-len` as stored in block keys.
        pub fn parse(text: &str) -> Option<Self> {
            let (addr, len) = text.split_once('-')?;
            let addr: Ipv4Addr = addr.parse().ok()?;
            let len: u32 = len.parse().ok()?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some(Net(u32::from(addr) & mask, mask))
        }

        pub fn contains(&self, ip: Ipv4Addr) -> bool {
            u32::from(ip) & self.1 == self.0
        }
    }
}

#[tokio::test]
async fn hostile_requests_get_the_right_code_and_leave_nothing() {
    let lab = lab(LabOptions {
        hosts: 1,
        ..Default::default()
    });
    let ns = lab.hosts[0].name.clone();
    let busy = format!("{}-busy", lab.prefix);
    sh::run("ip", &["netns", "add", &busy]).unwrap();
    sh::run(
        "ip",
        &[
            "-n", &busy, "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
        ],
    )
    .unwrap();
    let file = lab.dir.join("not-a-netns");
    std::fs::write(&file, "x").unwrap();
    let file = file.to_str().unwrap().to_string();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let busy_path = format!("/run/netns/{busy}");

    let req = |id: &str, netns: &str, pid: Option<u32>, ifname: &str| pb::AttachRequest {
        container_id: id.into(),
        netns: netns.into(),
        pid,
        ifname: ifname.into(),
        ..Default::default()
    };
    let with_ports = |ports: Vec<(&str, u32, u32)>| pb::AttachRequest {
        container_id: "ported".into(),
        ports: ports
            .into_iter()
            .map(|(protocol, host_port, container_port)| pb::PortMapping {
                protocol: protocol.into(),
                host_port,
                container_port,
            })
            .collect(),
        ..Default::default()
    };
    use tonic::Code::{InvalidArgument, OutOfRange};
    let long_id = "x".repeat(65);
    let huge_id = "y".repeat(100_000);
    let cases: Vec<(&str, pb::AttachRequest, tonic::Code)> = vec![
        ("empty id", req("", "", None, ""), InvalidArgument),
        ("over-long id", req(&long_id, "", None, ""), InvalidArgument),
        (
            "unicode id",
            req("контейнер", "", None, ""),
            InvalidArgument,
        ),
        ("path id", req("../etc", "", None, ""), InvalidArgument),
        ("slash id", req("a/b", "", None, ""), InvalidArgument),
        ("NUL id", req("a\0b", "", None, ""), InvalidArgument),
        ("space id", req("a b", "", None, ""), InvalidArgument),
        ("leading space id", req(" a", "", None, ""), InvalidArgument),
        ("newline id", req("a\n", "", None, ""), InvalidArgument),
        (
            "regular file netns",
            req("c", &file, None, ""),
            InvalidArgument,
        ),
        (
            "directory netns",
            req("c", "/run", None, ""),
            InvalidArgument,
        ),
        (
            "mount namespace",
            req("c", "/proc/self/ns/mnt", None, ""),
            InvalidArgument,
        ),
        (
            "missing netns",
            req("c", "/run/netns/nope-nope", None, ""),
            InvalidArgument,
        ),
        (
            "relative netns",
            req("c", "run/netns/x", None, ""),
            InvalidArgument,
        ),
        (
            "NUL in netns",
            req("c", "/run/netns/a\0b", None, ""),
            InvalidArgument,
        ),
        (
            "agent's own netns",
            req("c", "/proc/self/ns/net", None, ""),
            InvalidArgument,
        ),
        (
            "machine's netns",
            req("c", "/proc/1/ns/net", None, ""),
            InvalidArgument,
        ),
        (
            "dead pid",
            req("c", "", Some(dead_pid), ""),
            InvalidArgument,
        ),
        ("pid 0", req("c", "", Some(0), ""), InvalidArgument),
        (
            "netns and pid",
            req("c", &busy_path, Some(1), ""),
            InvalidArgument,
        ),
        (
            "ifname too long",
            req("c", "", None, "abcdefghijklmnop"),
            InvalidArgument,
        ),
        (
            "ifname with slash",
            req("c", "", None, "a/b"),
            InvalidArgument,
        ),
        ("ifname lo", req("c", "", None, "lo"), InvalidArgument),
        (
            "ifname present",
            req("c", &busy_path, None, "eth0"),
            InvalidArgument,
        ),
        ("port 0", with_ports(vec![("tcp", 0, 80)]), InvalidArgument),
        (
            "port 65536",
            with_ports(vec![("tcp", 65536, 80)]),
            InvalidArgument,
        ),
        (
            "container port 0",
            with_ports(vec![("udp", 53, 0)]),
            InvalidArgument,
        ),
        (
            "duplicate mapping",
            with_ports(vec![("tcp", 80, 80), ("", 80, 81)]),
            InvalidArgument,
        ),
        (
            "unknown protocol",
            with_ports(vec![("sctp", 80, 80)]),
            InvalidArgument,
        ),
        ("oversized request", req(&huge_id, "", None, ""), OutOfRange),
    ];
    assert!(cases.len() >= 25);
    let mut client = lab.client(0).await.unwrap();
    for (what, request, code) in cases {
        let status = client.attach(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}: a message");
    }
    let status = client
        .detach(pb::DetachRequest {
            container_id: "../x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), InvalidArgument);

    // Nothing was left behind.
    assert!(weft_links(&ns).is_empty(), "{:?}", weft_links(&ns));
    let keys = lab.etcd_keys().unwrap();
    assert!(!keys
        .keys()
        .any(|k| k.contains("/endpoints/") || k.contains("/ips/")));
    assert!(!keys.keys().any(|k| k.contains("/ports/")));
    assert!(lab.container_namespaces().is_empty());
    let busy_links = sh::run("ip", &["-n", &busy, "-o", "link"]).unwrap();
    assert_eq!(
        busy_links.lines().count(),
        3,
        "busy netns untouched: {busy_links}"
    );
    sh::run("ip", &["netns", "del", &busy]).unwrap();
    assert!(
        lab.ctl(0, &["status"]).unwrap().status.success(),
        "agent still serving"
    );
}
