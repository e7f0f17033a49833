//! Our ip6tables chains, for hosts with an IPv6 pool (pure). IPv6 has no `rp_filter`, so the
//! raw table drops, before routing, what a container sends from an address that is not routed
//! back through its own veth (the reverse-path match); the nat table masquerades IPv6 pools
//! with nat-outgoing (NAT66) leaving the fabric; the filter table holds network policy's
//! dispatch and accepts container traffic through a FORWARD policy of DROP. Written like the IPv4 tables: owned `WEFT-*` chains, jumps
//! inserted first, one atomic `ip6tables-restore --noflush` per table.

use super::rules::{self, comment, FilterRule, FirewallSpec, Jump, NatRule, PortRule};

pub const RAW_CHAINS: &[&str] = &["WEFT-PREROUTING"];
pub const RAW_JUMPS: &[Jump] = &[Jump {
    chain: "PREROUTING",
    rule: "-i weft+ -m comment --comment \"weft: containers send from their own addresses\" -j WEFT-PREROUTING",
    target: "WEFT-PREROUTING",
}];
pub const NAT_CHAINS: &[&str] = &["WEFT-POSTROUTING", "WEFT-NAT-OUTGOING", "WEFT-PORTS"];
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
    // Loopback is left out, as for IPv4: DNAT of ::1 to a container cannot be routed.
    Jump {
        chain: "OUTPUT",
        rule: "! -d ::1/128 -m addrtype --dst-type LOCAL -m comment --comment \"weft: published ports from this host\" -j WEFT-PORTS",
        target: "WEFT-PORTS",
    },
];
pub const FILTER_CHAINS: &[&str] = &["WEFT-FORWARD", "WEFT-INPUT"];
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

/// The ICMPv6 types a container may always send to its host: multicast listener query,
/// report and done (130–132), router solicitation (133), neighbour solicitation and
/// advertisement (135, 136). Neighbour discovery of the container's own address needs them
/// whatever its egress policy says (Calico accepts the same).
const NEIGHBOUR_DISCOVERY: [u8; 6] = [130, 131, 132, 133, 135, 136];

/// Whether the host needs our ip6tables chains at all: it has an IPv6 pool.
pub fn wanted(spec: &FirewallSpec) -> bool {
    spec.pools.iter().any(|p| p.cidr.is_ipv6())
}

/// The raw table: a packet from a container whose source is not routed back through the veth
/// it came in on (strict reverse path) is dropped.
pub fn raw_rules() -> Vec<String> {
    vec![format!(
        "-A WEFT-PREROUTING -m rpfilter --invert {} -j DROP",
        comment("a source address the container does not own")
    )]
}

/// The nat table: NAT66 for the IPv6 pools with nat-outgoing, to destinations in no pool; the
/// published ports of containers' IPv6 addresses (DNAT, and hairpin masquerade).
pub fn nat_rules(spec: &FirewallSpec) -> Vec<NatRule<'_>> {
    rules::nat_rules_of(spec, false)
}

/// The rules a set of published ports needs in the IPv6 nat table (hairpin and DNAT), rendered.
pub fn port_rules(ports: &[PortRule]) -> Vec<String> {
    rules::port_rules_of(ports, false)
}

/// The filter table, as for IPv4: established connections first, then network policy's
/// dispatch for each direction, and what policy let through (or no policy covers) accepted
/// whatever the FORWARD policy; towards this host, neighbour discovery before egress policy.
pub fn filter_rules() -> Vec<FilterRule> {
    let mut rules = vec![
        FilterRule::Established("-i"),
        FilterRule::Established("-o"),
        FilterRule::FromWorkloads,
        FilterRule::ToWorkloads,
        FilterRule::FromContainers,
        FilterRule::ToContainers,
    ];
    rules.extend(
        NEIGHBOUR_DISCOVERY
            .iter()
            .map(|t| FilterRule::InputNeighbourDiscovery(*t)),
    );
    rules.push(FilterRule::InputFromWorkloads);
    rules
}

#[cfg(test)]
mod tests {
    use super::super::rules::{render, PoolRule};
    use super::*;

    fn pool(name: &str, cidr: &str, nat_outgoing: bool) -> PoolRule {
        PoolRule {
            name: name.into(),
            cidr: cidr.parse().unwrap(),
            nat_outgoing,
        }
    }

    #[test]
    fn the_ipv6_tables_are_rendered_exactly() {
        let spec = FirewallSpec {
            pools: vec![
                pool("default", "10.65.0.0/16", true),
                pool("default-v6", "fd65::/48", true),
                pool("db-v6", "fd66::/48", false),
            ],
            ..Default::default()
        };
        assert!(wanted(&spec));
        assert_eq!(
            render(&nat_rules(&spec)),
            [
                "-A WEFT-POSTROUTING -s fd65::/48 -m comment --comment \"weft: pool default-v6 has nat-outgoing\" -j WEFT-NAT-OUTGOING",
                "-A WEFT-NAT-OUTGOING -d fd65::/48 -m comment --comment \"weft: inside the fabric (pool default-v6)\" -j RETURN",
                "-A WEFT-NAT-OUTGOING -d fd66::/48 -m comment --comment \"weft: inside the fabric (pool db-v6)\" -j RETURN",
                "-A WEFT-NAT-OUTGOING -m comment --comment \"weft: leaving the fabric\" -j MASQUERADE",
            ]
        );
        assert_eq!(
            raw_rules(),
            ["-A WEFT-PREROUTING -m rpfilter --invert -m comment --comment \"weft: a source address the container does not own\" -j DROP"]
        );
        let filter = render(&filter_rules());
        assert_eq!(
            filter[..6],
            [
                "-A WEFT-FORWARD -i weft+ -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: replies and allowed connections\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: replies and allowed connections\" -j ACCEPT",
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: egress policy\" -j WEFT-FROM-WL",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: ingress policy\" -j WEFT-TO-WL",
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: from containers\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: to containers\" -j ACCEPT",
            ]
        );
        assert_eq!(
            filter[6],
            "-A WEFT-INPUT -i weft+ -p ipv6-icmp -m icmp6 --icmpv6-type 130 -m comment --comment \"weft: neighbour discovery\" -j ACCEPT"
        );
        assert_eq!(
            filter.last().unwrap(),
            "-A WEFT-INPUT -i weft+ -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment \"weft: egress policy to this host\" -j WEFT-FROM-WL",
            "egress policy towards this host comes after neighbour discovery"
        );
        let port = |ip: &str| PortRule {
            container_id: crate::model::ContainerId::new("web").unwrap(),
            ip: ip.parse().unwrap(),
            protocol: crate::model::Protocol::Tcp,
            host_port: 8080,
            container_port: 80,
        };
        assert_eq!(
            port_rules(&[port("fd65::7"), port("10.65.0.7")]),
            [
                "-A WEFT-POSTROUTING -s fd65::7/128 -d fd65::7/128 -p tcp -m tcp --dport 80 -m comment --comment \"weft: hairpin web\" -j MASQUERADE",
                "-A WEFT-PORTS -p tcp -m tcp --dport 8080 -m comment --comment \"weft: web\" -j DNAT --to-destination [fd65::7]:80",
            ],
            "IPv6 ports only"
        );
        let v4_only = FirewallSpec {
            pools: vec![pool("default", "10.65.0.0/16", true)],
            ..Default::default()
        };
        assert!(
            !wanted(&v4_only),
            "no ip6tables chains without an IPv6 pool"
        );
    }
}
