//! Many endpoints on one host: attach latency with 10 existing endpoints against with N
//! existing, the agent's restart, its first full reconciliation and its full passes at rest
//! with N, and detaching all N.
//! The kernel floor's latency (the same kernel work with no agent) is probed at both sizes in
//! the same host, so what the kernel itself loses with N stands beside what weft loses.

use std::time::Duration;

use anyhow::{bail, Result};

use super::client::{delete_namespaces, namespaces, one_host_lab, rss_mb, Client};
use super::floor::floor_run;
use super::restart::{full_passes_at_rest, restart_agent};
use super::{timed, Options, Report, Run, CONCURRENCY};

/// Endpoints present before the first probe.
const FEW: usize = 10;
/// Sequential attaches timed at each size (detached again after the last).
const PROBES: usize = 20;
/// Quiet time before each probe.
const SETTLE: Duration = Duration::from_secs(2);

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    many(report, options.size(300, 2000))
}

fn many(report: &mut Report, n: usize) -> Result<()> {
    println!("== {n} endpoints on one host");
    let mut lab = one_host_lab()?;
    let client = Client::new(&lab, 0)?;
    let ns = namespaces(&lab, "m", n)?;
    let probe_ns = namespaces(&lab, "q", 2 * PROBES)?;
    let floor_ns = namespaces(&lab, "k", 2 * PROBES)?;
    let host = lab.hosts[0].name.clone();
    let floor = |k: usize| floor_probe(&host, &floor_ns, k);
    let attach = |i: usize| {
        let netns = format!("/run/netns/{}", ns[i]);
        client
            .attach(i % CONCURRENCY, format!("m{i}"), netns, vec![])
            .map(drop)
    };
    timed(FEW, 1, attach)?;
    let at_few = probe(&client, &probe_ns[..PROBES])?;
    let floor_at_few = floor(0)?;
    let fill = timed(n - FEW, CONCURRENCY, |i| attach(FEW + i))?;
    let at_n = probe(&client, &probe_ns[PROBES..])?;
    let floor_at_n = floor(1)?;
    let at_rest = full_passes_at_rest(&mut lab)?;
    let (ready, reconcile_ms) = restart_agent(&mut lab)?;
    let rss = rss_mb(lab.agent_pid(0).unwrap_or_default())?;
    let endpoints = lab.status(0)?["endpoint_count"].as_u64().unwrap_or(0);
    if endpoints as usize != n {
        bail!("agent came back with {endpoints} endpoints, expected {n}");
    }
    let detach = timed(n, CONCURRENCY, |i| {
        client.detach(i % CONCURRENCY, format!("m{i}"))
    })?;
    delete_namespaces(&ns)?;
    delete_namespaces(&probe_ns)?;

    let key = format!("endpoints.n{n}");
    report.line(
        &format!("{key}.attach_p50_at_10"),
        at_few.pct(0.5),
        "ms",
        "",
    );
    report.line(&format!("{key}.attach_p50_at_n"), at_n.pct(0.5), "ms", "");
    // A line, not a recorded ratio: it grows with N by design, so runs of different sizes
    // cannot be compared on it.
    report.line(
        &format!("{key}.attach_p50_ratio_at_n_over_at_10"),
        at_n.pct(0.5) / at_few.pct(0.5),
        "x",
        "target <= 1.5",
    );
    report_floor(report, &key, &floor_at_few, &floor_at_n);
    report.line(
        &format!("{key}.fill_rate"),
        fill.rate(),
        "per_s",
        "8 clients",
    );
    report.line(
        &format!("{key}.restart_ready"),
        ready.as_secs_f64() * 1e3,
        "ms",
        "start to API answering; target <= 2000",
    );
    report.line(
        &format!("{key}.reconcile"),
        reconcile_ms,
        "ms",
        "first full reconciliation, at start; target <= 200",
    );
    report.line(
        &format!("{key}.resync"),
        at_rest.mean_ms(),
        "ms",
        "a full pass with nothing to change; target <= 200",
    );
    report.line(&format!("{key}.rss"), rss, "MB", "");
    report.line(
        &format!("{key}.detach_all"),
        detach.wall.as_secs_f64() * 1e3,
        "ms",
        "8 clients; target <= 10000",
    );
    Ok(())
}

/// The kernel floor's probe `k` (0: at 10 endpoints, 1: at N): `PROBES` containers wired one at
/// a time by the floor loop in the lab host, then removed with their namespaces (their veths go
/// with them), and a quiet moment for the kernel's clean-up.
fn floor_probe(host: &str, floor_ns: &[String], k: usize) -> Result<Run> {
    std::thread::sleep(SETTLE);
    let range = k * PROBES..(k + 1) * PROBES;
    let run = floor_run(host, &floor_ns[range.clone()], range.start, 1);
    delete_namespaces(&floor_ns[range])?;
    std::thread::sleep(SETTLE);
    run
}

fn report_floor(report: &mut Report, key: &str, at_few: &Run, at_n: &Run) {
    report.line(
        &format!("{key}.floor_p50_at_10"),
        at_few.pct(0.5),
        "ms",
        "kernel floor, same host",
    );
    report.line(
        &format!("{key}.floor_p50_at_n"),
        at_n.pct(0.5),
        "ms",
        "kernel floor, same host",
    );
    report.line(
        &format!("{key}.floor_p50_ratio_at_n_over_at_10"),
        at_n.pct(0.5) / at_few.pct(0.5),
        "x",
        "what the kernel itself loses",
    );
}

/// Attaches one container per namespace in `names`, one at a time, and detaches them all
/// afterwards (untimed): a detach in between would set off the reconciler's pass for the
/// deleted link, which would then compete with the next attach.
fn probe(client: &Client, names: &[String]) -> Result<Run> {
    // Let the work an earlier burst left behind (reaper, etcd writer) finish first.
    std::thread::sleep(SETTLE);
    let ids: Vec<String> = names
        .iter()
        .map(|name| format!("probe-{}", name.rsplit('-').next().unwrap_or_default()))
        .collect();
    let mut samples = vec![];
    for (k, (id, name)) in ids.iter().zip(names).enumerate() {
        let started = std::time::Instant::now();
        client.attach(k, id.clone(), format!("/run/netns/{name}"), vec![])?;
        samples.push(started.elapsed());
    }
    for (k, id) in ids.into_iter().enumerate() {
        client.detach(k, id)?;
    }
    Ok(Run {
        samples,
        wall: Duration::from_secs(1),
    })
}
