//! The seeded randomized fault run ("chaos").
//!
//! This module owns the run: a lab of N hosts, bursts of operations drawn from one seeded
//! generator (attach, re-attach with other ports, detach, CNI ADD/DEL/GC on two networks, `kill
//! -9` and restart of agents, also in the middle of an attach, etcd frozen with SIGSTOP, a host
//! cut off from etcd for longer than the liveness TTL, deleted routes, links, container
//! interfaces and iptables rules, flipped sysctls), and after every burst a quiet point where
//! the invariant checker ([`crate::invariants`]) and the run's own model of what should be
//! attached must both pass, and sampled cross-host pings must answer.
//!
//! The sequence of operations is a function of the seed alone (outcomes never feed the
//! generator), so `chaos seed: N`, printed first, replays the same run. What each operation may
//! answer follows the hardening contract (`UNAVAILABLE` while etcd is out of reach, and then
//! nothing done; `ALREADY_EXISTS` for a host port another container holds): an expected error is
//! recorded, an unexpected answer or a broken invariant is a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use weft_proto::v1 as pb;

use crate::invariants::{self, ports_text, Endpoint, Port, Snapshot, Violation};
use crate::lab::{bin, Lab, LabOptions};
use crate::sh;

/// The lab agents' `--alive-ttl` (see `Lab::start_agent_env`); partitions outlast it.
pub const ALIVE_TTL: Duration = Duration::from_secs(3);
/// Agent-made containers per host: ids `c0`..`c7`.
const AGENT_IDS: usize = 8;
/// CNI "pods" (network namespaces the run makes) per host.
const PODS: usize = 4;
/// The CNI networks: (name, interface inside the pod).
const NETWORKS: [(&str, &str); 2] = [("weft-a", "eth0"), ("weft-b", "net1")];
/// The bound of one API call or plugin run: far above what any answer should take.
const CALL_LIMIT: Duration = Duration::from_secs(20);

/// How to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub seed: u64,
    /// No new burst starts after this much time (the last one still ends with a quiet point).
    pub duration: Duration,
    pub hosts: usize,
    /// Carry on after a failure (re-basing the model on what the lab shows) to find more.
    pub keep_going: bool,
    /// How long a quiet point waits for the lab to converge.
    pub quiet_limit: Duration,
    /// Print each operation as it completes.
    pub verbose: bool,
    /// Kinds of operation and window not to run (see [`KINDS`]); they are still drawn and
    /// recorded as skipped, so the rest of the sequence stays the seed's. For narrowing down a
    /// failure, or leaving out a fault whose fix has not landed yet.
    pub skip: BTreeSet<String>,
}

impl ChaosOptions {
    pub fn new(seed: u64, duration: Duration) -> Self {
        Self {
            seed,
            duration,
            hosts: 3,
            keep_going: false,
            quiet_limit: Duration::from_secs(10),
            verbose: false,
            skip: BTreeSet::new(),
        }
    }

    /// `WEFT_CHAOS_SEED` (default: a fresh random seed) and `WEFT_CHAOS_MINUTES` (default:
    /// `default`).
    pub fn from_env(default: Duration) -> Result<Self> {
        let seed = match std::env::var("WEFT_CHAOS_SEED") {
            Ok(text) => text
                .trim()
                .parse()
                .with_context(|| format!("WEFT_CHAOS_SEED={text:?} is not a number"))?,
            Err(_) => random_seed(),
        };
        let duration = match std::env::var("WEFT_CHAOS_MINUTES") {
            Ok(text) => {
                let minutes: f64 = text
                    .trim()
                    .parse()
                    .with_context(|| format!("WEFT_CHAOS_MINUTES={text:?} is not a number"))?;
                Duration::from_secs_f64(minutes.max(0.0) * 60.0)
            }
            Err(_) => default,
        };
        let mut options = Self::new(seed, duration);
        if let Ok(text) = std::env::var("WEFT_CHAOS_SKIP") {
            options.skip = parse_kinds(&text)?;
        }
        Ok(options)
    }
}

/// Every kind of operation and window, as `skip` names them.
pub const KINDS: &[&str] = &[
    "attach",
    "reattach-other-ports",
    "detach",
    "cni-add",
    "cni-second-network",
    "cni-del",
    "cni-gc",
    "kill",
    "kill-during-attach",
    "delete-route",
    "delete-veth",
    "delete-container-interface",
    "delete-block-route",
    "tamper-rules",
    "flip-sysctl",
    "etcd-pause",
    "partition",
];

/// Parses a comma-separated list of [`KINDS`].
pub fn parse_kinds(text: &str) -> Result<BTreeSet<String>> {
    let mut kinds = BTreeSet::new();
    for kind in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        anyhow::ensure!(
            KINDS.contains(&kind),
            "unknown kind {kind:?}; the kinds are {}",
            KINDS.join(", ")
        );
        kinds.insert(kind.to_string());
    }
    Ok(kinds)
}

/// A seed from the kernel's random source.
pub fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("urandom");
    // Small enough to type when replaying.
    u64::from_le_bytes(bytes) % 1_000_000_000
}

/// One operation as it ran.
#[derive(Debug, Clone)]
pub struct OpRecord {
    pub n: usize,
    pub burst: usize,
    /// Since the start of the run.
    pub at: Duration,
    pub took: Duration,
    /// One of [`KINDS`], or `quiet-point`.
    pub kind: String,
    pub op: String,
    pub outcome: String,
    /// What the contract allows, when the operation has an answer to judge.
    pub expected: String,
    pub ok: bool,
}

impl fmt::Display for OpRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<3} b{:<3} +{:>6.1}s {:>6.0}ms  {} -> {}",
            self.n,
            self.burst,
            self.at.as_secs_f64(),
            self.took.as_secs_f64() * 1e3,
            self.op,
            self.outcome
        )?;
        if !self.ok {
            write!(f, "   UNEXPECTED (allowed: {})", self.expected)?;
        }
        Ok(())
    }
}

/// Something that broke: an unexpected answer, or a quiet point that did not converge.
#[derive(Debug, Clone)]
pub struct Failure {
    pub burst: usize,
    pub at: Duration,
    pub what: String,
    /// The violations not reported by an earlier failure of the run.
    pub violations: Vec<Violation>,
    /// How many more were still there from earlier failures (keep-going runs).
    pub repeated: usize,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub hosts: usize,
    pub planned: Duration,
    /// Kinds left out (`skip`).
    pub skipped: Vec<String>,
    pub elapsed: Duration,
    pub bursts: usize,
    pub quiet_points: usize,
    pub ops: Vec<OpRecord>,
    pub failures: Vec<Failure>,
    /// The agents' last log lines when the first failure happened.
    pub log_tails: Vec<(String, String)>,
}

