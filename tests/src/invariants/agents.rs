//! Each agent's answers (Status and List) against etcd.

use super::*;

pub(super) fn check_agent(s: &Snapshot, host: &HostView, v: &mut Vec<Violation>) {
    let name = &host.name;
    let status = match &host.agent {
        AgentView::NotRunning => {
            v.push(Violation::new(
                name,
                "agent",
                "a running agent",
                "no agent process",
            ));
            return;
        }
        AgentView::Silent(e) => {
            v.push(Violation::new(
                name,
                "agent API",
                "answers to List and Status",
                e.clone(),
            ));
            return;
        }
        AgentView::Answered { status, .. } => status,
    };
    let r = &s.records;
    let text = |field: &str| status[field].as_str().unwrap_or("").to_string();
    if text("host") != *name {
        v.push(Violation::new(
            name,
            "Status.host",
            name.clone(),
            text("host"),
        ));
    }
    if text("underlay_ip") != host.ip.to_string() {
        v.push(Violation::new(
            name,
            "Status.underlay_ip",
            host.ip.to_string(),
            text("underlay_ip"),
        ));
    }
    let ip6 = host.ip6.map(|ip| ip.to_string()).unwrap_or_default();
    if text("underlay_ipv6") != ip6 {
        v.push(Violation::new(
            name,
            "Status.underlay_ipv6",
            format!("{ip6:?}"),
            format!("{:?}", text("underlay_ipv6")),
        ));
    }
    if status["etcd_connected"] != Value::Bool(true) {
        v.push(Violation::new(
            name,
            "Status.etcd_connected",
            "true",
            status["etcd_connected"].to_string(),
        ));
    }
    let recorded = r.endpoints_of(name).len() as u64;
    if status["endpoint_count"].as_u64() != Some(recorded) {
        v.push(Violation::new(
            name,
            "Status.endpoint_count",
            format!("{recorded} (endpoint records in etcd)"),
            status["endpoint_count"].to_string(),
        ));
    }
    if let Some(problems) = status["problems"].as_array() {
        for p in problems {
            v.push(Violation::new(
                name,
                "Status.problems",
                "none",
                p.as_str().map(str::to_string).unwrap_or(p.to_string()),
            ));
        }
    }
    let nets = |value: &Value| -> BTreeSet<String> {
        value
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str())
                    .map(|b| Net::parse(b).map_or(b.to_string(), |n| n.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let names =
        |blocks: BTreeSet<Net>| -> BTreeSet<String> { blocks.iter().map(Net::to_string).collect() };
    let local = nets(&status["local_blocks"]);
    if local != names(r.blocks_of(name)) {
        v.push(Violation::new(
            name,
            "Status.local_blocks",
            format!("{:?} (etcd)", names(r.blocks_of(name))),
            format!("{local:?}"),
        ));
    }
    let empty = vec![];
    let peers: BTreeMap<String, &Value> = status["peers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|p| (p["host"].as_str().unwrap_or("").to_string(), p))
        .collect();
    for (peer, ip) in r.hosts.iter().filter(|(h, _)| *h != name) {
        let Some(p) = peers.get(peer) else {
            v.push(Violation::new(
                name,
                format!("Status peer {peer}"),
                "listed (etcd has hosts/ for it)",
                "missing",
            ));
            continue;
        };
        if p["underlay_ip"].as_str() != Some(ip.to_string().as_str()) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} underlay_ip"),
                ip.to_string(),
                p["underlay_ip"].to_string(),
            ));
        }
        let ip6 = r
            .hosts_v6
            .get(peer)
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        if p["underlay_ipv6"].as_str().unwrap_or("") != ip6 {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} underlay_ipv6"),
                format!("{ip6:?} (etcd)"),
                p["underlay_ipv6"].to_string(),
            ));
        }
        let alive = r.alive.contains(peer);
        if p["alive"].as_bool() != Some(alive) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} alive"),
                format!(
                    "{alive} (etcd alive/{peer} {})",
                    if alive { "present" } else { "absent" }
                ),
                p["alive"].to_string(),
            ));
        }
        let blocks = nets(&p["blocks"]);
        if blocks != names(r.blocks_of(peer)) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer} blocks"),
                format!("{:?} (etcd)", names(r.blocks_of(peer))),
                format!("{blocks:?}"),
            ));
        }
    }
    for peer in peers.keys() {
        if peer == name || !r.hosts.contains_key(peer) {
            v.push(Violation::new(
                name,
                format!("Status peer {peer}"),
                "only peers with a hosts/ record",
                "listed",
            ));
        }
    }
}

/// The agent's List against etcd's endpoint records of the host.
pub(super) fn check_list(
    s: &Snapshot,
    host: &HostView,
    listed: &[Endpoint],
    v: &mut Vec<Violation>,
) {
    let name = &host.name;
    let recorded = s.records.endpoints_of(name);
    let mut seen = BTreeSet::new();
    for e in listed {
        if !seen.insert(e.id.as_str()) {
            v.push(Violation::new(
                name,
                format!("List endpoint {}", e.id),
                "listed once",
                "listed twice",
            ));
        }
        let Some(r) = recorded.get(e.id.as_str()) else {
            v.push(Violation::new(
                name,
                format!("List endpoint {}", e.id),
                format!("a record endpoints/{name}/{}", e.id),
                "none",
            ));
            continue;
        };
        let fields = [
            ("ip", r.ip.to_string(), e.ip.to_string()),
            ("ipv6", format!("{:?}", r.ipv6), format!("{:?}", e.ipv6)),
            ("host_ifname", r.host_ifname.clone(), e.host_ifname.clone()),
            ("ifname", r.ifname.clone(), e.ifname.clone()),
            ("netns", r.netns.clone(), e.netns.clone()),
            ("mac", r.mac.clone(), e.mac.clone()),
            ("ports", ports_text(&r.ports), ports_text(&e.ports)),
        ];
        for (field, want, got) in fields {
            if want != got {
                v.push(Violation::new(
                    name,
                    format!("List endpoint {} {field}", e.id),
                    format!("{want} (etcd)"),
                    got,
                ));
            }
        }
    }
    for id in recorded.keys() {
        if !seen.contains(id) {
            v.push(Violation::new(
                name,
                format!("etcd endpoints/{name}/{id}"),
                "the endpoint in the agent's List",
                "not listed",
            ));
        }
    }
}
