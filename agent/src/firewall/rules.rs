//! What our chains should hold, as typed rules, and their rendering in the exact form
//! `iptables-save` prints (so a resync compares text and a second verify writes nothing). Pure.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use super::chains::FamilyChains;
use crate::model::{ContainerId, Protocol};

/// A published port of one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRule {
    pub container_id: ContainerId,
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
}

/// A pool as the NAT rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRule {
    pub name: String,
    pub cidr: IpNetwork,
    pub nat_outgoing: bool,
}

/// Everything the rules are made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallSpec {
    /// Every pool of the cluster.
    pub pools: Vec<PoolRule>,
    pub ports: Vec<PortRule>,
    /// TCP services containers must not reach: the etcd endpoints the agent uses and its
    /// metrics listener (an unspecified address: that port on every address of the host).
    pub protected: Vec<SocketAddr>,
    /// When the pool may encapsulate: the underlay addresses VXLAN is accepted from (every
    /// peer's, sorted). Containers may never send VXLAN.
    pub vxlan_peers: Option<Vec<IpAddr>>,
    /// Network policy's chains (dispatch, per profile, per policy) of each family, as `policy`
    /// renders them.
    pub policy: FamilyChains,
}

/// One rule of our nat chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatRule<'a> {
    /// A container reaching itself through its own published port must not see a packet from
    /// its own address: masquerade that one case.
    Hairpin(&'a PortRule),
    /// Traffic from a pool with nat-outgoing goes through the outgoing checks.
    FromNatPool(&'a PoolRule),
    /// Traffic to any pool stays inside the fabric and keeps its source.
    InsideFabric(&'a PoolRule),
    /// Everything else leaves the fabric: masquerade.
    LeavingFabric,
    /// A published port.
    Dnat(&'a PortRule),
}

/// One rule of our filter chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterRule {
    /// Containers may not reach a protected service elsewhere (etcd on another machine).
    ForwardProtected(SocketAddr),
    FromContainers,
    ToContainers,
    /// Containers may not reach a protected service on this host.
    InputProtected(SocketAddr),
    /// Replies and packets of connections policy allowed pass before any policy (`-i` or `-o`).
    Established(&'static str),
    /// Traffic from containers meets their egress policy.
    FromWorkloads,
    /// Traffic to containers meets their ingress policy.
    ToWorkloads,
    /// New connections from containers to this host meet their egress policy too.
    InputFromWorkloads,
    /// IPv6 only: an ICMPv6 type of neighbour discovery (or multicast listener discovery) from
    /// a container to this host is accepted before egress policy, which could otherwise leave
    /// the host unable to resolve the container's address.
    InputNeighbourDiscovery(u8),
    /// Containers never send VXLAN, through this host or to it.
    ForwardContainerVxlan,
    InputContainerVxlan,
    /// VXLAN to this host is checked against the peers.
    InputVxlan,
    /// A peer's underlay address may send VXLAN (WEFT-VXLAN, in order before the drop).
    VxlanPeer(IpAddr),
    /// Anyone else may not.
    VxlanOthers,
}

pub(super) fn comment(text: impl fmt::Display) -> String {
    // Container ids are validated to [A-Za-z0-9_.-], so no quoting issues arise.
    format!("-m comment --comment \"weft: {text}\"")
}

impl fmt::Display for NatRule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatRule::Hairpin(p) => write!(
                f,
                "-A WEFT-POSTROUTING -s {ip}/{bits} -d {ip}/{bits} -p {proto} -m {proto} --dport {port} {c} -j MASQUERADE",
                ip = p.ip,
                bits = if p.ip.is_ipv4() { 32 } else { 128 },
                proto = p.protocol,
                port = p.container_port,
                c = comment(format_args!("hairpin {}", p.container_id)),
            ),
            NatRule::FromNatPool(pool) => write!(
                f,
                "-A WEFT-POSTROUTING -s {} {} -j WEFT-NAT-OUTGOING",
                pool.cidr,
                comment(format_args!("pool {} has nat-outgoing", pool.name))
            ),
            NatRule::InsideFabric(pool) => write!(
                f,
                "-A WEFT-NAT-OUTGOING -d {} {} -j RETURN",
                pool.cidr,
                comment(format_args!("inside the fabric (pool {})", pool.name))
            ),
            NatRule::LeavingFabric => write!(
                f,
                "-A WEFT-NAT-OUTGOING {} -j MASQUERADE",
                comment("leaving the fabric")
            ),
            NatRule::Dnat(p) => write!(
                f,
                "-A WEFT-PORTS -p {proto} -m {proto} --dport {hport} {c} -j DNAT --to-destination {to}",
                proto = p.protocol,
                hport = p.host_port,
                c = comment(&p.container_id),
                to = SocketAddr::new(p.ip, p.container_port),
            ),
        }
    }
}

