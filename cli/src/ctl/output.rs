//! How weftctl shows things: aligned tables for people, JSON for scripts.

use serde_json::json;
use weft_proto::v1 as pb;

pub fn endpoint_json(e: &pb::Endpoint) -> serde_json::Value {
    json!({
        "container_id": e.container_id,
        "host": e.host,
        "ip": e.ip,
        "gateway": e.gateway,
        "ipv6": e.ipv6,
        "gateway_v6": e.gateway_v6,
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

/// The addresses of both families that are present, comma-separated ("-" for none).
fn both(v4: &str, v6: &str) -> String {
    let present: Vec<&str> = [v4, v6].into_iter().filter(|a| !a.is_empty()).collect();
    match present.is_empty() {
        true => "-".into(),
        false => present.join(","),
    }
}

pub fn endpoint_rows(endpoints: &[pb::Endpoint]) -> String {
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            vec![
                e.container_id.clone(),
                both(&e.ip, &e.ipv6),
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
        both(&s.underlay_ip, &s.underlay_ipv6),
        s.underlay_interface,
        s.version,
        if s.etcd_connected { "connected" } else { "UNREACHABLE" },
        s.endpoint_count,
        s.route_count,
    );
    for pool in &s.pools {
        out.push_str(&format!(
            "pool:      {} {} (/{} blocks, nat-outgoing {}, encapsulation {})\n",
            pool.name,
            pool.cidr,
            pool.block_size,
            if pool.nat_outgoing { "on" } else { "off" },
            pool.encapsulation
        ));
    }
    out.push_str(&format!("mtu:       {}\n", s.mtu));
    if !s.tunnel_ip.is_empty() {
        out.push_str(&format!("tunnel:    {} ({})\n", s.tunnel_ip, s.vtep_mac));
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
                both(&p.underlay_ip, &p.underlay_ipv6),
                if p.alive { "alive" } else { "DOWN" }.to_string(),
                p.mode.clone(),
                if p.blocks.is_empty() {
                    "-".to_string()
                } else {
                    p.blocks.join(",")
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["PEER", "UNDERLAY", "STATE", "MODE", "BLOCKS"],
        &rows,
    ));
    if let Some(bgp) = &s.bgp {
        out.push_str("\n\n");
        out.push_str(&bgp_text(bgp));
    }
    out
}

/// The BGP part of `weftctl status`: bird, what it announces, one row per session.
fn bgp_text(bgp: &pb::BgpStatus) -> String {
    let daemon = match bgp.daemon_running {
        true => "running".to_string(),
        false => format!("NOT ANSWERING ({})", bgp.daemon_error),
    };
    let announced = match bgp.announced.is_empty() {
        true => "-".to_string(),
        false => bgp.announced.join(", "),
    };
    let mut out = format!(
        "bgp:       AS {}, router id {}, bird {daemon}\nannounced: {announced}\n\n",
        bgp.asn, bgp.router_id
    );
    let rows: Vec<Vec<String>> = bgp
        .sessions
        .iter()
        .map(|p| {
            vec![
                p.address.clone(),
                p.asn.to_string(),
                p.state.clone(),
                p.info.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["BGP PEER", "ASN", "SESSION", "INFO"], &rows));
    out
}

pub fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    json!({
        "host": s.host,
        "underlay_ip": s.underlay_ip,
        "underlay_interface": s.underlay_interface,
        "underlay_ipv6": s.underlay_ipv6,
        "version": s.version,
        "etcd_connected": s.etcd_connected,
        "endpoint_count": s.endpoint_count,
        "route_count": s.route_count,
        "rule_count": s.rule_count,
        "pools": s.pools.iter().map(|p| json!({
            "name": p.name, "cidr": p.cidr, "block_size": p.block_size,
            "nat_outgoing": p.nat_outgoing, "encapsulation": p.encapsulation,
        })).collect::<Vec<_>>(),
        "local_blocks": s.local_blocks,
        "problems": s.problems,
        "mtu": s.mtu,
        "tunnel_ip": s.tunnel_ip,
        "vtep_mac": s.vtep_mac,
        "peers": s.peers.iter().map(|p| json!({
            "host": p.host, "underlay_ip": p.underlay_ip, "underlay_ipv6": p.underlay_ipv6,
            "blocks": p.blocks, "alive": p.alive,
            "encapsulated": p.encapsulated, "mode": p.mode,
        })).collect::<Vec<_>>(),
        "bgp": s.bgp.as_ref().map(|b| json!({
            "asn": b.asn, "router_id": b.router_id, "daemon_running": b.daemon_running,
            "daemon_error": b.daemon_error, "announced": b.announced,
            "sessions": b.sessions.iter().map(|p| json!({
                "address": p.address, "asn": p.asn, "state": p.state, "info": p.info,
                "since": p.since,
            })).collect::<Vec<_>>(),
        })),
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
    fn status_shows_bgp_sessions() {
        let status = pb::StatusResponse {
            bgp: Some(pb::BgpStatus {
                asn: 64512,
                router_id: "198.51.100.1".into(),
                daemon_running: true,
                daemon_error: String::new(),
                sessions: vec![pb::BgpSession {
                    address: "198.51.100.100".into(),
                    asn: 64513,
                    state: "Established".into(),
                    info: String::new(),
                    since: 1_700_000_000,
                }],
                announced: vec!["10.65.7.0/26".into()],
            }),
            ..Default::default()
        };
        let text = status_text(&status);
        assert!(
            text.ends_with(
                "bgp:       AS 64512, router id 198.51.100.1, bird running\n\
                 announced: 10.65.7.0/26\n\n\
                 BGP PEER        ASN    SESSION      INFO\n\
                 198.51.100.100  64513  Established"
            ),
            "{text}"
        );
        let json = status_json(&status);
        assert_eq!(json["bgp"]["sessions"][0]["state"], "Established");
        assert_eq!(json["bgp"]["sessions"][0]["asn"], 64513);
        assert!(status_json(&pb::StatusResponse::default())["bgp"].is_null());
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }
}
