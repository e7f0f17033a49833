//! The invariant checker's part for network policy: on a quiet lab, each host's kernel holds
//! exactly what etcd's policies and endpoints ask of it.
//!
//! Both families are planned (as the agent plans them) and checked in their own tables: the
//! IPv4 chains in iptables, the IPv6 ones in ip6tables where an IPv6 pool exists; the address
//! sets of both families (`weft-s-`, `weft-6s-`, …) in the one `ipset` list.
//!
//! - chains ↔ policies: the chains policy owns (`WEFT-TO-WL`, `WEFT-FROM-WL`, the profiles'
//!   `WEFT-TW-*` and `WEFT-FW-*`, `WEFT-PI-*`, `WEFT-PO-*`) are exactly those the policies and
//!   this host's endpoints (with their labels) call for, rule for rule, and our FORWARD chain
//!   dispatches to them after accepting established connections;
//! - sets ↔ selectors ↔ endpoints: every `weft-` address set is one a rule of an enforced policy
//!   names, holding exactly the addresses of the endpoints (of every host) its selector
//!   matches, or the rule's networks; or a profile's, holding exactly the (address, veth) pairs
//!   of this host's endpoints in that profile; no other `weft-` set exists.
//!
//! What "call for" means is the planner's (`weft_agent::policy::plan`, a pure function of
//! records), fed from etcd here, not from the agent.

use std::collections::{BTreeMap, BTreeSet};

use weft_agent::firewall::chains::{as_held, parse_owned};
use weft_agent::policy::plan::{plan, Family, PolicyPlan, SetSpec};
use weft_agent::policy::render::render;
use weft_etcd::policy::{policy_from_value, Policy};
use weft_etcd::records::EndpointRecord;

use super::{HostKernel, HostView, Snapshot, Violation, ETCD_PREFIX};

/// Policies and endpoint records as stored, parsed with the agent's own rules.
struct Stored {
    policies: Vec<Policy>,
    endpoints: Vec<EndpointRecord>,
}

fn stored(s: &Snapshot, v: &mut Vec<Violation>) -> Stored {
    let mut out = Stored {
        policies: vec![],
        endpoints: vec![],
    };
    for (key, value) in &s.etcd {
        let Some(rest) = key.strip_prefix(ETCD_PREFIX) else {
            continue;
        };
        if let Some(name) = rest.strip_prefix("policies/") {
            let parsed = serde_json::from_str(value)
                .map_err(|e| e.to_string())
                .and_then(|doc| policy_from_value(&doc, "").map_err(|e| e.to_string()));
            match parsed {
                Ok(p) if p.name == name => out.policies.push(p),
                Ok(p) => v.push(Violation::new(
                    "cluster",
                    format!("etcd {rest}"),
                    format!("policy {name}"),
                    format!("policy {}", p.name),
                )),
                Err(e) => v.push(Violation::new(
                    "cluster",
                    format!("etcd {rest}"),
                    "a valid policy",
                    e,
                )),
            }
        } else if rest.starts_with("endpoints/") {
            // Malformed endpoint records are the main checker's to report.
            if let Ok(record) = serde_json::from_str::<EndpointRecord>(value) {
                out.endpoints.push(record);
            }
        }
    }
    out
}

/// Checks every host whose kernel could be read.
pub fn check(s: &Snapshot, v: &mut Vec<Violation>) {
    let stored = stored(s, v);
    let ipv6 = s.records.has_family(super::Family::V6);
    for host in &s.hosts {
        if let Ok(kernel) = &host.kernel {
            check_host(&stored, host, kernel, ipv6, v);
        }
    }
}

/// The tool and filter table of a family.
fn filter_of(k: &HostKernel, family: Family) -> (&'static str, &str) {
    match family {
        Family::V4 => ("iptables", &k.filter),
        Family::V6 => ("ip6tables", &k.filter6),
    }
}

/// Both families' plans from one reading (as the agent plans them); the IPv6 chains are checked
/// only where an IPv6 pool exists (elsewhere the agent writes no ip6tables chain), the sets of
/// both families always (set names carry their family).
fn check_host(
    stored: &Stored,
    host: &HostView,
    k: &HostKernel,
    ipv6: bool,
    v: &mut Vec<Violation>,
) {
    let name = &host.name;
    let policies: Vec<&Policy> = stored.policies.iter().collect();
    let fabric: Vec<&EndpointRecord> = stored.endpoints.iter().collect();
    let local: Vec<&EndpointRecord> = fabric.iter().copied().filter(|e| e.host == *name).collect();
    let mut sets = BTreeMap::new();
    for family in [Family::V4, Family::V6] {
        let wanted = plan(family, &policies, &fabric, &local);
        if family == Family::V4 || ipv6 {
            check_chains(name, k, family, &wanted, v);
        }
        sets.extend(wanted.sets);
    }
    check_sets(name, k, &sets, v);
}

