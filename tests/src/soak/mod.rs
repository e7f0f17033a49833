//! The soak: a 3-host lab on a 3-member etcd under continuous attach/detach churn (a third with
//! a published TCP port, a third UDP), an agent killed with SIGKILL and restarted every
//! `kill_every`, an etcd member restarted every `etcd_restart_every`, and a ping mesh between
//! long-lived containers throughout. At the end: failed requests judged against the fault
//! windows, lost pings, leaks (records, links, routes, rules, conntrack entries, namespaces,
//! processes), agent memory against its early figure, and reconcile time early against late.
//! `weft-lab soak` and `deploy/bench/soak` run it; a short run is part of the test suite.

pub mod churn;
pub mod leaks;
pub mod mesh;
pub mod report;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::lab::{Lab, LabOptions};
use crate::{invariants, passes, sh};
use churn::{unix_now, Tally};
use report::{SoakReport, Window};

/// How to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    pub hosts: usize,
    /// Attaches and detaches per second, all workers together.
    pub rate: f64,
    pub workers: usize,
    pub seed: u64,
    pub kill_every: Duration,
    pub etcd_restart_every: Duration,
    /// When memory is first measured (the figure the end is held to).
    pub early: Duration,
}

impl SoakOptions {
    /// The cadence (a kill every 2 minutes, an etcd member every 5, memory after 5
    /// minutes), compressed for short runs so each fault still happens at least twice.
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            hosts: 3,
            rate: 50.0,
            workers: 4,
            seed,
            kill_every: Duration::from_secs(120).min(duration / 3),
            etcd_restart_every: Duration::from_secs(300).min(duration / 3),
            early: Duration::from_secs(300).min(duration / 3),
        }
    }
}

/// The long-lived container of host `i`.
pub fn lived_id(i: usize) -> String {
    format!("lived-{i}")
}

/// Margin after an agent answers again, or an etcd member is back, during which requests may
/// still see the fault (reconnects, a leader election).
const AGENT_MARGIN: f64 = 2.0;
const ETCD_MARGIN: f64 = 5.0;

pub fn run(options: &SoakOptions) -> Result<SoakReport> {
    let mut lab = Lab::new(LabOptions {
        hosts: options.hosts,
        etcd_members: 3,
        ..Default::default()
    })?;
    let mut lived = vec![];
    for i in 0..options.hosts {
        lived.push(lab.attach(i, &lived_id(i))?);
    }
    for (from, _) in &lived {
        for (_, to) in &lived {
            lab.eventually(
                &format!("{from} reaches {to}"),
                Duration::from_secs(10),
                || sh::ping(from, to),
            )?;
        }
    }
    let pairs = mesh::start(&mut lab, &lived)?;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let churn = spawn_churn(&lab, options, stop.clone(), tally.clone())?;
    let started = Instant::now();
    let started_unix = unix_now();
    let faults = inject_faults(&mut lab, options, started);
    stop.store(true, Ordering::Relaxed);
    let _ = churn.join();
    let Faults {
        windows,
        early_memory,
        reconcile_samples,
    } = faults?;
    let seconds = started.elapsed().as_secs_f64();
    let reconcile = lab
        .hosts
        .iter()
        .zip(&reconcile_samples)
        .map(|(host, samples)| (host.name.clone(), passes::trend(samples)))
        .collect();

    let mut leaks = vec![];
    if let Err(unquiet) = invariants::wait_quiet(&lab, Duration::from_secs(30)) {
        leaks.push(unquiet.to_string());
    }
    let lived_ids: BTreeSet<String> = (0..options.hosts).map(lived_id).collect();
    leaks.extend(leaks::find(&lab, &lived_ids)?);
    leaks.extend(
        tally
            .stranded
            .lock()
            .unwrap()
            .iter()
            .map(|id| format!("{id} could not be detached")),
    );
    let pings = pairs
        .iter()
        .map(|p| {
            let result = mesh::read(&p.log);
            (
                format!("{} -> {}", p.from, p.to),
                result.replies,
                result.lost_at,
            )
        })
        .collect();
    let memory = early_memory
        .into_iter()
        .enumerate()
        .map(|(i, early)| (lab.hosts[i].name.clone(), early, agent_rss(&lab, i)))
        .collect();
    let failed = tally.failed.lock().unwrap().clone();
    Ok(SoakReport {
        started: started_unix,
        seconds,
        attaches: tally.attaches.load(Ordering::Relaxed),
        detaches: tally.detaches.load(Ordering::Relaxed),
        failed,
        windows,
        pings,
        leaks,
        memory,
        reconcile,
    })
}

