//! Route convergence: the time from a block claimed on one host to its route in another host's
//! kernel, read from the claiming agent's log and `ip -ts monitor route` on the other host; for
//! a peer on the same segment (a plain route) and for one on the other segment (a route through
//! `weft.vxlan`).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Result};

use super::client::{seconds_of_day, Client};
use super::{Options, Report, Run};
use crate::{Lab, LabOptions};

/// h1 and h2 on one segment.
pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    convergence(report, options.size(30, 120), 1)
}

/// h1 and h2 on different segments: the route on h2 goes through its VXLAN device.
pub fn run_vxlan(report: &mut Report, options: &Options) -> Result<()> {
    convergence(report, options.size(30, 120), 2)
}

fn convergence(report: &mut Report, blocks: usize, subnets: usize) -> Result<()> {
    // What marks the route to h1's block in h2's monitor log.
    let (key, marker, what) = match subnets {
        1 => ("convergence", " via ", "3 hosts, one segment"),
        _ => (
            "convergence.vxlan",
            "dev weft.vxlan",
            "3 hosts, h2 on the other segment",
        ),
    };
    println!("== route convergence over {blocks} new blocks ({what})");
    // /32 blocks: every attach on h1 claims a new block.
    let mut lab = Lab::new(LabOptions {
        subnets,
        agent_args: vec![
            "--pool".into(),
            "10.66.0.0/22".into(),
            "--block-size".into(),
            "32".into(),
        ],
        ..Default::default()
    })?;
    let monitor_log = lab.dir.join("monitor.log");
    let h2 = lab.hosts[1].name.clone();
    // Line-buffered, or the events sit in stdio's buffer when the monitor is ended.
    lab.spawn_logged(
        &h2,
        "stdbuf",
        &["-oL", "ip", "-ts", "monitor", "route"],
        Some(&monitor_log),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Client::new(&lab, 0)?;
    for i in 0..blocks {
        client.attach(0, format!("v{i}"), String::new(), vec![])?;
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    let claims = claims(&lab.agent_log(0));
    let monitor = std::fs::read_to_string(&monitor_log)?;
    let delays = delays(&claims, &monitor, marker);
    if delays.len() < blocks * 9 / 10 {
        bail!(
            "only {} of {blocks} routes were seen on h2 ({} claims logged; monitor saw:\n{})",
            delays.len(),
            claims.len(),
            monitor.lines().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    let run = Run {
        wall: Duration::from_secs(1),
        samples: delays,
    };
    let count = run.samples.len() as f64;
    report.line(&format!("{key}.blocks"), count, "count", "");
    report.line(&format!("{key}.p50"), run.pct(0.5), "ms", "");
    report.line(&format!("{key}.p99"), run.pct(0.99), "ms", "target <= 100");
    Ok(())
}

/// The blocks an agent's log says it claimed (without the `/32`), with the time of day.
pub fn claims(log: &str) -> HashMap<String, f64> {
    log.lines()
        .filter(|l| l.contains("claimed block"))
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?;
            let block = l.split("block=").nth(1)?.split_whitespace().next()?;
            Some((
                block.trim_end_matches("/32").to_string(),
                seconds_of_day(stamp)?,
            ))
        })
        .collect()
}

/// For each route added in an `ip -ts monitor route` log whose line holds `marker` and whose
/// destination is a claimed block: the time from the claim to the route.
pub fn delays(claims: &HashMap<String, f64>, monitor: &str, marker: &str) -> Vec<Duration> {
    let mut delays = vec![];
    for line in monitor
        .lines()
        .filter(|l| l.contains(marker) && !l.starts_with("Deleted"))
    {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let dst = rest.split_whitespace().next().unwrap_or("");
        if let (Some(claimed), Some(seen)) = (claims.get(dst), seconds_of_day(stamp)) {
            delays.push(Duration::from_secs_f64((seen - claimed).max(0.0)));
        }
    }
    delays
}
