//! The invariant checker: on a quiet lab every source of truth must tell the same story.
//!
//! This module owns two things:
//! - reading a lab's whole state into a [`Snapshot`]: the etcd records, each agent's `List` and
//!   `Status` (through `weftctl --json`, so fields added later, such as `problems`, are read when
//!   present and taken as empty when not), each host's kernel (links, `proto weft` routes,
//!   sysctls, iptables) and every container namespace an endpoint names;
//! - the pure comparison [`check`], which names every disagreement as a [`Violation`] (scope,
//!   object, expected, found).
//!
//! [`wait_quiet`] re-checks for a bounded time until the lab converges, so that a state that is
//! merely in flight (a route being repaired, a lease being renewed) is not reported; what is
//! still wrong at the end is.
//!
//! What "agree" means is written down once, here: etcd `endpoints/<host>/*` = the agent's List =
//! the kernel (one `weft*` veth in service per endpoint, its /32 `proto weft` route, a blackhole
//! per local block, a `via` route per peer block and no other `proto weft` route, the container
//! side: interface up with its /32, the gateway's permanent neighbour, the default route on
//! eth0), the
//! DNAT and hairpin rules of each published port and nothing else in `WEFT-PORTS`, the guard
//! keys (`ips/`, `ports/`) one to one with the endpoints, blocks owned by known hosts inside
//! their pools with at most one spare per host and pool, liveness keys exactly for running
//! agents, `weft-<host>-<id>` namespaces only for endpoints that own them, no address twice,
//! and each agent's Status matching etcd with no `problems`. Network policy's chains and
//! address sets are compared with etcd's policies and endpoint labels by `policy_invariants`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::lab::{bin, list_netns, Lab};

/// The etcd prefix the lab's agents use.
pub const ETCD_PREFIX: &str = "/weft/v1/";
/// Link group of retired veths (0x7765) as `ip -j` prints it: they are being deleted and are not
/// in service, so no invariant looks at them.
const RETIRED_GROUP: &str = "30565";
const GATEWAY: &str = "169.254.1.1";
const VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// How long one agent may take to answer List or Status before it counts as silent.
const API_LIMIT: Duration = Duration::from_secs(3);
/// How long one kernel read may take (a namespace being deleted can make `ip` wait).
const READ_LIMIT: Duration = Duration::from_secs(10);

/// One disagreement between sources of truth.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Violation {
    /// The lab host it concerns, or `cluster` for records that belong to no single host.
    pub scope: String,
    /// What is wrong, e.g. `route 10.65.1.2/32`, `etcd ips/10.65.1.2`, `WEFT-PORTS`.
    pub object: String,
    pub expected: String,
    pub found: String,
}

impl Violation {
    pub fn new(
        scope: impl Into<String>,
        object: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Self {
            scope: scope.into(),
            object: object.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {}: expected {}, found {}",
            self.scope, self.object, self.expected, self.found
        )
    }
}

/// An IPv4 prefix, as written in block keys (`a.b.c.d-len`), routes and Status (`a.b.c.d/len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Net {
    /// Parses `a.b.c.d/len`, `a.b.c.d-len` or a bare address (a /32).
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, len) = match text.split_once(['/', '-']) {
            Some((addr, len)) => (addr, len.parse().ok()?),
            None => (text, 32),
        };
        let net = Net {
            addr: addr.parse().ok()?,
            len,
        };
        (len <= 32).then_some(net)
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    /// Whether the address is the network's first (no host bits set).
    pub fn aligned(&self) -> bool {
        u32::from(self.addr) & !self.mask() == 0
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    pub fn contains_net(&self, other: &Net) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &Net) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A published port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    /// `tcp` or `udp` (an empty protocol means tcp).
    pub protocol: String,
    pub host_port: u16,
    pub container_port: u16,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// Renders a port list the way `weftctl attach -p` takes it.
pub fn ports_text(ports: &[Port]) -> String {
    if ports.is_empty() {
        return "no ports".into();
    }
    ports
        .iter()
        .map(Port::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One endpoint, from an etcd record or from the agent's List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub host: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub ifname: String,
    pub mac: String,
    pub netns: String,
    /// Only etcd records say whether the agent made (and owns) the namespace.
    pub owns_netns: Option<bool>,
    /// Sorted.
    pub ports: Vec<Port>,
}

impl Endpoint {
    /// Reads an endpoint from its JSON (etcd record or `weftctl --json ls` item).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let text = |field: &str| -> Result<String, String> {
            v[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no string field {field:?}"))
        };
        let ip = text("ip")?;
        let mut ports = vec![];
        if let Some(list) = v["ports"].as_array() {
            for p in list {
                let number = |field: &str| -> Result<u16, String> {
                    p[field]
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| format!("port without a valid {field:?}: {p}"))
                };
                let protocol = p["protocol"].as_str().unwrap_or("");
                ports.push(Port {
                    protocol: if protocol.is_empty() { "tcp" } else { protocol }.to_string(),
                    host_port: number("host_port")?,
                    container_port: number("container_port")?,
                });
            }
        }
        ports.sort();
        Ok(Endpoint {
            id: text("container_id")?,
            host: text("host")?,
            ip: ip.parse().map_err(|_| format!("bad ip {ip:?}"))?,
            host_ifname: text("host_ifname")?,
            ifname: v["ifname"].as_str().unwrap_or("eth0").to_string(),
            mac: v["mac"].as_str().unwrap_or("").to_ascii_lowercase(),
            netns: text("netns")?,
            owns_netns: v["owns_netns"].as_bool(),
            ports,
        })
    }
}

/// A pool record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub cidr: Net,
    pub block_size: u8,
    pub nat_outgoing: bool,
}

/// The etcd records of a lab, parsed; malformed ones are kept as violations.
#[derive(Debug, Default, Clone)]
pub struct Records {
    pub pools: BTreeMap<String, Pool>,
    /// Host name → underlay address.
    pub hosts: BTreeMap<String, Ipv4Addr>,
    pub alive: BTreeSet<String>,
    /// (pool, block, owning host).
    pub blocks: Vec<(String, Net, String)>,
    /// Address → (host, container id).
    pub ips: BTreeMap<Ipv4Addr, (String, String)>,
    /// (host, container id) → endpoint.
    pub endpoints: BTreeMap<(String, String), Endpoint>,
    /// (host, protocol, port) → container id.
    pub ports: BTreeMap<(String, String, u16), String>,
    pub malformed: Vec<Violation>,
}

impl Records {
    /// Parses every key under [`ETCD_PREFIX`] (keys of other collections are ignored: they
    /// belong to features this checker does not know yet).
    pub fn parse(keys: &BTreeMap<String, String>) -> Self {
        let mut r = Records::default();
        for (key, value) in keys {
            let Some(rest) = key.strip_prefix(ETCD_PREFIX) else {
                continue;
            };
            if let Err(why) = r.add(rest, value) {
                r.malformed.push(Violation::new(
                    "cluster",
                    format!("etcd {rest}"),
                    "a well-formed record",
                    format!("{why} (value {value:?})"),
                ));
            }
        }
        r
    }

