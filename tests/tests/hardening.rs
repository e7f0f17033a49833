//! Issue 11 (hardening): one test per defect and per extra, written against the fixed behaviour
//! specified in the hardening contract. Each one fails on an agent that has the defect, at the
//! assertion that shows it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tonic::transport::Channel;
use weft_proto::v1 as pb;
use weft_proto::v1::agent_client::AgentClient;
use weft_tests::cni::run_as as cni_as;
use weft_tests::lab::{bin, OUTSIDE_IP, ROUTER_IP};
use weft_tests::{sh, Lab, LabOptions};

/// The lab's agents run with `--alive-ttl 3s` and `--resync-interval 2s`.
const TTL: Duration = Duration::from_secs(3);
const RESYNC: Duration = Duration::from_secs(2);
/// The slack given to every timing the contract names.
const SLACK: Duration = Duration::from_secs(1);
const PREFIX: &str = "/weft/v1";

// ---- the lab ------------------------------------------------------------------------------------

/// A lab that also removes the agents' local journals (`--state-dir`, by default
/// `/run/weft/<host-name>`) once its agents are gone.
struct HLab {
    lab: Option<Lab>,
    state_dirs: Vec<PathBuf>,
}

impl Deref for HLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("lab")
    }
}

impl DerefMut for HLab {
    fn deref_mut(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("lab")
    }
}

impl Drop for HLab {
    fn drop(&mut self) {
        // The lab first: its agents must be gone before their journals are.
        drop(self.lab.take());
        for dir in &self.state_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn hlab(options: LabOptions) -> HLab {
    let lab = Lab::new(options).expect("lab");
    let state_dirs = lab
        .hosts
        .iter()
        .map(|h| PathBuf::from("/run/weft").join(&h.name))
        .collect();
    HLab {
        lab: Some(lab),
        state_dirs,
    }
}

fn hosts(n: usize, agent_args: &[&str]) -> LabOptions {
    LabOptions {
        hosts: n,
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn host_ns(lab: &Lab, i: usize) -> String {
    lab.hosts[i].name.clone()
}

/// The namespace name of a `/run/netns/NAME` path.
fn ns_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
}

// ---- kernel -------------------------------------------------------------------------------------

/// The ifindex of link `name` in namespace `ns`, if it exists.
fn link_index(ns: &str, name: &str) -> Option<u32> {
    let out = sh::output("ip", &["-n", ns, "-o", "link", "show", "dev", name]).ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `weft*` links in service in `ns` (retired ones, in their own group, are being deleted).
fn weft_links(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "-o", "link", "show", "group", "default"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("weft"))
        .collect()
}

/// The device `ip route get IP` picks in `ns`.
fn route_dev(ns: &str, ip: &str) -> String {
    let out = sh::run("ip", &["-n", ns, "route", "get", ip]).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "dev")
        .and_then(|i| words.get(i + 1))
        .map(|w| w.to_string())
        .unwrap_or_else(|| panic!("no device in `ip route get {ip}` in {ns}: {out}"))
}

fn nat_rules(ns: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "iptables-save", "-t", "nat"]).unwrap()
}

/// Whether a TCP connection to ip:port opens from `ns` within 2 s.
fn tcp_connects(ns: &str, ip: &str, port: u16) -> bool {
    sh::in_ns(ns, &["nc", "-z", "-n", "-w", "2", ip, &port.to_string()])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Asks a weft-echo service at ip:port (TCP) from `ns`; true if it answered.
fn echo_answers(ns: &str, ip: &str, port: u16) -> bool {
    sh::in_ns(ns, &["nc", "-n", "-w", "1", ip, &port.to_string()])
        .map(|o| String::from_utf8_lossy(&o.stdout).starts_with("peer="))
        .unwrap_or(false)
}

/// The inode of a file (a namespace's identity when it is a namespace path).
fn inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Runs `f` on a thread that has entered namespace `ns` (sockets it makes belong there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .expect("namespace thread")
}

/// The HTTP status of GET `path` on 127.0.0.1:`port` inside `ns`; None if nothing answered.
fn http_status(ns: &str, port: u16, path: &str) -> Option<u16> {
    let path = path.to_string();
    in_netns(ns, move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    })
}

