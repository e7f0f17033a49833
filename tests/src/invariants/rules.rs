//! Each host's iptables rules: our chains and jumps against the records (published ports,
//! pools, protected services, VXLAN peers); the nat checks serve both families.

use super::*;

/// Splits an iptables-save rule into words, honouring double quotes.
pub fn rule_words(line: &str) -> Vec<String> {
    let mut words = vec![];
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

pub(super) fn after<'w>(words: &'w [String], flag: &str) -> Option<&'w str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

/// `-A <chain> …` lines of one table, as words.
pub(super) fn rules_of<'t>(table: &'t str, chain: &str) -> Vec<(&'t str, Vec<String>)> {
    table
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(|l| (l, rule_words(l)))
        .filter(|(_, w)| w.get(1).map(String::as_str) == Some(chain))
        .collect()
}

/// A DNAT of `WEFT-PORTS`, as (protocol, host port, destination `ip:port`).
pub fn parse_dnat(words: &[String]) -> Option<(String, u16, String)> {
    if after(words, "-j") != Some("DNAT") {
        return None;
    }
    Some((
        after(words, "-p")?.to_string(),
        after(words, "--dport")?.parse().ok()?,
        after(words, "--to-destination")?.to_string(),
    ))
}

pub(super) fn check_rules(s: &Snapshot, host: &HostView, k: &HostKernel, v: &mut Vec<Violation>) {
    let name = &host.name;
    let r = &s.records;
    check_nat(r, name, Family::V4, &k.nat, v);
    // Jumps into our chains: exactly one each.
    let jumps = [
        (&k.nat, "nat", "POSTROUTING", "WEFT-POSTROUTING"),
        (&k.nat, "nat", "PREROUTING", "WEFT-PORTS"),
        (&k.nat, "nat", "OUTPUT", "WEFT-PORTS"),
        (&k.filter, "filter", "FORWARD", "WEFT-FORWARD"),
    ];
    check_jumps(name, Family::V4, &jumps, 1, v);
    check_vxlan_rules(r, name, k, v);
    check_container_accepts(name, Family::V4, &k.filter, v);
    rules6::check_rules6(s, host, k, v);
}

/// `WEFT-FORWARD` accepts what comes from and goes to containers.
pub(super) fn check_container_accepts(
    name: &str,
    family: Family,
    filter: &str,
    v: &mut Vec<Violation>,
) {
    let forward = rules_of(filter, "WEFT-FORWARD");
    for flag in ["-i", "-o"] {
        if !forward
            .iter()
            .any(|(_, w)| after(w, flag) == Some("weft+") && after(w, "-j") == Some("ACCEPT"))
        {
            v.push(Violation::new(
                name,
                format!("{} filter WEFT-FORWARD", family.iptables()),
                format!("{flag} weft+ -j ACCEPT"),
                "none",
            ));
        }
    }
}

/// Each (table text, table name, chain, target) jumps to its target `n` times.
pub(super) fn check_jumps(
    name: &str,
    family: Family,
    jumps: &[(&String, &str, &str, &str)],
    n: usize,
    v: &mut Vec<Violation>,
) {
    for (table, table_name, chain, target) in jumps {
        let found = rules_of(table, chain)
            .iter()
            .filter(|(_, w)| after(w, "-j") == Some(*target))
            .count();
        if found != n {
            v.push(Violation::new(
                name,
                format!(
                    "{} {table_name} {chain} jump to {target}",
                    family.iptables()
                ),
                match n {
                    1 => "exactly one".to_string(),
                    n => n.to_string(),
                },
                found.to_string(),
            ));
        }
    }
}

/// The endpoints of a host that have an address of the family, with that address.
fn addressed<'r>(
    r: &'r Records,
    name: &str,
    family: Family,
) -> Vec<(&'r str, &'r Endpoint, IpAddr)> {
    r.endpoints_of(name)
        .into_iter()
        .filter_map(|(id, e)| Some((id, e, e.address(family)?)))
        .collect()
}

