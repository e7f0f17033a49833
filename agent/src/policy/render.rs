//! A policy plan as iptables rules, in the exact form `iptables-save` prints (so a verification
//! compares text and finds nothing to do when nothing changed). Pure.
//!
//! - `WEFT-TO-WL` / `WEFT-FROM-WL` dispatch to the chain of each profile (the policies that
//!   select some local endpoints in that direction, in order) by its set of (address, veth)
//!   pairs: the destination and outgoing veth, or the source and incoming veth. An endpoint no
//!   policy selects is in no set and falls through (everything allowed). An endpoint joins a
//!   profile that exists by joining its set: no rule is written for it.
//! - `WEFT-TW-<hash>` / `WEFT-FW-<hash>` clear the allow mark, jump to each of the profile's
//!   policy chains in order and return as soon as one allowed; what none allowed is dropped.
//! - `WEFT-PI-<hash>` / `WEFT-PO-<hash>` hold a policy's rules once per host: an `allow` sets the
//!   mark and returns, a `deny` drops; the first rule that matches decides.

use weft_etcd::policy::{Action, PortRange, RuleProtocol};

use super::plan::{Direction, MatchRule, PolicyChain, PolicyPlan, ProfileChain, SideMatch};
use crate::firewall::chains::{Chains, OwnedChain, DISPATCH_CHAINS};

/// The packet mark bit that says "a policy allowed this packet" inside our chains.
pub const ALLOW_MARK: u32 = 0x20000;
/// Dispatch chain of traffic to workloads (ingress policy).
pub const TO_WORKLOADS: &str = DISPATCH_CHAINS[0];
/// Dispatch chain of traffic from workloads (egress policy).
pub const FROM_WORKLOADS: &str = DISPATCH_CHAINS[1];
/// Most port entries one multiport match takes (a range counts twice).
const MULTIPORT_MAX: usize = 15;

fn comment(text: impl std::fmt::Display) -> String {
    // Policy names and container ids are [A-Za-z0-9_.-]: nothing to quote.
    format!("-m comment --comment \"weft: {text}\"")
}

fn marked_return(chain: &str) -> String {
    format!("-A {chain} -m mark --mark {ALLOW_MARK:#x}/{ALLOW_MARK:#x} -j RETURN")
}

/// Every chain policy owns, rendered. The dispatch chains always exist (our FORWARD chain
/// jumps to them), empty when no policy selects a local endpoint.
pub fn render(plan: &PolicyPlan) -> Chains {
    let mut chains = Chains::new();
    for name in [TO_WORKLOADS, FROM_WORKLOADS] {
        chains.insert(name.to_string(), OwnedChain::default());
    }
    for profile in &plan.profiles {
        let (dispatch, side) = match profile.direction {
            Direction::Ingress => (TO_WORKLOADS, "dst,dst"),
            Direction::Egress => (FROM_WORKLOADS, "src,src"),
        };
        let rule = format!(
            "-A {dispatch} -m set --match-set {} {side} -j {}",
            profile.set, profile.chain
        );
        chains.get_mut(dispatch).expect("declared").rules.push(rule);
        chains.insert(
            profile.chain.clone(),
            OwnedChain {
                ordered: true,
                rules: profile_rules(profile),
            },
        );
    }
    for policy in &plan.policies {
        chains.insert(
            policy.chain.clone(),
            OwnedChain {
                ordered: true,
                rules: policy_rules(policy),
            },
        );
    }
    chains
}

fn profile_rules(e: &ProfileChain) -> Vec<String> {
    let chain = &e.chain;
    let direction = e.direction.as_str();
    let mut rules = vec![format!(
        "-A {chain} {} -j MARK --set-xmark 0x0/{ALLOW_MARK:#x}",
        comment(format_args!("{direction} policy"))
    )];
    for (name, policy_chain) in &e.policies {
        rules.push(format!(
            "-A {chain} {} -j {policy_chain}",
            comment(format_args!("policy {name}"))
        ));
        rules.push(marked_return(chain));
    }
    rules.push(format!(
        "-A {chain} {} -j DROP",
        comment(format_args!("no {direction} policy allowed it"))
    ));
    rules
}

fn policy_rules(p: &PolicyChain) -> Vec<String> {
    let mut rules = vec![];
    for rule in &p.rules {
        let note = comment(format_args!(
            "policy {} {} {}",
            p.policy,
            p.direction.as_str(),
            rule.index
        ));
        let target = match rule.action {
            Action::Allow => format!("-j MARK --set-xmark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}"),
            Action::Deny => "-j DROP".to_string(),
        };
        for matches in rule_matches(rule) {
            rules.push(format!("-A {} {matches}{note} {target}", p.chain));
        }
        if rule.action == Action::Allow {
            rules.push(marked_return(&p.chain));
        }
    }
    rules
}

/// The match part of each iptables rule one policy rule becomes (more than one when its ports
/// do not fit one multiport match), each ending in a space.
fn rule_matches(rule: &MatchRule) -> Vec<String> {
    let mut head = String::new();
    match rule.protocol {
        // What ip6tables-save prints for ICMPv6 (only IPv6 plans hold such rules).
        Some(RuleProtocol::Icmpv6) => head.push_str("-p ipv6-icmp "),
        Some(protocol) => head.push_str(&format!("-p {protocol} ")),
        None => {}
    }
    for (side, dir) in [(&rule.source, "src"), (&rule.destination, "dst")] {
        head.push_str(&sets(side, dir));
    }
    let mut out = vec![];
    for dports in port_chunks(&rule.destination.ports, "--dports") {
        for sports in port_chunks(&rule.source.ports, "--sports") {
            out.push(format!("{head}{dports}{sports}"));
        }
    }
    out
}

fn sets(side: &SideMatch, dir: &str) -> String {
    [&side.selector_set, &side.nets_set]
        .into_iter()
        .flatten()
        .map(|set| format!("-m set --match-set {set} {dir} "))
        .collect()
}

/// Multiport matches for a port list (one empty string when there are no ports).
fn port_chunks(ports: &[PortRange], flag: &str) -> Vec<String> {
    if ports.is_empty() {
        return vec![String::new()];
    }
    let mut chunks: Vec<Vec<String>> = vec![vec![]];
    let mut used = 0;
    for port in ports {
        let cost = if port.lo == port.hi { 1 } else { 2 };
        if used + cost > MULTIPORT_MAX {
            chunks.push(vec![]);
            used = 0;
        }
        used += cost;
        chunks.last_mut().expect("one chunk").push(port.to_string());
    }
    chunks
        .into_iter()
        .map(|c| format!("-m multiport {flag} {} ", c.join(",")))
        .collect()
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
