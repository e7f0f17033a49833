//! The invariant checker: on a quiet lab every source of truth must tell the same story.
//!
//! This module owns two things:
//! - reading a lab's whole state into a [`Snapshot`]: the etcd records, each agent's `List` and
//!   `Status` (through `weftctl --json`, so fields added later, such as `problems`, are read when
//!   present and taken as empty when not), each host's kernel (links, `proto weft` routes,
//!   sysctls, iptables) and every container namespace an endpoint names;
//! - the pure comparison [`check`], which names every disagreement as a [`Violation`] (scope,
//!   object, expected, found).
//!
//! [`wait_quiet`] re-checks for a bounded time until the lab converges, so that a state that is
//! merely in flight (a route being repaired, a lease being renewed) is not reported; what is
//! still wrong at the end is.
//!
//! What "agree" means is written down once, here: etcd `endpoints/<host>/*` = the agent's List =
//! the kernel (one `weft*` veth in service per endpoint, a `proto weft` host route per address
//! of the endpoint, a blackhole per local block, a `via` route per peer block and no other
//! `proto weft` route, the container side: interface up with its /32 and /128, per family the
//! gateway's permanent neighbour and the default route on eth0), the DNAT and hairpin rules of
//! each published port per family and nothing else in `WEFT-PORTS`, the guard keys (`ips/`,
//! `ports/`) one to one with the endpoints' addresses and ports, blocks owned by known hosts
//! inside their pools with at most one spare per host and pool, liveness keys exactly for
//! running agents, `weft-<host>-<id>` namespaces only for endpoints that own them, no address
//! twice, and each agent's Status matching etcd with no `problems`. Network policy's chains and
//! address sets are compared with etcd's policies and endpoint labels by `policy`.
//!
//! IPv6 is checked as IPv4 is, family by family: a family is expected wherever a pool of it
//! exists (its routes, sysctls, ip6tables tables and jumps, addresses and gateway in the
//! containers), and nothing of it where none does.
//!
//! `model` holds the compared data, `net` the prefixes of both families, `read` takes a
//! snapshot; the comparisons live with their subject: `cluster`, `agents`, `kernel` (links,
//! sysctls, routes), `rules` (the nat tables of both families and the IPv4 filter table),
//! `rules6` (the ip6tables raw and filter tables), `policy` (network policy's chains and sets)
//! and `containers`.

mod agents;
mod cluster;
mod containers;
#[cfg(test)]
mod fixture;
mod kernel;
mod model;
mod net;
mod policy;
mod read;
mod rules;
mod rules6;
#[cfg(test)]
mod tests;

use agents::*;
use cluster::*;
use containers::*;
use kernel::*;
pub use model::*;
pub use net::*;
use read::*;
pub use read::{in_netns, output_within, read_container, read_host_kernel, snapshot};
use rules::*;
pub use rules::{parse_dnat, rule_words};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::lab::{bin, list_netns, Lab};

/// The etcd prefix the lab's agents use.
pub const ETCD_PREFIX: &str = "/weft/v1/";
/// Link group of retired veths (0x7765) as `ip -j` prints it: they are being deleted and are not
/// in service, so no invariant looks at them.
const RETIRED_GROUP: &str = "30565";
const GATEWAY: &str = "169.254.1.1";
/// The containers' IPv6 gateway: the host end's link-local address.
const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";
const VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// How long one agent may take to answer List or Status before it counts as silent.
const API_LIMIT: Duration = Duration::from_secs(3);
/// How long one kernel read may take (a namespace being deleted can make `ip` wait).
const READ_LIMIT: Duration = Duration::from_secs(10);

/// One disagreement between sources of truth.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Violation {
    /// The lab host it concerns, or `cluster` for records that belong to no single host.
    pub scope: String,
    /// What is wrong, e.g. `route 10.65.1.2/32`, `etcd ips/10.65.1.2`, `WEFT-PORTS`.
    pub object: String,
    pub expected: String,
    pub found: String,
}

impl Violation {
    pub fn new(
        scope: impl Into<String>,
        object: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Self {
            scope: scope.into(),
            object: object.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {}: expected {}, found {}",
            self.scope, self.object, self.expected, self.found
        )
    }
}

/// What a clean check covered, so a caller can tell a vacuous pass from a real one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub hosts: usize,
    pub endpoints: usize,
    pub published_ports: usize,
    pub routes: usize,
    pub container_namespaces: usize,
}