    fn add(&mut self, rest: &str, value: &str) -> Result<(), String> {
        let json = || serde_json::from_str::<Value>(value).map_err(|e| format!("not JSON: {e}"));
        let segments: Vec<&str> = rest.split('/').collect();
        let field = |v: &Value, name: &str| -> Result<String, String> {
            v[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no {name:?}"))
        };
        match segments.as_slice() {
            ["pools", name] => {
                let v = json()?;
                let cidr = field(&v, "cidr")?;
                self.pools.insert(
                    name.to_string(),
                    Pool {
                        cidr: Net::parse(&cidr).ok_or(format!("bad cidr {cidr:?}"))?,
                        block_size: v["block_size"]
                            .as_u64()
                            .and_then(|n| u8::try_from(n).ok())
                            .ok_or("no block_size")?,
                        nat_outgoing: v["nat_outgoing"].as_bool().unwrap_or(false),
                    },
                );
            }
            ["hosts", name] => {
                let ip = field(&json()?, "underlay_ip")?;
                self.hosts.insert(
                    name.to_string(),
                    ip.parse().map_err(|_| format!("bad underlay_ip {ip:?}"))?,
                );
            }
            ["alive", name] => {
                self.alive.insert(name.to_string());
            }
            ["blocks", pool, block] => {
                let net = Net::parse(block)
                    .filter(|n| n.aligned() && block.contains('-'))
                    .ok_or(format!("bad block {block:?}"))?;
                let host = field(&json()?, "host")?;
                self.blocks.push((pool.to_string(), net, host));
            }
            ["ips", ip] => {
                let ip: Ipv4Addr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
                let v = json()?;
                self.ips
                    .insert(ip, (field(&v, "host")?, field(&v, "container_id")?));
            }
            ["endpoints", host, id] => {
                let e = Endpoint::from_json(&json()?)?;
                if e.host != *host || e.id != *id {
                    return Err(format!(
                        "record names {}/{}, not the key's {host}/{id}",
                        e.host, e.id
                    ));
                }
                self.endpoints.insert((host.to_string(), id.to_string()), e);
            }
            ["ports", host, protocol, port] => {
                let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
                let owner = field(&json()?, "container_id")?;
                self.ports
                    .insert((host.to_string(), protocol.to_string(), port), owner);
            }
            [collection, ..]
                if [
                    "pools",
                    "hosts",
                    "alive",
                    "blocks",
                    "ips",
                    "endpoints",
                    "ports",
                ]
                .contains(collection) =>
            {
                return Err("key of the wrong shape".into());
            }
            _ => {}
        }
        Ok(())
    }

    /// The endpoints of one host, by container id.
    pub fn endpoints_of(&self, host: &str) -> BTreeMap<&str, &Endpoint> {
        self.endpoints
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|((_, id), e)| (id.as_str(), e))
            .collect()
    }

    /// The blocks of one host.
    pub fn blocks_of(&self, host: &str) -> BTreeSet<Net> {
        self.blocks
            .iter()
            .filter(|(_, _, h)| h == host)
            .map(|(_, b, _)| *b)
            .collect()
    }
}

/// What an agent answered.
#[derive(Debug, Clone)]
pub enum AgentView {
    /// The lab has no running agent process for the host.
    NotRunning,
    /// The process runs but List or Status did not answer (in time).
    Silent(String),
    Answered {
        list: Vec<Value>,
        status: Value,
    },
}

/// A host's kernel state, as `ip -j` and `iptables-save` show it inside its namespace.
#[derive(Debug, Clone, Default)]
pub struct HostKernel {
    pub links: Vec<Value>,
    /// `proto weft` routes of every table.
    pub routes: Vec<Value>,
    /// `/proc/sys` path → value (`MISSING` when absent).
    pub sysctls: BTreeMap<String, String>,
    pub nat: String,
    pub filter: String,
    /// `ipset save`: network policy's address sets.
    pub ipsets: String,
}

/// A container namespace's state.
#[derive(Debug, Clone, Default)]
pub struct ContainerKernel {
    /// `ip -j addr`: links with their addresses.
    pub links: Vec<Value>,
    pub routes: Vec<Value>,
    pub neighbours: Vec<Value>,
}

/// One lab host.
#[derive(Debug, Clone)]
pub struct HostView {
    pub name: String,
    pub ip: Ipv4Addr,
    pub agent: AgentView,
    pub kernel: Result<HostKernel, String>,
    /// By namespace path: every namespace an endpoint of this host names.
    pub containers: BTreeMap<String, Result<ContainerKernel, String>>,
}

