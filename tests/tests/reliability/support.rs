//! What the reliability tests share: lab shorthands, kernel and etcd readers, consistency
//! checks of a host and of etcd, and a background pinger.

pub(crate) use std::collections::{BTreeMap, HashSet};
pub(crate) use std::os::unix::fs::PermissionsExt;
pub(crate) use std::process::Stdio;
pub(crate) use std::time::{Duration, Instant};

pub(crate) use nix::sys::signal::Signal;
pub(crate) use weft_proto::v1 as pb;
pub(crate) use weft_tests::lab::bin;
pub(crate) use weft_tests::{sh, Lab, LabOptions};

pub(crate) fn lab(options: LabOptions) -> Lab {
    Lab::new(options).expect("lab")
}

pub(crate) fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn weft_routes(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "route", "show", "proto", "119"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `weft*` links in service (retired ones, in their own group, are being deleted).
pub(crate) fn weft_links(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "-o", "link", "show", "group", "default"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("weft"))
        .collect()
}

pub(crate) fn iptables_save(ns: &str, table: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "iptables-save", "-t", table]).unwrap()
}

pub(crate) fn sysctl(ns: &str, path: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "cat", path])
        .unwrap()
        .trim()
        .to_string()
}

pub(crate) fn set_sysctl(ns: &str, path: &str, value: &str) {
    sh::run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ],
    )
    .unwrap();
}

/// Checks that host `i` holds exactly what its endpoints need: one veth and one /32 route per
/// endpoint, one blackhole per local block, no duplicated rule or jump.
pub(crate) fn assert_host_consistent(lab: &Lab, i: usize) {
    let ns = &lab.hosts[i].name;
    let endpoints = lab.ctl_json(i, &["ls"]).unwrap();
    let endpoints = endpoints.as_array().unwrap();
    let mut links = weft_links(ns);
    links.sort();
    let mut wanted: Vec<String> = endpoints
        .iter()
        .map(|e| e["host_ifname"].as_str().unwrap().to_string())
        .collect();
    wanted.sort();
    assert_eq!(links, wanted, "links of {ns}");
    let routes = weft_routes(ns);
    for e in endpoints {
        let ip = e["ip"].as_str().unwrap();
        let n = routes
            .iter()
            .filter(|r| r.starts_with(&format!("{ip} dev ")))
            .count();
        assert_eq!(n, 1, "one route for {ip} on {ns}: {routes:?}");
    }
    let status = lab.status(i).unwrap();
    let blocks = status["local_blocks"].as_array().unwrap();
    let blackholes = routes.iter().filter(|r| r.starts_with("blackhole")).count();
    assert_eq!(blackholes, blocks.len(), "{routes:?}");
    let nat = iptables_save(ns, "nat");
    for jump in ["-j WEFT-POSTROUTING", "-j WEFT-PORTS"] {
        let n = nat
            .lines()
            .filter(|l| !l.starts_with("-A WEFT") && l.ends_with(jump))
            .count();
        let expected = if jump == "-j WEFT-PORTS" { 2 } else { 1 };
        assert_eq!(n, expected, "jumps {jump} on {ns}: {nat}");
    }
    let filter = iptables_save(ns, "filter");
    assert_eq!(filter.matches("-j WEFT-FORWARD").count(), 1, "{filter}");
    let mut rules: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A WEFT")).collect();
    let all = rules.len();
    rules.sort();
    rules.dedup();
    assert_eq!(rules.len(), all, "duplicated rules on {ns}: {nat}");
}

/// Checks etcd: endpoint records and ips/ keys agree one to one, and no address or block is
/// held twice.
pub(crate) fn assert_etcd_consistent(lab: &Lab) -> BTreeMap<String, String> {
    let keys = lab.etcd_keys().unwrap();
    let mut endpoint_ips = vec![];
    let mut ip_keys = HashSet::new();
    for (key, value) in &keys {
        if key.contains("/endpoints/") {
            let record: serde_json::Value = serde_json::from_str(value).unwrap();
            endpoint_ips.push(record["ip"].as_str().unwrap().to_string());
        } else if let Some(ip) = key.split("/ips/").nth(1) {
            ip_keys.insert(ip.to_string());
        }
    }
    let unique: HashSet<&String> = endpoint_ips.iter().collect();
    assert_eq!(
        unique.len(),
        endpoint_ips.len(),
        "an address handed out twice"
    );
    let endpoint_set: HashSet<String> = endpoint_ips.into_iter().collect();
    assert_eq!(
        endpoint_set, ip_keys,
        "endpoint records and ips/ keys disagree"
    );
    keys
}

/// `count` pings every 10 ms in the background; `finish` waits for the last reply and returns
/// (sent, received). Ping stops by itself, so no request is cut off in flight.
pub(crate) struct Pinger(std::process::Child);

impl Pinger {
    pub(crate) fn start(ns: &str, target: &str, count: u32) -> Self {
        let count = count.to_string();
        let child = sh::command_in_ns(ns, "ping")
            .unwrap()
            .args(["-i", "0.01", "-W", "2", "-q", "-c", &count, target])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Pinger(child)
    }

    pub(crate) fn finish(self) -> (u64, u64) {
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, ..."
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("");
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        (
            numbers.first().copied().unwrap_or(0),
            numbers.get(1).copied().unwrap_or(0),
        )
    }
}
