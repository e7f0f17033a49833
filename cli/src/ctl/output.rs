//! How weftctl shows things: aligned tables for people, JSON for scripts.

use serde_json::json;
use weft_proto::v1 as pb;

pub fn endpoint_json(e: &pb::Endpoint) -> serde_json::Value {
    json!({
        "container_id": e.container_id,
        "host": e.host,
        "ip": e.ip,
        "gateway": e.gateway,
        "mac": e.mac,
        "host_ifname": e.host_ifname,
        "ifname": e.ifname,
        "netns": e.netns,
        "ports": e.ports.iter().map(|p| json!({
            "protocol": p.protocol, "host_port": p.host_port, "container_port": p.container_port,
        })).collect::<Vec<_>>(),
        "labels": e.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

fn ports_text(ports: &[pb::PortMapping]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|p| format!("{}:{}/{}", p.host_port, p.container_port, p.protocol))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    match pairs.is_empty() {
        true => "-".into(),
        false => pairs.join(","),
    }
}

/// Renders rows as a table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

pub fn endpoint_rows(endpoints: &[pb::Endpoint]) -> String {
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            vec![
                e.container_id.clone(),
                e.ip.clone(),
                e.host_ifname.clone(),
                e.mac.clone(),
                ports_text(&e.ports),
                e.netns.clone(),
                labels_text(&e.labels),
            ]
        })
        .collect();
    table(
        &["CONTAINER", "IP", "VETH", "MAC", "PORTS", "NETNS", "LABELS"],
        &rows,
    )
}

pub fn status_text(s: &pb::StatusResponse) -> String {
    let mut out = format!(
        "host:      {}\nunderlay:  {} ({})\nversion:   {}\netcd:      {}\nendpoints: {}\nroutes:    {}\n",
        s.host,
        s.underlay_ip,
        s.underlay_interface,
        s.version,
        if s.etcd_connected { "connected" } else { "UNREACHABLE" },
        s.endpoint_count,
        s.route_count,
    );
    for pool in &s.pools {
        out.push_str(&format!(
            "pool:      {} {} (/{} blocks, nat-outgoing {})\n",
            pool.name,
            pool.cidr,
            pool.block_size,
            if pool.nat_outgoing { "on" } else { "off" }
        ));
    }
    let blocks = if s.local_blocks.is_empty() {
        "-".to_string()
    } else {
        s.local_blocks.join(", ")
    };
    out.push_str(&format!("blocks:    {blocks}\n"));
    for problem in &s.problems {
        out.push_str(&format!("PROBLEM    {problem}\n"));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .peers
        .iter()
        .map(|p| {
            vec![
                p.host.clone(),
                p.underlay_ip.clone(),
                if p.alive { "alive" } else { "DOWN" }.to_string(),
                if p.blocks.is_empty() {
                    "-".to_string()
                } else {
                    p.blocks.join(",")
                },
            ]
        })
        .collect();
    out.push_str(&table(&["PEER", "UNDERLAY", "STATE", "BLOCKS"], &rows));
    out
}

pub fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    json!({
        "host": s.host,
        "underlay_ip": s.underlay_ip,
        "underlay_interface": s.underlay_interface,
        "version": s.version,
        "etcd_connected": s.etcd_connected,
        "endpoint_count": s.endpoint_count,
        "route_count": s.route_count,
        "rule_count": s.rule_count,
        "pools": s.pools.iter().map(|p| json!({
            "name": p.name, "cidr": p.cidr, "block_size": p.block_size,
            "nat_outgoing": p.nat_outgoing,
        })).collect::<Vec<_>>(),
        "local_blocks": s.local_blocks,
        "problems": s.problems,
        "peers": s.peers.iter().map(|p| json!({
            "host": p.host, "underlay_ip": p.underlay_ip, "blocks": p.blocks, "alive": p.alive,
        })).collect::<Vec<_>>(),
    })
}

pub fn print(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value:#}");
    } else {
        println!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }
}