impl HostView {
    /// The agent's List, parsed, when it answered.
    pub fn listed(&self) -> Option<Vec<Endpoint>> {
        match &self.agent {
            AgentView::Answered { list, .. } => Some(
                list.iter()
                    .filter_map(|v| Endpoint::from_json(v).ok())
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// Everything the checker compares, read at (nearly) one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub etcd: BTreeMap<String, String>,
    pub records: Records,
    /// Names under /run/netns.
    pub namespaces: BTreeSet<String>,
    pub hosts: Vec<HostView>,
    pub took: Duration,
}

impl Snapshot {
    /// A host's endpoints as its agent lists them, or as etcd records them when the agent did
    /// not answer.
    pub fn endpoints_of(&self, host: usize) -> Vec<Endpoint> {
        let view = &self.hosts[host];
        view.listed().unwrap_or_else(|| {
            self.records
                .endpoints_of(&view.name)
                .into_values()
                .cloned()
                .collect()
        })
    }
}

/// Runs a command with `stdin` as its input, killing it (by its PID: we started it) when it
/// outlives `limit`.
pub fn output_within(
    command: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<Output> {
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits without reading all of its input is judged by its exit, not by
        // our broken pipe.
        let _ = std::io::Write::write_all(&mut pipe, input);
    }
    // Readers on their own threads, so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = vec![];
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = vec![];
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs a command inside the network namespace at `path`; fails on a non-zero exit.
pub fn in_netns(path: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={path}")).arg(program).args(args);
    let out = output_within(&mut command, stdin.map(str::as_bytes), READ_LIMIT)?;
    if !out.status.success() {
        bail!(
            "{program} {} in {path}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -j` commands in one `ip -batch` inside a namespace; one JSON array per command.
fn ip_json(path: &str, detailed: bool, commands: &[&str]) -> Result<Vec<Vec<Value>>> {
    let mut input = commands.join("\n");
    input.push('\n');
    let args: &[&str] = if detailed {
        &["-j", "-d", "-batch", "-"]
    } else {
        &["-j", "-batch", "-"]
    };
    let text = in_netns(path, "ip", args, Some(&input))?;
    let arrays: Vec<Vec<Value>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Vec<Value>>(l)
                .with_context(|| format!("ip -j output {l:?}"))
                // `ip -j` prints empty objects for filtered-out entries; drop them.
                .map(|v| {
                    v.into_iter()
                        .filter(|e| e.as_object().is_some_and(|o| !o.is_empty()))
                        .collect()
                })
        })
        .collect::<Result<_>>()?;
    if arrays.len() != commands.len() {
        bail!(
            "ip -batch in {path} answered {} of {} commands: {text}",
            arrays.len(),
            commands.len()
        );
    }
    Ok(arrays)
}

fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Reads a host's kernel state from inside its namespace.
pub fn read_host_kernel(ns: &str) -> Result<HostKernel> {
    let path = netns_path(ns);
    let mut arrays = ip_json(
        &path,
        true,
        &["link show", "route show table all proto 119"],
    )?;
    let routes = arrays.pop().unwrap_or_default();
    let links = arrays.pop().unwrap_or_default();
    let mut files = vec!["/proc/sys/net/ipv4/ip_forward".to_string()];
    for link in &links {
        let name = link["ifname"].as_str().unwrap_or("");
        if name.starts_with("weft") && link["group"].as_str() != Some(RETIRED_GROUP) {
            for knob in VETH_SYSCTLS {
                files.push(knob.0.replace("{}", name));
            }
        }
    }
    let mut args = vec![
        "-c",
        "for f in \"$@\"; do v=$(cat \"$f\" 2>/dev/null) || v=MISSING; echo \"$f=$v\"; done",
        "sh",
    ];
    args.extend(files.iter().map(String::as_str));
    let text = in_netns(&path, "sh", &args, None)?;
    let sysctls = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let save = in_netns(&path, "iptables-save", &[], None)?;
    let table = |name: &str| -> String {
        let mut inside = false;
        let mut out = String::new();
        for line in save.lines() {
            if line.starts_with('*') {
                inside = line == format!("*{name}");
            } else if inside {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    let ipsets = in_netns(&path, "ipset", &["save"], None)?;
    Ok(HostKernel {
        links,
        routes,
        sysctls,
        nat: table("nat"),
        filter: table("filter"),
        ipsets,
    })
}

/// Reads a container namespace (by path) the checker needs: addresses, routes, neighbours.
pub fn read_container(path: &str) -> Result<ContainerKernel> {
    if !Path::new(path).exists() {
        bail!("no such namespace");
    }
    let mut arrays = ip_json(
        path,
        false,
        &["addr show", "route show table all", "neigh show"],
    )?;
    let neighbours = arrays.pop().unwrap_or_default();
    let routes = arrays.pop().unwrap_or_default();
    let links = arrays.pop().unwrap_or_default();
    Ok(ContainerKernel {
        links,
        routes,
        neighbours,
    })
}

/// The host-end sysctls of every endpoint veth and their wanted values (`{}` = the veth); a
/// knob whose file is absent (IPv6 off) is not a violation.
const VETH_SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/conf/{}/proxy_arp", "1"),
    ("/proc/sys/net/ipv4/neigh/{}/proxy_delay", "0"),
    ("/proc/sys/net/ipv4/conf/{}/forwarding", "1"),
    ("/proc/sys/net/ipv4/conf/{}/rp_filter", "1"),
    ("/proc/sys/net/ipv6/conf/{}/accept_ra", "0"),
];

/// What the snapshot needs of a lab host, so hosts can be read in parallel.
struct HostTarget {
    name: String,
    ip: Ipv4Addr,
    socket: PathBuf,
    running: bool,
}

fn read_agent(target: &HostTarget) -> AgentView {
    if !target.running {
        return AgentView::NotRunning;
    }
    let ctl = |what: &str| -> Result<Value, String> {
        let mut command = Command::new(bin("weftctl"));
        command
            .arg("--socket")
            .arg(&target.socket)
            .arg("--json")
            .arg(what);
        let out = output_within(&mut command, None, API_LIMIT).map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!(
                "weftctl {what} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("weftctl {what}: {e}"))
    };
    // One silent answer is enough: a frozen agent would make the second wait out its limit too.
    match ctl("ls").and_then(|list| Ok((list, ctl("status")?))) {
        Ok((list, status)) => AgentView::Answered {
            list: list.as_array().cloned().unwrap_or_default(),
            status,
        },
        Err(e) => AgentView::Silent(e),
    }
}

fn read_host(target: &HostTarget, records: &Records) -> HostView {
    let agent = read_agent(target);
    let kernel = read_host_kernel(&target.name).map_err(|e| format!("{e:#}"));
    let mut paths: BTreeSet<String> = records
        .endpoints_of(&target.name)
        .values()
        .map(|e| e.netns.clone())
        .collect();
    if let AgentView::Answered { list, .. } = &agent {
        paths.extend(
            list.iter()
                .filter_map(|v| v["netns"].as_str().map(String::from)),
        );
    }
    let containers = paths
        .into_iter()
        .map(|p| {
            let state = read_container(&p).map_err(|e| format!("{e:#}"));
            (p, state)
        })
        .collect();
    HostView {
        name: target.name.clone(),
        ip: target.ip,
        agent,
        kernel,
        containers,
    }
}

/// Reads the whole lab: etcd first, then every host (in parallel).
pub fn snapshot(lab: &Lab) -> Result<Snapshot> {
    let started = Instant::now();
    let etcd = lab.etcd_keys().context("reading etcd")?;
    let records = Records::parse(&etcd);
    let targets: Vec<HostTarget> = lab
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| HostTarget {
            name: h.name.clone(),
            ip: h.ip,
            socket: h.socket.clone(),
            running: lab.agent_alive(i),
        })
        .collect();
    let hosts = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                let records = &records;
                s.spawn(move || read_host(t, records))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host reader panicked"))
            .collect()
    });
    Ok(Snapshot {
        etcd,
        records,
        namespaces: list_netns().into_iter().collect(),
        hosts,
        took: started.elapsed(),
    })
}

/// What a clean check covered, so a caller can tell a vacuous pass from a real one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub hosts: usize,
    pub endpoints: usize,
    pub published_ports: usize,
    pub routes: usize,
    pub container_namespaces: usize,
}

impl Coverage {
    pub fn of(s: &Snapshot) -> Self {
        Coverage {
            hosts: s.hosts.len(),
            endpoints: s.records.endpoints.len(),
            published_ports: s.records.endpoints.values().map(|e| e.ports.len()).sum(),
            routes: s
                .hosts
                .iter()
                .filter_map(|h| h.kernel.as_ref().ok())
                .map(|k| k.routes.len())
                .sum(),
            container_namespaces: s.hosts.iter().map(|h| h.containers.len()).sum(),
        }
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} hosts, {} endpoints, {} published ports, {} routes, {} container namespaces",
            self.hosts,
            self.endpoints,
            self.published_ports,
            self.routes,
            self.container_namespaces
        )
    }
}

/// Compares every source of truth in the snapshot; returns every violation, sorted.
pub fn check(s: &Snapshot) -> Vec<Violation> {
    let mut v = s.records.malformed.clone();
    check_cluster(s, &mut v);
    for host in &s.hosts {
        check_agent(s, host, &mut v);
        if let Some(listed) = host.listed() {
            check_list(s, host, &listed, &mut v);
        }
        match &host.kernel {
            Ok(kernel) => {
                check_links_and_sysctls(s, host, kernel, &mut v);
                check_routes(s, host, kernel, &mut v);
                check_rules(s, host, kernel, &mut v);
            }
            Err(e) => v.push(Violation::new(
                &host.name,
                "kernel state",
                "readable",
                e.clone(),
            )),
        }
        check_containers(s, host, &mut v);
    }
    check_namespaces(s, &mut v);
    check_addresses_unique(s, &mut v);
    crate::policy_invariants::check(s, &mut v);
    v.sort();
    v.dedup();
    v
}

/// Reads the lab once and checks it (no waiting: for a lab known to be still).
pub fn check_now(lab: &Lab) -> Result<Vec<Violation>> {
    Ok(check(&snapshot(lab)?))
}

/// A lab that converged: the snapshot that passed.
#[derive(Debug)]
pub struct Quiet {
    pub snapshot: Snapshot,
    pub coverage: Coverage,
    pub attempts: usize,
    pub took: Duration,
}

/// A lab that did not converge within the limit: what was still wrong at the end.
#[derive(Debug)]
pub struct Unquiet {
    pub violations: Vec<Violation>,
    /// The last snapshot (boxed: it is large, and errors travel by value).
    pub snapshot: Option<Box<Snapshot>>,
    pub attempts: usize,
    pub took: Duration,
}

impl fmt::Display for Unquiet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} violation(s) still present after {:.1}s ({} checks):",
            self.violations.len(),
            self.took.as_secs_f64(),
            self.attempts
        )?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unquiet {}

/// Re-checks until the lab shows no violation or `limit` passes.
pub fn wait_quiet(lab: &Lab, limit: Duration) -> Result<Quiet, Unquiet> {
    wait_quiet_with(lab, limit, |_| vec![])
}

