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
//! The lab is IPv4-only or dual-stack ([`Stack`]): odd seeds run dual-stack unless told, so
//! that runs with random seeds check IPv6 under the same faults. On a dual-stack lab every
//! other tampering operation acts on the IPv6 side (an IPv6 route, ip6tables rules, an IPv6
//! sysctl) and the probes ping both families.
//!
//! The sequence of operations is a function of the seed alone (outcomes never feed the
//! generator), so `chaos seed: N`, printed first, replays the same run. What each operation may
//! answer follows the hardening contract (`UNAVAILABLE` while etcd is out of reach, and then
//! nothing done; `ALREADY_EXISTS` for a host port another container holds): an expected error is
//! recorded, an unexpected answer or a broken invariant is a failure.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::invariants::Violation;
use crate::lab::{Lab, LabOptions};

mod execute;
mod model;
mod ops;
mod report;
mod runner;
mod tamper;
#[cfg(test)]
mod tests;

use model::{kinds_text, Key, Kind, Model, Outcome};
use ops::{gen_burst, h, ipv6_twin, Burst, Op, Window, RULE_TAMPERS, SYSCTL_FLIPS};
pub use report::{ChaosReport, Failure, OpRecord};

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
    /// IPv4 only or dual-stack; by default the seed's choice ([`Stack::of_seed`]).
    pub stack: Stack,
}

/// The families of the run's lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stack {
    #[default]
    Ipv4,
    /// IPv4 and IPv6 pools; every container has an address of each family.
    DualStack,
}

impl Stack {
    /// The seed's choice: odd seeds run dual-stack.
    pub fn of_seed(seed: u64) -> Self {
        match seed % 2 {
            1 => Stack::DualStack,
            _ => Stack::Ipv4,
        }
    }
}

impl std::str::FromStr for Stack {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim() {
            "ipv4" => Ok(Stack::Ipv4),
            "dual-stack" => Ok(Stack::DualStack),
            other => anyhow::bail!("{other:?}: use ipv4 or dual-stack"),
        }
    }
}

impl std::fmt::Display for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stack::Ipv4 => "ipv4",
            Stack::DualStack => "dual-stack",
        })
    }
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
            stack: Stack::of_seed(seed),
        }
    }

    /// `WEFT_CHAOS_SEED` (default: a fresh random seed), `WEFT_CHAOS_MINUTES` (default:
    /// `default`) and `WEFT_CHAOS_STACK` (`ipv4` or `dual-stack`; default: the seed's choice).
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
        if let Ok(text) = std::env::var("WEFT_CHAOS_STACK") {
            options.stack = text.parse().context("WEFT_CHAOS_STACK")?;
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

impl Chaos {
    /// Whether the next tampering operation acts on the IPv6 side: every other one on a
    /// dual-stack lab (by the number of operations so far, so the seed decides).
    fn ipv6_turn(&self) -> bool {
        self.options.stack == Stack::DualStack && self.report.ops.len() % 2 == 1
    }
}

/// Runs a whole chaos run on a fresh lab and reports it (failures included; `Err` only when the
/// lab itself could not be built or driven).
pub fn run(options: &ChaosOptions) -> Result<ChaosReport> {
    eprintln!("chaos seed: {} ({})", options.seed, options.stack);
    let lab = Lab::new(LabOptions {
        hosts: options.hosts,
        ipv6: options.stack == Stack::DualStack,
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
            stack: options.stack,
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