/// `-d <ip>/32 ` for a specific address, nothing for the unspecified one.
fn destination(addr: &SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => String::new(),
        IpAddr::V4(ip) => format!("-d {ip}/32 "),
        IpAddr::V6(ip) => format!("-d {ip}/128 "),
    }
}

impl fmt::Display for FilterRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protected = comment("the datastore and the agent are not for containers");
        match self {
            FilterRule::ForwardProtected(addr) => write!(
                f,
                "-A WEFT-FORWARD {}-i weft+ -p tcp -m tcp --dport {} {protected} -j DROP",
                destination(addr),
                addr.port()
            ),
            FilterRule::InputProtected(addr) => write!(
                f,
                "-A WEFT-INPUT {}-i weft+ -p tcp -m tcp --dport {} {protected} -j DROP",
                destination(addr),
                addr.port()
            ),
            FilterRule::ForwardContainerVxlan => write!(
                f,
                "-A WEFT-FORWARD -i weft+ -p udp -m udp --dport {VXLAN} {} -j DROP",
                comment("containers never send VXLAN")
            ),
            FilterRule::InputContainerVxlan => write!(
                f,
                "-A WEFT-INPUT -i weft+ -p udp -m udp --dport {VXLAN} {} -j DROP",
                comment("containers never send VXLAN")
            ),
            FilterRule::InputVxlan => write!(
                f,
                "-A WEFT-INPUT -p udp -m udp --dport {VXLAN} {} -j WEFT-VXLAN",
                comment("VXLAN only from peers")
            ),
            FilterRule::VxlanPeer(ip) => write!(
                f,
                "-A WEFT-VXLAN -s {ip}/{} {} -j RETURN",
                if ip.is_ipv4() { 32 } else { 128 },
                comment("a peer")
            ),
            FilterRule::VxlanOthers => write!(f, "-A WEFT-VXLAN {} -j DROP", comment("not a peer")),
            FilterRule::FromContainers => write!(
                f,
                "-A WEFT-FORWARD -i weft+ {} -j ACCEPT",
                comment("from containers")
            ),
            FilterRule::ToContainers => write!(
                f,
                "-A WEFT-FORWARD -o weft+ {} -j ACCEPT",
                comment("to containers")
            ),
            FilterRule::Established(flag) => write!(
                f,
                "-A WEFT-FORWARD {flag} weft+ -m conntrack --ctstate RELATED,ESTABLISHED {} -j ACCEPT",
                comment("replies and allowed connections")
            ),
            FilterRule::FromWorkloads => write!(
                f,
                "-A WEFT-FORWARD -i weft+ {} -j WEFT-FROM-WL",
                comment("egress policy")
            ),
            FilterRule::ToWorkloads => write!(
                f,
                "-A WEFT-FORWARD -o weft+ {} -j WEFT-TO-WL",
                comment("ingress policy")
            ),
            FilterRule::InputNeighbourDiscovery(kind) => write!(
                f,
                "-A WEFT-INPUT -i weft+ -p ipv6-icmp -m icmp6 --icmpv6-type {kind} {} -j ACCEPT",
                comment("neighbour discovery")
            ),
            FilterRule::InputFromWorkloads => write!(
                f,
                "-A WEFT-INPUT -i weft+ -m conntrack ! --ctstate RELATED,ESTABLISHED {} -j WEFT-FROM-WL",
                comment("egress policy to this host")
            ),
        }
    }
}

/// The IPv4 rules of our nat chains (the IPv4 table holds IPv4 pools and ports only).
pub fn nat_rules(spec: &FirewallSpec) -> Vec<NatRule<'_>> {
    nat_rules_of(spec, true)
}

/// The rules of one family's nat chains (`v4`: IPv4's, else IPv6's): hairpins, the outgoing
/// checks of pools with nat-outgoing, what stays inside the fabric, masquerade of the rest, and
/// the DNAT of published ports.
pub(super) fn nat_rules_of(spec: &FirewallSpec, v4: bool) -> Vec<NatRule<'_>> {
    let mut ports: Vec<&PortRule> = spec.ports.iter().filter(|p| p.ip.is_ipv4() == v4).collect();
    ports.sort();
    let pools: Vec<&PoolRule> = spec
        .pools
        .iter()
        .filter(|p| p.cidr.is_ipv4() == v4)
        .collect();
    let mut rules: Vec<NatRule> = ports.iter().map(|p| NatRule::Hairpin(p)).collect();
    rules.extend(
        pools
            .iter()
            .filter(|p| p.nat_outgoing)
            .map(|p| NatRule::FromNatPool(p)),
    );
    rules.extend(pools.iter().map(|p| NatRule::InsideFabric(p)));
    rules.push(NatRule::LeavingFabric);
    rules.extend(ports.iter().map(|p| NatRule::Dnat(p)));
    rules
}