/// Like [`wait_quiet`], with more invariants (`extra`) checked on each snapshot.
pub fn wait_quiet_with(
    lab: &Lab,
    limit: Duration,
    mut extra: impl FnMut(&Snapshot) -> Vec<Violation>,
) -> Result<Quiet, Unquiet> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (violations, snap) = match snapshot(lab) {
            Ok(snap) => {
                let mut violations = check(&snap);
                violations.extend(extra(&snap));
                violations.sort();
                violations.dedup();
                (violations, Some(snap))
            }
            Err(e) => (
                vec![Violation::new(
                    "lab",
                    "snapshot",
                    "a readable lab",
                    format!("{e:#}"),
                )],
                None,
            ),
        };
        if violations.is_empty() {
            let snapshot = snap.expect("a clean check had a snapshot");
            return Ok(Quiet {
                coverage: Coverage::of(&snapshot),
                snapshot,
                attempts,
                took: started.elapsed(),
            });
        }
        if started.elapsed() >= limit {
            return Err(Unquiet {
                violations,
                snapshot: snap.map(Box::new),
                attempts,
                took: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(400));
    }
}

/// Waits (up to 10 s) for the lab to be quiet and panics naming every violation otherwise.
/// Returns what the passing check covered.
pub fn assert_quiet(lab: &Lab) -> Coverage {
    match wait_quiet(lab, Duration::from_secs(10)) {
        Ok(quiet) => quiet.coverage,
        Err(unquiet) => panic!("the lab is not consistent: {unquiet}"),
    }
}

// ---- cluster-wide records ----------------------------------------------------------------------

fn check_cluster(s: &Snapshot, v: &mut Vec<Violation>) {
    let r = &s.records;
    let lab_hosts: BTreeMap<&str, &HostView> =
        s.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    if r.pools.is_empty() {
        v.push(Violation::new("cluster", "etcd pools/", "a pool", "none"));
    }
    for name in r.hosts.keys() {
        if !lab_hosts.contains_key(name.as_str()) {
            v.push(Violation::new(
                "cluster",
                format!("etcd hosts/{name}"),
                "only hosts of this lab",
                "a host the lab does not have",
            ));
        }
    }
    for name in &r.alive {
        if !lab_hosts.contains_key(name.as_str()) {
            v.push(Violation::new(
                "cluster",
                format!("etcd alive/{name}"),
                "only hosts of this lab",
                "a host the lab does not have",
            ));
        }
    }
    for host in &s.hosts {
        let running = !matches!(host.agent, AgentView::NotRunning);
        match (running, r.alive.contains(&host.name)) {
            (true, false) => v.push(Violation::new(
                &host.name,
                format!("etcd alive/{}", host.name),
                "present (the agent runs)",
                "missing",
            )),
            (false, true) => v.push(Violation::new(
                &host.name,
                format!("etcd alive/{}", host.name),
                "absent (no agent runs)",
                "present",
            )),
            _ => {}
        }
        match r.hosts.get(&host.name) {
            Some(ip) if *ip != host.ip => v.push(Violation::new(
                &host.name,
                format!("etcd hosts/{}", host.name),
                format!("underlay {}", host.ip),
                format!("underlay {ip}"),
            )),
            None if running => v.push(Violation::new(
                &host.name,
                format!("etcd hosts/{}", host.name),
                "present (the agent runs)",
                "missing",
            )),
            _ => {}
        }
    }

    // Blocks: in their pool, of the pool's size, owned by a known host, never overlapping.
    for (i, (pool, block, owner)) in r.blocks.iter().enumerate() {
        let object = format!("etcd blocks/{pool}/{}-{}", block.addr, block.len);
        match r.pools.get(pool) {
            None => v.push(Violation::new(
                "cluster",
                &object,
                "a block of an existing pool",
                format!("no pool {pool}"),
            )),
            Some(p) if !p.cidr.contains_net(block) || block.len != p.block_size => {
                v.push(Violation::new(
                    "cluster",
                    &object,
                    format!("a /{} inside {}", p.block_size, p.cidr),
                    block.to_string(),
                ))
            }
            Some(_) => {}
        }
        if !r.hosts.contains_key(owner) {
            v.push(Violation::new(
                "cluster",
                &object,
                "an owner in hosts/",
                format!("owner {owner}, unknown"),
            ));
        }
        for (other_pool, other, other_owner) in &r.blocks[i + 1..] {
            if block.overlaps(other) {
                v.push(Violation::new(
                    "cluster",
                    &object,
                    "no overlap with another block",
                    format!("overlaps {other_pool}/{other} of {other_owner}"),
                ));
            }
        }
    }

    // Guard keys one to one with endpoints.
    for (ip, (host, id)) in &r.ips {
        let object = format!("etcd ips/{ip}");
        match r.endpoints.get(&(host.clone(), id.clone())) {
            None => v.push(Violation::new(
                scope_of(s, host),
                object,
                format!("an endpoint record endpoints/{host}/{id}"),
                "none (leaked address)",
            )),
            Some(e) if e.ip != *ip => v.push(Violation::new(
                scope_of(s, host),
                object,
                format!("endpoints/{host}/{id} to hold {ip}"),
                format!("it holds {}", e.ip),
            )),
            Some(_) => {}
        }
    }
    let mut holders: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for ((host, id), e) in &r.endpoints {
        let object = format!("etcd endpoints/{host}/{id}");
        holders
            .entry(e.ip)
            .or_default()
            .push(format!("{host}/{id}"));
        match r.ips.get(&e.ip) {
            None => v.push(Violation::new(
                host,
                &object,
                format!("a guard key ips/{}", e.ip),
                "none",
            )),
            Some((h, i)) if h != host || i != id => v.push(Violation::new(
                host,
                &object,
                format!("ips/{} held by {host}/{id}", e.ip),
                format!("held by {h}/{i}"),
            )),
            Some(_) => {}
        }
        let owners: Vec<&String> = r
            .blocks
            .iter()
            .filter(|(_, b, _)| b.contains(e.ip))
            .map(|(_, _, h)| h)
            .collect();
        if owners != vec![host] {
            v.push(Violation::new(
                host,
                &object,
                format!("{} inside a block of {host}", e.ip),
                if owners.is_empty() {
                    "inside no block".to_string()
                } else {
                    format!("inside blocks of {owners:?}")
                },
            ));
        }
        if !r.hosts.contains_key(host) {
            v.push(Violation::new(
                host,
                &object,
                format!("a host record hosts/{host}"),
                "none",
            ));
        }
        let mut seen = BTreeSet::new();
        for p in &e.ports {
            if !seen.insert((p.protocol.clone(), p.host_port)) {
                v.push(Violation::new(
                    host,
                    &object,
                    "each host port published once",
                    format!("{}/{} twice", p.protocol, p.host_port),
                ));
            }
            match r
                .ports
                .get(&(host.clone(), p.protocol.clone(), p.host_port))
            {
                Some(owner) if owner == id => {}
                other => v.push(Violation::new(
                    host,
                    &object,
                    format!(
                        "a reservation ports/{host}/{}/{} for {id}",
                        p.protocol, p.host_port
                    ),
                    match other {
                        Some(owner) => format!("reserved for {owner}"),
                        None => "no reservation".into(),
                    },
                )),
            }
        }
    }
    for (ip, who) in holders {
        if who.len() > 1 {
            v.push(Violation::new(
                "cluster",
                format!("address {ip}"),
                "one endpoint",
                format!("endpoints {}", who.join(", ")),
            ));
        }
    }
    for ((host, protocol, port), owner) in &r.ports {
        let publishes = r
            .endpoints
            .get(&(host.clone(), owner.clone()))
            .is_some_and(|e| {
                e.ports
                    .iter()
                    .any(|p| p.protocol == *protocol && p.host_port == *port)
            });
        if !publishes {
            v.push(Violation::new(
                scope_of(s, host),
                format!("etcd ports/{host}/{protocol}/{port}"),
                format!("endpoint {host}/{owner} publishing {protocol}/{port}"),
                "no such endpoint or port (leaked reservation)",
            ));
        }
    }

    // No block held without need beyond one spare per host and pool.
    let mut held: BTreeMap<(&str, &str), Vec<Net>> = BTreeMap::new();
    for (pool, block, host) in &r.blocks {
        held.entry((host.as_str(), pool.as_str()))
            .or_default()
            .push(*block);
    }
    for ((host, pool), blocks) in held {
        let used = blocks
            .iter()
            .filter(|b| {
                r.endpoints
                    .values()
                    .any(|e| e.host == host && b.contains(e.ip))
            })
            .count();
        if blocks.len() > used + 1 {
            v.push(Violation::new(
                scope_of(s, host),
                format!("blocks of pool {pool}"),
                format!("at most {} ({used} in use + 1 spare)", used + 1),
                format!(
                    "{}: {}",
                    blocks.len(),
                    blocks
                        .iter()
                        .map(Net::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
}

/// The lab host a record concerns, or `cluster` when it names no lab host.
fn scope_of(s: &Snapshot, host: &str) -> String {
    if s.hosts.iter().any(|h| h.name == host) {
        host.to_string()
    } else {
        "cluster".into()
    }
}

// ---- agents ------------------------------------------------------------------------------------

fn check_agent(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let name = &host.name;
    let status = match &host.agent {
        AgentView::NotRunning => {
            v.push(Violation::new(
                name,
                "agent",
                "a running agent",
                "no agent process",
            ));
            return;
        }
        AgentView::Silent(e) => {
            v.push(Violation::new(
                name,
                "agent API",
                "answers to List and Status",
                e.clone(),
            ));
            return;
        }
        AgentView::Answered { status, .. } => status,
    };
    let r = &s.records;
    let text = |field: &str| status[field].as_str().unwrap_or("").to_string();
    if text("host") != *name {
        v.push(Violation::new(
            name,
            "Status.host",
            name.clone(),
            text("host"),
        ));
    }
    if text("underlay_ip") != host.ip.to_string() {
        v.push(Violation::new(
            name,
            "Status.underlay_ip",
            host.ip.to_string(),
            text("underlay_ip"),
        ));
    }
    if status["etcd_connected"] != Value::Bool(true) {
        v.push(Violation::new(
            name,
            "Status.etcd_connected",
            "true",
            status["etcd_connected"].to_string(),
        ));
    }
    let recorded = r.endpoints_of(name).len() as u64;
    if status["endpoint_count"].as_u64() != Some(recorded) {
        v.push(Violation::new(
            name,
            "Status.endpoint_count",
            format!("{recorded} (endpoint records in etcd)"),
            status["endpoint_count"].to_string(),
        ));
    }
    if let Some(problems) = status["problems"].as_array() {
        for p in problems {
            v.push(Violation::new(
                name,
                "Status.problems",
                "none",
                p.as_str().map(str::to_string).unwrap_or(p.to_string()),
            ));
        }
    }
    let nets = |value: &Value| -> BTreeSet<String> {
        value
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str())
                    .map(|b| Net::parse(b).map_or(b.to_string(), |n| n.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let names =
        |blocks: BTreeSet<Net>| -> BTreeSet<String> { blocks.iter().map(Net::to_string).collect() };
    let local = nets(&status["local_blocks"]);
    if local != names(r.blocks_of(name)) {
        v.push(Violation::new(
            name,
            "Status.local_blocks",
            format!("{:?} (etcd)", names(r.blocks_of(name))),
            format!("{local:?}"),
        ));
    }
    let empty = vec![];
    let peers: BTreeMap<String, &Value> = status["peers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|p| (p["host"].as_str().unwrap_or("").to_string(), p))
        .collect();
    for (peer, ip) in r.hosts.iter().filter(|(h, _)| *h != name) {
        let Some(p) = peers.get(peer) else {
            v.push(Violation::new(
                name,
                format!("Status peer {peer}"),
                "listed (etcd has hosts/ for it)",
                "missing",
            ));
            continue;
        };
        if p["underlay_ip"].as_str() != Some(ip.to_string().as_str()) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} underlay_ip"),
                ip.to_string(),
                p["underlay_ip"].to_string(),
            ));
        }
        let alive = r.alive.contains(peer);
        if p["alive"].as_bool() != Some(alive) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} alive"),
                format!(
                    "{alive} (etcd alive/{peer} {})",
                    if alive { "present" } else { "absent" }
                ),
                p["alive"].to_string(),
            ));
        }
        let blocks = nets(&p["blocks"]);
        if blocks != names(r.blocks_of(peer)) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} blocks"),
                format!("{:?} (etcd)", names(r.blocks_of(peer))),
                format!("{blocks:?}"),
            ));
        }
    }
    for peer in peers.keys() {
        if peer == name || !r.hosts.contains_key(peer) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer}"),
                "only peers with a hosts/ record",
                "listed",
            ));
        }
    }
}