impl Coverage {
    pub fn of(s: &Snapshot) -> Self {
        Coverage {
            hosts: s.hosts.len(),
            endpoints: s.records.endpoints.len(),
            published_ports: s.records.endpoints.values().map(|e| e.ports.len()).sum(),
            routes: s
                .hosts
                .iter()
                .filter_map(|h| h.kernel.as_ref().ok())
                .map(|k| k.routes.len())
                .sum(),
            container_namespaces: s.hosts.iter().map(|h| h.containers.len()).sum(),
        }
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} hosts, {} endpoints, {} published ports, {} routes, {} container namespaces",
            self.hosts,
            self.endpoints,
            self.published_ports,
            self.routes,
            self.container_namespaces
        )
    }
}

/// Compares every source of truth in the snapshot; returns every violation, sorted.
pub fn check(s: &Snapshot) -> Vec<Violation> {
    let mut v = s.records.malformed.clone();
    check_cluster(s, &mut v);
    for host in &s.hosts {
        check_agent(s, host, &mut v);
        if let Some(listed) = host.listed() {
            check_list(s, host, &listed, &mut v);
        }
        match &host.kernel {
            Ok(kernel) => {
                check_links_and_sysctls(s, host, kernel, &mut v);
                check_routes(s, host, kernel, &mut v);
                check_rules(s, host, kernel, &mut v);
            }
            Err(e) => v.push(Violation::new(
                &host.name,
                "kernel state",
                "readable",
                e.clone(),
            )),
        }
        check_containers(s, host, &mut v);
    }
    check_namespaces(s, &mut v);
    check_addresses_unique(s, &mut v);
    policy::check(s, &mut v);
    v.sort();
    v.dedup();
    v
}

/// Reads the lab once and checks it (no waiting: for a lab known to be still).
pub fn check_now(lab: &Lab) -> Result<Vec<Violation>> {
    Ok(check(&snapshot(lab)?))
}

/// A lab that converged: the snapshot that passed.
#[derive(Debug)]
pub struct Quiet {
    pub snapshot: Snapshot,
    pub coverage: Coverage,
    pub attempts: usize,
    pub took: Duration,
}

/// A lab that did not converge within the limit: what was still wrong at the end.
#[derive(Debug)]
pub struct Unquiet {
    pub violations: Vec<Violation>,
    /// The last snapshot (boxed: it is large, and errors travel by value).
    pub snapshot: Option<Box<Snapshot>>,
    pub attempts: usize,
    pub took: Duration,
}

impl fmt::Display for Unquiet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} violation(s) still present after {:.1}s ({} checks):",
            self.violations.len(),
            self.took.as_secs_f64(),
            self.attempts
        )?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unquiet {}

/// Re-checks until the lab shows no violation or `limit` passes.
pub fn wait_quiet(lab: &Lab, limit: Duration) -> Result<Quiet, Unquiet> {
    wait_quiet_with(lab, limit, |_| vec![])
}

/// Like [`wait_quiet`], with more invariants (`extra`) checked on each snapshot.
pub fn wait_quiet_with(
    lab: &Lab,
    limit: Duration,
    mut extra: impl FnMut(&Snapshot) -> Vec<Violation>,
) -> Result<Quiet, Unquiet> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (violations, snap) = match snapshot(lab) {
            Ok(snap) => {
                let mut violations = check(&snap);
                violations.extend(extra(&snap));
                violations.sort();
                violations.dedup();
                (violations, Some(snap))
            }
            Err(e) => (
                vec![Violation::new(
                    "lab",
                    "snapshot",
                    "a readable lab",
                    format!("{e:#}"),
                )],
                None,
            ),
        };
        if violations.is_empty() {
            let snapshot = snap.expect("a clean check had a snapshot");
            return Ok(Quiet {
                coverage: Coverage::of(&snapshot),
                snapshot,
                attempts,
                took: started.elapsed(),
            });
        }
        if started.elapsed() >= limit {
            return Err(Unquiet {
                violations,
                snapshot: snap.map(Box::new),
                attempts,
                took: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(400));
    }
}

/// Waits (up to 10 s) for the lab to be quiet and panics naming every violation otherwise.
/// Returns what the passing check covered.
pub fn assert_quiet(lab: &Lab) -> Coverage {
    match wait_quiet(lab, Duration::from_secs(10)) {
        Ok(quiet) => quiet.coverage,
        Err(unquiet) => panic!("the lab is not consistent: {unquiet}"),
    }
}
