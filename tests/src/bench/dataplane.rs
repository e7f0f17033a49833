//! Dataplane throughput: iperf3 container → container across hosts against host → host on the
//! underlay, medians of alternating runs.

use std::time::Duration;

use anyhow::{Context, Result};

use super::{Options, Report};
use crate::{sh, Lab, LabOptions};

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    dataplane(report, options.size(2, 5))
}

fn dataplane(report: &mut Report, seconds: u32) -> Result<()> {
    println!(
        "== dataplane: iperf3 container->container across hosts vs host->host ({seconds}s x 3)"
    );
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ..Default::default()
    })?;
    let (c1, _) = lab.attach(0, "client")?;
    let (c2, ip2) = lab.attach(1, "server")?;
    let h2 = lab.hosts[1].name.clone();
    lab.spawn_in(&c2, "iperf3", &["-s"])?;
    lab.spawn_in(&h2, "iperf3", &["-s"])?;
    std::thread::sleep(Duration::from_millis(500));
    let mut fabric = vec![];
    let mut underlay = vec![];
    for _ in 0..3 {
        fabric.push(iperf(&c1, &ip2, seconds)?);
        underlay.push(iperf(
            &lab.hosts[0].name,
            &lab.hosts[1].ip.to_string(),
            seconds,
        )?);
    }
    let (f, u) = (median(&mut fabric), median(&mut underlay));
    report.line("dataplane.container_gbps", f / 1e9, "Gbit/s", "median of 3");
    report.line("dataplane.host_gbps", u / 1e9, "Gbit/s", "median of 3");
    report.line("dataplane.ratio", f / u, "x", "target >= 0.9");
    Ok(())
}

/// One iperf3 TCP run from namespace `client_ns`; the received bits per second.
pub fn iperf(client_ns: &str, server_ip: &str, seconds: u32) -> Result<f64> {
    let out = sh::in_ns(
        client_ns,
        &["iperf3", "-c", server_ip, "-t", &seconds.to_string(), "-J"],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 json")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