/// The IPv4 rules of our filter chains: drops of protected services before the accepts.
pub fn filter_rules(spec: &FirewallSpec) -> Vec<FilterRule> {
    let protected: Vec<SocketAddr> = spec
        .protected
        .iter()
        .filter(|a| a.is_ipv4())
        .copied()
        .collect();
    let mut rules: Vec<FilterRule> = protected
        .iter()
        .filter(|a| !a.ip().is_unspecified())
        .map(|a| FilterRule::ForwardProtected(*a))
        .collect();
    // Containers never send VXLAN, whatever policy allows: dropped before anything accepts.
    let vxlan = spec.vxlan_peers.as_ref();
    if vxlan.is_some() {
        rules.push(FilterRule::ForwardContainerVxlan);
    }
    // Policy: established connections first, then each direction's dispatch, and what policy
    // let through (or no policy covers) is accepted.
    rules.extend([
        FilterRule::Established("-i"),
        FilterRule::Established("-o"),
        FilterRule::FromWorkloads,
        FilterRule::ToWorkloads,
        FilterRule::FromContainers,
        FilterRule::ToContainers,
    ]);
    rules.extend(protected.iter().map(|a| FilterRule::InputProtected(*a)));
    if vxlan.is_some() {
        rules.extend([FilterRule::InputContainerVxlan, FilterRule::InputVxlan]);
    }
    // After every drop of WEFT-INPUT: an egress policy's allow accepts.
    rules.push(FilterRule::InputFromWorkloads);
    if let Some(peers) = vxlan {
        rules.extend(
            peers
                .iter()
                .filter(|p| p.is_ipv4())
                .map(|p| FilterRule::VxlanPeer(*p)),
        );
        rules.push(FilterRule::VxlanOthers);
    }
    rules
}

/// The UDP port of VXLAN.
const VXLAN: u16 = crate::model::VXLAN_PORT;

/// Renders rules, one `-A` line each.
pub fn render<T: fmt::Display>(rules: &[T]) -> Vec<String> {
    rules.iter().map(|r| r.to_string()).collect()
}

/// A jump from a built-in chain into ours.
pub struct Jump {
    pub chain: &'static str,
    pub rule: &'static str,
    pub target: &'static str,
}

pub const NAT_JUMPS: &[Jump] = &[
    Jump {
        chain: "POSTROUTING",
        rule: "-m comment --comment \"weft: SNAT leaving the fabric, hairpin\" -j WEFT-POSTROUTING",
        target: "WEFT-POSTROUTING",
    },
    Jump {
        chain: "PREROUTING",
        rule: "-m addrtype --dst-type LOCAL -m comment --comment \"weft: published ports\" -j WEFT-PORTS",
        target: "WEFT-PORTS",
    },
    // Loopback destinations are left out: DNAT of 127.0.0.1 to a container cannot be routed.
    Jump {
        chain: "OUTPUT",
        rule: "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment \"weft: published ports from this host\" -j WEFT-PORTS",
        target: "WEFT-PORTS",
    },
];

pub const FILTER_JUMPS: &[Jump] = &[
    Jump {
        chain: "FORWARD",
        rule: "-m comment --comment \"weft: container traffic\" -j WEFT-FORWARD",
        target: "WEFT-FORWARD",
    },
    Jump {
        chain: "INPUT",
        rule: "-m comment --comment \"weft: containers to host services\" -j WEFT-INPUT",
        target: "WEFT-INPUT",
    },
];

pub const NAT_CHAINS: &[&str] = &["WEFT-POSTROUTING", "WEFT-NAT-OUTGOING", "WEFT-PORTS"];
pub const FILTER_CHAINS: &[&str] = &["WEFT-FORWARD", "WEFT-INPUT", "WEFT-VXLAN"];

/// The rules a set of published ports needs in the nat table (hairpin and DNAT), rendered.
pub fn port_rules(ports: &[PortRule]) -> Vec<String> {
    port_rules_of(ports, true)
}