// ---- etcd ---------------------------------------------------------------------------------------

fn etcdctl(lab: &Lab, args: &[&str]) -> std::process::Output {
    let endpoints = lab.etcd_endpoints();
    let mut all = vec!["etcdctl", "--endpoints", endpoints.as_str()];
    all.extend_from_slice(args);
    sh::in_ns(&lab.router, &all).unwrap()
}

/// (create_revision, lease) of one key, if it exists.
fn key_meta(lab: &Lab, key: &str) -> Option<(i64, i64)> {
    let out = etcdctl(lab, &["get", key, "-w", "json"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let kv = v["kvs"].get(0)?;
    Some((
        kv["create_revision"].as_i64().unwrap_or(0),
        kv["lease"].as_i64().unwrap_or(0),
    ))
}

/// Whether a lease no longer exists in etcd.
fn lease_expired(lab: &Lab, lease: i64) -> bool {
    let out = etcdctl(lab, &["lease", "timetolive", &format!("{lease:x}")]);
    String::from_utf8_lossy(&out.stdout).contains("expired")
}

fn keys(lab: &Lab) -> BTreeMap<String, String> {
    lab.etcd_keys().unwrap()
}

/// Every key that belongs to `host` (its host, alive, block, address, endpoint and port keys).
fn keys_of_host(lab: &Lab, host: &str) -> BTreeSet<String> {
    keys(lab)
        .into_iter()
        .filter(|(k, v)| {
            k == &format!("{PREFIX}/hosts/{host}")
                || k == &format!("{PREFIX}/alive/{host}")
                || k.starts_with(&format!("{PREFIX}/endpoints/{host}/"))
                || k.starts_with(&format!("{PREFIX}/ports/{host}/"))
                || ((k.contains("/blocks/") || k.contains("/ips/"))
                    && serde_json::from_str::<Value>(v)
                        .map(|r| r["host"] == json!(host))
                        .unwrap_or(false))
        })
        .map(|(k, _)| k)
        .collect()
}

/// Runs weftctl inside host `i`'s namespace with the lab's etcd flags after `args` (the
/// operator commands read etcd directly).
fn weftctl_operator(lab: &Lab, i: usize, args: &[&str]) -> std::process::Output {
    let weftctl = bin("weftctl");
    let socket = lab.hosts[i].socket.to_str().unwrap().to_string();
    let etcd = lab.etcd_client_args();
    let mut all = vec![weftctl.to_str().unwrap(), "--socket", &socket];
    all.extend_from_slice(args);
    all.extend(etcd.iter().map(String::as_str));
    sh::in_ns(&lab.hosts[i].name, &all).unwrap()
}

/// `weftctl host remove NAME`, run from host `from`.
fn remove_host(lab: &Lab, from: usize, name: &str) {
    let out = weftctl_operator(lab, from, &["host", "remove", name]);
    assert!(
        out.status.success(),
        "host remove {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// etcd stopped with SIGSTOP: connections stay open and nothing answers. Resumed on drop.
struct EtcdPause {
    pid: Option<i32>,
}

impl EtcdPause {
    fn new(lab: &Lab) -> Self {
        let pid = lab.etcd[0].pid().expect("etcd runs") as i32;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Self { pid: Some(pid) }
    }

    fn resume(&mut self) {
        if let Some(pid) = self.pid.take() {
            kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
        }
    }
}

impl Drop for EtcdPause {
    fn drop(&mut self) {
        self.resume();
    }
}

/// Host `ns` cut from etcd's port in both directions (packets dropped, not refused), inside the
/// lab namespace only. Healed on drop (the namespace goes with the lab anyway).
struct Partition {
    ns: String,
    active: bool,
}

impl Partition {
    fn rules(&self, op: &str) {
        for (chain, addr_flag, port_flag) in
            [("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")]
        {
            sh::run(
                "ip",
                &[
                    "netns", "exec", &self.ns, "iptables", "-w", op, chain, "-p", "tcp", addr_flag,
                    ROUTER_IP, port_flag, "2379", "-j", "DROP",
                ],
            )
            .unwrap();
        }
    }

    fn new(ns: &str) -> Self {
        let p = Self {
            ns: ns.to_string(),
            active: true,
        };
        p.rules("-I");
        p
    }

    fn heal(&mut self) {
        if std::mem::take(&mut self.active) {
            self.rules("-D");
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if self.active {
            self.active = false;
            for (chain, addr_flag, port_flag) in
                [("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")]
            {
                let _ = sh::output(
                    "ip",
                    &[
                        "netns", "exec", &self.ns, "iptables", "-w", "-D", chain, "-p", "tcp",
                        addr_flag, ROUTER_IP, port_flag, "2379", "-j", "DROP",
                    ],
                );
            }
        }
    }
}

// ---- the API ------------------------------------------------------------------------------------

fn request(id: &str) -> pb::AttachRequest {
    pb::AttachRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

fn tcp_port(host_port: u32, container_port: u32) -> pb::PortMapping {
    pb::PortMapping {
        protocol: "tcp".into(),
        host_port,
        container_port,
    }
}

/// One Attach, bounded so that a hung agent fails the test instead of stalling it.
async fn attach(
    client: &mut AgentClient<Channel>,
    req: pb::AttachRequest,
) -> Result<pb::Endpoint, tonic::Status> {
    let id = req.container_id.clone();
    tokio::time::timeout(Duration::from_secs(60), client.attach(req))
        .await
        .unwrap_or_else(|_| panic!("attach {id} did not answer within 60 s"))
        .map(|r| r.into_inner().endpoint.expect("an endpoint"))
}

async fn detach(client: &mut AgentClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    let req = pb::DetachRequest {
        container_id: id.into(),
    };
    tokio::time::timeout(Duration::from_secs(60), client.detach(req))
        .await
        .unwrap_or_else(|_| panic!("detach {id} did not answer within 60 s"))
        .map(|_| ())
}

fn listed(lab: &Lab, i: usize) -> Vec<Value> {
    lab.ctl_json(i, &["ls"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn listed_one(lab: &Lab, i: usize, id: &str) -> Option<Value> {
    listed(lab, i)
        .into_iter()
        .find(|e| e["container_id"] == json!(id))
}

fn peer_alive(lab: &Lab, i: usize, peer: &str) -> bool {
    lab.status(i)
        .map(|s| {
            s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["host"] == json!(peer) && p["alive"] == json!(true))
        })
        .unwrap_or(false)
}

/// `Status.problems` of host `i` (`status --json` key `problems`); panics if the key is missing.
fn problems(lab: &Lab, i: usize) -> Vec<String> {
    let status = lab.status(i).unwrap();
    status["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("weftctl status --json has no \"problems\" list: {status}"))
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect()
}

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

// ---- 5. host-port listeners ------------------------------------------------------------------------

#[tokio::test]
async fn publishing_a_port_a_host_socket_listens_on_is_refused_unless_overridden() {
    let mut lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let (_tcp, _udp) = in_netns(&h1, || {
        (
            TcpListener::bind(("0.0.0.0", 2222)).unwrap(),
            UdpSocket::bind(("0.0.0.0", 5300)).unwrap(),
        )
    });
    let mut client = lab.client(0).await.unwrap();
    let cases = [("tcp", 2222u32, "thief-tcp"), ("udp", 5300u32, "thief-udp")];
    for (protocol, port, id) in cases {
        let mut req = request(id);
        req.ports = vec![pb::PortMapping {
            protocol: protocol.into(),
            host_port: port,
            container_port: 80,
        }];
        let status = attach(&mut client, req)
            .await
            .expect_err("a port a host socket listens on must be refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&port.to_string()),
            "the message names the port: {status:?}"
        );
        let all = keys(&lab);
        assert!(!all.keys().any(|k| k.contains("/ports/")), "{all:?}");
        assert!(!all
            .keys()
            .any(|k| k.contains("/ips/") || k.contains("/endpoints/")));
        assert!(!nat_rules(&h1).contains(&format!("--dport {port}")));
        assert!(weft_links(&h1).is_empty(), "{:?}", weft_links(&h1));
        assert!(lab.container_namespaces().is_empty());
    }

    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    lab.start_agent_with(0, &["--allow-host-port-override"])
        .unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let mut client = lab.client(0).await.unwrap();
    for (protocol, port, id) in cases {
        let mut req = request(id);
        req.ports = vec![pb::PortMapping {
            protocol: protocol.into(),
            host_port: port,
            container_port: 80,
        }];
        attach(&mut client, req)
            .await
            .unwrap_or_else(|e| panic!("with the override, {protocol}/{port}: {e:?}"));
    }
}

// ---- 6. datastore protection -----------------------------------------------------------------------

#[test]
fn containers_cannot_reach_etcd_or_a_non_loopback_metrics_listener() {
    let mut lab = hlab(hosts(1, &["--metrics-addr", "0.0.0.0:9099"]));
    let h1 = host_ns(&lab, 0);
    let host_ip = lab.hosts[0].ip.to_string();
    let (ns, _) = lab.attach(0, "c1").unwrap();
    let echo = bin("weft-echo");
    let outside = lab.outside.clone();
    lab.spawn_in(&outside, echo.to_str().unwrap(), &["7000"])
        .unwrap();
    lab.eventually(
        "the container reaches the outside host",
        Duration::from_secs(10),
        || tcp_connects(&ns, OUTSIDE_IP, 7000),
    )
    .unwrap();
    assert!(tcp_connects(&h1, ROUTER_IP, 2379), "the host reaches etcd");
    assert!(
        tcp_connects(&h1, &host_ip, 9099),
        "the host reaches its metrics"
    );

    lab.eventually(
        "the container is kept from etcd",
        Duration::from_secs(10),
        || !tcp_connects(&ns, ROUTER_IP, 2379),
    )
    .unwrap_or_else(|e| panic!("{e}: a container opened a connection to etcd"));
    assert!(
        !tcp_connects(&ns, &host_ip, 9099),
        "a container opened a connection to its host's metrics listener"
    );
    assert!(!tcp_connects(&ns, ROUTER_IP, 2379), "still kept from etcd");
    assert!(
        tcp_connects(&ns, OUTSIDE_IP, 7000),
        "the outside still works"
    );
    assert!(
        tcp_connects(&h1, ROUTER_IP, 2379),
        "the host still reaches etcd"
    );
    assert!(
        tcp_connects(&h1, &host_ip, 9099),
        "the host still reaches its metrics"
    );

    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    lab.start_agent_with(0, &["--protect-datastore=false"])
        .unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    lab.eventually(
        "without protection the container reaches etcd",
        Duration::from_secs(10),
        || tcp_connects(&ns, ROUTER_IP, 2379),
    )
    .unwrap();
}

// ---- 7. CNI: networks and a second interface --------------------------------------------------------

/// Whether `id` has the shape `cni-<8 hex>-<16 hex>-<readable>`; returns the network part.
fn cni_id_parts(id: &str) -> Option<(String, String, String)> {
    let rest = id.strip_prefix("cni-")?;
    let (network, rest) = rest.split_once('-')?;
    let (attachment, readable) = rest.split_once('-')?;
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    (hex(network, 8) && hex(attachment, 16)).then(|| {
        (
            network.to_string(),
            attachment.to_string(),
            readable.to_string(),
        )
    })
}

#[test]
fn a_second_cni_network_adds_net1_beside_eth0_and_gc_is_per_network() {
    let lab = hlab(hosts(2, &[]));
    let ctr = "0123456789abcdef0123";
    let ns = format!("{}-cni", lab.prefix);
    sh::run("ip", &["netns", "add", &ns]).unwrap();
    let path = format!("/run/netns/{ns}");
    let config = |name: &str| {
        json!({
            "cniVersion": "1.1.0", "name": name, "type": "weft-cni",
            "socket": lab.hosts[0].socket,
        })
    };
    let (a, b) = (config("weft-a"), config("weft-b"));
    let (ok, added_a) = cni_as("ADD", ctr, &path, "eth0", &a);
    assert!(ok, "ADD weft-a eth0: {added_a}");
    let (ok, added_b) = cni_as("ADD", ctr, &path, "net1", &b);
    assert!(ok, "ADD weft-b net1: {added_b}");
    assert_eq!(added_b["interfaces"][0]["name"], "net1", "{added_b}");
    let address = |r: &Value| {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_string()
    };
    let (ip_a, ip_b) = (address(&added_a), address(&added_b));
    assert_ne!(ip_a, ip_b);

    assert_eq!(
        route_dev(&ns, OUTSIDE_IP),
        "eth0",
        "the default route stays on eth0: {}",
        sh::run("ip", &["-n", &ns, "route"]).unwrap()
    );
    let (ok, err) = cni_as("CHECK", ctr, &path, "eth0", &a);
    assert!(ok, "CHECK of (weft-a, eth0) after adding net1: {err}");

    // From another host: replies leave through the interface of their source address.
    let (remote, _) = lab.attach(1, "remote").unwrap();
    for ip in [&ip_a, &ip_b] {
        lab.eventually(
            &format!("a container on another host reaches {ip}"),
            Duration::from_secs(15),
            || sh::ping(&remote, ip),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; routes in the container: {}",
                sh::run("ip", &["-n", &ns, "route"]).unwrap()
            )
        });
    }

    let ids: Vec<String> = listed(&lab, 0)
        .iter()
        .map(|e| e["container_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let parts: Vec<(String, String, String)> = ids
        .iter()
        .map(|id| {
            cni_id_parts(id).unwrap_or_else(|| {
                panic!("{id} is not cni-<8 hex network>-<16 hex attachment>-<container>")
            })
        })
        .collect();
    assert_ne!(parts[0].0, parts[1].0, "the network part differs: {ids:?}");
    assert!(
        parts.iter().all(|p| p.2 == ctr[..12]),
        "the first 12 characters of the container id: {ids:?}"
    );

    // GC of weft-a keeps what weft-b made.
    let mut gc = a.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": ctr, "ifname": "eth0"}]);
    let (ok, err) = cni_as("GC", "", "", "", &gc);
    assert!(ok, "GC weft-a: {err}");
    assert_eq!(
        listed(&lab, 0).len(),
        2,
        "GC of weft-a leaves net1 attached"
    );
    assert!(link_index(&ns, "net1").is_some());
    // GC of weft-b with nothing valid detaches net1 only.
    let mut gc = b.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (ok, err) = cni_as("GC", "", "", "", &gc);
    assert!(ok, "GC weft-b: {err}");
    let left = listed(&lab, 0);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["ifname"], "eth0");
    lab.eventually("net1 removed", Duration::from_secs(5), || {
        link_index(&ns, "net1").is_none()
    })
    .unwrap();
    assert!(link_index(&ns, "eth0").is_some());
    assert!(sh::ping(&remote, &ip_a));
}

// ---- 8. repeated attach with different parameters ---------------------------------------------------

#[tokio::test]
async fn attaching_an_id_again_with_other_parameters_applies_or_refuses_them() {
    let mut lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let host_ip = lab.hosts[0].ip.to_string();
    let outside = lab.outside.clone();
    let mut client = lab.client(0).await.unwrap();
    let mut req = request("web");
    req.ports = vec![tcp_port(8080, 80)];
    let web = attach(&mut client, req).await.unwrap();
    let web_ns = ns_name(&web.netns);
    let echo = bin("weft-echo");
    lab.spawn_in(&web_ns, echo.to_str().unwrap(), &["80"])
        .unwrap();
    lab.eventually("8080 published", Duration::from_secs(10), || {
        echo_answers(&outside, &host_ip, 8080)
    })
    .unwrap();

    // Other ports: applied.
    let mut req = request("web");
    req.ports = vec![tcp_port(9090, 80)];
    let moved = attach(&mut client, req).await.unwrap();
    let listed_ports = &listed_one(&lab, 0, "web").unwrap()["ports"];
    assert_eq!(
        listed_ports,
        &json!([{"protocol": "tcp", "host_port": 9090, "container_port": 80}]),
        "List shows the new ports"
    );
    assert_eq!(moved.ip, web.ip, "same endpoint");
    lab.eventually("9090 published", Duration::from_secs(10), || {
        echo_answers(&outside, &host_ip, 9090)
    })
    .unwrap();
    let all = keys(&lab);
    assert!(all.contains_key(&format!("{PREFIX}/ports/{h1}/tcp/9090")));
    assert!(
        !all.contains_key(&format!("{PREFIX}/ports/{h1}/tcp/8080")),
        "the old host port is freed in etcd"
    );
    let rules = nat_rules(&h1);
    assert!(!rules.contains("--dport 8080"), "old DNAT gone: {rules}");
    assert!(rules.contains("--dport 9090"), "{rules}");

    // Other ifname: refused.
    let mut req = request("web");
    req.ports = vec![tcp_port(9090, 80)];
    req.ifname = "eth1".into();
    let status = attach(&mut client, req).await.expect_err("other ifname");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("ifname"), "{status:?}");

    // Other netns while the recorded one exists: refused.
    let other = format!("{}-other", lab.prefix);
    sh::run("ip", &["netns", "add", &other]).unwrap();
    let mut req = request("web");
    req.ports = vec![tcp_port(9090, 80)];
    req.netns = format!("/run/netns/{other}");
    let status = attach(&mut client, req).await.expect_err("other netns");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("netns"), "{status:?}");
    assert!(
        link_index(&other, "eth0").is_none(),
        "nothing wired into {other}"
    );

    // Other netns once the recorded one is gone: re-wired there. The old namespace is held
    // by a process, so its veth lives on and only its path disappears, as when a runtime
    // replaces a container's sandbox.
    let (old, new) = (format!("{}-old", lab.prefix), format!("{}-new", lab.prefix));
    for n in [&old, &new] {
        sh::run("ip", &["netns", "add", n]).unwrap();
    }
    lab.spawn_in(&old, "sleep", &["600"]).unwrap();
    let mut req = request("mover");
    req.netns = format!("/run/netns/{old}");
    let mover = attach(&mut client, req).await.unwrap();
    assert!(sh::ping(&h1, &mover.ip));
    sh::run("ip", &["netns", "del", &old]).unwrap();
    let mut req = request("mover");
    req.netns = format!("/run/netns/{new}");
    let rewired = attach(&mut client, req)
        .await
        .expect("re-wired into the new namespace");
    assert_eq!(rewired.netns, format!("/run/netns/{new}"));
    let record: Value =
        serde_json::from_str(&keys(&lab)[&format!("{PREFIX}/endpoints/{h1}/mover")]).unwrap();
    assert_eq!(
        record["netns"],
        json!(format!("/run/netns/{new}")),
        "{record}"
    );
    let inside = sh::run("ip", &["-n", &new, "-4", "-o", "addr", "show", "eth0"]).unwrap();
    assert!(inside.contains(&format!("{}/32", rewired.ip)), "{inside}");
    lab.eventually(
        "the re-wired container answers",
        Duration::from_secs(10),
        || sh::ping(&new, &host_ip) && sh::ping(&h1, &rewired.ip),
    )
    .unwrap();
}

// ---- extras ------------------------------------------------------------------------------------------

#[tokio::test]
async fn more_than_64_published_ports_are_refused_and_leave_nothing() {
    let lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let mut client = lab.client(0).await.unwrap();
    let mut req = request("many");
    req.ports = (0..200).map(|i| tcp_port(20000 + i, 80)).collect();
    let status = attach(&mut client, req)
        .await
        .expect_err("200 published ports must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most 64"), "{status:?}");
    let all = keys(&lab);
    assert!(
        !all.keys()
            .any(|k| k.contains("/ports/") || k.contains("/ips/") || k.contains("/endpoints/")),
        "{all:?}"
    );
    assert!(!nat_rules(&h1).contains("--dport 20"), "no DNAT rule left");
    assert!(weft_links(&h1).is_empty());
    assert!(lab.container_namespaces().is_empty());
    // 64 is allowed.
    let mut req = request("many");
    req.ports = (0..64).map(|i| tcp_port(20000 + i, 80)).collect();
    let ok = attach(&mut client, req)
        .await
        .expect("64 ports are allowed");
    assert_eq!(ok.ports.len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_leaked_by_an_agent_killed_during_attaches_are_collected() {
    let mut lab = hlab(hosts(1, &[]));
    let host = host_ns(&lab, 0);
    let mut tasks = vec![];
    for worker in 0..6 {
        let mut client = lab.client(0).await.unwrap();
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let id = format!("k{worker}-{n}");
                let answer =
                    tokio::time::timeout(Duration::from_secs(30), client.attach(request(&id)))
                        .await;
                if !matches!(answer, Ok(Ok(_))) {
                    return n;
                }
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    let mut attached = 0;
    for task in tasks {
        attached += task.await.unwrap();
    }
    eprintln!("{attached} attaches answered before the kill");
    // What an attach interrupted between making its namespace and recording it leaves behind.
    let planted = format!("weft-{host}-interrupted");
    sh::run("ip", &["netns", "add", &planted]).unwrap();

    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let leaked = || {
        let owned: BTreeSet<String> = listed(&lab, 0)
            .iter()
            .map(|e| format!("weft-{host}-{}", e["container_id"].as_str().unwrap()))
            .collect();
        lab.container_namespaces()
            .into_iter()
            .filter(|n| !owned.contains(n))
            .collect::<Vec<_>>()
    };
    let before = leaked();
    assert!(before.contains(&planted), "{before:?}");
    eprintln!("agent-owned namespaces without an endpoint after the restart: {before:?}");
    let took = lab
        .eventually(
            "agent-owned namespaces without an endpoint removed",
            RESYNC * 2 + SLACK,
            || leaked().is_empty(),
        )
        .unwrap_or_else(|e| panic!("{e}: still there: {:?}", leaked()));
    eprintln!("{} leaked namespaces removed in {took:?}", before.len());
    // Endpoints keep theirs.
    for e in listed(&lab, 0) {
        let netns = e["netns"].as_str().unwrap();
        assert!(inode(netns).is_some(), "{netns} of a live endpoint kept");
    }
}

#[test]
fn ipam_check_names_a_weft_veth_that_no_record_explains() {
    // A long resync interval: the agent would remove the stray link after one.
    let lab = hlab(hosts(1, &["--resync-interval", "60s"]));
    let h1 = host_ns(&lab, 0);
    lab.attach(0, "c1").unwrap();
    let clean = weftctl_operator(&lab, 0, &["--json", "ipam", "check"]);
    assert!(
        clean.status.success(),
        "clean before: {}",
        String::from_utf8_lossy(&clean.stdout)
    );
    let report: Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(report["kernel_checked"], true, "{report}");

    let elsewhere = format!("{}-stray", lab.prefix);
    sh::run("ip", &["netns", "add", &elsewhere]).unwrap();
    let stray = "weft0badc0ffee";
    sh::run(
        "ip",
        &[
            "-n", &h1, "link", "add", stray, "type", "veth", "peer", "name", "eth0", "netns",
            &elsewhere,
        ],
    )
    .unwrap();
    let out = weftctl_operator(&lab, 0, &["--json", "ipam", "check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "ipam check must fail: {text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    let named = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["problem"].as_str().unwrap_or_default().contains(stray));
    assert!(named, "a problem names {stray}: {report}");
}

#[tokio::test]
async fn detach_while_cut_off_from_etcd_does_nothing_and_returns_unavailable() {
    let lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let endpoint = lab.ctl_json(0, &["attach", "c1"]).unwrap();
    let netns = endpoint["netns"].as_str().unwrap().to_string();
    let ip = endpoint["ip"].as_str().unwrap().to_string();
    let veth = endpoint["host_ifname"].as_str().unwrap().to_string();
    let index = link_index(&h1, &veth).unwrap();
    let key = format!("{PREFIX}/endpoints/{h1}/c1");
    let mut client = lab.client(0).await.unwrap();

    let mut partition = Partition::new(&h1);
    let status = detach(&mut client, "c1")
        .await
        .expect_err("detach without etcd must fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Whatever the agent started in the background would show within a moment.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(link_index(&h1, &veth), Some(index), "the veth is untouched");
    assert!(inode(&netns).is_some(), "the namespace is untouched");
    assert!(sh::ping(&h1, &ip), "the container is still reachable");
    assert!(keys(&lab).contains_key(&key), "the record is still there");
    assert!(
        listed_one(&lab, 0, "c1").is_some(),
        "the agent still serves it"
    );

    partition.heal();
    let mut outcome = Err(tonic::Status::unknown("not tried"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        outcome = detach(&mut client, "c1").await;
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    outcome.expect("detach succeeds once etcd is back");
    assert!(!keys(&lab).contains_key(&key));
    lab.eventually("veth gone", Duration::from_secs(5), || {
        link_index(&h1, &veth).is_none()
    })
    .unwrap();
}

/// Whether the peer closed a connection (reads what it sent first, e.g. an HTTP/2 preface).
fn closed_by_peer(stream: &std::os::unix::net::UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut reader = stream;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Sets this process's soft RLIMIT_NOFILE to `soft`, raising the hard limit if need be (children
/// started afterwards inherit it).
fn set_nofile(soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = soft;
        limit.rlim_max = limit.rlim_max.max(soft);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "setting RLIMIT_NOFILE to {soft}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_socket_connections_do_not_stall_attach() {
    const IDLE: usize = 2000;
    // The agent starts with the usual soft limit (systemd's default, and most shells'), as on a
    // real host; this test process then raises its own for the idle connections.
    set_nofile(1024);
    let lab = hlab(hosts(1, &[]));
    set_nofile(IDLE as u64 + 1024);
    let pid = lab.agent_pid(0).unwrap();
    let fds = move || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    eprintln!("agent descriptors at rest: {}", fds());

    let socket = lab.hosts[0].socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let idle: Vec<_> = (0..IDLE)
            .map(|_| std::os::unix::net::UnixStream::connect(&socket))
            .collect();
        let _ = tx.send(idle);
    });
    let idle: Vec<_> = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("2,000 connections made within 60 s")
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every connection accepted by the kernel");
    let opened = Instant::now();

    // An attach (through fresh connections, retried as a client would) succeeds within 5 s.
    let mut last = String::new();
    let mut done = None;
    while opened.elapsed() < Duration::from_secs(5) + SLACK {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut client = lab.client(0).await.map_err(|e| e.to_string())?;
            client
                .attach(request("busy-day"))
                .await
                .map_err(|e| format!("{e:?}"))
        })
        .await;
        match attempt {
            Ok(Ok(_)) => {
                done = Some(opened.elapsed());
                break;
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "attempt timed out after 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = done.unwrap_or_else(|| {
        panic!("no attach succeeded within 5 s of {IDLE} idle connections: {last}")
    });
    eprintln!("attach succeeded {took:?} after {IDLE} idle connections opened");
    let count = fds();
    eprintln!("agent descriptors with {IDLE} idle connections: {count}");
    assert!(count < 1000, "the agent holds {count} descriptors");

    // Connections that never sent a preface are closed after 5 s.
    let wait = (Duration::from_secs(5) + SLACK * 2).saturating_sub(opened.elapsed());
    tokio::time::sleep(wait).await;
    let open = idle.iter().filter(|s| !closed_by_peer(s)).count();
    assert_eq!(open, 0, "{open} idle connections still open after 5 s");
    assert!(fds() < 1000);
}
