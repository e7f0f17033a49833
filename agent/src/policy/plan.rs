//! What policy wants of this host's firewall, decided from data alone: for each local endpoint
//! and direction, the policies that select it (ascending `order`, ties by name) — its profile,
//! one chain and one set of (address, veth) pairs shared by every local endpoint with the same
//! list; for each such policy, its rules once; for each selector or list of networks those
//! rules name, an address set and its members, taken from every endpoint of the fabric. Pure: the same inputs give the
//! same plan, and nothing here touches the kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use weft_etcd::names::stable_hash;
use weft_etcd::policy::{Action, Peer, Policy, PortRange, Rule, RuleProtocol, Selector};
use weft_etcd::records::EndpointRecord;

use super::member::Member;

type Labels = BTreeMap<String, String>;

/// An address family. Sets and rules are planned per family, and enforced by iptables and
/// ip6tables each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }

    /// `inet` or `inet6`, as ipset names them.
    pub fn ipset(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    fn holds(self, net: &IpNetwork) -> bool {
        Family::of(&net.ip()) == self
    }

    /// The endpoint's address of this family, if it has one (a dual-stack endpoint has both).
    pub fn address(self, endpoint: &EndpointRecord) -> Option<IpAddr> {
        endpoint.addresses().find(|ip| Family::of(ip) == self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic to the endpoint (enforced on its host).
    Ingress,
    /// Traffic from the endpoint.
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    fn rules(self, policy: &Policy) -> Option<&Vec<Rule>> {
        match self {
            Direction::Ingress => policy.ingress.as_ref(),
            Direction::Egress => policy.egress.as_ref(),
        }
    }
}

/// What an address set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// The addresses of the endpoints a selector matches (`hash:ip`), anywhere in the fabric.
    Selector,
    /// A rule's networks (`hash:net`).
    Nets,
    /// The local endpoints of one profile, each address with its veth (`hash:net,iface`):
    /// traffic is dispatched to the profile's chain by it.
    Profile,
}

/// One address set: its kind, family and members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub kind: SetKind,
    pub family: Family,
    pub members: BTreeSet<Member>,
}

#[cfg(test)]
impl SetSpec {
    /// An IPv4 profile set of these members (as `ipset save` prints them), for tests.
    pub fn v4_profile(members: &[&str]) -> Self {
        Self {
            kind: SetKind::Profile,
            family: Family::V4,
            members: members.iter().map(|m| m.parse().unwrap()).collect(),
        }
    }
}

/// The address set of a selector: named by a hash of its canonical text, so every host names it
/// alike and two policies that use one selector share its set.
pub fn selector_set_name(family: Family, selector: &Selector) -> String {
    let hash = stable_hash(&["selector", &selector.to_string()]);
    format!("weft-{}s-{hash:016x}", family.digit())
}

fn nets_set_name(family: Family, nets: &[IpNetwork]) -> String {
    let texts: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    format!("weft-{}n-{:016x}", family.digit(), stable_hash(&refs))
}

/// A policy's chain for one direction: `WEFT-PI-`/`WEFT-PO-` and a hash of its name.
pub fn policy_chain(direction: Direction, policy: &str) -> String {
    let letter = match direction {
        Direction::Ingress => 'I',
        Direction::Egress => 'O',
    };
    format!("WEFT-P{letter}-{:016x}", stable_hash(&["policy", policy]))
}

/// A profile: the policies that apply in one direction, in apply order. Every local endpoint
/// they apply to shares its chain and set, so an endpoint joins a profile by joining its set.
fn profile_hash(direction: Direction, policies: &[&Policy]) -> u64 {
    let mut parts = vec!["profile", direction.as_str()];
    parts.extend(policies.iter().map(|p| p.name.as_str()));
    stable_hash(&parts)
}

/// A profile's chain: to the workloads (`WEFT-TW-<hash>`) or from them (`WEFT-FW-<hash>`); the
/// same name in both families.
fn profile_chain(direction: Direction, hash: u64) -> String {
    match direction {
        Direction::Ingress => format!("WEFT-TW-{hash:016x}"),
        Direction::Egress => format!("WEFT-FW-{hash:016x}"),
    }
}

/// A profile's set of (address, veth) pairs: `weft-4t-…`/`weft-4f-…` (to/from the workloads).
fn profile_set(family: Family, direction: Direction, hash: u64) -> String {
    let letter = match direction {
        Direction::Ingress => 't',
        Direction::Egress => 'f',
    };
    format!("weft-{}{letter}-{hash:016x}", family.digit())
}