/// The rules a set of published ports needs in one family's nat table, rendered.
pub(super) fn port_rules_of(ports: &[PortRule], v4: bool) -> Vec<String> {
    let spec = FirewallSpec {
        ports: ports.to_vec(),
        ..Default::default()
    };
    nat_rules_of(&spec, v4)
        .iter()
        .filter(|r| matches!(r, NatRule::Hairpin(_) | NatRule::Dnat(_)))
        .map(|r| r.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FirewallSpec {
        FirewallSpec {
            pools: vec![
                PoolRule {
                    name: "default".into(),
                    cidr: "10.65.0.0/16".parse().unwrap(),
                    nat_outgoing: true,
                },
                PoolRule {
                    name: "internal".into(),
                    cidr: "10.66.0.0/16".parse().unwrap(),
                    nat_outgoing: false,
                },
            ],
            ports: vec![PortRule {
                container_id: ContainerId::new("web").unwrap(),
                ip: "10.65.0.5".parse().unwrap(),
                protocol: Protocol::Tcp,
                host_port: 8080,
                container_port: 80,
            }],
            protected: vec![
                "198.51.100.100:2379".parse().unwrap(),
                "0.0.0.0:9099".parse().unwrap(),
            ],
            vxlan_peers: None,
            policy: Default::default(),
        }
    }

    #[test]
    fn the_nat_table_is_rendered_exactly() {
        let spec = spec();
        assert_eq!(
            render(&nat_rules(&spec)),
            vec![
                "-A WEFT-POSTROUTING -s 10.65.0.5/32 -d 10.65.0.5/32 -p tcp -m tcp --dport 80 -m comment --comment \"weft: hairpin web\" -j MASQUERADE",
                "-A WEFT-POSTROUTING -s 10.65.0.0/16 -m comment --comment \"weft: pool default has nat-outgoing\" -j WEFT-NAT-OUTGOING",
                "-A WEFT-NAT-OUTGOING -d 10.65.0.0/16 -m comment --comment \"weft: inside the fabric (pool default)\" -j RETURN",
                "-A WEFT-NAT-OUTGOING -d 10.66.0.0/16 -m comment --comment \"weft: inside the fabric (pool internal)\" -j RETURN",
                "-A WEFT-NAT-OUTGOING -m comment --comment \"weft: leaving the fabric\" -j MASQUERADE",
                "-A WEFT-PORTS -p tcp -m tcp --dport 8080 -m comment --comment \"weft: web\" -j DNAT --to-destination 10.65.0.5:80",
            ]
        );
        assert_eq!(
            render(&filter_rules(&spec)),
            vec![
                "-A WEFT-FORWARD -d 198.51.100.100/32 -i weft+ -p tcp -m tcp --dport 2379 -m comment --comment \"weft: the datastore and the agent are not for containers\" -j DROP",
                "-A WEFT-FORWARD -i weft+ -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: replies and allowed connections\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: replies and allowed connections\" -j ACCEPT",
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: egress policy\" -j WEFT-FROM-WL",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: ingress policy\" -j WEFT-TO-WL",
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: from containers\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: to containers\" -j ACCEPT",
                "-A WEFT-INPUT -d 198.51.100.100/32 -i weft+ -p tcp -m tcp --dport 2379 -m comment --comment \"weft: the datastore and the agent are not for containers\" -j DROP",
                "-A WEFT-INPUT -i weft+ -p tcp -m tcp --dport 9099 -m comment --comment \"weft: the datastore and the agent are not for containers\" -j DROP",
                "-A WEFT-INPUT -i weft+ -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: egress policy to this host\" -j WEFT-FROM-WL",
            ]
        );
    }

    #[test]
    fn vxlan_is_accepted_from_peers_only_and_never_from_containers_whatever_policy_allows() {
        let spec = FirewallSpec {
            vxlan_peers: Some(vec!["198.18.0.2".parse().unwrap()]),
            ..Default::default()
        };
        assert_eq!(
            render(&filter_rules(&spec)),
            vec![
                "-A WEFT-FORWARD -i weft+ -p udp -m udp --dport 4789 -m comment --comment \"weft: containers never send VXLAN\" -j DROP",
                "-A WEFT-FORWARD -i weft+ -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: replies and allowed connections\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: replies and allowed connections\" -j ACCEPT",
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: egress policy\" -j WEFT-FROM-WL",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: ingress policy\" -j WEFT-TO-WL",
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: from containers\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: to containers\" -j ACCEPT",
                "-A WEFT-INPUT -i weft+ -p udp -m udp --dport 4789 -m comment --comment \"weft: containers never send VXLAN\" -j DROP",
                "-A WEFT-INPUT -p udp -m udp --dport 4789 -m comment --comment \"weft: VXLAN only from peers\" -j WEFT-VXLAN",
                "-A WEFT-INPUT -i weft+ -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: egress policy to this host\" -j WEFT-FROM-WL",
                "-A WEFT-VXLAN -s 198.18.0.2/32 -m comment --comment \"weft: a peer\" -j RETURN",
                "-A WEFT-VXLAN -m comment --comment \"weft: not a peer\" -j DROP",
            ]
        );
    }

    #[test]
    fn ports_render_as_their_own_rules() {
        let rules = port_rules(&spec().ports);
        assert_eq!(rules.len(), 2);
        assert!(rules[0].contains("hairpin web"));
        assert!(rules[1].contains("--to-destination 10.65.0.5:80"));
    }
}
