//! Cluster-wide records: pools, hosts, liveness, blocks, guard keys and endpoints (with their
//! addresses of both families) against each other and against the lab.

use super::*;

pub(super) fn check_cluster(s: &Snapshot, v: &mut Vec<Violation>) {
    let r = &s.records;
    let lab_hosts: BTreeMap<&str, &HostView> =
        s.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    if r.pools.is_empty() {
        v.push(Violation::new("cluster", "etcd pools/", "a pool", "none"));
    }
    for name in r.hosts.keys() {
        if !lab_hosts.contains_key(name.as_str()) {
            v.push(Violation::new(
                "cluster",
                format!("etcd hosts/{name}"),
                "only hosts of this lab",
                "a host the lab does not have",
            ));
        }
    }
    for name in &r.alive {
        if !lab_hosts.contains_key(name.as_str()) {
            v.push(Violation::new(
                "cluster",
                format!("etcd alive/{name}"),
                "only hosts of this lab",
                "a host the lab does not have",
            ));
        }
    }
    for host in &s.hosts {
        let running = !matches!(host.agent, AgentView::NotRunning);
        match (running, r.alive.contains(&host.name)) {
            (true, false) => v.push(Violation::new(
                &host.name,
                format!("etcd alive/{}", host.name),
                "present (the agent runs)",
                "missing",
            )),
            (false, true) => v.push(Violation::new(
                &host.name,
                format!("etcd alive/{}", host.name),
                "absent (no agent runs)",
                "present",
            )),
            _ => {}
        }
        match r.hosts.get(&host.name) {
            Some(ip) if *ip != host.ip => v.push(Violation::new(
                &host.name,
                format!("etcd hosts/{}", host.name),
                format!("underlay {}", host.ip),
                format!("underlay {ip}"),
            )),
            None if running => v.push(Violation::new(
                &host.name,
                format!("etcd hosts/{}", host.name),
                "present (the agent runs)",
                "missing",
            )),
            _ => {}
        }
        let registered = r.hosts_v6.get(&host.name).copied();
        if r.hosts.contains_key(&host.name) && registered != host.ip6.map(IpAddr::V6) {
            v.push(Violation::new(
                &host.name,
                format!("etcd hosts/{} underlay_ipv6", host.name),
                format!("{:?} (the lab host's)", host.ip6),
                format!("{registered:?}"),
            ));
        }
    }

    // Blocks: in their pool, of the pool's size, owned by a known host, never overlapping.
    for (i, (pool, block, owner)) in r.blocks.iter().enumerate() {
        let object = format!("etcd blocks/{pool}/{}-{}", block.addr, block.len);
        match r.pools.get(pool) {
            None => v.push(Violation::new(
                "cluster",
                &object,
                "a block of an existing pool",
                format!("no pool {pool}"),
            )),
            Some(p) if !p.cidr.contains_net(block) || block.len != p.block_size => {
                v.push(Violation::new(
                    "cluster",
                    &object,
                    format!("a /{} inside {}", p.block_size, p.cidr),
                    block.to_string(),
                ))
            }
            Some(_) => {}
        }
        if !r.hosts.contains_key(owner) {
            v.push(Violation::new(
                "cluster",
                &object,
                "an owner in hosts/",
                format!("owner {owner}, unknown"),
            ));
        }
        for (other_pool, other, other_owner) in &r.blocks[i + 1..] {
            if block.overlaps(other) {
                v.push(Violation::new(
                    "cluster",
                    &object,
                    "no overlap with another block",
                    format!("overlaps {other_pool}/{other} of {other_owner}"),
                ));
            }
        }
    }

    // Guard keys one to one with endpoints' addresses (of both families).
    for (ip, (host, id)) in &r.ips {
        let object = format!("etcd ips/{ip}");
        match r.endpoints.get(&(host.clone(), id.clone())) {
            None => v.push(Violation::new(
                scope_of(s, host),
                object,
                format!("an endpoint record endpoints/{host}/{id}"),
                "none (leaked address)",
            )),
            Some(e) if !e.addresses().contains(ip) => v.push(Violation::new(
                scope_of(s, host),
                object,
                format!("endpoints/{host}/{id} to hold {ip}"),
                format!(
                    "it holds {}",
                    e.addresses()
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            )),
            Some(_) => {}
        }
    }
    // Tunnel address guards one to one with the hosts' tunnel addresses.
    for (ip, host) in &r.tunnel_ips {
        if r.tunnels.get(host) != Some(ip) {
            v.push(Violation::new(
                scope_of(s, host),
                format!("etcd ips/{ip} (tunnel)"),
                format!("the tunnel address of {host}"),
                format!("{host}'s is {:?}", r.tunnels.get(host)),
            ));
        }
    }
    for (host, ip) in &r.tunnels {
        if r.tunnel_ips.get(ip) != Some(host) {
            v.push(Violation::new(
                scope_of(s, host),
                format!("etcd hosts/{host} tunnel_ip {ip}"),
                format!("a tunnel guard ips/{ip} held by {host}"),
                format!("{:?}", r.tunnel_ips.get(ip)),
            ));
        }
    }
    let mut holders: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for ((host, id), e) in &r.endpoints {
        let object = format!("etcd endpoints/{host}/{id}");
        for ip in e.addresses() {
            holders.entry(ip).or_default().push(format!("{host}/{id}"));
            check_address(r, host, id, ip, &object, v);
        }
        if !r.hosts.contains_key(host) {
            v.push(Violation::new(
                host,
                &object,
                format!("a host record hosts/{host}"),
                "none",
            ));
        }
        let mut seen = BTreeSet::new();
        for p in &e.ports {
            if !seen.insert((p.protocol.clone(), p.host_port)) {
                v.push(Violation::new(
                    host,
                    &object,
                    "each host port published once",
                    format!("{}/{} twice", p.protocol, p.host_port),
                ));
            }
            match r
                .ports
                .get(&(host.clone(), p.protocol.clone(), p.host_port))
            {
                Some(owner) if owner == id => {}
                other => v.push(Violation::new(
                    host,
                    &object,
                    format!(
                        "a reservation ports/{host}/{}/{} for {id}",
                        p.protocol, p.host_port
                    ),
                    match other {
                        Some(owner) => format!("reserved for {owner}"),
                        None => "no reservation".into(),
                    },
                )),
            }
        }
    }
    for (ip, who) in holders {
        if who.len() > 1 {
            v.push(Violation::new(
                "cluster",
                format!("address {ip}"),
                "one endpoint",
                format!("endpoints {}", who.join(", ")),
            ));
        }
    }
    for ((host, protocol, port), owner) in &r.ports {
        let publishes = r
            .endpoints
            .get(&(host.clone(), owner.clone()))
            .is_some_and(|e| {
                e.ports
                    .iter()
                    .any(|p| p.protocol == *protocol && p.host_port == *port)
            });
        if !publishes {
            v.push(Violation::new(
                scope_of(s, host),
                format!("etcd ports/{host}/{protocol}/{port}"),
                format!("endpoint {host}/{owner} publishing {protocol}/{port}"),
                "no such endpoint or port (leaked reservation)",
            ));
        }
    }

    // No block held without need beyond one spare per host and pool.
    let mut held: BTreeMap<(&str, &str), Vec<Net>> = BTreeMap::new();
    for (pool, block, host) in &r.blocks {
        held.entry((host.as_str(), pool.as_str()))
            .or_default()
            .push(*block);
    }
    for ((host, pool), blocks) in held {
        let used = blocks
            .iter()
            .filter(|b| {
                r.endpoints
                    .values()
                    .any(|e| e.host == host && e.addresses().iter().any(|ip| b.contains(*ip)))
            })
            .count();
        if blocks.len() > used + 1 {
            v.push(Violation::new(
                scope_of(s, host),
                format!("blocks of pool {pool}"),
                format!("at most {} ({used} in use + 1 spare)", used + 1),
                format!(
                    "{}: {}",
                    blocks.len(),
                    blocks
                        .iter()
                        .map(Net::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
}

/// One address of an endpoint: guarded for it, inside a block of its host.
fn check_address(
    r: &Records,
    host: &String,
    id: &str,
    ip: IpAddr,
    object: &str,
    v: &mut Vec<Violation>,
) {
    match r.ips.get(&ip) {
        None => v.push(Violation::new(
            host,
            object,
            format!("a guard key ips/{ip}"),
            "none",
        )),
        Some((h, i)) if h != host || i != id => v.push(Violation::new(
            host,
            object,
            format!("ips/{ip} held by {host}/{id}"),
            format!("held by {h}/{i}"),
        )),
        Some(_) => {}
    }
    let owners: Vec<&String> = r
        .blocks
        .iter()
        .filter(|(_, b, _)| b.contains(ip))
        .map(|(_, _, h)| h)
        .collect();
    if owners != vec![host] {
        v.push(Violation::new(
            host,
            object,
            format!("{ip} inside a block of {host}"),
            if owners.is_empty() {
                "inside no block".to_string()
            } else {
                format!("inside blocks of {owners:?}")
            },
        ));
    }
}

/// The lab host a record concerns, or `cluster` when it names no lab host.
pub(super) fn scope_of(s: &Snapshot, host: &str) -> String {
    if s.hosts.iter().any(|h| h.name == host) {
        host.to_string()
    } else {
        "cluster".into()
    }
}