impl ChaosReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// One paragraph: seed, outcome, counts, how to replay.
    pub fn summary(&self) -> String {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for op in self
            .ops
            .iter()
            .filter(|o| !o.outcome.starts_with("skipped"))
        {
            *kinds.entry(op.kind.as_str()).or_default() += 1;
        }
        format!(
            "chaos seed: {}\nresult: {} after {:.1}s (planned {:.1} min, {} hosts): {} bursts, {} \
             operations, {} quiet points, {} failure(s)\nmix: {}{}\nreplay: WEFT_CHAOS_SEED={} \
             cargo nextest run -p weft-tests --test chaos, or weft-lab chaos --seed {}",
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" },
            self.elapsed.as_secs_f64(),
            self.planned.as_secs_f64() / 60.0,
            self.hosts,
            self.bursts,
            self.ops.len(),
            self.quiet_points,
            self.failures.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            if self.skipped.is_empty() {
                String::new()
            } else {
                format!("\nskipped kinds: {}", self.skipped.join(","))
            },
            self.seed,
            self.seed,
        )
    }

    /// Everything: the summary, every operation, every failure with its violations.
    pub fn render(&self) -> String {
        let mut out = self.summary();
        out.push_str("\noperations:\n");
        for op in &self.ops {
            out.push_str(&format!("  {op}\n"));
        }
        if !self.failures.is_empty() {
            out.push_str("failures:\n");
            for f in &self.failures {
                out.push_str(&format!(
                    "  burst {} at +{:.1}s: {}\n",
                    f.burst,
                    f.at.as_secs_f64(),
                    f.what
                ));
                for v in &f.violations {
                    out.push_str(&format!("    {v}\n"));
                }
                if f.repeated > 0 {
                    out.push_str(&format!(
                        "    (and {} violation(s) reported before)\n",
                        f.repeated
                    ));
                }
            }
            for (host, tail) in &self.log_tails {
                out.push_str(&format!("---- last log lines of {host} ----\n{tail}\n"));
            }
            out.push_str(&format!("chaos seed: {}\n", self.seed));
        }
        out
    }
}

// ---- operations --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Attach {
        host: usize,
        id: String,
        ports: Vec<Port>,
    },
    Detach {
        host: usize,
        id: String,
    },
    CniAdd {
        host: usize,
        pod: usize,
        net: usize,
        ports: Vec<Port>,
    },
    CniDel {
        host: usize,
        pod: usize,
        net: usize,
    },
    /// GC of one network: the attachments of `keep` pods stay valid.
    CniGc {
        host: usize,
        net: usize,
        keep: Vec<usize>,
    },
    KillRestart {
        host: usize,
    },
    KillDuringAttach {
        host: usize,
        id: String,
        ports: Vec<Port>,
        after: Duration,
    },
    /// The `pick`-th endpoint (modulo their number) at the time the operation runs.
    DeleteRoute {
        host: usize,
        pick: usize,
    },
    DeleteVeth {
        host: usize,
        pick: usize,
    },
    DeleteContainerInterface {
        host: usize,
        pick: usize,
    },
    /// A blackhole or peer-block route.
    DeleteBlockRoute {
        host: usize,
        pick: usize,
    },
    TamperRules {
        host: usize,
        how: usize,
    },
    FlipSysctl {
        host: usize,
        pick: usize,
        knob: usize,
    },
}

const RULE_TAMPERS: &[&str] = &[
    "flush nat WEFT-PORTS",
    "delete the first rule of nat WEFT-PORTS",
    "add a stray DNAT to nat WEFT-PORTS",
    "delete the nat PREROUTING jump to WEFT-PORTS",
    "delete the filter FORWARD jump to WEFT-FORWARD",
    "flush nat WEFT-POSTROUTING",
    "flush filter WEFT-FORWARD",
];

/// (sysctl path, with `{}` for the picked endpoint's veth, bad value).
const SYSCTL_FLIPS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/ip_forward", "0"),
    ("/proc/sys/net/ipv4/conf/{}/proxy_arp", "0"),
    ("/proc/sys/net/ipv4/conf/{}/rp_filter", "0"),
    ("/proc/sys/net/ipv4/conf/{}/forwarding", "0"),
    ("/proc/sys/net/ipv4/neigh/{}/proxy_delay", "80"),
    ("/proc/sys/net/ipv6/conf/{}/accept_ra", "1"),
];

fn h(host: usize) -> String {
    format!("h{}", host + 1)
}

impl Op {
    /// The operation's kind, as `skip` names it (before looking at the model).
    fn kind(&self) -> &'static str {
        match self {
            Op::Attach { .. } => "attach",
            Op::Detach { .. } => "detach",
            Op::CniAdd { net: 0, .. } => "cni-add",
            Op::CniAdd { .. } => "cni-second-network",
            Op::CniDel { .. } => "cni-del",
            Op::CniGc { .. } => "cni-gc",
            Op::KillRestart { .. } => "kill",
            Op::KillDuringAttach { .. } => "kill-during-attach",
            Op::DeleteRoute { .. } => "delete-route",
            Op::DeleteVeth { .. } => "delete-veth",
            Op::DeleteContainerInterface { .. } => "delete-container-interface",
            Op::DeleteBlockRoute { .. } => "delete-block-route",
            Op::TamperRules { .. } => "tamper-rules",
            Op::FlipSysctl { .. } => "flip-sysctl",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Attach { host, id, ports } => {
                write!(f, "attach {}/{id} {}", h(*host), ports_text(ports))
            }
            Op::Detach { host, id } => write!(f, "detach {}/{id}", h(*host)),
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            } => write!(
                f,
                "cni add {} pod{pod} {} ({}) {}",
                h(*host),
                NETWORKS[*net].0,
                NETWORKS[*net].1,
                ports_text(ports)
            ),
            Op::CniDel { host, pod, net } => write!(
                f,
                "cni del {} pod{pod} {} ({})",
                h(*host),
                NETWORKS[*net].0,
                NETWORKS[*net].1
            ),
            Op::CniGc { host, net, keep } => write!(
                f,
                "cni gc {} {} keeping pods {keep:?}",
                h(*host),
                NETWORKS[*net].0
            ),
            Op::KillRestart { host } => write!(f, "kill -9 and restart the agent of {}", h(*host)),
            Op::KillDuringAttach {
                host,
                id,
                ports,
                after,
            } => write!(
                f,
                "kill -9 the agent of {} {}ms into attach {}/{id} {}, restart",
                h(*host),
                after.as_millis(),
                h(*host),
                ports_text(ports)
            ),
            Op::DeleteRoute { host, pick } => {
                write!(
                    f,
                    "delete the /32 route of endpoint #{pick} on {}",
                    h(*host)
                )
            }
            Op::DeleteVeth { host, pick } => {
                write!(
                    f,
                    "delete the host veth of endpoint #{pick} on {}",
                    h(*host)
                )
            }
            Op::DeleteContainerInterface { host, pick } => write!(
                f,
                "delete the container interface of endpoint #{pick} on {}",
                h(*host)
            ),
            Op::DeleteBlockRoute { host, pick } => {
                write!(f, "delete block route #{pick} on {}", h(*host))
            }
            Op::TamperRules { host, how } => {
                write!(f, "tamper on {}: {}", h(*host), RULE_TAMPERS[*how])
            }
            Op::FlipSysctl { host, pick, knob } => write!(
                f,
                "flip sysctl on {}: {}={} (endpoint #{pick})",
                h(*host),
                SYSCTL_FLIPS[*knob].0,
                SYSCTL_FLIPS[*knob].1
            ),
        }
    }
}

