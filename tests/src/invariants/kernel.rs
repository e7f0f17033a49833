//! Each host's kernel: its links and sysctls, and its `proto weft` routes (of both families)
//! against the records.

use super::*;

pub(super) fn check_links_and_sysctls(
    s: &Snapshot,
    host: &HostView,
    k: &HostKernel,
    v: &mut Vec<Violation>,
) {
    let name = &host.name;
    let endpoints = s.records.endpoints_of(name);
    let in_service: BTreeMap<&str, &Value> = k
        .links
        .iter()
        .filter(|l| l["group"].as_str() != Some(RETIRED_GROUP))
        .filter_map(|l| Some((l["ifname"].as_str()?, l)))
        .filter(|(n, _)| n.starts_with("weft"))
        .collect();
    let mut claims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, e) in &endpoints {
        claims.entry(e.host_ifname.as_str()).or_default().push(id);
    }
    for (veth, ids) in &claims {
        if ids.len() > 1 {
            v.push(Violation::new(
                name,
                format!("veth {veth}"),
                "one endpoint per host veth",
                format!("claimed by {}", ids.join(", ")),
            ));
        }
        let Some(link) = in_service.get(veth) else {
            v.push(Violation::new(
                name,
                format!("veth {veth} of {}", ids.join(", ")),
                "present and in service",
                "missing",
            ));
            continue;
        };
        let kind = link["linkinfo"]["info_kind"].as_str().unwrap_or("");
        let up = link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP"));
        let mac = link["address"].as_str().unwrap_or("");
        if kind != "veth" || !up || mac != VETH_MAC {
            v.push(Violation::new(
                name,
                format!("veth {veth} of {}", ids.join(", ")),
                format!("an UP veth with MAC {VETH_MAC}"),
                format!(
                    "kind {kind:?}, {}, MAC {mac}",
                    if up { "up" } else { "down" }
                ),
            ));
        }
        let wanted = match s.records.has_family(Family::V6) {
            true => VETH_SYSCTLS.iter().chain(&[]),
            false => VETH_SYSCTLS[..VETH_SYSCTLS.len() - IPV6_ONLY]
                .iter()
                .chain(VETH_SYSCTLS_V4_ONLY),
        };
        for (template, want) in wanted {
            let path = template.replace("{}", veth);
            match k.sysctls.get(&path).map(String::as_str) {
                Some(got) if got == *want => {}
                Some("MISSING") if path.contains("/ipv6/") => {}
                got => v.push(Violation::new(
                    name,
                    format!("sysctl {path}"),
                    *want,
                    got.unwrap_or("unread"),
                )),
            }
        }
    }
    // Only veths: other `weft*` devices (a future `weft.vxlan`) are nobody's endpoint.
    for (veth, link) in &in_service {
        if !claims.contains_key(veth) && link["linkinfo"]["info_kind"].as_str() == Some("veth") {
            v.push(Violation::new(
                name,
                format!("link {veth}"),
                "no weft link without an endpoint",
                "an unclaimed link in service",
            ));
        }
    }
    for (path, want) in HOST_SYSCTLS {
        if path.contains("/ipv6/") && !s.records.has_family(Family::V6) {
            continue;
        }
        let got = k.sysctls.get(*path).map(String::as_str);
        if got != Some(*want) {
            v.push(Violation::new(
                name,
                format!("sysctl {path}"),
                *want,
                got.unwrap_or("unread"),
            ));
        }
    }
}

/// Where a `proto weft` route sends traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Dev(String),
    Via(String),
    Blackhole,
    Other(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dev(d) => write!(f, "dev {d}"),
            Target::Via(g) => write!(f, "via {g}"),
            Target::Blackhole => write!(f, "blackhole"),
            Target::Other(o) => write!(f, "{o}"),
        }
    }
}

pub(super) fn route_target(r: &Value) -> Target {
    let kind = r["type"].as_str().unwrap_or("unicast");
    if kind == "blackhole" {
        return Target::Blackhole;
    }
    if kind != "unicast" {
        return Target::Other(kind.to_string());
    }
    match (r["gateway"].as_str(), r["dev"].as_str()) {
        (Some(gw), _) => Target::Via(gw.to_string()),
        (None, Some(dev)) => Target::Dev(dev.to_string()),
        _ => Target::Other(r.to_string()),
    }
}