/// The nat table of one family: a DNAT per published port of each endpoint address of the
/// family and nothing else in `WEFT-PORTS`, a hairpin per published port, and SNAT leaving the
/// fabric per pool of the family.
pub(super) fn check_nat(
    r: &Records,
    name: &str,
    family: Family,
    nat: &str,
    v: &mut Vec<Violation>,
) {
    let tool = family.iptables();
    let endpoints = addressed(r, name, family);
    let destination = |ip: IpAddr, port: u16| match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    };
    let mut wanted: BTreeMap<(String, u16, String), Vec<String>> = BTreeMap::new();
    for (id, e, ip) in &endpoints {
        for p in &e.ports {
            wanted
                .entry((
                    p.protocol.clone(),
                    p.host_port,
                    destination(*ip, p.container_port),
                ))
                .or_default()
                .push(id.to_string());
        }
    }
    let mut found: BTreeMap<(String, u16, String), usize> = BTreeMap::new();
    for (line, words) in rules_of(nat, "WEFT-PORTS") {
        match parse_dnat(&words) {
            Some(key) => *found.entry(key).or_default() += 1,
            None => v.push(Violation::new(
                name,
                format!("{tool} nat WEFT-PORTS"),
                "only DNAT rules of published ports",
                line.to_string(),
            )),
        }
    }
    for ((proto, port, to), ids) in &wanted {
        let n = found
            .get(&(proto.clone(), *port, to.clone()))
            .copied()
            .unwrap_or(0);
        if n != 1 {
            v.push(Violation::new(
                name,
                format!("{tool} nat WEFT-PORTS {proto}/{port} of {}", ids.join(", ")),
                format!("one DNAT to {to}"),
                format!("{n}"),
            ));
        }
    }
    for ((proto, port, to), n) in &found {
        if !wanted.contains_key(&(proto.clone(), *port, to.clone())) {
            v.push(Violation::new(
                name,
                format!("{tool} nat WEFT-PORTS {proto}/{port}"),
                "no DNAT that no published port explains",
                format!("{n} DNAT to {to}"),
            ));
        }
    }
    check_hairpins(name, family, nat, &endpoints, v);
    check_nat_outgoing(r, name, family, nat, v);
}

/// Hairpins: a container reaching itself through its own published port is masqueraded. A
/// rule may cover one port or the whole container (no -p/--dport): either serves.
fn check_hairpins(
    name: &str,
    family: Family,
    nat: &str,
    endpoints: &[(&str, &Endpoint, IpAddr)],
    v: &mut Vec<Violation>,
) {
    let tool = family.iptables();
    let host_len = format!("/{}", family.bits());
    let mut hairpins: Vec<(String, Option<String>, Option<u16>)> = vec![];
    for (_, words) in rules_of(nat, "WEFT-POSTROUTING") {
        let src = after(&words, "-s").map(|a| a.trim_end_matches(host_len.as_str()));
        let dst = after(&words, "-d").map(|a| a.trim_end_matches(host_len.as_str()));
        if src.is_some() && src == dst && after(&words, "-j") == Some("MASQUERADE") {
            hairpins.push((
                src.unwrap_or("").to_string(),
                after(&words, "-p").map(str::to_string),
                after(&words, "--dport").and_then(|p| p.parse().ok()),
            ));
        }
    }
    for (id, e, ip) in endpoints {
        let ip = ip.to_string();
        for p in &e.ports {
            let covered = hairpins.iter().any(|(src, proto, port)| {
                *src == ip
                    && proto.as_ref().is_none_or(|x| *x == p.protocol)
                    && port.is_none_or(|x| x == p.container_port)
            });
            if !covered {
                v.push(Violation::new(
                    name,
                    format!(
                        "{tool} nat WEFT-POSTROUTING hairpin of {id} {ip} {}/{}",
                        p.protocol, p.container_port
                    ),
                    "a MASQUERADE rule",
                    "none",
                ));
            }
        }
    }
    for (src, proto, port) in &hairpins {
        let published = endpoints.iter().any(|(_, e, ip)| {
            ip.to_string() == *src
                && e.ports.iter().any(|p| {
                    proto.as_ref().is_none_or(|x| *x == p.protocol)
                        && port.is_none_or(|x| x == p.container_port)
                })
        });
        if !published {
            v.push(Violation::new(
                name,
                format!(
                    "{tool} nat WEFT-POSTROUTING hairpin {src} {}/{}",
                    proto.as_deref().unwrap_or("any"),
                    port.map_or("any".to_string(), |p| p.to_string())
                ),
                "no hairpin that no published port explains",
                "a MASQUERADE rule",
            ));
        }
    }
}

