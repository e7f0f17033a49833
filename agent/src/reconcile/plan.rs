//! What a reconciliation pass should do, decided from data alone: the routes this host should
//! hold and the difference to the kernel's, which endpoints lost their veth and what to do about
//! it, which links nobody claims, which peers have been down too long. Time comes in as an
//! argument, so every rule here is unit-tested without a clock or a kernel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use weft_etcd::records::EndpointRecord;
use weft_etcd::ClusterView;

use crate::model::{Route, RouteTarget};
use peers::PeerPath;

/// The routes this host should hold: a host route per local container whose veth exists, a
/// blackhole per local block, and each peer block the way its host is reached (`paths`; through
/// the tunnel only once the tunnel device exists, `tunnel` being its index).
pub fn desired_routes(
    me: &str,
    cluster: &ClusterView,
    endpoints: &[EndpointRecord],
    links: &BTreeMap<String, u32>,
    paths: &BTreeMap<String, PeerPath>,
    tunnel: Option<u32>,
) -> BTreeMap<IpNetwork, RouteTarget> {
    let mut desired: BTreeMap<IpNetwork, RouteTarget> = cluster
        .blocks
        .iter()
        .filter(|(_, owner)| owner.host != me)
        .filter_map(|(block, owner)| {
            let path = paths.get(&owner.host)?;
            if block.is_ipv6() {
                return Some((*block, ipv6_target(cluster, &owner.host, path, tunnel)?));
            }
            let target = match path {
                PeerPath::Direct { via } => RouteTarget::Via(*via),
                PeerPath::Tunnel { tunnel_ip, .. } => RouteTarget::Onlink {
                    via: *tunnel_ip,
                    dev: tunnel?,
                },
                PeerPath::Underlay | PeerPath::Unrouted => return None,
            };
            Some((*block, target))
        })
        .collect();
    for block in cluster.blocks_of(me) {
        desired.insert(block, RouteTarget::Blackhole);
    }
    for endpoint in endpoints {
        if let Some(index) = links.get(&endpoint.host_ifname) {
            for ip in endpoint.addresses() {
                let route = Route::host(ip, RouteTarget::Dev(*index));
                desired.insert(route.dst, route.target);
            }
        }
    }
    desired
}

/// How a peer's IPv6 block is reached: via the peer's IPv6 underlay address when the peer is
/// on this host's subnet (none if it has no IPv6 underlay address); through the tunnel, via
/// the link-local address of the peer's VTEP MAC (a permanent neighbour of the tunnel device),
/// when its IPv4 blocks go through the tunnel; otherwise left to the underlay's routing.
fn ipv6_target(
    cluster: &ClusterView,
    host: &str,
    path: &PeerPath,
    tunnel: Option<u32>,
) -> Option<RouteTarget> {
    match path {
        PeerPath::Direct { .. } => Some(RouteTarget::Via(cluster.hosts.get(host)?.underlay_ipv6?)),
        PeerPath::Tunnel { vtep, .. } => Some(RouteTarget::Onlink {
            via: std::net::IpAddr::V6(vtep.link_local()),
            dev: tunnel?,
        }),
        PeerPath::Underlay | PeerPath::Unrouted => None,
    }
}

/// What to do to bring the kernel to the desired set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Missing or pointing elsewhere: `ip route replace`.
    pub replace: Vec<Route>,
    /// Ours but unwanted (or duplicates): `ip route del`. Applied after `replace`, so a route
    /// that changes target never goes missing; deletes name the exact target, so they never hit
    /// the replacement.
    pub delete: Vec<Route>,
}

impl RouteDiff {
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.delete.is_empty()
    }
}

/// Compares desired routes (one target per destination) with the kernel's `proto weft` routes.
pub fn route_diff(desired: &BTreeMap<IpNetwork, RouteTarget>, actual: &[Route]) -> RouteDiff {
    let mut out = RouteDiff::default();
    let mut satisfied = HashSet::new();
    for route in actual {
        match desired.get(&route.dst) {
            Some(target) if *target == route.target && !satisfied.contains(&route.dst) => {
                satisfied.insert(route.dst);
            }
            // A blackhole and a unicast route to the same prefix can coexist in the kernel (they
            // differ in type), so a stale one must be deleted, not just replaced.
            _ => out.delete.push(*route),
        }
    }
    for (dst, target) in desired {
        if !satisfied.contains(dst) {
            out.replace.push(Route {
                dst: *dst,
                target: *target,
            });
        }
    }
    out
}

/// Endpoints whose veth is not in service, leaving out those with an attach or detach under way
/// (which make and remove veths themselves).
pub fn missing_veths<'e>(
    endpoints: &'e [EndpointRecord],
    links: &BTreeMap<String, u32>,
    busy: &HashSet<String>,
) -> Vec<&'e EndpointRecord> {
    endpoints
        .iter()
        .filter(|e| !links.contains_key(&e.host_ifname) && !busy.contains(&e.container_id))
        .collect()
}