/// The gateway of `owner`'s blocks on `me`. IPv4: its underlay address on the same subnet, its
/// tunnel address (through weft.vxlan) off the subnet or with encapsulation vxlan, none when the
/// pool never encapsulates and it is off the subnet. IPv6: its IPv6 underlay address where IPv4
/// goes direct, the link-local address of its VTEP MAC where IPv4 goes through the tunnel (which
/// carries IPv6 frames too), none otherwise.
pub(super) fn peer_gateway(
    r: &Records,
    me: &str,
    owner: &str,
    pool: &str,
    family: Family,
) -> Option<IpAddr> {
    let underlay = *r.hosts.get(owner)?;
    let (mine, prefix) = (*r.hosts.get(me)?, *r.host_prefixes.get(me).unwrap_or(&32));
    let mask = |ip: Ipv4Addr| u32::from(ip).checked_shr(32 - prefix as u32).unwrap_or(0);
    let local = prefix == 0 || mask(mine) == mask(underlay);
    let encapsulation = r
        .pools
        .get(pool)
        .map_or("cross-subnet", |p| p.encapsulation.as_str());
    let direct = match (encapsulation, local) {
        ("vxlan", _) | ("cross-subnet", false) => false,
        (_, true) => true,
        _ => return None,
    };
    match (family, direct) {
        (Family::V4, true) => Some(IpAddr::V4(underlay)),
        (Family::V4, false) => r.tunnels.get(owner).copied().map(IpAddr::V4),
        (Family::V6, true) => r.hosts_v6.get(owner).copied(),
        (Family::V6, false) => {
            r.tunnels.get(owner)?;
            r.vtep_link_locals.get(owner).copied()
        }
    }
}

pub(super) fn check_routes(s: &Snapshot, host: &HostView, k: &HostKernel, v: &mut Vec<Violation>) {
    let name = &host.name;
    let r = &s.records;
    let mut wanted: BTreeMap<Net, Vec<(Target, String)>> = BTreeMap::new();
    for (id, e) in r.endpoints_of(name) {
        for ip in e.addresses() {
            wanted
                .entry(Net::host(ip))
                .or_default()
                .push((Target::Dev(e.host_ifname.clone()), format!("endpoint {id}")));
        }
    }
    for (pool, block, owner) in &r.blocks {
        if owner == name {
            wanted
                .entry(*block)
                .or_default()
                .push((Target::Blackhole, format!("local block of pool {pool}")));
        } else if let Some(via) = peer_gateway(r, name, owner, pool, block.family()) {
            wanted
                .entry(*block)
                .or_default()
                .push((Target::Via(via.to_string()), format!("block of {owner}")));
        }
    }
    let mut actual: BTreeMap<Net, Vec<(Target, String)>> = BTreeMap::new();
    for route in &k.routes {
        let dst = route["dst"].as_str().unwrap_or("");
        let Some(net) = Net::parse(dst) else {
            v.push(Violation::new(
                name,
                format!("route {dst}"),
                "no proto weft route outside the pools",
                route.to_string(),
            ));
            continue;
        };
        let table = route["table"].as_str().unwrap_or("main").to_string();
        actual
            .entry(net)
            .or_default()
            .push((route_target(route), table));
    }
    for (net, wants) in &wanted {
        if wants.len() > 1 {
            v.push(Violation::new(
                name,
                format!("route {net}"),
                "one owner of the destination",
                wants
                    .iter()
                    .map(|(t, why)| format!("{why} ({t})"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        let (want, why) = &wants[0];
        let found = actual.get(net).map(Vec::as_slice).unwrap_or(&[]);
        let ok = found.len() == 1 && found[0].0 == *want && found[0].1 == "main";
        if !ok {
            v.push(Violation::new(
                name,
                format!("route {net} ({why})"),
                format!("{want} proto weft in table main"),
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found
                        .iter()
                        .map(|(t, table)| format!("{t} in table {table}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            ));
        }
    }
    for (net, found) in &actual {
        if !wanted.contains_key(net) {
            v.push(Violation::new(
                name,
                format!("route {net}"),
                "no proto weft route that nothing claims",
                found
                    .iter()
                    .map(|(t, table)| format!("{t} in table {table}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
    }
}
