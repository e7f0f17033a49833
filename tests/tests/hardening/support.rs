//! What the hardening tests share: a lab that also removes the agents' journals, and helpers
//! for the kernel, etcd (pauses, partitions, keys) and the API.

pub(crate) use std::collections::{BTreeMap, BTreeSet};
pub(crate) use std::io::{Read, Write};
pub(crate) use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
pub(crate) use std::ops::{Deref, DerefMut};
pub(crate) use std::path::PathBuf;
pub(crate) use std::time::{Duration, Instant};

pub(crate) use nix::sys::signal::{kill, Signal};
pub(crate) use nix::unistd::Pid;
pub(crate) use serde_json::{json, Value};
pub(crate) use tonic::transport::Channel;
pub(crate) use weft_proto::v1 as pb;
pub(crate) use weft_proto::v1::agent_client::AgentClient;
pub(crate) use weft_tests::cni::run_as as cni_as;
pub(crate) use weft_tests::lab::{bin, OUTSIDE_IP, ROUTER_IP};
pub(crate) use weft_tests::{sh, Lab, LabOptions};

/// The lab's agents run with `--alive-ttl 3s` and `--resync-interval 2s`.
pub(crate) const TTL: Duration = Duration::from_secs(3);
pub(crate) const RESYNC: Duration = Duration::from_secs(2);
/// The slack given to every timing the contract names.
pub(crate) const SLACK: Duration = Duration::from_secs(1);
pub(crate) const PREFIX: &str = "/weft/v1";

// ---- the lab ------------------------------------------------------------------------------------