/// A fault that lasts through a burst's operations.
#[derive(Debug, Clone)]
enum Window {
    EtcdPause(Duration),
    Partition(usize, Duration),
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::EtcdPause(length) => {
                write!(f, "etcd paused (SIGSTOP) for {:.1}s", length.as_secs_f64())
            }
            Window::Partition(host, length) => write!(
                f,
                "partition {} from etcd for {:.1}s (TTL {}s)",
                h(*host),
                length.as_secs_f64(),
                ALIVE_TTL.as_secs()
            ),
        }
    }
}

impl Window {
    fn kind(&self) -> &'static str {
        match self {
            Window::EtcdPause(_) => "etcd-pause",
            Window::Partition(..) => "partition",
        }
    }
}

#[derive(Debug, Clone)]
struct Burst {
    window: Option<Window>,
    ops: Vec<Op>,
}

fn gen_ports(rng: &mut StdRng) -> Vec<Port> {
    let n = match rng.gen_range(0..100) {
        0..=54 => 0,
        55..=84 => 1,
        _ => 2,
    };
    let mut ports: Vec<Port> = vec![];
    for _ in 0..n {
        let udp = rng.gen_bool(0.3);
        let host_port = 8000 + rng.gen_range(0..6u16);
        let container_port = if udp {
            [53, 5353][rng.gen_range(0..2)]
        } else {
            [80, 8080][rng.gen_range(0..2)]
        };
        let protocol = if udp { "udp" } else { "tcp" }.to_string();
        if !ports
            .iter()
            .any(|p| p.protocol == protocol && p.host_port == host_port)
        {
            ports.push(Port {
                protocol,
                host_port,
                container_port,
            });
        }
    }
    ports.sort();
    ports
}

fn gen_op(rng: &mut StdRng, hosts: usize, faults: bool) -> Op {
    let host = rng.gen_range(0..hosts);
    let id = |rng: &mut StdRng| format!("c{}", rng.gen_range(0..AGENT_IDS));
    let total = if faults { 108 } else { 72 };
    match rng.gen_range(0..total) {
        0..=29 => Op::Attach {
            host,
            id: id(rng),
            ports: gen_ports(rng),
        },
        30..=43 => Op::Detach { host, id: id(rng) },
        44..=59 => {
            let pod = rng.gen_range(0..PODS);
            let net = rng.gen_range(0..NETWORKS.len());
            let ports = if rng.gen_bool(0.3) {
                gen_ports(rng)
            } else {
                vec![]
            };
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            }
        }
        60..=67 => Op::CniDel {
            host,
            pod: rng.gen_range(0..PODS),
            net: rng.gen_range(0..NETWORKS.len()),
        },
        68..=71 => Op::CniGc {
            host,
            net: rng.gen_range(0..NETWORKS.len()),
            keep: (0..PODS).filter(|_| rng.gen_bool(0.6)).collect(),
        },
        72..=77 => Op::KillRestart { host },
        78..=81 => Op::KillDuringAttach {
            host,
            id: id(rng),
            ports: gen_ports(rng),
            after: Duration::from_millis(rng.gen_range(0..40)),
        },
        82..=85 => Op::DeleteRoute {
            host,
            pick: rng.gen_range(0..64),
        },
        86..=89 => Op::DeleteVeth {
            host,
            pick: rng.gen_range(0..64),
        },
        90..=92 => Op::DeleteContainerInterface {
            host,
            pick: rng.gen_range(0..64),
        },
        93..=95 => Op::DeleteBlockRoute {
            host,
            pick: rng.gen_range(0..64),
        },
        96..=101 => Op::TamperRules {
            host,
            how: rng.gen_range(0..RULE_TAMPERS.len()),
        },
        _ => Op::FlipSysctl {
            host,
            pick: rng.gen_range(0..64),
            knob: rng.gen_range(0..SYSCTL_FLIPS.len()),
        },
    }
}

/// Burst `index` (from 1). Every third one runs inside a window, so that even a short run
/// freezes etcd and cuts a host off; which of the two, for how long, is drawn.
fn gen_burst(rng: &mut StdRng, hosts: usize, index: usize) -> Burst {
    let windowed = matches!(index % 3, 0);
    let window = if !windowed {
        None
    } else if rng.gen_bool(0.5) {
        Some(Window::EtcdPause(Duration::from_millis(
            rng.gen_range(1000..=5000),
        )))
    } else {
        Some(Window::Partition(
            rng.gen_range(0..hosts),
            ALIVE_TTL + Duration::from_millis(rng.gen_range(1000..=3500)),
        ))
    };
    // Inside a window only API operations run: each may wait out the etcd timeout.
    let n = if window.is_some() {
        rng.gen_range(1..=3)
    } else {
        rng.gen_range(3..=8)
    };
    let ops = (0..n)
        .map(|_| gen_op(rng, hosts, window.is_none()))
        .collect();
    Burst { window, ops }
}

// ---- the model of what should be attached ------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Agent(String),
    Cni { pod: usize, net: usize },
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Agent(id) => write!(f, "{id}"),
            Key::Cni { pod, net } => write!(f, "pod{pod} on {}", NETWORKS[*net].0),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// None: unknown (an operation ended in a way that leaves it open).
    ports: Option<Vec<Port>>,
    /// False when it may or may not exist; the next quiet point settles it.
    sure: bool,
    /// The operation that made it so.
    why: String,
}

#[derive(Debug, Default)]
struct Model {
    hosts: Vec<BTreeMap<Key, Entry>>,
}

/// The kinds of answer the contract distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    AlreadyExists,
    Unavailable,
    Other,
}

struct Outcome {
    kind: Kind,
    text: String,
}

impl Outcome {
    fn new(kind: Kind, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }

    fn from_status(status: &tonic::Status) -> Self {
        let kind = match status.code() {
            tonic::Code::AlreadyExists => Kind::AlreadyExists,
            tonic::Code::Unavailable => Kind::Unavailable,
            _ => Kind::Other,
        };
        Self::new(kind, format!("{:?}: {}", status.code(), status.message()))
    }
}

