//! How each peer is reached: plain routes to peers on this host's subnet, the VXLAN tunnel to
//! the others (or to all, or to none, by the pool's encapsulation), and what the tunnel device
//! must then hold: one permanent neighbour and one permanent FDB entry per remote host. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use weft_etcd::records::{Encapsulation, HostRecord};

use crate::model::Mac;

/// How one peer's blocks are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// On this host's subnet: `via <underlay ip>`.
    Direct { via: IpAddr },
    /// Through the tunnel: `via <tunnel ip> dev weft.vxlan onlink`, with the peer's VTEP.
    Tunnel {
        underlay: IpAddr,
        tunnel_ip: IpAddr,
        vtep: Mac,
    },
    /// Off the subnet with encapsulation `none`: no route from weft, the underlay's routing
    /// carries it (with `--bgp`, because the routers learned every block).
    Underlay,
    /// To be reached through the tunnel, but the peer has not published its tunnel yet: no
    /// route until it does.
    Unrouted,
}

impl PeerPath {
    /// What `Status` and `weftctl status` call it.
    pub fn mode(&self) -> &'static str {
        match self {
            PeerPath::Direct { .. } => "direct",
            PeerPath::Tunnel { .. } => "vxlan",
            PeerPath::Underlay => "underlay",
            PeerPath::Unrouted => "unrouted",
        }
    }
}

/// The path to every peer. `subnet` is this host's underlay address with its prefix length.
pub fn peer_paths(
    me: &str,
    subnet: IpNetwork,
    encapsulation: Encapsulation,
    hosts: &BTreeMap<String, HostRecord>,
) -> BTreeMap<String, PeerPath> {
    hosts
        .iter()
        .filter(|(name, _)| name.as_str() != me)
        .map(|(name, host)| {
            let local = subnet.contains(host.underlay_ip);
            let tunnel = || match (host.tunnel_ip, host.vtep_mac.as_deref().map(str::parse)) {
                (Some(tunnel_ip), Some(Ok(vtep))) => PeerPath::Tunnel {
                    underlay: host.underlay_ip,
                    tunnel_ip,
                    vtep,
                },
                _ => PeerPath::Unrouted,
            };
            let path = match (encapsulation.tunnels(local), local) {
                (true, _) => tunnel(),
                (false, true) => PeerPath::Direct {
                    via: host.underlay_ip,
                },
                (false, false) => PeerPath::Underlay,
            };
            (name.clone(), path)
        })
        .collect()
}

/// Whether this host needs a tunnel address: some peer is (or will be, once it publishes its
/// own) reached through the tunnel.
pub fn needs_tunnel(
    me: &str,
    subnet: IpNetwork,
    encapsulation: Encapsulation,
    hosts: &BTreeMap<String, HostRecord>,
) -> bool {
    hosts
        .iter()
        .filter(|(name, _)| name.as_str() != me)
        .any(|(_, h)| encapsulation.tunnels(subnet.contains(h.underlay_ip)))
}

/// What the tunnel device must hold. On a host with an IPv6 pool, IPv6 crosses the tunnel too
/// (inner IPv6 in the IPv4 underlay's VXLAN): each remote host also gets a permanent neighbour
/// for the link-local address of its VTEP MAC, which its IPv6 blocks are routed via.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TunnelPlan {
    /// Whether any peer is reached through it (else it is removed).
    pub needed: bool,
    pub neighbours: BTreeSet<(IpAddr, Mac)>,
    pub fdb: BTreeSet<(Mac, IpAddr)>,
}

pub fn tunnel_plan(paths: &BTreeMap<String, PeerPath>, ipv6: bool) -> TunnelPlan {
    let mut plan = TunnelPlan::default();
    for path in paths.values() {
        if let PeerPath::Tunnel {
            underlay,
            tunnel_ip,
            vtep,
        } = path
        {
            plan.needed = true;
            plan.neighbours.insert((*tunnel_ip, *vtep));
            if ipv6 {
                plan.neighbours
                    .insert((IpAddr::V6(vtep.link_local()), *vtep));
            }
            plan.fdb.insert((*vtep, *underlay));
        }
    }
    plan
}

