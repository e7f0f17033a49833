//! Container namespaces (their addresses, gateways and default routes, per family), the agents'
//! own namespaces, and addresses held once in the lab.

use super::*;

pub(super) fn check_containers(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let name = &host.name;
    for (id, e) in s.records.endpoints_of(name) {
        let object = |what: &str| format!("container {id} ({}) {what}", e.netns);
        let state = match host.containers.get(&e.netns) {
            Some(Ok(state)) => state,
            Some(Err(err)) => {
                v.push(Violation::new(
                    name,
                    object("namespace"),
                    "present",
                    err.clone(),
                ));
                continue;
            }
            None => {
                v.push(Violation::new(
                    name,
                    object("namespace"),
                    "read",
                    "not read",
                ));
                continue;
            }
        };
        let link = |ifname: &str| {
            state
                .links
                .iter()
                .find(|l| l["ifname"].as_str() == Some(ifname))
        };
        if !link("lo").is_some_and(is_up) {
            v.push(Violation::new(name, object("lo"), "up", "down or missing"));
        }
        match link(&e.ifname) {
            None => v.push(Violation::new(
                name,
                object(&format!("interface {}", e.ifname)),
                "present",
                "missing",
            )),
            Some(l) => check_interface(name, e, l, &object, v),
        }
        for ip in e.addresses() {
            check_gateway_neighbour(name, e, state, Family::of(&ip), &object, v);
            if e.secondary {
                check_source_rule(name, e, state, ip, &object, v);
            }
        }
    }
    check_default_routes(s, host, v);
}

