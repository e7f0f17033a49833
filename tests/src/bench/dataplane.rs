//! Dataplane throughput: iperf3 container → container across hosts against host → host on the
//! underlay, medians of alternating runs; on one segment (plain routes) and across two segments
//! (VXLAN against the hosts' own path through the router).

use std::time::Duration;

use anyhow::{Context, Result};

use super::{Better, Options, Report};
use crate::{sh, Lab, LabOptions};

/// Same segment: plain routes between the hosts.
pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    dataplane(report, options.size(2, 5), 1)
}

/// Two segments: the containers' packets cross the router inside VXLAN, the hosts' own packets
/// are routed by it.
pub fn run_vxlan(report: &mut Report, options: &Options) -> Result<()> {
    dataplane(report, options.size(2, 5), 2)
}

fn dataplane(report: &mut Report, seconds: u32, subnets: usize) -> Result<()> {
    let (key, what, target) = match subnets {
        1 => ("dataplane", "across hosts vs host->host", 0.9),
        _ => (
            "dataplane.vxlan",
            "across segments (VXLAN) vs host->host across the router",
            0.75,
        ),
    };
    println!("== dataplane: iperf3 container->container {what} ({seconds}s x 3)");
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        subnets,
        ..Default::default()
    })?;
    let (c1, _) = lab.attach(0, "client")?;
    let (c2, ip2) = lab.attach(1, "server")?;
    let h2 = lab.hosts[1].name.clone();
    lab.spawn_in(&c2, "iperf3", &["-s"])?;
    lab.spawn_in(&h2, "iperf3", &["-s"])?;
    std::thread::sleep(Duration::from_millis(500));
    let h1 = lab.hosts[0].name.clone();
    let host_ip = lab.hosts[1].ip.to_string();
    let (f, u) = medians(&c1, &ip2, &h1, &host_ip, seconds)?;
    report.line(
        &format!("{key}.container_gbps"),
        f / 1e9,
        "Gbit/s",
        "median of 3",
    );
    report.line(
        &format!("{key}.host_gbps"),
        u / 1e9,
        "Gbit/s",
        "median of 3",
    );
    report.ratio(&format!("{key}.ratio"), f / u, Better::Higher, Some(target));
    if subnets > 1 {
        // Between lab namespaces the hosts' own TCP crosses every veth as 64 KB super-packets,
        // while the router's bridge (which offers no offload for encapsulated packets)
        // segments the VXLAN ones. With segmentation offload off on h1's underlay link, both
        // paths carry MTU-sized frames across the underlay, as on a physical wire.
        sh::run_in(&h1, &["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])
            .context("turning segmentation offload off (apt-get install ethtool)")?;
        let (f, u) = medians(&c1, &ip2, &h1, &host_ip, seconds)?;
        report.line(
            &format!("{key}.wire.container_gbps"),
            f / 1e9,
            "Gbit/s",
            "MTU-sized frames on the underlay",
        );
        report.line(
            &format!("{key}.wire.host_gbps"),
            u / 1e9,
            "Gbit/s",
            "MTU-sized frames on the underlay",
        );
        report.ratio(&format!("{key}.wire.ratio"), f / u, Better::Higher, None);
    }
    Ok(())
}

/// Medians of three alternating iperf3 runs: container `c1` → `ip2`, and host `h1` → `host_ip`.
fn medians(c1: &str, ip2: &str, h1: &str, host_ip: &str, seconds: u32) -> Result<(f64, f64)> {
    let mut fabric = vec![];
    let mut underlay = vec![];
    for _ in 0..3 {
        fabric.push(iperf(c1, ip2, seconds)?);
        underlay.push(iperf(h1, host_ip, seconds)?);
    }
    Ok((median(&mut fabric), median(&mut underlay)))
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