/// Entries to add and to delete to turn `actual` into `wanted`.
pub fn set_diff<T: Ord + Clone>(wanted: &BTreeSet<T>, actual: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    (
        wanted.difference(actual).cloned().collect(),
        actual.difference(wanted).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(ip: &str, tunnel: Option<(&str, &str)>) -> HostRecord {
        HostRecord {
            underlay_ip: ip.parse().unwrap(),
            version: "t".into(),
            first_seen: 0,
            underlay_prefix: Some(24),
            vtep_mac: tunnel.map(|(_, mac)| mac.to_string()),
            tunnel_ip: tunnel.map(|(ip, _)| ip.parse().unwrap()),
            underlay_ipv6: None,
        }
    }

    fn hosts() -> BTreeMap<String, HostRecord> {
        BTreeMap::from([
            (
                "a".to_string(),
                host("198.51.100.1", Some(("10.65.0.1", "02:00:00:00:00:0a"))),
            ),
            (
                "b".to_string(),
                host("198.51.100.2", Some(("10.65.1.1", "02:00:00:00:00:0b"))),
            ),
            (
                "c".to_string(),
                host("198.18.0.3", Some(("10.65.2.1", "02:00:00:00:00:0c"))),
            ),
            ("d".to_string(), host("198.18.0.4", None)),
        ])
    }

    fn tunnel(underlay: &str, ip: &str, mac: &str) -> PeerPath {
        PeerPath::Tunnel {
            underlay: underlay.parse().unwrap(),
            tunnel_ip: ip.parse().unwrap(),
            vtep: mac.parse().unwrap(),
        }
    }

    #[test]
    fn each_encapsulation_routes_peers_its_way() {
        let subnet: IpNetwork = "198.51.100.1/24".parse().unwrap();
        let direct_b = PeerPath::Direct {
            via: "198.51.100.2".parse().unwrap(),
        };
        let tunnel_b = tunnel("198.51.100.2", "10.65.1.1", "02:00:00:00:00:0b");
        let tunnel_c = tunnel("198.18.0.3", "10.65.2.1", "02:00:00:00:00:0c");
        let cross = peer_paths("a", subnet, Encapsulation::CrossSubnet, &hosts());
        assert_eq!(cross["b"], direct_b);
        assert_eq!(cross["c"], tunnel_c);
        assert_eq!(cross["d"], PeerPath::Unrouted, "no tunnel published yet");
        assert!(!cross.contains_key("a"));
        let always = peer_paths("a", subnet, Encapsulation::Vxlan, &hosts());
        assert_eq!(always["b"], tunnel_b);
        assert_eq!(always["c"], tunnel_c);
        let never = peer_paths("a", subnet, Encapsulation::None, &hosts());
        assert_eq!(never["b"], direct_b);
        assert_eq!(never["c"], PeerPath::Underlay);
        assert_eq!(never["c"].mode(), "underlay");
        assert_eq!(cross["d"].mode(), "unrouted");
    }

    #[test]
    fn a_tunnel_address_is_needed_only_when_a_peer_is_reached_through_it() {
        let subnet: IpNetwork = "198.51.100.1/24".parse().unwrap();
        let mut same: BTreeMap<String, HostRecord> = hosts();
        same.retain(|name, _| name == "a" || name == "b");
        assert!(!needs_tunnel(
            "a",
            subnet,
            Encapsulation::CrossSubnet,
            &same
        ));
        assert!(needs_tunnel("a", subnet, Encapsulation::Vxlan, &same));
        assert!(needs_tunnel(
            "a",
            subnet,
            Encapsulation::CrossSubnet,
            &hosts()
        ));
        assert!(!needs_tunnel("a", subnet, Encapsulation::None, &hosts()));
        same.retain(|name, _| name == "a");
        assert!(
            !needs_tunnel("a", subnet, Encapsulation::Vxlan, &same),
            "no peer at all"
        );
    }

    #[test]
    fn the_tunnel_holds_one_neighbour_and_one_fdb_entry_per_remote_host() {
        let subnet: IpNetwork = "198.51.100.1/24".parse().unwrap();
        let paths = peer_paths("a", subnet, Encapsulation::Vxlan, &hosts());
        let plan = tunnel_plan(&paths, false);
        assert!(plan.needed);
        let mac = |m: &str| m.parse::<Mac>().unwrap();
        let ip = |i: &str| i.parse::<IpAddr>().unwrap();
        assert_eq!(
            plan.neighbours,
            BTreeSet::from([
                (ip("10.65.1.1"), mac("02:00:00:00:00:0b")),
                (ip("10.65.2.1"), mac("02:00:00:00:00:0c")),
            ])
        );
        assert_eq!(
            plan.fdb,
            BTreeSet::from([
                (mac("02:00:00:00:00:0b"), ip("198.51.100.2")),
                (mac("02:00:00:00:00:0c"), ip("198.18.0.3")),
            ])
        );
        // With an IPv6 pool: also the link-local address of each peer's VTEP MAC.
        let dual = tunnel_plan(&paths, true);
        assert_eq!(dual.fdb, plan.fdb);
        let extra: BTreeSet<_> = dual
            .neighbours
            .difference(&plan.neighbours)
            .cloned()
            .collect();
        assert_eq!(
            extra,
            BTreeSet::from([
                (ip("fe80::ff:fe00:b"), mac("02:00:00:00:00:0b")),
                (ip("fe80::ff:fe00:c"), mac("02:00:00:00:00:0c")),
            ])
        );
        let none = tunnel_plan(
            &peer_paths("a", subnet, Encapsulation::None, &hosts()),
            true,
        );
        assert!(!none.needed && none.neighbours.is_empty());
        let (add, delete) = set_diff(&BTreeSet::from([1, 2]), &BTreeSet::from([2, 3]));
        assert_eq!((add, delete), (vec![1], vec![3]));
    }
}