/// What puts an endpoint in a profile's set: its address of the family on its veth; for egress
/// also the unspecified address (`0.0.0.0`, `::`) on its veth — such packets pass reverse-path
/// checks to reach its host, and must meet its policy too — and over IPv6 the link-local
/// network on its veth (what it sends its host from a link-local address).
pub fn profile_members(
    family: Family,
    direction: Direction,
    endpoint: &EndpointRecord,
) -> Vec<Member> {
    let veth = &endpoint.host_ifname;
    let Some(ip) = family.address(endpoint) else {
        return vec![];
    };
    let mut members = vec![Member::on(IpNetwork::from(ip), veth)];
    if direction == Direction::Egress {
        let (unspecified, link_local): (IpAddr, _) = match family {
            Family::V4 => (std::net::Ipv4Addr::UNSPECIFIED.into(), None),
            Family::V6 => (
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                IpNetwork::new("fe80::".parse().expect("address"), 10).ok(),
            ),
        };
        members.push(Member::on(IpNetwork::from(unspecified), veth));
        members.extend(link_local.map(|net| Member::on(net, veth)));
    }
    members
}

/// How one side of a rule is matched in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SideMatch {
    /// The selector's address set.
    pub selector_set: Option<String>,
    /// The networks' address set; None when the rule gives no networks, or one of them is the
    /// whole family (`0.0.0.0/0`: any address).
    pub nets_set: Option<String>,
    pub ports: Vec<PortRange>,
}

/// One rule of a policy, as this family enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchRule {
    /// Its place in the policy's list (for the comment that names it).
    pub index: usize,
    pub action: Action,
    pub protocol: Option<RuleProtocol>,
    pub source: SideMatch,
    pub destination: SideMatch,
}

/// A policy's rules for one direction, rendered once per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChain {
    pub chain: String,
    pub policy: String,
    pub direction: Direction,
    pub rules: Vec<MatchRule>,
}

/// The policies that apply to some local endpoints in one direction, in the order they apply:
/// one chain, and one set of the endpoints' (address, veth) pairs that dispatches to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileChain {
    pub chain: String,
    pub set: String,
    pub direction: Direction,
    /// (policy name, policy chain), in apply order.
    pub policies: Vec<(String, String)>,
}

impl ProfileChain {
    fn of(family: Family, direction: Direction, selecting: &[&Policy]) -> Self {
        let hash = profile_hash(direction, selecting);
        Self {
            chain: profile_chain(direction, hash),
            set: profile_set(family, direction, hash),
            direction,
            policies: selecting
                .iter()
                .map(|p| (p.name.clone(), policy_chain(direction, &p.name)))
                .collect(),
        }
    }
}

/// Everything policy wants of this host, for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    /// The profiles of this host's endpoints, in chain-name order.
    pub profiles: Vec<ProfileChain>,
    pub policies: Vec<PolicyChain>,
    pub sets: BTreeMap<String, SetSpec>,
    /// The selector of each selector set (by set name): what an endpoint change is checked
    /// against to move set members without planning again.
    pub selectors: BTreeMap<String, Selector>,
}

/// The profiles one local endpoint belongs to in one family (one per direction some policy
/// selects it in), each with the members that put it there, as [`plan`] makes them: what an
/// attach adds to the sets in place when those profiles already exist here.
pub fn endpoint_plan(
    family: Family,
    policies: &[&Policy],
    endpoint: &EndpointRecord,
) -> Vec<(ProfileChain, Vec<Member>)> {
    if family.address(endpoint).is_none() {
        return vec![];
    }
    let mut ordered: Vec<&Policy> = policies.to_vec();
    ordered.sort_by(|a, b| a.apply_order(b));
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .filter_map(|direction| {
            let selecting = selecting(&ordered, direction, &endpoint.labels);
            (!selecting.is_empty()).then(|| {
                (
                    ProfileChain::of(family, direction, &selecting),
                    profile_members(family, direction, endpoint),
                )
            })
        })
        .collect()
}

/// The policies (of `ordered`, in apply order) that select these labels for `direction`.
fn selecting<'a>(ordered: &[&'a Policy], direction: Direction, labels: &Labels) -> Vec<&'a Policy> {
    ordered
        .iter()
        .filter(|p| direction.rules(p).is_some() && p.selector.matches(labels))
        .copied()
        .collect()
}