/// The agent's List against etcd's endpoint records of the host.
fn check_list(s: &Snapshot, host: &HostView, listed: &[Endpoint], v: &mut Vec<Violation>) {
    let name = &host.name;
    let recorded = s.records.endpoints_of(name);
    let mut seen = BTreeSet::new();
    for e in listed {
        if !seen.insert(e.id.as_str()) {
            v.push(Violation::new(
                name,
                format!("List endpoint {}", e.id),
                "listed once",
                "listed twice",
            ));
        }
        let Some(r) = recorded.get(e.id.as_str()) else {
            v.push(Violation::new(
                name,
                format!("List endpoint {}", e.id),
                format!("a record endpoints/{name}/{}", e.id),
                "none",
            ));
            continue;
        };
        let fields = [
            ("ip", r.ip.to_string(), e.ip.to_string()),
            ("host_ifname", r.host_ifname.clone(), e.host_ifname.clone()),
            ("ifname", r.ifname.clone(), e.ifname.clone()),
            ("netns", r.netns.clone(), e.netns.clone()),
            ("mac", r.mac.clone(), e.mac.clone()),
            ("ports", ports_text(&r.ports), ports_text(&e.ports)),
        ];
        for (field, want, got) in fields {
            if want != got {
                v.push(Violation::new(
                    name,
                    format!("List endpoint {} {field}", e.id),
                    format!("{want} (etcd)"),
                    got,
                ));
            }
        }
    }
    for id in recorded.keys() {
        if !seen.contains(id) {
            v.push(Violation::new(
                name,
                format!("etcd endpoints/{name}/{id}"),
                "the endpoint in the agent's List",
                "not listed",
            ));
        }
    }
}

// ---- host kernel -------------------------------------------------------------------------------

