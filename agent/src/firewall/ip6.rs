//! Our ip6tables chains, for hosts with an IPv6 pool (pure). IPv6 has no `rp_filter`, so the
//! raw table drops, before routing, what a container sends from an address that is not routed
//! back through its own veth (the reverse-path match); the nat table masquerades IPv6 pools
//! with nat-outgoing (NAT66) leaving the fabric; the filter table accepts container traffic
//! through a FORWARD policy of DROP. Written like the IPv4 tables: owned `WEFT-*` chains, jumps
//! inserted first, one atomic `ip6tables-restore --noflush` per table.

use super::rules::{comment, FilterRule, FirewallSpec, Jump, NatRule, PoolRule, PortRule};

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
pub const FILTER_CHAINS: &[&str] = &["WEFT-FORWARD"];
pub const FILTER_JUMPS: &[Jump] = &[Jump {
    chain: "FORWARD",
    rule: "-m comment --comment \"weft: container traffic\" -j WEFT-FORWARD",
    target: "WEFT-FORWARD",
}];

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
    let mut ports: Vec<&PortRule> = spec.ports.iter().filter(|p| p.ip.is_ipv6()).collect();
    ports.sort();
    let pools: Vec<&PoolRule> = spec.pools.iter().filter(|p| p.cidr.is_ipv6()).collect();
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

/// The rules a set of published ports needs in the IPv6 nat table (hairpin and DNAT), rendered.
pub fn port_rules(ports: &[PortRule]) -> Vec<String> {
    let spec = FirewallSpec {
        ports: ports.to_vec(),
        ..Default::default()
    };
    nat_rules(&spec)
        .iter()
        .filter(|r| matches!(r, NatRule::Hairpin(_) | NatRule::Dnat(_)))
        .map(|r| r.to_string())
        .collect()
}

/// The filter table: container traffic accepted whatever the FORWARD policy.
pub fn filter_rules() -> Vec<FilterRule> {
    vec![FilterRule::FromContainers, FilterRule::ToContainers]
}

#[cfg(test)]
mod tests {
    use super::super::rules::render;
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
        assert_eq!(
            render(&filter_rules()),
            [
                "-A WEFT-FORWARD -i weft+ -m comment --comment \"weft: from containers\" -j ACCEPT",
                "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: to containers\" -j ACCEPT",
            ]
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
