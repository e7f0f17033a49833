//! Container namespaces, the agents' own namespaces, and addresses held once in the lab.

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
        let up = |l: &Value| {
            l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP"))
        };
        if !link("lo").is_some_and(up) {
            v.push(Violation::new(name, object("lo"), "up", "down or missing"));
        }
        match link(&e.ifname) {
            None => v.push(Violation::new(
                name,
                object(&format!("interface {}", e.ifname)),
                "present",
                "missing",
            )),
            Some(l) => {
                if !up(l) {
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
                let addrs: Vec<String> = l["addr_info"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|x| x["family"] == "inet")
                            .map(|x| {
                                format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"])
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let want = format!("{}/32", e.ip);
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
        let neighbour = state.neighbours.iter().find(|n| {
            n["dst"].as_str() == Some(GATEWAY) && n["dev"].as_str() == Some(e.ifname.as_str())
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
                object(&format!("neighbour {GATEWAY} dev {}", e.ifname)),
                format!("lladdr {VETH_MAC} PERMANENT"),
                neighbour.map_or("none".to_string(), Value::to_string),
            ));
        }
    }
    check_default_routes(s, host, v);
}

/// Each container namespace has exactly one default route, in its main table, via the gateway
/// on one of its weft interfaces (the contract: only the first weft interface of a namespace
/// carries it; later ones route their own traffic through a table of their own).
pub(super) fn check_default_routes(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let mut interfaces: BTreeMap<&String, Vec<&str>> = BTreeMap::new();
    for (_, e) in s.records.endpoints_of(&host.name) {
        interfaces
            .entry(&e.netns)
            .or_default()
            .push(e.ifname.as_str());
    }
    for (netns, ifnames) in interfaces {
        let Some(Ok(state)) = host.containers.get(netns) else {
            continue; // already named by the per-container checks
        };
        let defaults: Vec<&Value> = state
            .routes
            .iter()
            .filter(|r| {
                r["dst"].as_str() == Some("default")
                    && r["table"].as_str().unwrap_or("main") == "main"
            })
            .collect();
        let good = defaults.len() == 1
            && defaults[0]["gateway"].as_str() == Some(GATEWAY)
            && defaults[0]["dev"]
                .as_str()
                .is_some_and(|dev| ifnames.contains(&dev));
        if !good {
            v.push(Violation::new(
                &host.name,
                format!("namespace {netns} default route"),
                format!("one, via {GATEWAY} on one of {ifnames:?}"),
                format!("{defaults:?}"),
            ));
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
                    let Some(ip) = a["local"].as_str().and_then(|x| x.parse::<Ipv4Addr>().ok())
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
                if net.len == 32 {
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