/// Plans one family. `fabric` is every endpoint of every host (this host's included), `local`
/// the endpoints of this host.
pub fn plan(
    family: Family,
    policies: &[&Policy],
    fabric: &[&EndpointRecord],
    local: &[&EndpointRecord],
) -> PolicyPlan {
    let mut ordered: Vec<&Policy> = policies.to_vec();
    ordered.sort_by(|a, b| a.apply_order(b));
    let mut out = PolicyPlan::default();
    let mut used: BTreeSet<(Direction, &str)> = BTreeSet::new();
    // Endpoints share label sets (replicas): each selector is evaluated once per distinct set.
    let mut selecting_by_labels: HashMap<(Direction, &Labels), Vec<&Policy>> = HashMap::new();
    let mut profiles: BTreeMap<String, ProfileChain> = BTreeMap::new();
    let mut profile_sets: BTreeMap<String, SetSpec> = BTreeMap::new();
    for endpoint in local.iter().filter(|e| family.address(e).is_some()) {
        for direction in [Direction::Ingress, Direction::Egress] {
            let selecting = selecting_by_labels
                .entry((direction, &endpoint.labels))
                .or_insert_with(|| selecting(&ordered, direction, &endpoint.labels));
            if selecting.is_empty() {
                continue;
            }
            used.extend(selecting.iter().map(|p| (direction, p.name.as_str())));
            let profile = ProfileChain::of(family, direction, selecting);
            profile_sets
                .entry(profile.set.clone())
                .or_insert_with(|| SetSpec {
                    kind: SetKind::Profile,
                    family,
                    members: BTreeSet::new(),
                })
                .members
                .extend(profile_members(family, direction, endpoint));
            profiles.entry(profile.chain.clone()).or_insert(profile);
        }
    }
    out.profiles = profiles.into_values().collect();
    let mut groups: HashMap<&Labels, Vec<IpNetwork>> = HashMap::new();
    for e in fabric {
        if let Some(ip) = family.address(e) {
            groups
                .entry(&e.labels)
                .or_default()
                .push(IpNetwork::from(ip));
        }
    }
    let mut sets = SetPlanner {
        family,
        groups: groups.into_iter().collect(),
        sets: BTreeMap::new(),
        selectors: BTreeMap::new(),
    };
    for policy in &ordered {
        for direction in [Direction::Ingress, Direction::Egress] {
            if !used.contains(&(direction, policy.name.as_str())) {
                continue;
            }
            let rules = direction.rules(policy).map(Vec::as_slice).unwrap_or(&[]);
            out.policies.push(PolicyChain {
                chain: policy_chain(direction, &policy.name),
                policy: policy.name.clone(),
                direction,
                rules: rules
                    .iter()
                    .enumerate()
                    .filter_map(|(index, rule)| sets.rule(index, rule))
                    .collect(),
            });
        }
    }
    out.sets = sets.sets;
    out.sets.extend(profile_sets);
    out.selectors = sets.selectors;
    out
}

struct SetPlanner<'a> {
    family: Family,
    /// The fabric's endpoints of this family, grouped by their labels.
    groups: Vec<(&'a Labels, Vec<IpNetwork>)>,
    sets: BTreeMap<String, SetSpec>,
    selectors: BTreeMap<String, Selector>,
}

impl SetPlanner<'_> {
    /// The rule in this family, or None when it can match nothing here (ICMPv6 in IPv4, or
    /// networks all of the other family).
    fn rule(&mut self, index: usize, rule: &Rule) -> Option<MatchRule> {
        let foreign = matches!(
            (self.family, rule.protocol),
            (Family::V4, Some(RuleProtocol::Icmpv6)) | (Family::V6, Some(RuleProtocol::Icmp))
        );
        if foreign {
            return None;
        }
        Some(MatchRule {
            index,
            action: rule.action,
            protocol: rule.protocol,
            source: self.side(&rule.source)?,
            destination: self.side(&rule.destination)?,
        })
    }

    fn side(&mut self, peer: &Peer) -> Option<SideMatch> {
        // Networks first: a side that matches nothing in this family makes no selector set.
        let nets_set = match peer.nets.is_empty() {
            true => None,
            false => {
                let nets: Vec<IpNetwork> = peer
                    .nets
                    .iter()
                    .filter(|n| self.family.holds(n))
                    .copied()
                    .collect();
                if nets.is_empty() {
                    // Only networks of the other family: this side matches nothing here.
                    return None;
                }
                match nets.iter().any(|n| n.prefix() == 0) {
                    true => None,
                    false => Some(self.nets_set(nets)),
                }
            }
        };
        let selector_set = peer.selector.as_ref().map(|s| self.selector_set(s));
        Some(SideMatch {
            selector_set,
            nets_set,
            ports: peer.ports.clone(),
        })
    }

    fn selector_set(&mut self, selector: &Selector) -> String {
        let name = selector_set_name(self.family, selector);
        if !self.sets.contains_key(&name) {
            let members = self
                .groups
                .iter()
                .filter(|(labels, _)| selector.matches(labels))
                .flat_map(|(_, ips)| ips.iter().map(|ip| Member::from(*ip)))
                .collect();
            self.sets.insert(
                name.clone(),
                SetSpec {
                    kind: SetKind::Selector,
                    family: self.family,
                    members,
                },
            );
            self.selectors.insert(name.clone(), selector.clone());
        }
        name
    }

    fn nets_set(&mut self, nets: Vec<IpNetwork>) -> String {
        let name = nets_set_name(self.family, &nets);
        self.sets.entry(name.clone()).or_insert_with(|| SetSpec {
            kind: SetKind::Nets,
            family: self.family,
            members: nets.into_iter().map(Member::from).collect(),
        });
        name
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