fn is_up(link: &Value) -> bool {
    link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

/// The container's weft interface: up, with the endpoint's MAC and each of its addresses as a
/// host prefix (/32, /128).
fn check_interface(
    name: &str,
    e: &Endpoint,
    l: &Value,
    object: &dyn Fn(&str) -> String,
    v: &mut Vec<Violation>,
) {
    if !is_up(l) {
        v.push(Violation::new(
            name,
            object(&format!("interface {}", e.ifname)),
            "up",
            "down",
        ));
    }
    let mac = l["address"].as_str().unwrap_or("").to_ascii_lowercase();
    if !e.mac.is_empty() && mac != e.mac {
        v.push(Violation::new(
            name,
            object(&format!("interface {} MAC", e.ifname)),
            e.mac.clone(),
            mac,
        ));
    }
    for ip in e.addresses() {
        let family = Family::of(&ip);
        let addrs: Vec<String> = l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["family"] == family.inet() && x["scope"] != "link")
            .map(|x| format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"]))
            .collect();
        let want = Net::host(ip).to_string();
        if !addrs.contains(&want) {
            v.push(Violation::new(
                name,
                object(&format!("interface {} address", e.ifname)),
                want,
                format!("{addrs:?}"),
            ));
        }
    }
}

/// The family's gateway as a permanent neighbour with the host end's MAC.
fn check_gateway_neighbour(
    name: &str,
    e: &Endpoint,
    state: &ContainerKernel,
    family: Family,
    object: &dyn Fn(&str) -> String,
    v: &mut Vec<Violation>,
) {
    let gateway = gateway(family);
    let (_, neighbours) = state.of(family);
    let neighbour = neighbours.iter().find(|n| {
        n["dst"].as_str() == Some(gateway) && n["dev"].as_str() == Some(e.ifname.as_str())
    });
    let neighbour_ok = neighbour.is_some_and(|n| {
        n["lladdr"].as_str() == Some(VETH_MAC)
            && n["state"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"))
    });
    if !neighbour_ok {
        v.push(Violation::new(
            name,
            object(&format!("neighbour {gateway} dev {}", e.ifname)),
            format!("lladdr {VETH_MAC} PERMANENT"),
            neighbour.map_or("none".to_string(), Value::to_string),
        ));
    }
}

/// A secondary interface's address: a rule `from <address>` to a table whose default route
/// leaves through that interface via the family's gateway, so that what the address sends
/// (replies included) leaves where it is routed back (the host drops it otherwise).
fn check_source_rule(
    name: &str,
    e: &Endpoint,
    state: &ContainerKernel,
    ip: IpAddr,
    object: &dyn Fn(&str) -> String,
    v: &mut Vec<Violation>,
) {
    let family = Family::of(&ip);
    let (routes, _) = state.of(family);
    let gateway = gateway(family);
    let source = ip.to_string();
    let tables: Vec<&str> = state
        .rules_of(family)
        .iter()
        .filter(|r| r["src"].as_str() == Some(source.as_str()))
        .filter_map(|r| r["table"].as_str())
        .collect();
    let routed = tables.iter().any(|table| {
        routes.iter().any(|r| {
            r["dst"] == "default"
                && r["table"].as_str() == Some(table)
                && r["gateway"].as_str() == Some(gateway)
                && r["dev"].as_str() == Some(e.ifname.as_str())
        })
    });
    if !routed {
        v.push(Violation::new(
            name,
            object(&format!("source rule of {ip} (secondary {})", e.ifname)),
            format!(
                "from {ip} lookup a table with a default via {gateway} dev {}",
                e.ifname
            ),
            match tables.is_empty() {
                true => "no rule".to_string(),
                false => format!("rules to tables {tables:?} without that route"),
            },
        ));
    }
}

/// The containers' gateway of a family: an address the host end answers for.
pub(super) fn gateway(family: Family) -> &'static str {
    match family {
        Family::V4 => GATEWAY,
        Family::V6 => GATEWAY_V6,
    }
}

/// Each container namespace has, per family of its addresses, exactly one default route in its
/// main table, via the family's gateway on one of its weft interfaces (the contract: only the
/// first weft interface of a namespace carries it; later ones route their own traffic through a
/// table of their own), and none of a family it has no address of.
pub(super) fn check_default_routes(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let mut interfaces: BTreeMap<&String, (Vec<&str>, BTreeSet<Family>)> = BTreeMap::new();
    for (_, e) in s.records.endpoints_of(&host.name) {
        let entry = interfaces.entry(&e.netns).or_default();
        entry.0.push(e.ifname.as_str());
        entry.1.extend(e.addresses().iter().map(Family::of));
    }
    for (netns, (ifnames, families)) in interfaces {
        let Some(Ok(state)) = host.containers.get(netns) else {
            continue; // already named by the per-container checks
        };
        for family in [Family::V4, Family::V6] {
            let (routes, _) = state.of(family);
            let defaults: Vec<&Value> = routes
                .iter()
                .filter(|r| {
                    r["dst"].as_str() == Some("default")
                        && r["table"].as_str().unwrap_or("main") == "main"
                })
                .collect();
            let gateway = gateway(family);
            let wanted = families.contains(&family);
            let good = match wanted {
                false => defaults.is_empty(),
                true => {
                    defaults.len() == 1
                        && defaults[0]["gateway"].as_str() == Some(gateway)
                        && defaults[0]["dev"]
                            .as_str()
                            .is_some_and(|dev| ifnames.contains(&dev))
                }
            };
            if !good {
                v.push(Violation::new(
                    &host.name,
                    format!("namespace {netns} default route ({family:?})"),
                    match wanted {
                        true => format!("one, via {gateway} on one of {ifnames:?}"),
                        false => format!("none (no {family:?} address)"),
                    },
                    format!("{defaults:?}"),
                ));
            }
        }
    }
}

pub(super) fn check_namespaces(s: &Snapshot, v: &mut Vec<Violation>) {
    for host in &s.hosts {
        let mine = format!("weft-{}-", host.name);
        let owners: BTreeSet<String> = s
            .records
            .endpoints_of(&host.name)
            .values()
            .filter(|e| e.owns_netns != Some(false))
            .map(|e| e.netns.clone())
            .collect();
        for ns in s.namespaces.iter().filter(|n| n.starts_with(&mine)) {
            let path = netns_path(ns);
            if !owners.contains(&path) {
                v.push(Violation::new(
                    &host.name,
                    format!("netns {ns}"),
                    "an endpoint that owns it",
                    "none (leaked agent-made namespace)",
                ));
            }
        }
    }
}

pub(super) fn check_addresses_unique(s: &Snapshot, v: &mut Vec<Violation>) {
    // Inside containers: every pool address configured on an interface, once in the lab.
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let pools: Vec<Net> = s.records.pools.values().map(|p| p.cidr).collect();
    for host in &s.hosts {
        for (path, state) in &host.containers {
            let Ok(state) = state else { continue };
            for link in &state.links {
                for a in link["addr_info"].as_array().into_iter().flatten() {
                    let Some(ip) = a["local"].as_str().and_then(|x| x.parse::<IpAddr>().ok())
                    else {
                        continue;
                    };
                    if pools.iter().any(|p| p.contains(ip)) {
                        seen.entry(ip.to_string())
                            .or_default()
                            .insert(format!("{path} {}", link["ifname"].as_str().unwrap_or("?")));
                    }
                }
            }
        }
    }
    // On hosts: a container /32 routed by two hosts.
    let mut routed: BTreeMap<Net, Vec<&str>> = BTreeMap::new();
    for host in &s.hosts {
        let Ok(k) = &host.kernel else { continue };
        for r in &k.routes {
            if let (Some(net), Target::Dev(_)) =
                (Net::parse(r["dst"].as_str().unwrap_or("")), route_target(r))
            {
                if net.len == net.family().bits() {
                    routed.entry(net).or_default().push(&host.name);
                }
            }
        }
    }
    for (ip, places) in seen {
        if places.len() > 1 {
            v.push(Violation::new(
                "cluster",
                format!("address {ip} in containers"),
                "configured once",
                places.into_iter().collect::<Vec<_>>().join("; "),
            ));
        }
    }
    for (net, hosts) in routed {
        if hosts.len() > 1 {
            v.push(Violation::new(
                "cluster",
                format!("route {net}"),
                "one host with a container route to it",
                hosts.join(", "),
            ));
        }
    }
}
