//! Route reconciliation: the desired `proto weft` routes against what the kernel holds.

use std::collections::BTreeMap;

use ipnetwork::Ipv4Network;

use crate::dataplane::{KernelRoute, RouteTarget};

/// What to do to bring the kernel to the desired set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Missing or pointing elsewhere: `ip route replace`.
    pub replace: Vec<KernelRoute>,
    /// Ours but unwanted (or duplicates): `ip route del`. Applied after `replace`, so a route
    /// that changes target never goes missing; deletes name the exact target, so they never hit
    /// the replacement.
    pub delete: Vec<KernelRoute>,
}

impl RouteDiff {
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.delete.is_empty()
    }
}

/// Compares desired routes (one target per destination) with the kernel's `proto weft` routes.
pub fn diff(desired: &BTreeMap<Ipv4Network, RouteTarget>, actual: &[KernelRoute]) -> RouteDiff {
    let mut out = RouteDiff::default();
    let mut satisfied = BTreeMap::new();
    for route in actual {
        match desired.get(&route.dst) {
            Some(target) if *target == route.target && !satisfied.contains_key(&route.dst) => {
                satisfied.insert(route.dst, ());
            }
            // A blackhole and a unicast route to the same prefix can coexist in the kernel (they
            // differ in type), so a stale one must be deleted, not just replaced.
            _ => out.delete.push(*route),
        }
    }
    for (dst, target) in desired {
        if !satisfied.contains_key(dst) {
            out.replace.push(KernelRoute {
                dst: *dst,
                target: *target,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn route(dst: &str, target: RouteTarget) -> KernelRoute {
        KernelRoute {
            dst: net(dst),
            target,
        }
    }

    #[test]
    fn converged_state_needs_nothing() {
        let desired = BTreeMap::from([
            (net("10.65.0.0/26"), RouteTarget::Blackhole),
            (net("10.65.0.5/32"), RouteTarget::Dev(4)),
        ]);
        let actual = [
            route("10.65.0.5/32", RouteTarget::Dev(4)),
            route("10.65.0.0/26", RouteTarget::Blackhole),
        ];
        assert!(diff(&desired, &actual).is_empty());
    }

    #[test]
    fn missing_changed_stale_and_duplicate_routes() {
        let peer = RouteTarget::Via("198.51.100.2".parse().unwrap());
        let moved = RouteTarget::Via("198.51.100.3".parse().unwrap());
        let desired = BTreeMap::from([
            (net("10.65.0.64/26"), moved),
            (net("10.65.0.128/26"), peer),
            (net("10.65.0.5/32"), RouteTarget::Dev(4)),
        ]);
        let actual = [
            route("10.65.0.64/26", peer),
            route("10.65.0.5/32", RouteTarget::Dev(4)),
            route("10.65.0.5/32", RouteTarget::Dev(4)),
            route("10.65.1.0/26", RouteTarget::Blackhole),
        ];
        let d = diff(&desired, &actual);
        assert_eq!(
            d.replace,
            vec![route("10.65.0.64/26", moved), route("10.65.0.128/26", peer)]
        );
        assert_eq!(
            d.delete,
            vec![
                route("10.65.0.64/26", peer),
                route("10.65.0.5/32", RouteTarget::Dev(4)),
                route("10.65.1.0/26", RouteTarget::Blackhole),
            ]
        );
    }
}
