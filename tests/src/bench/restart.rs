//! Agent restart with many local endpoints: start to API answering, the first full
//! reconciliation, and the agent's resident set.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::sys::signal::Signal;

use super::batch::Batch;
use super::client::{one_host_lab, rss_mb, Client};
use super::{Options, Report, CONCURRENCY};
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
    Ok((
        ready,
        initial_reconciliation_ms(&lab.agent_log(0)[before..]),
    ))
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