/// SNAT leaving the fabric, per pool of the family.
fn check_nat_outgoing(r: &Records, name: &str, family: Family, nat: &str, v: &mut Vec<Violation>) {
    let tool = family.iptables();
    let pools: Vec<(&String, &Pool)> = r
        .pools
        .iter()
        .filter(|(_, p)| p.cidr.family() == family)
        .collect();
    let postrouting = rules_of(nat, "WEFT-POSTROUTING");
    let outgoing = rules_of(nat, "WEFT-NAT-OUTGOING");
    for (pool, p) in &pools {
        let cidr = p.cidr.to_string();
        if p.nat_outgoing
            && !postrouting.iter().any(|(_, w)| {
                after(w, "-s") == Some(cidr.as_str()) && after(w, "-j") == Some("WEFT-NAT-OUTGOING")
            })
        {
            v.push(Violation::new(
                name,
                format!("{tool} nat WEFT-POSTROUTING pool {pool}"),
                format!("-s {cidr} -j WEFT-NAT-OUTGOING (nat-outgoing)"),
                "none",
            ));
        }
        if !outgoing
            .iter()
            .any(|(_, w)| after(w, "-d") == Some(cidr.as_str()) && after(w, "-j") == Some("RETURN"))
        {
            v.push(Violation::new(
                name,
                format!("{tool} nat WEFT-NAT-OUTGOING pool {pool}"),
                format!("-d {cidr} -j RETURN (inside the fabric)"),
                "none",
            ));
        }
    }
    if pools.iter().any(|(_, p)| p.nat_outgoing)
        && !outgoing
            .iter()
            .any(|(_, w)| after(w, "-j") == Some("MASQUERADE") && after(w, "-d").is_none())
    {
        v.push(Violation::new(
            name,
            format!("{tool} nat WEFT-NAT-OUTGOING"),
            "a final MASQUERADE",
            "none",
        ));
    }
}

/// The VXLAN guard: where a pool may encapsulate, containers never send VXLAN (`WEFT-FORWARD`,
/// `WEFT-INPUT`) and VXLAN to this host passes `WEFT-VXLAN`: a RETURN per other host's underlay
/// address, in order, then a DROP. Where none may, `WEFT-VXLAN` holds nothing.
pub(super) fn check_vxlan_rules(r: &Records, name: &str, k: &HostKernel, v: &mut Vec<Violation>) {
    let encapsulates = r.pools.values().any(|p| p.encapsulation != "none");
    let found: Vec<String> = rules_of(&k.filter, "WEFT-VXLAN")
        .iter()
        .map(|(_, w)| match (after(w, "-s"), after(w, "-j")) {
            (Some(src), Some(target)) => format!("{src} {target}"),
            (None, Some(target)) => target.to_string(),
            _ => w.join(" "),
        })
        .collect();
    let mut wanted: Vec<String> = vec![];
    if encapsulates {
        let mut peers: Vec<Ipv4Addr> = r
            .hosts
            .iter()
            .filter(|(h, _)| h.as_str() != name)
            .map(|(_, ip)| *ip)
            .collect();
        peers.sort();
        peers.dedup();
        wanted.extend(peers.iter().map(|ip| format!("{ip}/32 RETURN")));
        wanted.push("DROP".into());
    }
    if found != wanted {
        v.push(Violation::new(
            name,
            "iptables filter WEFT-VXLAN",
            wanted.join(", "),
            found.join(", "),
        ));
    }
    let vxlan = |w: &[String]| after(w, "--dport") == Some("4789");
    let from_containers = |w: &[String]| after(w, "-i") == Some("weft+");
    for chain in ["WEFT-FORWARD", "WEFT-INPUT"] {
        let drops = rules_of(&k.filter, chain)
            .iter()
            .filter(|(_, w)| vxlan(w) && from_containers(w) && after(w, "-j") == Some("DROP"))
            .count();
        if drops != usize::from(encapsulates) {
            v.push(Violation::new(
                name,
                format!("iptables filter {chain} VXLAN from containers"),
                format!("{} DROP", usize::from(encapsulates)),
                drops.to_string(),
            ));
        }
    }
    let jumps = rules_of(&k.filter, "WEFT-INPUT")
        .iter()
        .filter(|(_, w)| vxlan(w) && !from_containers(w) && after(w, "-j") == Some("WEFT-VXLAN"))
        .count();
    if jumps != usize::from(encapsulates) {
        v.push(Violation::new(
            name,
            "iptables filter WEFT-INPUT jump to WEFT-VXLAN",
            usize::from(encapsulates).to_string(),
            jumps.to_string(),
        ));
    }
}