/// Namespaces named as the agent names its own (`weft-<me>-<container id>`) that no endpoint
/// uses and no attach is making: left by an attach that was interrupted (the agent killed).
/// Names that belong to a host whose name extends ours (`weft-<me>-x-...` of host `<me>-x`,
/// when several agents share a machine) are not ours.
pub fn stray_namespaces(
    paths: &[String],
    me: &str,
    hosts: &[&String],
    used: &HashSet<String>,
    busy: &HashSet<String>,
) -> Vec<String> {
    let mine = format!("weft-{me}-");
    let longer: Vec<String> = hosts
        .iter()
        .filter(|h| h.len() > me.len() && h.starts_with(me))
        .map(|h| format!("weft-{h}-"))
        .collect();
    paths
        .iter()
        .filter(|path| !used.contains(*path))
        .filter(|path| {
            let name = path.rsplit('/').next().unwrap_or_default();
            let Some(id) = name.strip_prefix(&mine) else {
                return false;
            };
            !busy.contains(id) && !longer.iter().any(|p| name.starts_with(p))
        })
        .cloned()
        .collect()
}

/// What to do about endpoints without a veth, links without an endpoint and namespaces without
/// an endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LeakPlan {
    /// Their namespace is still there: the container lives; make its veth again.
    pub repair: Vec<String>,
    /// Their namespace is gone (seen on two passes): release the endpoint.
    pub release: Vec<String>,
    /// `weft*` links no endpoint claims, for longer than the grace period: remove them (unless
    /// they turn out to be a container's).
    pub orphans: Vec<String>,
    /// Namespaces of ours no endpoint uses, for longer than the grace period: delete them.
    pub namespaces: Vec<String>,
}

/// What one pass observed for the leak plan.
pub struct LeakInputs<'a> {
    /// Endpoints without a veth (from [`missing_veths`]), with whether their namespace opens.
    pub missing: &'a [(String, bool)],
    pub links: &'a BTreeMap<String, u32>,
    /// The veth names of every endpoint.
    pub claimed: &'a HashSet<String>,
    /// Namespaces of ours no endpoint uses (from [`stray_namespaces`]).
    pub stray_namespaces: &'a [String],
}

/// Observations that must repeat before they are acted on, kept from pass to pass.
#[derive(Debug, Default)]
pub struct LeakTracker {
    /// Endpoints seen without veth and namespace, with how many passes saw it so.
    gone: HashMap<String, u32>,
    /// `weft*` links with no endpoint behind them, since when.
    orphan_since: HashMap<String, Instant>,
    /// Namespaces of ours without an endpoint, since when.
    stray_since: HashMap<String, Instant>,
}

/// Keeps the first sighting of each current item; returns those seen for at least `grace`.
fn due(
    since: &mut HashMap<String, Instant>,
    current: &[&String],
    now: Instant,
    grace: Duration,
) -> Vec<String> {
    since.retain(|item, _| current.contains(&item));
    let mut due: Vec<String> = current
        .iter()
        .filter(|item| now.duration_since(*since.entry((**item).clone()).or_insert(now)) >= grace)
        .map(|item| (*item).clone())
        .collect();
    due.sort();
    due
}

impl LeakTracker {
    /// Plans one pass.
    pub fn plan(&mut self, inputs: &LeakInputs, now: Instant, grace: Duration) -> LeakPlan {
        let LeakInputs {
            missing,
            links,
            claimed,
            stray_namespaces,
        } = inputs;
        let mut plan = LeakPlan::default();
        let gone_now: HashSet<&String> = missing
            .iter()
            .filter(|(_, alive)| !alive)
            .map(|(id, _)| id)
            .collect();
        self.gone.retain(|id, _| gone_now.contains(id));
        for (id, namespace_alive) in missing.iter() {
            if *namespace_alive {
                plan.repair.push(id.clone());
                continue;
            }
            let seen = self.gone.entry(id.clone()).or_insert(0);
            *seen += 1;
            if *seen >= 2 {
                plan.release.push(id.clone());
            }
        }
        let unclaimed: Vec<&String> = links.keys().filter(|n| !claimed.contains(*n)).collect();
        plan.orphans = due(&mut self.orphan_since, &unclaimed, now, grace);
        let strays: Vec<&String> = stray_namespaces.iter().collect();
        plan.namespaces = due(&mut self.stray_since, &strays, now, grace);
        plan
    }

    /// Forgets what was acted on.
    pub fn done(&mut self, plan: &LeakPlan) {
        for id in &plan.release {
            self.gone.remove(id);
        }
        for name in &plan.orphans {
            self.orphan_since.remove(name);
        }
        for path in &plan.namespaces {
            self.stray_since.remove(path);
        }
    }
}

/// Peers seen down, since when, for the optional automatic removal.
#[derive(Debug, Default)]
pub struct DeadHostTracker {
    down_since: HashMap<String, Instant>,
}

impl DeadHostTracker {
    /// The peers that have been down for at least `after`.
    pub fn plan(
        &mut self,
        cluster: &ClusterView,
        me: &str,
        now: Instant,
        after: Duration,
    ) -> Vec<String> {
        self.down_since
            .retain(|host, _| cluster.hosts.contains_key(host) && !cluster.alive.contains(host));
        for host in cluster.hosts.keys() {
            if host != me && !cluster.alive.contains(host) {
                self.down_since.entry(host.clone()).or_insert(now);
            }
        }
        let mut doomed: Vec<String> = self
            .down_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= after)
            .map(|(host, _)| host.clone())
            .collect();
        doomed.sort();
        doomed
    }

    pub fn removed(&mut self, host: &str) {
        self.down_since.remove(host);
    }
}

pub mod peers;
pub mod registration;

#[cfg(test)]
mod tests;
