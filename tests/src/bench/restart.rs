//! Agent restart with many local endpoints: start to API answering, the first full
//! reconciliation, and the agent's resident set.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use super::batch::Batch;
use super::client::{one_host_lab, rss_mb, Client};
use super::{Options, Report, CONCURRENCY};
use crate::passes::{self, Totals};
use crate::Lab;

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    restart(report, options.size(200, 1000))
}

fn restart(report: &mut Report, n: usize) -> Result<()> {
    println!("== agent restart with {n} local endpoints");
    let mut lab = one_host_lab()?;
    let client = Client::new(&lab, 0)?;
    let batch = Batch::new(&lab, "r", n, CONCURRENCY)?;
    batch.attach(&client, |_| vec![])?;
    let (ready, reconcile_ms) = restart_agent(&mut lab)?;
    let rss = rss_mb(lab.agent_pid(0).unwrap())?;
    let endpoints = lab.status(0)?["endpoint_count"].as_u64().unwrap_or(0);
    if endpoints as usize != n {
        bail!("agent came back with {endpoints} endpoints, expected {n}");
    }
    report.line(
        &format!("restart.n{n}.ready"),
        ready.as_secs_f64() * 1e3,
        "ms",
        "start to API answering; target <= 2000",
    );
    report.line(
        &format!("restart.n{n}.reconcile"),
        reconcile_ms,
        "ms",
        "first full reconciliation",
    );
    report.line(&format!("restart.n{n}.rss"), rss, "MB", "target <= 50");
    batch.remove()?;
    Ok(())
}

/// Restarts host 0's agent (SIGTERM, start): the time from start to its API answering, and the
/// duration of its first full reconciliation as it logged it.
pub fn restart_agent(lab: &mut Lab) -> Result<(Duration, f64)> {
    lab.stop_agent(0, Signal::SIGTERM)?;
    let before = lab.agent_log(0).len();
    let started = Instant::now();
    lab.start_agent(0)?;
    lab.wait_agent(0, Duration::from_secs(60))?;
    let ready = started.elapsed();
    let log = &lab.agent_log(0)[before..];
    if let Some(steps) = log
        .lines()
        .find(|l| l.contains("initial reconciliation done"))
        .and_then(|l| l.split("steps=").nth(1))
    {
        println!("  first full pass, by step (ms): {steps}");
    }
    Ok((ready, initial_reconciliation_ms(log)))
}

/// Full passes of host 0's agent with nothing to change: it is restarted with a resync interval
/// of a second, and its totals are read over a few intervals in which nothing is asked of it.
pub fn full_passes_at_rest(lab: &mut Lab) -> Result<passes::Kind> {
    lab.stop_agent(0, Signal::SIGTERM)?;
    lab.start_agent_with(0, &["--resync-interval", "1s"])?;
    lab.wait_agent(0, Duration::from_secs(60))?;
    // The first pass (timed by `restart_agent`) and what it sets off go first.
    std::thread::sleep(Duration::from_secs(2));
    let ns = lab.hosts[0].name.clone();
    let before = Totals::read(&ns)?;
    std::thread::sleep(Duration::from_secs(5));
    let full = Totals::read(&ns)?
        .since(&before)
        .context("the agent restarted while its passes were timed")?
        .of("full");
    if full.passes < 2 {
        bail!(
            "the agent made {} full passes in 5 s, with a 1 s interval",
            full.passes
        );
    }
    println!(
        "  full pass at rest: {:.1} ms over {} passes, by step (ms): {}",
        full.mean_ms(),
        full.passes,
        full.steps_ms()
    );
    Ok(full)
}

/// The duration the agent logged for its first full reconciliation (NaN if not logged).
pub fn initial_reconciliation_ms(log: &str) -> f64 {
    log.lines()
        .find(|l| l.contains("initial reconciliation done"))
        .and_then(|l| l.split("ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