fn kinds_text(kinds: &[Kind]) -> String {
    kinds
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

impl Model {
    fn new(hosts: usize) -> Self {
        Self {
            hosts: vec![BTreeMap::new(); hosts],
        }
    }

    /// (a sure conflict, a possible one) of `ports` with the other attachments of the host.
    fn conflicts(&self, host: usize, key: &Key, ports: &[Port]) -> (bool, bool) {
        let (mut sure, mut maybe) = (false, false);
        for (k, e) in &self.hosts[host] {
            if k == key {
                continue;
            }
            let overlap = match &e.ports {
                Some(theirs) => theirs.iter().any(|t| {
                    ports
                        .iter()
                        .any(|p| p.protocol == t.protocol && p.host_port == t.host_port)
                }),
                None => !ports.is_empty(),
            };
            if overlap && e.sure && e.ports.is_some() {
                sure = true;
            } else if overlap {
                maybe = true;
            }
        }
        (sure, maybe)
    }

    /// What an attach (or CNI ADD) may answer.
    fn expect_attach(&self, host: usize, key: &Key, ports: &[Port], reachable: bool) -> Vec<Kind> {
        let (sure, maybe) = self.conflicts(host, key, ports);
        let existing = self.hosts[host].get(key);
        let mut allowed = vec![];
        if reachable {
            if !sure {
                allowed.push(Kind::Ok);
            }
            if sure || maybe {
                allowed.push(Kind::AlreadyExists);
            }
        } else {
            allowed.push(Kind::Unavailable);
            if sure || maybe {
                allowed.push(Kind::AlreadyExists);
            }
            // A repair of what exists needs no etcd.
            if existing.is_some_and(|e| !e.sure || e.ports.as_deref().is_none_or(|p| p == ports)) {
                allowed.push(Kind::Ok);
            }
        }
        allowed
    }

    fn apply_attach(
        &mut self,
        host: usize,
        key: Key,
        ports: &[Port],
        outcome: Kind,
        ok: bool,
        why: &str,
    ) {
        let entries = &mut self.hosts[host];
        if !ok {
            // Nobody knows what an unexpected answer left behind.
            entries.insert(
                key,
                Entry {
                    ports: None,
                    sure: false,
                    why: why.into(),
                },
            );
            return;
        }
        if outcome == Kind::Ok {
            entries.insert(
                key,
                Entry {
                    ports: Some(ports.to_vec()),
                    sure: true,
                    why: why.into(),
                },
            );
        }
    }

    fn expect_detach(&self, host: usize, key: &Key, reachable: bool) -> Vec<Kind> {
        match (reachable, self.hosts[host].get(key)) {
            (true, _) => vec![Kind::Ok],
            (false, Some(e)) if e.sure => vec![Kind::Unavailable],
            (false, _) => vec![Kind::Unavailable, Kind::Ok],
        }
    }

    fn apply_detach(&mut self, host: usize, key: Key, outcome: Kind, ok: bool, why: &str) {
        if !ok {
            self.unsettle(host, key, why);
        } else if outcome == Kind::Ok {
            self.hosts[host].remove(&key);
        }
    }

    fn unsettle(&mut self, host: usize, key: Key, why: &str) {
        self.hosts[host].insert(
            key,
            Entry {
                ports: None,
                sure: false,
                why: why.into(),
            },
        );
    }

    /// Which listed endpoints an entry is.
    fn matches(key: &Key, e: &Endpoint, pods: &PodNames, host: usize) -> bool {
        match key {
            Key::Agent(id) => e.id == *id,
            Key::Cni { pod, net } => {
                e.netns == pods.path(host, *pod) && e.ifname == NETWORKS[*net].1
            }
        }
    }

    /// The model against the endpoints the snapshot shows.
    fn check(&self, snap: &Snapshot, pods: &PodNames) -> Vec<Violation> {
        let mut v = vec![];
        for (host, entries) in self.hosts.iter().enumerate() {
            let name = &snap.hosts[host].name;
            let listed = snap.endpoints_of(host);
            let mut claimed = vec![false; listed.len()];
            for (key, entry) in entries {
                let found: Vec<usize> = (0..listed.len())
                    .filter(|&i| Self::matches(key, &listed[i], pods, host))
                    .collect();
                for &i in &found {
                    claimed[i] = true;
                }
                if found.len() > 1 {
                    v.push(Violation::new(
                        name,
                        format!("model: endpoint {key}"),
                        "one endpoint",
                        found
                            .iter()
                            .map(|&i| listed[i].id.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ));
                }
                if !entry.sure {
                    continue;
                }
                match found.first() {
                    None => v.push(Violation::new(
                        name,
                        format!("model: endpoint {key}"),
                        format!("attached (after {})", entry.why),
                        "not attached",
                    )),
                    Some(&i) => {
                        if let Some(ports) = &entry.ports {
                            if *ports != listed[i].ports {
                                v.push(Violation::new(
                                    name,
                                    format!("model: endpoint {key} ({}) ports", listed[i].id),
                                    format!("{} (after {})", ports_text(ports), entry.why),
                                    ports_text(&listed[i].ports),
                                ));
                            }
                        }
                    }
                }
            }
            for (i, e) in listed.iter().enumerate() {
                if !claimed[i] {
                    v.push(Violation::new(
                        name,
                        format!("model: endpoint {} ({})", e.id, e.ip),
                        "not attached (no operation left it attached)",
                        "attached",
                    ));
                }
            }
        }
        v
    }

    /// Settles open entries from what a quiet lab shows.
    fn settle(&mut self, snap: &Snapshot, pods: &PodNames) {
        for (host, entries) in self.hosts.iter_mut().enumerate() {
            let listed = snap.endpoints_of(host);
            entries.retain(|key, entry| {
                if entry.sure {
                    return true;
                }
                match listed.iter().find(|e| Self::matches(key, e, pods, host)) {
                    Some(e) => {
                        entry.ports = Some(e.ports.clone());
                        entry.sure = true;
                        entry.why = format!("{} (settled: it exists)", entry.why);
                        true
                    }
                    None => false,
                }
            });
        }
    }

    /// Takes whatever the lab shows as the truth (after a failure, to look for more).
    fn rebase(&mut self, snap: &Snapshot, pods: &PodNames) {
        for (host, entries) in self.hosts.iter_mut().enumerate() {
            entries.clear();
            for e in snap.endpoints_of(host) {
                let key = (0..PODS)
                    .find(|&pod| e.netns == pods.path(host, pod))
                    .and_then(|pod| {
                        let net = NETWORKS.iter().position(|n| n.1 == e.ifname)?;
                        Some(Key::Cni { pod, net })
                    })
                    .unwrap_or_else(|| Key::Agent(e.id.clone()));
                entries.insert(
                    key,
                    Entry {
                        ports: Some(e.ports.clone()),
                        sure: true,
                        why: "re-based on the lab after a failure".into(),
                    },
                );
            }
        }
    }
}

/// Names of the pod namespaces the run makes: `<prefix>-h<N>p<pod>` (so the lab removes them).
struct PodNames {
    prefix: String,
}

impl PodNames {
    fn name(&self, host: usize, pod: usize) -> String {
        format!("{}-h{}p{pod}", self.prefix, host + 1)
    }

    fn path(&self, host: usize, pod: usize) -> String {
        format!("/run/netns/{}", self.name(host, pod))
    }
}

// ---- the run -----------------------------------------------------------------------------------

struct Chaos {
    lab: Lab,
    rt: tokio::runtime::Runtime,
    options: ChaosOptions,
    model: Model,
    pods: PodNames,
    made_pods: BTreeSet<(usize, usize)>,
    probe_rng: StdRng,
    started: Instant,
    report: ChaosReport,
    /// etcd frozen, and hosts cut off from it.
    etcd_paused: bool,
    partitioned: BTreeSet<usize>,
    burst: usize,
    /// Every violation reported so far, so a keep-going run names each once.
    reported: BTreeSet<Violation>,
}

/// Runs a whole chaos run on a fresh lab and reports it (failures included; `Err` only when the
/// lab itself could not be built or driven).
pub fn run(options: &ChaosOptions) -> Result<ChaosReport> {
    eprintln!("chaos seed: {}", options.seed);
    let lab = Lab::new(LabOptions {
        hosts: options.hosts,
        ..Default::default()
    })?;
    let mut chaos = Chaos {
        pods: PodNames {
            prefix: lab.prefix.clone(),
        },
        lab,
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        model: Model::new(options.hosts),
        made_pods: BTreeSet::new(),
        probe_rng: StdRng::seed_from_u64(options.seed ^ 0x05ee_d0f9_e0be),
        started: Instant::now(),
        report: ChaosReport {
            seed: options.seed,
            hosts: options.hosts,
            planned: options.duration,
            skipped: options.skip.iter().cloned().collect(),
            ..Default::default()
        },
        options: options.clone(),
        etcd_paused: false,
        partitioned: BTreeSet::new(),
        burst: 0,
        reported: BTreeSet::new(),
    };
    let result = chaos.run_all();
    chaos.report.elapsed = chaos.started.elapsed();
    if let Err(e) = result {
        chaos.fail(format!("the lab could not be driven: {e:#}"), vec![]);
    }
    Ok(chaos.report)
}

impl Chaos {
    fn run_all(&mut self) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(self.options.seed);
        // The quiet point of an empty lab: the baseline everything else is judged against.
        if !self.quiet_point()? && !self.options.keep_going {
            return Ok(());
        }
        while self.started.elapsed() < self.options.duration {
            self.burst += 1;
            self.report.bursts = self.burst;
            let burst = gen_burst(&mut rng, self.options.hosts, self.burst);
            let ran = self.run_burst(&burst);
            // Whatever happened, etcd answers and no host is cut off before the quiet point.
            self.end_window()?;
            ran?;
            if !self.report.failures.is_empty() && !self.options.keep_going {
                return Ok(());
            }
            if !self.quiet_point()? && !self.options.keep_going {
                return Ok(());
            }
        }
        Ok(())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(
        &mut self,
        kind: &str,
        op: impl Into<String>,
        started: Instant,
        outcome: impl Into<String>,
        expected: impl Into<String>,
        ok: bool,
    ) {
        let record = OpRecord {
            n: self.report.ops.len() + 1,
            burst: self.burst,
            at: started.duration_since(self.started),
            took: started.elapsed(),
            kind: kind.to_string(),
            op: op.into(),
            outcome: outcome.into(),
            expected: expected.into(),
            ok,
        };
        if self.options.verbose {
            eprintln!("{record}");
        }
        if !ok {
            self.fail(format!("operation #{}: {}", record.n, record), vec![]);
        }
        self.report.ops.push(record);
    }

    fn fail(&mut self, what: String, violations: Vec<Violation>) {
        if self.report.log_tails.is_empty() {
            self.report.log_tails = (0..self.lab.hosts.len())
                .map(|i| {
                    let log = self.lab.agent_log(i);
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                    (self.lab.hosts[i].name.clone(), tail)
                })
                .collect();
        }
        let all = violations.len();
        let violations: Vec<Violation> = violations
            .into_iter()
            .filter(|v| self.reported.insert(v.clone()))
            .collect();
        let repeated = all - violations.len();
        if self.options.verbose {
            eprintln!("FAILURE in burst {}: {what}", self.burst);
            for v in &violations {
                eprintln!("  {v}");
            }
            if repeated > 0 {
                eprintln!("  (and {repeated} violation(s) reported before)");
            }
        }
        self.report.failures.push(Failure {
            burst: self.burst,
            at: self.now(),
            what,
            violations,
            repeated,
        });
    }

    fn reachable(&self, host: usize) -> bool {
        !self.etcd_paused && !self.partitioned.contains(&host)
    }

    fn run_burst(&mut self, burst: &Burst) -> Result<()> {
        let window_started = Instant::now();
        let length = match &burst.window {
            None => Duration::ZERO,
            Some(window) if self.options.skip.contains(window.kind()) => {
                let text = window.to_string();
                self.record(
                    window.kind(),
                    text,
                    window_started,
                    "skipped (--skip)",
                    "",
                    true,
                );
                Duration::ZERO
            }
            Some(window) => {
                match window {
                    Window::EtcdPause(_) => {
                        self.lab.pause_etcd()?;
                        self.etcd_paused = true;
                    }
                    Window::Partition(host, _) => {
                        self.lab.partition_from_etcd(*host)?;
                        self.partitioned.insert(*host);
                    }
                }
                let text = window.to_string();
                self.record(window.kind(), text, window_started, "done", "", true);
                match window {
                    Window::EtcdPause(length) | Window::Partition(_, length) => *length,
                }
            }
        };
        for op in &burst.ops {
            self.check_agents_alive()?;
            self.run_op(op)?;
            if !self.report.failures.is_empty() && !self.options.keep_going {
                return Ok(());
            }
        }
        if let Some(rest) = length.checked_sub(window_started.elapsed()) {
            std::thread::sleep(rest);
        }
        Ok(())
    }

    fn end_window(&mut self) -> Result<()> {
        if self.etcd_paused {
            let started = Instant::now();
            self.lab.resume_etcd()?;
            self.etcd_paused = false;
            self.record(
                "etcd-pause",
                "etcd resumed (SIGCONT)",
                started,
                "done",
                "",
                true,
            );
        }
        for host in std::mem::take(&mut self.partitioned) {
            let started = Instant::now();
            self.lab.heal_partition(host)?;
            let text = format!("partition of {} healed", h(host));
            self.record("partition", text, started, "done", "", true);
        }
        Ok(())
    }

    /// An agent that died without being killed by the run is a failure; it is restarted so
    /// the run can go on.
    fn check_agents_alive(&mut self) -> Result<()> {
        for host in 0..self.lab.hosts.len() {
            if !self.lab.agent_alive(host) {
                self.fail(
                    format!("the agent of {} died without being killed", h(host)),
                    vec![],
                );
                self.lab.stop_agent(host, Signal::SIGKILL)?;
                self.lab.start_agent(host)?;
                self.lab.wait_agent(host, Duration::from_secs(30))?;
            }
        }
        Ok(())
    }

    fn run_op(&mut self, op: &Op) -> Result<()> {
        let started = Instant::now();
        let text = op.to_string();
        let kind = op.kind();
        if self.skipped(op) {
            self.record(kind, text, started, "skipped (--skip)", "", true);
            return Ok(());
        }
        match op {
            Op::Attach { host, id, ports } => {
                let key = Key::Agent(id.clone());
                let allowed = self
                    .model
                    .expect_attach(*host, &key, ports, self.reachable(*host));
                let outcome = self.grpc_attach(*host, id, ports);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model
                    .apply_attach(*host, key, ports, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::Detach { host, id } => {
                let key = Key::Agent(id.clone());
                let allowed = self.model.expect_detach(*host, &key, self.reachable(*host));
                let outcome = self.grpc_detach(*host, id);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model.apply_detach(*host, key, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            } => {
                self.make_pod(*host, *pod)?;
                let key = Key::Cni {
                    pod: *pod,
                    net: *net,
                };
                let allowed = self
                    .model
                    .expect_attach(*host, &key, ports, self.reachable(*host));
                let outcome = self.cni(*host, "ADD", Some(*pod), *net, ports, &[]);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model
                    .apply_attach(*host, key, ports, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::CniDel { host, pod, net } => {
                let key = Key::Cni {
                    pod: *pod,
                    net: *net,
                };
                let allowed = self.model.expect_detach(*host, &key, self.reachable(*host));
                let outcome = self.cni(*host, "DEL", Some(*pod), *net, &[], &[]);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model.apply_detach(*host, key, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::CniGc { host, net, keep } => {
                // Under the contract, GC of one network leaves the other network's attachments.
                let doomed: Vec<Key> = self.model.hosts[*host]
                    .keys()
                    .filter(|k| matches!(k, Key::Cni { pod, net: n } if n == net && !keep.contains(pod)))
                    .cloned()
                    .collect();
                let allowed = if self.reachable(*host) {
                    vec![Kind::Ok]
                } else {
                    vec![Kind::Ok, Kind::Unavailable]
                };
                let outcome = self.cni(*host, "GC", None, *net, &[], keep);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                for key in doomed {
                    if ok && outcome.kind == Kind::Ok {
                        self.model.hosts[*host].remove(&key);
                    } else {
                        self.model.unsettle(*host, key, &why);
                    }
                }
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::KillRestart { host } => {
                self.lab.stop_agent(*host, Signal::SIGKILL)?;
                self.lab.start_agent(*host)?;
                let (outcome, ok) = match self.lab.wait_agent(*host, Duration::from_secs(30)) {
                    Ok(()) => ("restarted".to_string(), true),
                    Err(e) => (format!("did not come back: {e:#}"), false),
                };
                self.record(kind, text, started, outcome, "restarted", ok);
            }
            Op::KillDuringAttach {
                host,
                id,
                ports,
                after,
            } => {
                let outcome = self.kill_during_attach(*host, id, ports, *after)?;
                let key = Key::Agent(id.clone());
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                if outcome.kind == Kind::Ok {
                    self.model
                        .apply_attach(*host, key, ports, Kind::Ok, true, &why);
                } else {
                    // Cut off mid-way: it may or may not exist; the quiet point settles it.
                    self.model.unsettle(*host, key, &why);
                }
                let (text_out, ok) = match self.lab.wait_agent(*host, Duration::from_secs(30)) {
                    Ok(()) => (format!("attach answered {}; restarted", outcome.text), true),
                    Err(e) => (format!("did not come back: {e:#}"), false),
                };
                self.record(kind, text, started, text_out, "any answer; restarted", ok);
            }
            Op::DeleteRoute { host, pick } => {
                let outcome = match self.pick_endpoint(*host, *pick) {
                    None => "skipped: no endpoint".to_string(),
                    Some(e) => self.tamper(
                        *host,
                        &format!("{} via {}", e.ip, e.host_ifname),
                        &[
                            "ip",
                            "route",
                            "del",
                            &format!("{}/32", e.ip),
                            "dev",
                            &e.host_ifname,
                        ],
                    ),
                };
                self.record(kind, text, started, outcome, "", true);
            }
            Op::DeleteVeth { host, pick } => {
                let outcome = match self.pick_endpoint(*host, *pick) {
                    None => "skipped: no endpoint".to_string(),
                    Some(e) => self.tamper(
                        *host,
                        &format!("{} of {}", e.host_ifname, e.id),
                        &["ip", "link", "del", &e.host_ifname],
                    ),
                };
                self.record(kind, text, started, outcome, "", true);
            }
            Op::DeleteContainerInterface { host, pick } => {
                let outcome = match self.pick_endpoint(*host, *pick) {
                    None => "skipped: no endpoint".to_string(),
                    Some(e) => match invariants::in_netns(
                        &e.netns,
                        "ip",
                        &["link", "del", &e.ifname],
                        None,
                    ) {
                        Ok(_) => format!("deleted {} in {} ({})", e.ifname, e.netns, e.id),
                        Err(err) => format!("failed: {err:#}"),
                    },
                };
                self.record(kind, text, started, outcome, "", true);
            }
            Op::DeleteBlockRoute { host, pick } => {
                let outcome = self.delete_block_route(*host, *pick);
                self.record(kind, text, started, outcome, "", true);
            }
            Op::TamperRules { host, how } => {
                let outcome = self.tamper_rules(*host, *how);
                self.record(kind, text, started, outcome, "", true);
            }
            Op::FlipSysctl { host, pick, knob } => {
                let (template, value) = SYSCTL_FLIPS[*knob];
                let path = if template.contains("{}") {
                    self.pick_endpoint(*host, *pick)
                        .map(|e| template.replace("{}", &e.host_ifname))
                } else {
                    Some(template.to_string())
                };
                let outcome = match path {
                    None => "skipped: no endpoint".to_string(),
                    Some(path) => self.tamper(
                        *host,
                        &format!("{path}={value}"),
                        &["sh", "-c", &format!("echo {value} > {path}")],
                    ),
                };
                self.record(kind, text, started, outcome, "", true);
            }
        }
        Ok(())
    }

    /// Whether `skip` leaves this operation out. A re-attach with other ports is one by what
    /// the model holds when it comes.
    fn skipped(&self, op: &Op) -> bool {
        let skip = &self.options.skip;
        if skip.contains(op.kind()) {
            return true;
        }
        let (host, key, ports) = match op {
            Op::Attach { host, id, ports }
            | Op::KillDuringAttach {
                host, id, ports, ..
            } => (*host, Key::Agent(id.clone()), ports),
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            } => (
                *host,
                Key::Cni {
                    pod: *pod,
                    net: *net,
                },
                ports,
            ),
            _ => return false,
        };
        skip.contains("reattach-other-ports")
            && self.model.hosts[host]
                .get(&key)
                .is_some_and(|e| e.ports.as_ref() != Some(ports))
    }

    // ---- API and plugin calls ------------------------------------------------------------------

    fn grpc_attach(&self, host: usize, id: &str, ports: &[Port]) -> Outcome {
        let request = attach_request(id, ports);
        let lab = &self.lab;
        self.rt.block_on(async {
            let mut client = match tokio::time::timeout(CALL_LIMIT, lab.client(host)).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Outcome::new(Kind::Other, format!("cannot connect: {e:#}")),
                Err(_) => return Outcome::new(Kind::Other, "connect timed out"),
            };
            match tokio::time::timeout(CALL_LIMIT, client.attach(request)).await {
                Ok(Ok(response)) => {
                    let e = response.into_inner().endpoint.unwrap_or_default();
                    Outcome::new(Kind::Ok, format!("ok: {} {}", e.ip, e.host_ifname))
                }
                Ok(Err(status)) => Outcome::from_status(&status),
                Err(_) => Outcome::new(Kind::Other, format!("no answer within {CALL_LIMIT:?}")),
            }
        })
    }

    fn grpc_detach(&self, host: usize, id: &str) -> Outcome {
        let lab = &self.lab;
        self.rt.block_on(async {
            let mut client = match tokio::time::timeout(CALL_LIMIT, lab.client(host)).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Outcome::new(Kind::Other, format!("cannot connect: {e:#}")),
                Err(_) => return Outcome::new(Kind::Other, "connect timed out"),
            };
            let request = pb::DetachRequest {
                container_id: id.to_string(),
            };
            match tokio::time::timeout(CALL_LIMIT, client.detach(request)).await {
                Ok(Ok(_)) => Outcome::new(Kind::Ok, "ok"),
                Ok(Err(status)) => Outcome::from_status(&status),
                Err(_) => Outcome::new(Kind::Other, format!("no answer within {CALL_LIMIT:?}")),
            }
        })
    }

    /// Starts an attach, kills the agent `after` into it, restarts the agent. Returns what the
    /// attach answered (OK only when it completed before the kill).
    fn kill_during_attach(
        &mut self,
        host: usize,
        id: &str,
        ports: &[Port],
        after: Duration,
    ) -> Result<Outcome> {
        let lab = &self.lab;
        let client = self
            .rt
            .block_on(async { tokio::time::timeout(CALL_LIMIT, lab.client(host)).await });
        let call = match client {
            Ok(Ok(mut client)) => {
                let request = attach_request(id, ports);
                Some(self.rt.spawn(async move {
                    match tokio::time::timeout(CALL_LIMIT, client.attach(request)).await {
                        Ok(Ok(_)) => Outcome::new(Kind::Ok, "ok"),
                        Ok(Err(status)) => Outcome::from_status(&status),
                        Err(_) => Outcome::new(Kind::Other, "no answer"),
                    }
                }))
            }
            _ => None,
        };
        std::thread::sleep(after);
        self.lab.stop_agent(host, Signal::SIGKILL)?;
        let outcome = match call {
            Some(call) => self
                .rt
                .block_on(call)
                .unwrap_or_else(|e| Outcome::new(Kind::Other, format!("task: {e}"))),
            None => Outcome::new(Kind::Other, "cannot connect"),
        };
        self.lab.start_agent(host)?;
        Ok(outcome)
    }

    fn make_pod(&mut self, host: usize, pod: usize) -> Result<()> {
        if self.made_pods.insert((host, pod)) {
            sh::run("ip", &["netns", "add", &self.pods.name(host, pod)])?;
        }
        Ok(())
    }

    /// Runs weft-cni like a runtime does, for one network of host `host`.
    fn cni(
        &self,
        host: usize,
        command: &str,
        pod: Option<usize>,
        net: usize,
        ports: &[Port],
        keep: &[usize],
    ) -> Outcome {
        let (network, ifname) = NETWORKS[net];
        let mut config = json!({
            "cniVersion": "1.1.0",
            "name": network,
            "type": "weft-cni",
            "socket": self.lab.hosts[host].socket,
        });
        if !ports.is_empty() {
            config["runtimeConfig"] = json!({"portMappings": ports.iter().map(|p| json!({
                "hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol,
            })).collect::<Vec<_>>()});
        }
        if command == "GC" {
            config["cni.dev/valid-attachments"] = Value::Array(
                keep.iter()
                    .map(|pod| json!({"containerID": format!("pod{pod}"), "ifname": ifname}))
                    .collect(),
            );
        }
        let mut child = Command::new(bin("weft-cni"));
        child
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_IFNAME", ifname);
        if let Some(pod) = pod {
            child
                .env("CNI_CONTAINERID", format!("pod{pod}"))
                .env("CNI_NETNS", self.pods.path(host, pod));
        }
        let input = config.to_string();
        let out = match invariants::output_within(&mut child, Some(input.as_bytes()), CALL_LIMIT) {
            Ok(out) => out,
            Err(e) => return Outcome::new(Kind::Other, format!("{e:#}")),
        };
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() {
            let ip = answer["ips"][0]["address"].as_str().unwrap_or("");
            return Outcome::new(Kind::Ok, format!("ok {ip}").trim_end().to_string());
        }
        let code = answer["code"].as_u64().unwrap_or(0);
        let msg = answer["msg"].as_str().unwrap_or("").to_string();
        let kind = match code {
            100 => Kind::AlreadyExists,
            11 if !msg.starts_with("cannot reach the agent") => Kind::Unavailable,
            _ => Kind::Other,
        };
        Outcome::new(kind, format!("CNI error {code}: {msg}"))
    }

    // ---- tampering -----------------------------------------------------------------------------

    /// The `pick`-th endpoint of a host (modulo their number), by the agent's List.
    fn pick_endpoint(&self, host: usize, pick: usize) -> Option<Endpoint> {
        let list = self.lab.ctl_json(host, &["ls"]).ok()?;
        let endpoints: Vec<Endpoint> = list
            .as_array()?
            .iter()
            .filter_map(|v| Endpoint::from_json(v).ok())
            .collect();
        (!endpoints.is_empty()).then(|| endpoints[pick % endpoints.len()].clone())
    }

    /// Runs a command in a host's namespace; the answer describes what happened.
    fn tamper(&self, host: usize, what: &str, args: &[&str]) -> String {
        match invariants::in_netns(
            &format!("/run/netns/{}", self.lab.hosts[host].name),
            args[0],
            &args[1..],
            None,
        ) {
            Ok(_) => format!("done: {what}"),
            Err(e) => format!("failed ({what}): {e:#}"),
        }
    }

    fn delete_block_route(&self, host: usize, pick: usize) -> String {
        let ns = &self.lab.hosts[host].name;
        let routes = sh::run("ip", &["-n", ns, "-j", "route", "show", "proto", "119"])
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<Value>>(&t).ok())
            .unwrap_or_default();
        let blocks: Vec<&Value> = routes
            .iter()
            .filter(|r| r["dst"].as_str().is_some_and(|d| d.contains('/')))
            .collect();
        if blocks.is_empty() {
            return "skipped: no block route".into();
        }
        let route = blocks[pick % blocks.len()];
        let dst = route["dst"].as_str().unwrap_or("");
        if route["type"].as_str() == Some("blackhole") {
            self.tamper(
                host,
                &format!("blackhole {dst}"),
                &["ip", "route", "del", "blackhole", dst],
            )
        } else {
            let via = route["gateway"].as_str().unwrap_or("");
            self.tamper(
                host,
                &format!("{dst} via {via}"),
                &["ip", "route", "del", dst, "via", via],
            )
        }
    }

    fn tamper_rules(&self, host: usize, how: usize) -> String {
        let what = RULE_TAMPERS[how];
        let ipt = |args: &[&str]| {
            let mut all = vec!["iptables", "-w"];
            all.extend_from_slice(args);
            self.tamper(host, what, &all)
        };
        // A jump is deleted by its own spec, read back from iptables-save.
        let delete_jump = |table: &str, chain: &str, target: &str| {
            let save = invariants::in_netns(
                &format!("/run/netns/{}", self.lab.hosts[host].name),
                "iptables-save",
                &["-t", table],
                None,
            )
            .unwrap_or_default();
            let prefix = format!("-A {chain} ");
            let Some(line) = save
                .lines()
                .find(|l| l.starts_with(&prefix) && l.ends_with(&format!("-j {target}")))
            else {
                return format!("skipped: no {chain} jump to {target}");
            };
            let spec = invariants::rule_words(line);
            let mut args = vec![
                "iptables".to_string(),
                "-w".into(),
                "-t".into(),
                table.into(),
                "-D".into(),
            ];
            args.extend(spec.into_iter().skip(1));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            self.tamper(host, what, &refs)
        };
        match how {
            0 => ipt(&["-t", "nat", "-F", "WEFT-PORTS"]),
            1 => ipt(&["-t", "nat", "-D", "WEFT-PORTS", "1"]),
            2 => ipt(&[
                "-t",
                "nat",
                "-A",
                "WEFT-PORTS",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "DNAT",
                "--to-destination",
                "10.65.255.254:9",
            ]),
            3 => delete_jump("nat", "PREROUTING", "WEFT-PORTS"),
            4 => delete_jump("filter", "FORWARD", "WEFT-FORWARD"),
            5 => ipt(&["-t", "nat", "-F", "WEFT-POSTROUTING"]),
            _ => ipt(&["-F", "WEFT-FORWARD"]),
        }
    }

    // ---- quiet points --------------------------------------------------------------------------

    /// Waits for the lab to converge and judges it; false when it did not pass.
    fn quiet_point(&mut self) -> Result<bool> {
        self.check_agents_alive()?;
        self.report.quiet_points += 1;
        let started = Instant::now();
        let result = {
            let Chaos {
                lab, model, pods, ..
            } = &*self;
            invariants::wait_quiet_with(lab, self.options.quiet_limit, |snap| {
                model.check(snap, pods)
            })
        };
        match result {
            Ok(quiet) => {
                let unreachable = self.probe(&quiet.snapshot);
                self.model.settle(&quiet.snapshot, &self.pods);
                let outcome = format!(
                    "quiet after {:.1}s ({} checks, {:.0}ms a snapshot): {}",
                    quiet.took.as_secs_f64(),
                    quiet.attempts,
                    quiet.snapshot.took.as_secs_f64() * 1e3,
                    quiet.coverage
                );
                if unreachable.is_empty() {
                    self.record("quiet-point", "quiet point", started, outcome, "", true);
                    return Ok(true);
                }
                self.record(
                    "quiet-point",
                    "quiet point",
                    started,
                    format!("{outcome}; pings failed"),
                    "",
                    true,
                );
                self.fail("quiet point: sampled pings failed".into(), unreachable);
                Ok(false)
            }
            Err(unquiet) => {
                self.record(
                    "quiet-point",
                    "quiet point",
                    started,
                    format!(
                        "NOT quiet after {:.1}s: {} violation(s)",
                        unquiet.took.as_secs_f64(),
                        unquiet.violations.len()
                    ),
                    "",
                    true,
                );
                self.fail(
                    format!("quiet point: {} violation(s)", unquiet.violations.len()),
                    unquiet.violations,
                );
                if let Some(snap) = &unquiet.snapshot {
                    self.model.rebase(snap, &self.pods);
                }
                Ok(false)
            }
        }
    }

    /// Sampled data-path checks: from one endpoint of each host to one on another host.
    fn probe(&mut self, snap: &Snapshot) -> Vec<Violation> {
        let all: Vec<(usize, Endpoint)> = (0..snap.hosts.len())
            .flat_map(|h| snap.endpoints_of(h).into_iter().map(move |e| (h, e)))
            .collect();
        // Only namespaces with a primary interface (eth0) have a default route: a namespace
        // left with only a secondary network has no way back, by the contract's rule.
        let primary: BTreeSet<&str> = all
            .iter()
            .filter(|(_, e)| e.ifname == "eth0")
            .map(|(_, e)| e.netns.as_str())
            .collect();
        let mut pairs = vec![];
        for host in 0..snap.hosts.len() {
            let mine: Vec<&(usize, Endpoint)> = all
                .iter()
                .filter(|(h, e)| *h == host && e.ifname == "eth0")
                .collect();
            let theirs: Vec<&(usize, Endpoint)> = all
                .iter()
                .filter(|(h, e)| *h != host && primary.contains(e.netns.as_str()))
                .collect();
            if mine.is_empty() || theirs.is_empty() {
                continue;
            }
            let src = mine[self.probe_rng.gen_range(0..mine.len())];
            let dst = theirs[self.probe_rng.gen_range(0..theirs.len())];
            pairs.push((src.clone(), dst.clone()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut failed = vec![];
        for ((sh_, src), (dh, dst)) in pairs {
            let ns = src.netns.trim_start_matches("/run/netns/").to_string();
            let mut answered = false;
            loop {
                if sh::ping(&ns, &dst.ip.to_string()) {
                    answered = true;
                    break;
                }
                if Instant::now() > deadline {
                    break;
                }
            }
            if !answered {
                failed.push(Violation::new(
                    &snap.hosts[sh_].name,
                    format!(
                        "path {} ({}) -> {} ({} on {})",
                        src.id, src.ip, dst.ip, dst.id, snap.hosts[dh].name
                    ),
                    "ping answered",
                    "no answer",
                ));
            }
        }
        failed
    }
}

fn attach_request(id: &str, ports: &[Port]) -> pb::AttachRequest {
    pb::AttachRequest {
        container_id: id.to_string(),
        ports: ports
            .iter()
            .map(|p| pb::PortMapping {
                protocol: p.protocol.clone(),
                host_port: p.host_port.into(),
                container_port: p.container_port.into(),
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_operations() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..=20)
                .map(|i| {
                    let b = gen_burst(&mut rng, 3, i);
                    format!(
                        "{:?} {:?}",
                        b.window,
                        b.ops.iter().map(Op::to_string).collect::<Vec<_>>()
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn expected_answers_follow_the_contract() {
        let mut m = Model::new(1);
        let web = vec![Port {
            protocol: "tcp".into(),
            host_port: 8000,
            container_port: 80,
        }];
        let a = Key::Agent("a".into());
        let b = Key::Agent("b".into());
        assert_eq!(m.expect_attach(0, &a, &web, true), vec![Kind::Ok]);
        m.apply_attach(0, a.clone(), &web, Kind::Ok, true, "test");
        // Another container wants the same host port: refused.
        assert_eq!(
            m.expect_attach(0, &b, &web, true),
            vec![Kind::AlreadyExists]
        );
        // Re-attach of the holder with the same port is fine, also without etcd.
        assert_eq!(m.expect_attach(0, &a, &web, true), vec![Kind::Ok]);
        assert!(m.expect_attach(0, &a, &web, false).contains(&Kind::Ok));
        // A new container without etcd: unavailable; a known one may not be detached then.
        assert_eq!(m.expect_attach(0, &b, &[], false), vec![Kind::Unavailable]);
        assert_eq!(m.expect_detach(0, &a, false), vec![Kind::Unavailable]);
        m.apply_detach(0, a.clone(), Kind::Ok, true, "test");
        assert!(m.hosts[0].is_empty());
    }
}
