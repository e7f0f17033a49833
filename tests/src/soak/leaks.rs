//! What a finished soak must not leave: records, links, routes, rules, conntrack entries,
//! namespaces or processes of any container but the long-lived ones. Each check names what it
//! found.

use std::collections::BTreeSet;

use anyhow::Result;

use super::churn::PORT_BASE;
use crate::lab::Lab;
use crate::sh;

/// Every leak found, one sentence each; `lived` are the long-lived containers' ids.
pub fn find(lab: &Lab, lived: &BTreeSet<String>) -> Result<Vec<String>> {
    let mut leaks = etcd(lab, lived)?;
    for (i, host) in lab.hosts.iter().enumerate() {
        let ns = host.name.as_str();
        let links = sh::run("ip", &["-n", ns, "-o", "link", "show"])?;
        let veths = links.lines().filter(|l| l.contains(": weft")).count();
        let lived_here = usize::from(lived.contains(&super::lived_id(i)));
        if veths != lived_here {
            leaks.push(format!("{ns}: {veths} weft veths, {lived_here} expected"));
        }
        let routes = sh::run("ip", &["-n", ns, "route", "show", "proto", "weft"])?;
        let host_routes = routes.lines().filter(|l| l.contains(" dev weft")).count();
        if host_routes != lived_here {
            leaks.push(format!(
                "{ns}: {host_routes} container routes, {lived_here} expected"
            ));
        }
        let nat = sh::run("ip", &["netns", "exec", ns, "iptables-save", "-t", "nat"])?;
        let dnat: Vec<&str> = nat.lines().filter(|l| l.contains("-j DNAT")).collect();
        if !dnat.is_empty() {
            leaks.push(format!("{ns}: DNAT rules left: {dnat:?}"));
        }
        leaks.extend(conntrack(ns)?);
        leaks.extend(children(lab, i));
    }
    let prefix = format!("weft-{}-", lab.prefix);
    let namespaces: Vec<String> = lab
        .container_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .filter(|n| !lived.iter().any(|id| n.ends_with(&format!("-{id}"))))
        .collect();
    if !namespaces.is_empty() {
        leaks.push(format!("container namespaces left: {namespaces:?}"));
    }
    Ok(leaks)
}

/// Endpoint and port records of anything but the long-lived containers.
fn etcd(lab: &Lab, lived: &BTreeSet<String>) -> Result<Vec<String>> {
    let keys = lab.etcd_keys()?;
    let mut leaks = vec![];
    for key in keys.keys() {
        let endpoint = key
            .split_once("/endpoints/")
            .and_then(|(_, rest)| rest.rsplit('/').next());
        if let Some(id) = endpoint {
            if !lived.contains(id) {
                leaks.push(format!("etcd: {key}"));
            }
        }
        if key.contains("/ports/") {
            leaks.push(format!("etcd: {key}"));
        }
    }
    let addresses = keys.keys().filter(|k| k.contains("/ips/")).count();
    if addresses != lived.len() {
        leaks.push(format!(
            "etcd: {addresses} address records, {} expected",
            lived.len()
        ));
    }
    Ok(leaks)
}

/// Conntrack entries of the churn's published ports (by the original direction's port).
fn conntrack(ns: &str) -> Result<Vec<String>> {
    let out = sh::in_ns(ns, &["conntrack", "-L"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let left: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("dport="))
                .and_then(|p| p.parse::<u16>().ok())
                .is_some_and(|p| p >= PORT_BASE)
        })
        .collect();
    Ok(match left.is_empty() {
        true => vec![],
        false => vec![format!(
            "{ns}: conntrack entries of published ports: {left:?}"
        )],
    })
}

/// Processes the agent of host `i` started and did not reap.
fn children(lab: &Lab, i: usize) -> Vec<String> {
    let Some(pid) = lab.agent_pid(i) else {
        return vec![format!("{}: no agent running", lab.hosts[i].name)];
    };
    let path = format!("/proc/{pid}/task/{pid}/children");
    let children = std::fs::read_to_string(path).unwrap_or_default();
    match children.split_whitespace().count() {
        0 => vec![],
        n => vec![format!(
            "{}: the agent has {n} child processes left: {children}",
            lab.hosts[i].name
        )],
    }
}