fn check_links_and_sysctls(s: &Snapshot, host: &HostView, k: &HostKernel, v: &mut Vec<Violation>) {
    let name = &host.name;
    let endpoints = s.records.endpoints_of(name);
    let in_service: BTreeMap<&str, &Value> = k
        .links
        .iter()
        .filter(|l| l["group"].as_str() != Some(RETIRED_GROUP))
        .filter_map(|l| Some((l["ifname"].as_str()?, l)))
        .filter(|(n, _)| n.starts_with("weft"))
        .collect();
    let mut claims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, e) in &endpoints {
        claims.entry(e.host_ifname.as_str()).or_default().push(id);
    }
    for (veth, ids) in &claims {
        if ids.len() > 1 {
            v.push(Violation::new(
                name,
                format!("veth {veth}"),
                "one endpoint per host veth",
                format!("claimed by {}", ids.join(", ")),
            ));
        }
        let Some(link) = in_service.get(veth) else {
            v.push(Violation::new(
                name,
                format!("veth {veth} of {}", ids.join(", ")),
                "present and in service",
                "missing",
            ));
            continue;
        };
        let kind = link["linkinfo"]["info_kind"].as_str().unwrap_or("");
        let up = link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP"));
        let mac = link["address"].as_str().unwrap_or("");
        if kind != "veth" || !up || mac != VETH_MAC {
            v.push(Violation::new(
                name,
                format!("veth {veth} of {}", ids.join(", ")),
                format!("an UP veth with MAC {VETH_MAC}"),
                format!(
                    "kind {kind:?}, {}, MAC {mac}",
                    if up { "up" } else { "down" }
                ),
            ));
        }
        for (template, want) in VETH_SYSCTLS {
            let path = template.replace("{}", veth);
            match k.sysctls.get(&path).map(String::as_str) {
                Some(got) if got == *want => {}
                Some("MISSING") if path.contains("/ipv6/") => {}
                got => v.push(Violation::new(
                    name,
                    format!("sysctl {path}"),
                    *want,
                    got.unwrap_or("unread"),
                )),
            }
        }
    }
    // Only veths: other `weft*` devices (a future `weft.vxlan`) are nobody's endpoint.
    for (veth, link) in &in_service {
        if !claims.contains_key(veth) && link["linkinfo"]["info_kind"].as_str() == Some("veth") {
            v.push(Violation::new(
                name,
                format!("link {veth}"),
                "no weft link without an endpoint",
                "an unclaimed link in service",
            ));
        }
    }
    let forward = "/proc/sys/net/ipv4/ip_forward";
    if k.sysctls.get(forward).map(String::as_str) != Some("1") {
        v.push(Violation::new(
            name,
            format!("sysctl {forward}"),
            "1",
            k.sysctls.get(forward).cloned().unwrap_or_default(),
        ));
    }
}

/// Where a `proto weft` route sends traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Dev(String),
    Via(String),
    Blackhole,
    Other(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dev(d) => write!(f, "dev {d}"),
            Target::Via(g) => write!(f, "via {g}"),
            Target::Blackhole => write!(f, "blackhole"),
            Target::Other(o) => write!(f, "{o}"),
        }
    }
}

fn route_target(r: &Value) -> Target {
    let kind = r["type"].as_str().unwrap_or("unicast");
    if kind == "blackhole" {
        return Target::Blackhole;
    }
    if kind != "unicast" {
        return Target::Other(kind.to_string());
    }
    match (r["gateway"].as_str(), r["dev"].as_str()) {
        (Some(gw), _) => Target::Via(gw.to_string()),
        (None, Some(dev)) => Target::Dev(dev.to_string()),
        _ => Target::Other(r.to_string()),
    }
}

