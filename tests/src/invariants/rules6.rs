//! Each host's ip6tables rules: where an IPv6 pool exists, the raw table's anti-spoofing (IPv6
//! has no `rp_filter`), the nat table as for IPv4 (published ports, NAT66), the filter table's
//! accepts and neighbour discovery, and one jump into each of our chains; where none does, no
//! chain of ours at all.

use super::*;

/// The ICMPv6 types a container may always send to its host (multicast listener query, report
/// and done, router solicitation, neighbour solicitation and advertisement).
pub(super) const NEIGHBOUR_DISCOVERY: [u8; 6] = [130, 131, 132, 133, 135, 136];

pub(super) fn check_rules6(s: &Snapshot, host: &HostView, k: &HostKernel, v: &mut Vec<Violation>) {
    let name = &host.name;
    let r = &s.records;
    if !r.has_family(Family::V6) {
        check_none(name, k, v);
        return;
    }
    check_nat(r, name, Family::V6, &k.nat6, v);
    let jumps = [
        (&k.raw6, "raw", "PREROUTING", "WEFT-PREROUTING"),
        (&k.nat6, "nat", "POSTROUTING", "WEFT-POSTROUTING"),
        (&k.nat6, "nat", "PREROUTING", "WEFT-PORTS"),
        (&k.nat6, "nat", "OUTPUT", "WEFT-PORTS"),
        (&k.filter6, "filter", "FORWARD", "WEFT-FORWARD"),
        (&k.filter6, "filter", "INPUT", "WEFT-INPUT"),
    ];
    check_jumps(name, Family::V6, &jumps, 1, v);
    check_anti_spoofing(name, &k.raw6, v);
    check_container_accepts(name, Family::V6, &k.filter6, v);
    check_neighbour_discovery(name, &k.filter6, v);
}

/// No IPv6 pool: no `WEFT-` chain and no jump to one in any ip6tables table.
fn check_none(name: &str, k: &HostKernel, v: &mut Vec<Violation>) {
    for (table, text) in [("raw", &k.raw6), ("nat", &k.nat6), ("filter", &k.filter6)] {
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(":WEFT-") || l.contains("-j WEFT-"))
            .collect();
        if !ours.is_empty() {
            v.push(Violation::new(
                name,
                format!("ip6tables {table}"),
                "no chain of ours (no IPv6 pool)",
                ours.join(" | "),
            ));
        }
    }
}

/// The raw table: only containers' packets (`-i weft+`) pass `WEFT-PREROUTING`, which drops a
/// source that is not routed back through the veth it came in on, and does nothing else.
fn check_anti_spoofing(name: &str, raw: &str, v: &mut Vec<Violation>) {
    let from_containers = rules_of(raw, "PREROUTING")
        .iter()
        .filter(|(_, w)| after(w, "-j") == Some("WEFT-PREROUTING"))
        .all(|(_, w)| after(w, "-i") == Some("weft+"));
    if !from_containers {
        v.push(Violation::new(
            name,
            "ip6tables raw PREROUTING jump to WEFT-PREROUTING",
            "only for -i weft+",
            "for other interfaces too",
        ));
    }
    let rules: Vec<&str> = rules_of(raw, "WEFT-PREROUTING")
        .into_iter()
        .map(|(line, _)| line)
        .collect();
    let drop = |w: &[String]| {
        after(w, "-m") == Some("rpfilter")
            && w.iter().any(|x| x == "--invert")
            && after(w, "-j") == Some("DROP")
    };
    if rules.len() != 1 || !drop(&rule_words(rules[0])) {
        v.push(Violation::new(
            name,
            "ip6tables raw WEFT-PREROUTING",
            "one rule: -m rpfilter --invert -j DROP",
            format!("{} rules: {}", rules.len(), rules.join(" | ")),
        ));
    }
}

/// `WEFT-INPUT` accepts neighbour discovery from containers before egress policy may drop it.
fn check_neighbour_discovery(name: &str, filter: &str, v: &mut Vec<Violation>) {
    let input = rules_of(filter, "WEFT-INPUT");
    let policy = input
        .iter()
        .position(|(_, w)| after(w, "-j") == Some("WEFT-FROM-WL"))
        .unwrap_or(input.len());
    for kind in NEIGHBOUR_DISCOVERY {
        let kind_text = kind.to_string();
        let accepted = input[..policy].iter().any(|(_, w)| {
            after(w, "-i") == Some("weft+")
                && after(w, "--icmpv6-type") == Some(kind_text.as_str())
                && after(w, "-j") == Some("ACCEPT")
        });
        if !accepted {
            v.push(Violation::new(
                name,
                format!("ip6tables filter WEFT-INPUT ICMPv6 type {kind}"),
                "accepted from weft+ before egress policy",
                "not",
            ));
        }
    }
}