/// Chains ↔ policies, in the family's filter table, and the dispatch order of our FORWARD.
fn check_chains(
    name: &str,
    k: &HostKernel,
    family: Family,
    wanted: &PolicyPlan,
    v: &mut Vec<Violation>,
) {
    let (tool, filter) = filter_of(k, family);
    let held = parse_owned(filter);
    let want = as_held(&render(wanted));
    for (chain, rules) in &want {
        match held.get(chain) {
            None => v.push(Violation::new(
                name,
                format!("{tool} filter {chain}"),
                "a chain of network policy",
                "none",
            )),
            Some(found) => {
                let ordered = !chain.ends_with("-WL");
                let same = match ordered {
                    true => found == rules,
                    false => {
                        found.iter().collect::<BTreeSet<_>>()
                            == rules.iter().collect::<BTreeSet<_>>()
                            && found.len() == rules.len()
                    }
                };
                if !same {
                    v.push(Violation::new(
                        name,
                        format!("{tool} filter {chain}"),
                        format!("{} rules: {}", rules.len(), rules.join(" | ")),
                        format!("{} rules: {}", found.len(), found.join(" | ")),
                    ));
                }
            }
        }
    }
    for chain in held.keys().filter(|c| !want.contains_key(*c)) {
        v.push(Violation::new(
            name,
            format!("{tool} filter {chain}"),
            "no policy chain that no policy explains",
            "a chain",
        ));
    }
    let forward: Vec<&str> = filter
        .lines()
        .filter(|l| l.starts_with("-A WEFT-FORWARD "))
        .collect();
    let position = |needle: &str| forward.iter().position(|l| l.contains(needle));
    let (established, dispatch, accept) = (
        position("--ctstate RELATED,ESTABLISHED"),
        position("-j WEFT-TO-WL"),
        position("-o weft+ -m comment --comment \"weft: to containers\" -j ACCEPT"),
    );
    if !matches!((established, dispatch, accept), (Some(a), Some(b), Some(c)) if a < b && b < c) {
        v.push(Violation::new(
            name,
            format!("{tool} filter WEFT-FORWARD"),
            "established accepted, then policy dispatch, then the accepts",
            format!("{established:?}, {dispatch:?}, {accept:?}"),
        ));
    }
    check_drops_first(name, tool, filter, v);
}

/// Sets ↔ selectors ↔ endpoints: every planned set (of either family) holds exactly its
/// members, and no other `weft-` set exists.
fn check_sets(
    name: &str,
    k: &HostKernel,
    wanted: &BTreeMap<String, SetSpec>,
    v: &mut Vec<Violation>,
) {
    let sets = parse_sets(&k.ipsets);
    for (set, spec) in wanted {
        let members: BTreeSet<String> = spec.members.iter().map(|m| m.to_string()).collect();
        match sets.get(set) {
            None => v.push(Violation::new(
                name,
                format!("ipset {set}"),
                format!("a set of {} members", members.len()),
                "none",
            )),
            Some(found) if *found != members => v.push(Violation::new(
                name,
                format!("ipset {set}"),
                format!("{members:?}"),
                format!("{found:?}"),
            )),
            Some(_) => {}
        }
    }
    for set in sets.keys().filter(|s| !wanted.contains_key(*s)) {
        v.push(Violation::new(
            name,
            format!("ipset {set}"),
            "no weft- set that no enforced rule names",
            "a set",
        ));
    }
}

/// What policy allows never overrides our drops (protected services, VXLAN from containers):
/// in `WEFT-FORWARD` every DROP comes before the accept of established connections, in
/// `WEFT-INPUT` every DROP and the VXLAN check before the jump to egress policy.
pub(super) fn check_drops_first(name: &str, tool: &str, filter: &str, v: &mut Vec<Violation>) {
    let orders = [
        ("WEFT-FORWARD", "--ctstate RELATED,ESTABLISHED"),
        ("WEFT-INPUT", "-j WEFT-FROM-WL"),
    ];
    for (chain, policy) in orders {
        let prefix = format!("-A {chain} ");
        let lines: Vec<&str> = filter.lines().filter(|l| l.starts_with(&prefix)).collect();
        let Some(first_policy) = lines.iter().position(|l| l.contains(policy)) else {
            v.push(Violation::new(
                name,
                format!("{tool} filter {chain}"),
                format!("a rule with {policy}"),
                "none",
            ));
            continue;
        };
        let late = lines[first_policy..]
            .iter()
            .filter(|l| l.ends_with("-j DROP") || l.ends_with("-j WEFT-VXLAN"))
            .count();
        if late > 0 {
            v.push(Violation::new(
                name,
                format!("{tool} filter {chain}"),
                "every drop before policy",
                format!("{late} after it"),
            ));
        }
    }
}

/// `weft-` sets of `ipset save` output with their members as printed.
fn parse_sets(save: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in save.lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["create", set, ..] if set.starts_with("weft-") => {
                sets.entry(set.to_string()).or_default();
            }
            ["add", set, member, ..] if set.starts_with("weft-") => {
                sets.entry(set.to_string())
                    .or_default()
                    .insert(member.to_string());
            }
            _ => {}
        }
    }
    sets
}
