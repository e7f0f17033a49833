//! Network policy in a lab: applying and deleting policies with weftctl (run on the first
//! host, where etcd is reachable), labelled attaches, and reading what each host's kernel holds
//! of policy (its owned chains and its `weft-` address sets).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;

use anyhow::{bail, Result};
use serde_json::Value;

use std::time::{Duration, Instant};

use super::{bin, Lab};
use crate::probe::{self, Probe};
use crate::sh;

/// Runs `weftctl ARGS --etcd-endpoints …` inside the first host's namespace.
pub fn weftctl_etcd(lab: &Lab, args: &[&str]) -> Result<Output> {
    let weftctl = bin("weftctl");
    let etcd = lab.etcd_client_args();
    let mut all = vec![weftctl.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(etcd.iter().map(String::as_str));
    sh::in_ns(&lab.hosts[0].name, &all)
}

/// Applies a policy document (one policy or a list) with `weftctl policy apply -f`.
pub fn apply(lab: &Lab, doc: &Value) -> Result<()> {
    let out = apply_text(lab, &doc.to_string(), "json")?;
    if !out.status.success() {
        bail!(
            "weftctl policy apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `weftctl policy apply` on a file holding `text`.
pub fn apply_text(lab: &Lab, text: &str, extension: &str) -> Result<Output> {
    let path = lab
        .dir
        .join(format!("policy-{}.{extension}", rand::random::<u32>()));
    std::fs::write(&path, text)?;
    let out = weftctl_etcd(lab, &["policy", "apply", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    out
}

pub fn delete(lab: &Lab, name: &str) -> Result<()> {
    let out = weftctl_etcd(lab, &["policy", "delete", name])?;
    if !out.status.success() {
        bail!(
            "weftctl policy delete {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Attaches (or re-attaches) a container with labels (`k=v`); returns (netns name, ip).
pub fn attach(
    lab: &Lab,
    host: usize,
    id: &str,
    labels: &[&str],
    extra: &[&str],
) -> Result<(String, String)> {
    let mut args = vec!["attach", id];
    for label in labels {
        args.extend(["--label", label]);
    }
    args.extend_from_slice(extra);
    let endpoint = lab.ctl_json(host, &args)?;
    let netns = endpoint["netns"].as_str().unwrap_or_default();
    Ok((
        netns.rsplit('/').next().unwrap_or_default().to_string(),
        endpoint["ip"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The `weft-` address sets of host `i` with their members.
pub fn sets(lab: &Lab, i: usize) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let save = sh::run_in(&lab.hosts[i].name, &["ipset", "save"])?;
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in save.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, ..] if name.starts_with("weft-") => {
                sets.entry(name.to_string()).or_default();
            }
            ["add", name, member, ..] if name.starts_with("weft-") => {
                sets.entry(name.to_string())
                    .or_default()
                    .insert(member.to_string());
            }
            _ => {}
        }
    }
    Ok(sets)
}

/// Whether `ip` is a member of some `weft-` set of host `i`.
pub fn in_some_set(lab: &Lab, i: usize, ip: &str) -> bool {
    sets(lab, i).is_ok_and(|s| s.values().any(|m| m.contains(ip)))
}

/// The chain of the profile that host `i` dispatches `veth`'s traffic to, by the profile sets
/// that hold the veth: `set_prefix` `weft-4t-`/`weft-6t-` (to the workload) or
/// `weft-4f-`/`weft-6f-` (from it). None while no such set holds it.
pub fn profile_chain(lab: &Lab, i: usize, veth: &str, set_prefix: &str) -> Option<String> {
    let suffix = format!(",{veth}");
    let sets = sets(lab, i).ok()?;
    let (name, _) = sets.iter().find(|(name, members)| {
        name.starts_with(set_prefix) && members.iter().any(|m| m.ends_with(&suffix))
    })?;
    let hash = name.strip_prefix(set_prefix)?;
    let letter = match set_prefix.ends_with("t-") {
        true => "TW",
        false => "FW",
    };
    Some(format!("WEFT-{letter}-{hash}"))
}

/// The filter table of host `i` without counters and comments of iptables-save: what a
/// comparison of rules and chains needs.
pub fn filter_rules(lab: &Lab, i: usize) -> Result<Vec<String>> {
    let save = sh::run_in(&lab.hosts[i].name, &["iptables-save", "-t", "filter"])?;
    Ok(save
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.starts_with(':') {
            // ":CHAIN POLICY [packets:bytes]": the counters change with traffic.
            true => l.rsplit_once(' ').map_or(l, |(head, _)| head).to_string(),
            false => l.to_string(),
        })
        .collect())
}

/// Lines of host `i`'s filter table that belong to network policy's chains.
pub fn policy_chain_lines(lab: &Lab, i: usize) -> Result<Vec<String>> {
    Ok(filter_rules(lab, i)?
        .into_iter()
        .filter(|l| {
            ["WEFT-TW-", "WEFT-FW-", "WEFT-PI-", "WEFT-PO-"]
                .iter()
                .any(|p| l.contains(p))
        })
        .collect())
}

/// Starts weft-echo on ports 80 and 5432 (TCP and UDP) in `ns`.
pub fn serve(lab: &mut Lab, ns: &str) {
    let echo = bin("weft-echo");
    for port in ["80", "5432"] {
        lab.spawn_in(ns, echo.to_str().unwrap(), &[port]).unwrap();
    }
}

/// Waits until `from` reaches (or stops reaching) `ip` with `probe`, up to 3 s; returns whether
/// it ended as wanted.
pub fn becomes(from: &str, ip: &str, probe: Probe, reached: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if probe::reach(from, ip, probe) == reached {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