/// A lab that also removes the agents' local journals (`--state-dir`, by default
/// `/run/weft/<host-name>`) once its agents are gone.
pub(crate) struct HLab {
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

pub(crate) fn hlab(options: LabOptions) -> HLab {
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

pub(crate) fn hosts(n: usize, agent_args: &[&str]) -> LabOptions {
    LabOptions {
        hosts: n,
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub(crate) fn host_ns(lab: &Lab, i: usize) -> String {
    lab.hosts[i].name.clone()
}

/// The namespace name of a `/run/netns/NAME` path.
pub(crate) fn ns_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
}

// ---- kernel -------------------------------------------------------------------------------------

/// The ifindex of link `name` in namespace `ns`, if it exists.
pub(crate) fn link_index(ns: &str, name: &str) -> Option<u32> {
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
pub(crate) fn weft_links(ns: &str) -> Vec<String> {
    sh::run("ip", &["-n", ns, "-o", "link", "show", "group", "default"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("weft"))
        .collect()
}

/// The device `ip route get IP` picks in `ns`.
pub(crate) fn route_dev(ns: &str, ip: &str) -> String {
    let out = sh::run("ip", &["-n", ns, "route", "get", ip]).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "dev")
        .and_then(|i| words.get(i + 1))
        .map(|w| w.to_string())
        .unwrap_or_else(|| panic!("no device in `ip route get {ip}` in {ns}: {out}"))
}

pub(crate) fn nat_rules(ns: &str) -> String {
    sh::run("ip", &["netns", "exec", ns, "iptables-save", "-t", "nat"]).unwrap()
}

/// Whether a TCP connection to ip:port opens from `ns` within 2 s.
pub(crate) fn tcp_connects(ns: &str, ip: &str, port: u16) -> bool {
    sh::in_ns(ns, &["nc", "-z", "-n", "-w", "2", ip, &port.to_string()])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Asks a weft-echo service at ip:port (TCP) from `ns`; true if it answered.
pub(crate) fn echo_answers(ns: &str, ip: &str, port: u16) -> bool {
    sh::in_ns(ns, &["nc", "-n", "-w", "1", ip, &port.to_string()])
        .map(|o| String::from_utf8_lossy(&o.stdout).starts_with("peer="))
        .unwrap_or(false)
}

/// The inode of a file (a namespace's identity when it is a namespace path).
pub(crate) fn inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Runs `f` on a thread that has entered namespace `ns` (sockets it makes belong there).
pub(crate) fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
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
pub(crate) fn http_status(ns: &str, port: u16, path: &str) -> Option<u16> {
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

pub(crate) fn etcdctl(lab: &Lab, args: &[&str]) -> std::process::Output {
    let endpoints = lab.etcd_endpoints();
    let mut all = vec!["etcdctl", "--endpoints", endpoints.as_str()];
    all.extend_from_slice(args);
    sh::in_ns(&lab.router, &all).unwrap()
}

/// (create_revision, lease) of one key, if it exists.
pub(crate) fn key_meta(lab: &Lab, key: &str) -> Option<(i64, i64)> {
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
pub(crate) fn lease_expired(lab: &Lab, lease: i64) -> bool {
    let out = etcdctl(lab, &["lease", "timetolive", &format!("{lease:x}")]);
    String::from_utf8_lossy(&out.stdout).contains("expired")
}

pub(crate) fn keys(lab: &Lab) -> BTreeMap<String, String> {
    lab.etcd_keys().unwrap()
}

/// Every key that belongs to `host` (its host, alive, block, address, endpoint and port keys).
pub(crate) fn keys_of_host(lab: &Lab, host: &str) -> BTreeSet<String> {
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
pub(crate) fn weftctl_operator(lab: &Lab, i: usize, args: &[&str]) -> std::process::Output {
    let weftctl = bin("weftctl");
    let socket = lab.hosts[i].socket.to_str().unwrap().to_string();
    let etcd = lab.etcd_client_args();
    let mut all = vec![weftctl.to_str().unwrap(), "--socket", &socket];
    all.extend_from_slice(args);
    all.extend(etcd.iter().map(String::as_str));
    sh::in_ns(&lab.hosts[i].name, &all).unwrap()
}

/// `weftctl host remove NAME`, run from host `from`.
pub(crate) fn remove_host(lab: &Lab, from: usize, name: &str) {
    let out = weftctl_operator(lab, from, &["host", "remove", name]);
    assert!(
        out.status.success(),
        "host remove {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// etcd stopped with SIGSTOP: connections stay open and nothing answers. Resumed on drop.
pub(crate) struct EtcdPause {
    pid: Option<i32>,
}

impl EtcdPause {
    pub(crate) fn new(lab: &Lab) -> Self {
        let pid = lab.etcd[0].pid().expect("etcd runs") as i32;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Self { pid: Some(pid) }
    }

    pub(crate) fn resume(&mut self) {
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
pub(crate) struct Partition {
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

    pub(crate) fn new(ns: &str) -> Self {
        let p = Self {
            ns: ns.to_string(),
            active: true,
        };
        p.rules("-I");
        p
    }

    pub(crate) fn heal(&mut self) {
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

pub(crate) fn request(id: &str) -> pb::AttachRequest {
    pb::AttachRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

pub(crate) fn tcp_port(host_port: u32, container_port: u32) -> pb::PortMapping {
    pb::PortMapping {
        protocol: "tcp".into(),
        host_port,
        container_port,
    }
}

/// One Attach, bounded so that a hung agent fails the test instead of stalling it.
pub(crate) async fn attach(
    client: &mut AgentClient<Channel>,
    req: pb::AttachRequest,
) -> Result<pb::Endpoint, tonic::Status> {
    let id = req.container_id.clone();
    tokio::time::timeout(Duration::from_secs(60), client.attach(req))
        .await
        .unwrap_or_else(|_| panic!("attach {id} did not answer within 60 s"))
        .map(|r| r.into_inner().endpoint.expect("an endpoint"))
}

pub(crate) async fn detach(
    client: &mut AgentClient<Channel>,
    id: &str,
) -> Result<(), tonic::Status> {
    let req = pb::DetachRequest {
        container_id: id.into(),
    };
    tokio::time::timeout(Duration::from_secs(60), client.detach(req))
        .await
        .unwrap_or_else(|_| panic!("detach {id} did not answer within 60 s"))
        .map(|_| ())
}

pub(crate) fn listed(lab: &Lab, i: usize) -> Vec<Value> {
    lab.ctl_json(i, &["ls"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

pub(crate) fn listed_one(lab: &Lab, i: usize, id: &str) -> Option<Value> {
    listed(lab, i)
        .into_iter()
        .find(|e| e["container_id"] == json!(id))
}

pub(crate) fn peer_alive(lab: &Lab, i: usize, peer: &str) -> bool {
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
pub(crate) fn problems(lab: &Lab, i: usize) -> Vec<String> {
    let status = lab.status(i).unwrap();
    status["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("weftctl status --json has no \"problems\" list: {status}"))
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect()
}
