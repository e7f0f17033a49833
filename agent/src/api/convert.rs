//! Protobuf messages to domain values and back.

use weft_etcd::records::{EndpointRecord, PortRecord};
use weft_proto::v1 as pb;

use crate::context::VERSION;
use crate::model::{
    port_mapping, AttachRequest, ContainerId, IfName, Invalid, GATEWAY_V4, GATEWAY_V6,
};
use crate::reconcile::plan::peers::PeerPath;
use crate::status::HostStatus;

impl TryFrom<pb::AttachRequest> for AttachRequest {
    type Error = Invalid;

    /// Checks in the order a client would fix things: the id, the interface, each port, then
    /// the ports as a set and where the namespace comes from.
    fn try_from(req: pb::AttachRequest) -> Result<Self, Invalid> {
        ContainerId::new(&req.container_id)?;
        if !req.ifname.is_empty() {
            IfName::new(&req.ifname)?;
        }
        let ports = req
            .ports
            .iter()
            .map(|p| port_mapping(&p.protocol, p.host_port, p.container_port))
            .collect::<Result<Vec<_>, _>>()?;
        AttachRequest::new(&req.container_id, &req.netns, req.pid, &req.ifname, ports)?
            .with_labels(req.labels.into_iter().collect())?
            .with_ips(&req.ips)?
            .with_pools(&req.pools)
    }
}

pub fn endpoint_to_pb(record: &EndpointRecord) -> pb::Endpoint {
    pb::Endpoint {
        container_id: record.container_id.clone(),
        host: record.host.clone(),
        ip: shown(record.address_of(true)),
        gateway: match record.address_of(true) {
            Some(_) => GATEWAY_V4.to_string(),
            None => String::new(),
        },
        ipv6: shown(record.address_of(false)),
        gateway_v6: match record.address_of(false) {
            Some(_) => GATEWAY_V6.to_string(),
            None => String::new(),
        },
        mac: record.mac.clone(),
        host_ifname: record.host_ifname.clone(),
        netns: record.netns.clone(),
        ports: record.ports.iter().map(port_to_pb).collect(),
        ifname: record.ifname.clone(),
        labels: record
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// An optional address as the API shows it: empty when absent.
fn shown(ip: Option<std::net::IpAddr>) -> String {
    ip.map(|ip| ip.to_string()).unwrap_or_default()
}

fn port_to_pb(port: &PortRecord) -> pb::PortMapping {
    pb::PortMapping {
        protocol: port.protocol.to_string(),
        host_port: port.host_port.into(),
        container_port: port.container_port.into(),
    }
}

pub fn status_to_pb(status: HostStatus) -> pb::StatusResponse {
    pb::StatusResponse {
        host: status.host,
        underlay_ip: status.underlay.ip.to_string(),
        underlay_interface: status.underlay.ifname,
        underlay_ipv6: shown(status.underlay.ipv6),
        pools: status
            .pools
            .into_iter()
            .map(|(name, pool)| pb::Pool {
                name,
                cidr: pool.cidr.to_string(),
                block_size: pool.block_size.into(),
                nat_outgoing: pool.nat_outgoing,
                encapsulation: pool.encapsulation.to_string(),
            })
            .collect(),
        local_blocks: status.local_blocks.iter().map(|b| b.to_string()).collect(),
        endpoint_count: status.endpoint_count as u32,
        etcd_connected: status.etcd_connected,
        version: VERSION.to_string(),
        peers: status
            .peers
            .into_iter()
            .map(|p| pb::Peer {
                host: p.host,
                underlay_ip: p.underlay_ip.to_string(),
                underlay_ipv6: shown(p.underlay_ipv6),
                blocks: p.blocks.iter().map(|b| b.to_string()).collect(),
                alive: p.alive,
                encapsulated: matches!(p.path, PeerPath::Tunnel { .. }),
                mode: p.path.mode().to_string(),
            })
            .collect(),
        route_count: status.route_count as u32,
        rule_count: status.rule_count as u32,
        problems: status.problems,
        mtu: status.mtu,
        tunnel_ip: status
            .tunnel_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        vtep_mac: status.vtep_mac.unwrap_or_default(),
        bgp: status.bgp.map(bgp_to_pb),
    }
}

fn bgp_to_pb(bgp: crate::bgp::BgpStatus) -> pb::BgpStatus {
    pb::BgpStatus {
        asn: bgp.asn.get(),
        router_id: bgp.router_id.to_string(),
        daemon_running: bgp.daemon.is_ok(),
        daemon_error: bgp.daemon.err().unwrap_or_default(),
        sessions: bgp
            .sessions
            .into_iter()
            .map(|s| pb::BgpSession {
                address: s.address.to_string(),
                asn: s.asn.get(),
                state: s.state,
                info: s.info,
                since: s.since.unwrap_or(0),
            })
            .collect(),
        announced: bgp.announced.iter().map(|b| b.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ip: &str, ipv6: Option<&str>) -> EndpointRecord {
        EndpointRecord {
            container_id: "web".into(),
            host: "h1".into(),
            ip: ip.parse().unwrap(),
            host_ifname: "weft1".into(),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/a".into(),
            owns_netns: false,
            ports: vec![],
            created: 0,
            secondary: false,
            labels: Default::default(),
            ipv6: ipv6.map(|ip| ip.parse().unwrap()),
        }
    }

    #[test]
    fn an_endpoint_shows_each_family_in_its_own_fields() {
        let dual = endpoint_to_pb(&record("10.65.0.5", Some("fd65::5")));
        let fields = |e: &pb::Endpoint| {
            (
                e.ip.clone(),
                e.gateway.clone(),
                e.ipv6.clone(),
                e.gateway_v6.clone(),
            )
        };
        assert_eq!(
            fields(&dual),
            (
                "10.65.0.5".into(),
                "169.254.1.1".into(),
                "fd65::5".into(),
                "fe80::ecee:eeff:feee:eeee".into()
            )
        );
        let v4 = endpoint_to_pb(&record("10.65.0.5", None));
        assert_eq!(fields(&v4).2, "");
        assert_eq!(fields(&v4).3, "");
        let v6 = endpoint_to_pb(&record("fd65::7", None));
        assert_eq!(
            fields(&v6),
            (
                String::new(),
                String::new(),
                "fd65::7".into(),
                "fe80::ecee:eeff:feee:eeee".into()
            )
        );
    }
}