fn check_routes(s: &Snapshot, host: &HostView, k: &HostKernel, v: &mut Vec<Violation>) {
    let name = &host.name;
    let r = &s.records;
    let mut wanted: BTreeMap<Net, Vec<(Target, String)>> = BTreeMap::new();
    for (id, e) in r.endpoints_of(name) {
        wanted
            .entry(Net {
                addr: e.ip,
                len: 32,
            })
            .or_default()
            .push((Target::Dev(e.host_ifname.clone()), format!("endpoint {id}")));
    }
    for (pool, block, owner) in &r.blocks {
        if owner == name {
            wanted
                .entry(*block)
                .or_default()
                .push((Target::Blackhole, format!("local block of pool {pool}")));
        } else if let Some(ip) = r.hosts.get(owner) {
            wanted
                .entry(*block)
                .or_default()
                .push((Target::Via(ip.to_string()), format!("block of {owner}")));
        }
    }
    let mut actual: BTreeMap<Net, Vec<(Target, String)>> = BTreeMap::new();
    for route in &k.routes {
        let dst = route["dst"].as_str().unwrap_or("");
        let Some(net) = Net::parse(dst) else {
            v.push(Violation::new(
                name,
                format!("route {dst}"),
                "no proto weft route outside the pools",
                route.to_string(),
            ));
            continue;
        };
        let table = route["table"].as_str().unwrap_or("main").to_string();
        actual
            .entry(net)
            .or_default()
            .push((route_target(route), table));
    }
    for (net, wants) in &wanted {
        if wants.len() > 1 {
            v.push(Violation::new(
                name,
                format!("route {net}"),
                "one owner of the destination",
                wants
                    .iter()
                    .map(|(t, why)| format!("{why} ({t})"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        let (want, why) = &wants[0];
        let found = actual.get(net).map(Vec::as_slice).unwrap_or(&[]);
        let ok = found.len() == 1 && found[0].0 == *want && found[0].1 == "main";
        if !ok {
            v.push(Violation::new(
                name,
                format!("route {net} ({why})"),
                format!("{want} proto weft in table main"),
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found
                        .iter()
                        .map(|(t, table)| format!("{t} in table {table}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            ));
        }
    }
    for (net, found) in &actual {
        if !wanted.contains_key(net) {
            v.push(Violation::new(
                name,
                format!("route {net}"),
                "no proto weft route that nothing claims",
                found
                    .iter()
                    .map(|(t, table)| format!("{t} in table {table}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
    }
}

/// Splits an iptables-save rule into words, honouring double quotes.
pub fn rule_words(line: &str) -> Vec<String> {
    let mut words = vec![];
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

fn after<'w>(words: &'w [String], flag: &str) -> Option<&'w str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

/// `-A <chain> …` lines of one table, as words.
fn rules_of<'t>(table: &'t str, chain: &str) -> Vec<(&'t str, Vec<String>)> {
    table
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(|l| (l, rule_words(l)))
        .filter(|(_, w)| w.get(1).map(String::as_str) == Some(chain))
        .collect()
}

/// A DNAT of `WEFT-PORTS`, as (protocol, host port, destination `ip:port`).
pub fn parse_dnat(words: &[String]) -> Option<(String, u16, String)> {
    if after(words, "-j") != Some("DNAT") {
        return None;
    }
    Some((
        after(words, "-p")?.to_string(),
        after(words, "--dport")?.parse().ok()?,
        after(words, "--to-destination")?.to_string(),
    ))
}

fn check_rules(s: &Snapshot, host: &HostView, k: &HostKernel, v: &mut Vec<Violation>) {
    let name = &host.name;
    let r = &s.records;
    let endpoints = r.endpoints_of(name);

    // WEFT-PORTS: one DNAT per published port, nothing else.
    let mut wanted: BTreeMap<(String, u16, String), Vec<String>> = BTreeMap::new();
    for (id, e) in &endpoints {
        for p in &e.ports {
            wanted
                .entry((
                    p.protocol.clone(),
                    p.host_port,
                    format!("{}:{}", e.ip, p.container_port),
                ))
                .or_default()
                .push(id.to_string());
        }
    }
    let mut found: BTreeMap<(String, u16, String), usize> = BTreeMap::new();
    for (line, words) in rules_of(&k.nat, "WEFT-PORTS") {
        match parse_dnat(&words) {
            Some(key) => *found.entry(key).or_default() += 1,
            None => v.push(Violation::new(
                name,
                "iptables nat WEFT-PORTS",
                "only DNAT rules of published ports",
                line.to_string(),
            )),
        }
    }
    for ((proto, port, to), ids) in &wanted {
        let n = found
            .get(&(proto.clone(), *port, to.clone()))
            .copied()
            .unwrap_or(0);
        if n != 1 {
            v.push(Violation::new(
                name,
                format!(
                    "iptables nat WEFT-PORTS {proto}/{port} of {}",
                    ids.join(", ")
                ),
                format!("one DNAT to {to}"),
                format!("{n}"),
            ));
        }
    }
    for ((proto, port, to), n) in &found {
        if !wanted.contains_key(&(proto.clone(), *port, to.clone())) {
            v.push(Violation::new(
                name,
                format!("iptables nat WEFT-PORTS {proto}/{port}"),
                "no DNAT that no published port explains",
                format!("{n} DNAT to {to}"),
            ));
        }
    }

    // Hairpins: a container reaching itself through its own published port is masqueraded. A
    // rule may cover one port or the whole container (no -p/--dport): either serves.
    let mut hairpins: Vec<(String, Option<String>, Option<u16>)> = vec![];
    for (_, words) in rules_of(&k.nat, "WEFT-POSTROUTING") {
        let src = after(&words, "-s").map(|a| a.trim_end_matches("/32"));
        let dst = after(&words, "-d").map(|a| a.trim_end_matches("/32"));
        if src.is_some() && src == dst && after(&words, "-j") == Some("MASQUERADE") {
            hairpins.push((
                src.unwrap_or("").to_string(),
                after(&words, "-p").map(str::to_string),
                after(&words, "--dport").and_then(|p| p.parse().ok()),
            ));
        }
    }
    for (id, e) in &endpoints {
        let ip = e.ip.to_string();
        for p in &e.ports {
            let covered = hairpins.iter().any(|(src, proto, port)| {
                *src == ip
                    && proto.as_ref().is_none_or(|x| *x == p.protocol)
                    && port.is_none_or(|x| x == p.container_port)
            });
            if !covered {
                v.push(Violation::new(
                    name,
                    format!(
                        "iptables nat WEFT-POSTROUTING hairpin of {id} {ip} {}/{}",
                        p.protocol, p.container_port
                    ),
                    "a MASQUERADE rule",
                    "none",
                ));
            }
        }
    }
    for (src, proto, port) in &hairpins {
        let published = endpoints.values().any(|e| {
            e.ip.to_string() == *src
                && e.ports.iter().any(|p| {
                    proto.as_ref().is_none_or(|x| *x == p.protocol)
                        && port.is_none_or(|x| x == p.container_port)
                })
        });
        if !published {
            v.push(Violation::new(
                name,
                format!(
                    "iptables nat WEFT-POSTROUTING hairpin {src} {}/{}",
                    proto.as_deref().unwrap_or("any"),
                    port.map_or("any".to_string(), |p| p.to_string())
                ),
                "no hairpin that no published port explains",
                "a MASQUERADE rule",
            ));
        }
    }

    // SNAT leaving the fabric, per pool.
    let postrouting = rules_of(&k.nat, "WEFT-POSTROUTING");
    let outgoing = rules_of(&k.nat, "WEFT-NAT-OUTGOING");
    for (pool, p) in &r.pools {
        let cidr = p.cidr.to_string();
        if p.nat_outgoing
            && !postrouting.iter().any(|(_, w)| {
                after(w, "-s") == Some(cidr.as_str()) && after(w, "-j") == Some("WEFT-NAT-OUTGOING")
            })
        {
            v.push(Violation::new(
                name,
                format!("iptables nat WEFT-POSTROUTING pool {pool}"),
                format!("-s {cidr} -j WEFT-NAT-OUTGOING (nat-outgoing)"),
                "none",
            ));
        }
        if !outgoing
            .iter()
            .any(|(_, w)| after(w, "-d") == Some(cidr.as_str()) && after(w, "-j") == Some("RETURN"))
        {
            v.push(Violation::new(
                name,
                format!("iptables nat WEFT-NAT-OUTGOING pool {pool}"),
                format!("-d {cidr} -j RETURN (inside the fabric)"),
                "none",
            ));
        }
    }
    if r.pools.values().any(|p| p.nat_outgoing)
        && !outgoing
            .iter()
            .any(|(_, w)| after(w, "-j") == Some("MASQUERADE") && after(w, "-d").is_none())
    {
        v.push(Violation::new(
            name,
            "iptables nat WEFT-NAT-OUTGOING",
            "a final MASQUERADE",
            "none",
        ));
    }

    // Jumps into our chains: exactly one each.
    let jumps = [
        (&k.nat, "nat", "POSTROUTING", "WEFT-POSTROUTING"),
        (&k.nat, "nat", "PREROUTING", "WEFT-PORTS"),
        (&k.nat, "nat", "OUTPUT", "WEFT-PORTS"),
        (&k.filter, "filter", "FORWARD", "WEFT-FORWARD"),
    ];
    for (table, table_name, chain, target) in jumps {
        let n = rules_of(table, chain)
            .iter()
            .filter(|(_, w)| after(w, "-j") == Some(target))
            .count();
        if n != 1 {
            v.push(Violation::new(
                name,
                format!("iptables {table_name} {chain} jump to {target}"),
                "exactly one",
                n.to_string(),
            ));
        }
    }
    let forward = rules_of(&k.filter, "WEFT-FORWARD");
    for flag in ["-i", "-o"] {
        if !forward
            .iter()
            .any(|(_, w)| after(w, flag) == Some("weft+") && after(w, "-j") == Some("ACCEPT"))
        {
            v.push(Violation::new(
                name,
                "iptables filter WEFT-FORWARD",
                format!("{flag} weft+ -j ACCEPT"),
                "none",
            ));
        }
    }
}

// ---- containers, namespaces, addresses ---------------------------------------------------------

fn check_containers(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let name = &host.name;
    for (id, e) in s.records.endpoints_of(name) {
        let object = |what: &str| format!("container {id} ({}) {what}", e.netns);
        let state = match host.containers.get(&e.netns) {
            Some(Ok(state)) => state,
            Some(Err(err)) => {
                v.push(Violation::new(
                    name,
                    object("namespace"),
                    "present",
                    err.clone(),
                ));
                continue;
            }
            None => {
                v.push(Violation::new(
                    name,
                    object("namespace"),
                    "read",
                    "not read",
                ));
                continue;
            }
        };
        let link = |ifname: &str| {
            state
                .links
                .iter()
                .find(|l| l["ifname"].as_str() == Some(ifname))
        };
        let up = |l: &Value| {
            l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP"))
        };
        if !link("lo").is_some_and(up) {
            v.push(Violation::new(name, object("lo"), "up", "down or missing"));
        }
        match link(&e.ifname) {
            None => v.push(Violation::new(
                name,
                object(&format!("interface {}", e.ifname)),
                "present",
                "missing",
            )),
            Some(l) => {
                if !up(l) {
                    v.push(Violation::new(
                        name,
                        object(&format!("interface {}", e.ifname)),
                        "up",
                        "down",
                    ));
                }
                let mac = l["address"].as_str().unwrap_or("").to_ascii_lowercase();
                if !e.mac.is_empty() && mac != e.mac {
                    v.push(Violation::new(
                        name,
                        object(&format!("interface {} MAC", e.ifname)),
                        e.mac.clone(),
                        mac,
                    ));
                }
                let addrs: Vec<String> = l["addr_info"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|x| x["family"] == "inet")
                            .map(|x| {
                                format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"])
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let want = format!("{}/32", e.ip);
                if !addrs.contains(&want) {
                    v.push(Violation::new(
                        name,
                        object(&format!("interface {} address", e.ifname)),
                        want,
                        format!("{addrs:?}"),
                    ));
                }
            }
        }
        let neighbour = state.neighbours.iter().find(|n| {
            n["dst"].as_str() == Some(GATEWAY) && n["dev"].as_str() == Some(e.ifname.as_str())
        });
        let neighbour_ok = neighbour.is_some_and(|n| {
            n["lladdr"].as_str() == Some(VETH_MAC)
                && n["state"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"))
        });
        if !neighbour_ok {
            v.push(Violation::new(
                name,
                object(&format!("neighbour {GATEWAY} dev {}", e.ifname)),
                format!("lladdr {VETH_MAC} PERMANENT"),
                neighbour.map_or("none".to_string(), Value::to_string),
            ));
        }
    }
    check_default_routes(s, host, v);
}

/// Each container namespace has exactly one default route, in its main table, via the gateway
/// on one of its weft interfaces (the contract: only the first weft interface of a namespace
/// carries it; later ones route their own traffic through a table of their own).
fn check_default_routes(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let mut interfaces: BTreeMap<&String, Vec<&str>> = BTreeMap::new();
    for (_, e) in s.records.endpoints_of(&host.name) {
        interfaces
            .entry(&e.netns)
            .or_default()
            .push(e.ifname.as_str());
    }
    for (netns, ifnames) in interfaces {
        let Some(Ok(state)) = host.containers.get(netns) else {
            continue; // already named by the per-container checks
        };
        let defaults: Vec<&Value> = state
            .routes
            .iter()
            .filter(|r| {
                r["dst"].as_str() == Some("default")
                    && r["table"].as_str().unwrap_or("main") == "main"
            })
            .collect();
        let good = defaults.len() == 1
            && defaults[0]["gateway"].as_str() == Some(GATEWAY)
            && defaults[0]["dev"]
                .as_str()
                .is_some_and(|dev| ifnames.contains(&dev));
        if !good {
            v.push(Violation::new(
                &host.name,
                format!("namespace {netns} default route"),
                format!("one, via {GATEWAY} on one of {ifnames:?}"),
                format!("{defaults:?}"),
            ));
        }
    }
}

fn check_namespaces(s: &Snapshot, v: &mut Vec<Violation>) {
    for host in &s.hosts {
        let mine = format!("weft-{}-", host.name);
        let owners: BTreeSet<String> = s
            .records
            .endpoints_of(&host.name)
            .values()
            .filter(|e| e.owns_netns != Some(false))
            .map(|e| e.netns.clone())
            .collect();
        for ns in s.namespaces.iter().filter(|n| n.starts_with(&mine)) {
            let path = netns_path(ns);
            if !owners.contains(&path) {
                v.push(Violation::new(
                    &host.name,
                    format!("netns {ns}"),
                    "an endpoint that owns it",
                    "none (leaked agent-made namespace)",
                ));
            }
        }
    }
}

fn check_addresses_unique(s: &Snapshot, v: &mut Vec<Violation>) {
    // Inside containers: every pool address configured on an interface, once in the lab.
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let pools: Vec<Net> = s.records.pools.values().map(|p| p.cidr).collect();
    for host in &s.hosts {
        for (path, state) in &host.containers {
            let Ok(state) = state else { continue };
            for link in &state.links {
                for a in link["addr_info"].as_array().into_iter().flatten() {
                    let Some(ip) = a["local"].as_str().and_then(|x| x.parse::<Ipv4Addr>().ok())
                    else {
                        continue;
                    };
                    if pools.iter().any(|p| p.contains(ip)) {
                        seen.entry(ip.to_string())
                            .or_default()
                            .insert(format!("{path} {}", link["ifname"].as_str().unwrap_or("?")));
                    }
                }
            }
        }
    }
    // On hosts: a container /32 routed by two hosts.
    let mut routed: BTreeMap<Net, Vec<&str>> = BTreeMap::new();
    for host in &s.hosts {
        let Ok(k) = &host.kernel else { continue };
        for r in &k.routes {
            if let (Some(net), Target::Dev(_)) =
                (Net::parse(r["dst"].as_str().unwrap_or("")), route_target(r))
            {
                if net.len == 32 {
                    routed.entry(net).or_default().push(&host.name);
                }
            }
        }
    }
    for (ip, places) in seen {
        if places.len() > 1 {
            v.push(Violation::new(
                "cluster",
                format!("address {ip} in containers"),
                "configured once",
                places.into_iter().collect::<Vec<_>>().join("; "),
            ));
        }
    }
    for (net, hosts) in routed {
        if hosts.len() > 1 {
            v.push(Violation::new(
                "cluster",
                format!("route {net}"),
                "one host with a container route to it",
                hosts.join(", "),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_parse_both_notations_and_compare() {
        let a = Net::parse("10.65.3.64-26").unwrap();
        assert_eq!(a, Net::parse("10.65.3.64/26").unwrap());
        assert_eq!(a.to_string(), "10.65.3.64/26");
        assert!(a.aligned());
        assert!(!Net::parse("10.65.3.65/26").unwrap().aligned());
        assert!(a.contains("10.65.3.127".parse().unwrap()));
        assert!(!a.contains("10.65.3.128".parse().unwrap()));
        assert_eq!(Net::parse("10.65.3.7").unwrap().len, 32);
        let pool = Net::parse("10.65.0.0/16").unwrap();
        assert!(pool.contains_net(&a) && !a.contains_net(&pool) && a.overlaps(&pool));
        assert!(Net::parse("10.65.0.0/33").is_none());
    }

    #[test]
    fn dnat_rules_are_read_from_iptables_save() {
        let line = "-A WEFT-PORTS -p udp -m udp --dport 5353 -m comment --comment \"weft: a b\" \
                    -j DNAT --to-destination 10.65.34.1:53";
        let words = rule_words(line);
        assert!(words.contains(&"weft: a b".to_string()), "{words:?}");
        assert_eq!(
            parse_dnat(&words),
            Some(("udp".into(), 5353, "10.65.34.1:53".into()))
        );
        assert_eq!(parse_dnat(&rule_words("-A WEFT-PORTS -j RETURN")), None);
    }

    fn records(pairs: &[(&str, &str)]) -> Records {
        Records::parse(
            &pairs
                .iter()
                .map(|(k, v)| (format!("{ETCD_PREFIX}{k}"), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn records_parse_and_malformed_ones_are_named() {
        let r = records(&[
            (
                "pools/default",
                r#"{"cidr":"10.65.0.0/16","block_size":26,"nat_outgoing":true}"#,
            ),
            (
                "hosts/h1",
                r#"{"underlay_ip":"198.51.100.1","version":"x","first_seen":0}"#,
            ),
            ("blocks/default/10.65.0.0-26", r#"{"host":"h1"}"#),
            ("blocks/default/10.65.0.1-26", r#"{"host":"h1"}"#),
            ("ips/10.65.0.1", r#"{"host":"h1","container_id":"a"}"#),
            (
                "endpoints/h1/b",
                r#"{"container_id":"a","host":"h1","ip":"10.65.0.1","host_ifname":"weftx","netns":"/x"}"#,
            ),
            ("ports/h1/tcp/80", r#"{"container_id":"a"}"#),
            ("future/thing", "whatever"),
        ]);
        assert_eq!(r.pools["default"].block_size, 26);
        assert_eq!(r.blocks.len(), 1);
        assert_eq!(r.ips.len(), 1);
        assert_eq!(r.ports.len(), 1);
        let objects: Vec<&str> = r.malformed.iter().map(|v| v.object.as_str()).collect();
        assert_eq!(
            objects,
            vec!["etcd blocks/default/10.65.0.1-26", "etcd endpoints/h1/b"],
            "{:?}",
            r.malformed
        );
    }
}