fn spawn_churn(
    lab: &Lab,
    options: &SoakOptions,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Result<std::thread::JoinHandle<()>> {
    let sockets = lab.hosts.iter().map(|h| h.socket.clone()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("churn runtime")?;
    let (workers, rate, seed) = (options.workers, options.rate, options.seed);
    Ok(std::thread::spawn(move || {
        runtime.block_on(churn::run(sockets, workers, rate, seed, stop, tally));
    }))
}

/// What the fault loop saw.
struct Faults {
    windows: Vec<Window>,
    /// Each agent's memory at the early mark (KiB).
    early_memory: Vec<u64>,
    /// Per agent, its reconciler totals sampled through the run.
    reconcile_samples: Vec<Vec<passes::Totals>>,
}

/// How often the agents' reconcile totals are read.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Kills agents and restarts etcd members on the options' cadence until the run's time is up;
/// samples memory at the early mark and the reconcilers' totals throughout.
fn inject_faults(lab: &mut Lab, options: &SoakOptions, started: Instant) -> Result<Faults> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut windows = vec![];
    let mut early = vec![];
    let mut samples = vec![vec![]; lab.hosts.len()];
    let mut next_sample = Duration::ZERO;
    let (mut next_kill, mut next_etcd) = (options.kill_every, options.etcd_restart_every);
    while started.elapsed() < options.duration {
        std::thread::sleep(Duration::from_millis(200));
        let elapsed = started.elapsed();
        if elapsed >= next_sample {
            next_sample += SAMPLE_EVERY;
            for (i, host) in lab.hosts.iter().enumerate() {
                // An agent being restarted has no listener for a moment: no sample then.
                if let Ok(totals) = passes::Totals::read(&host.name) {
                    samples[i].push(totals);
                }
            }
        }
        if early.is_empty() && elapsed >= options.early {
            early = (0..lab.hosts.len()).map(|i| agent_rss(lab, i)).collect();
        }
        if elapsed >= next_kill {
            next_kill += options.kill_every;
            let host = rng.gen_range(0..lab.hosts.len());
            let start = unix_now();
            lab.stop_agent(host, Signal::SIGKILL)?;
            lab.start_agent(host)?;
            lab.wait_agent(host, Duration::from_secs(30))?;
            windows.push(Window {
                what: format!("agent of {} killed and restarted", lab.hosts[host].name),
                host: Some(host),
                start,
                end: unix_now() + AGENT_MARGIN,
            });
        }
        if elapsed >= next_etcd {
            next_etcd += options.etcd_restart_every;
            let member = rng.gen_range(0..lab.etcd.len());
            let start = unix_now();
            lab.etcd[member].stop();
            std::thread::sleep(Duration::from_secs(2));
            lab.etcd[member].restart()?;
            windows.push(Window {
                what: format!("etcd member {member} restarted"),
                host: None,
                start,
                end: unix_now() + ETCD_MARGIN,
            });
        }
    }
    if early.is_empty() {
        early = (0..lab.hosts.len()).map(|i| agent_rss(lab, i)).collect();
    }
    Ok(Faults {
        windows,
        early_memory: early,
        reconcile_samples: samples,
    })
}

/// The resident memory of host `i`'s agent, in KiB (0 when it is not running).
fn agent_rss(lab: &Lab, i: usize) -> u64 {
    let Some(pid) = lab.agent_pid(i) else {
        return 0;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
