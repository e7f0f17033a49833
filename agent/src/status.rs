//! The agent's view of its host and the cluster, as `Status` and the metrics gauges show it.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use weft_etcd::records::PoolRecord;

use crate::context::Context;
use crate::kernel::Underlay;
use crate::reconcile::plan::peers::PeerPath;
use crate::telemetry::metrics::Gauges;

/// A peer as shown by `Status`.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub host: String,
    pub underlay_ip: IpAddr,
    pub underlay_ipv6: Option<IpAddr>,
    pub blocks: Vec<IpNetwork>,
    pub alive: bool,
    /// How its blocks are reached.
    pub path: PeerPath,
}

/// The agent's answer to `Status`.
#[derive(Debug, Clone)]
pub struct HostStatus {
    pub host: String,
    pub underlay: Underlay,
    pub pools: Vec<(String, PoolRecord)>,
    pub local_blocks: Vec<IpNetwork>,
    pub endpoint_count: usize,
    pub etcd_connected: bool,
    pub peers: Vec<PeerStatus>,
    pub route_count: usize,
    pub rule_count: usize,
    pub problems: Vec<String>,
    pub mtu: u32,
    pub tunnel_ip: Option<IpAddr>,
    pub vtep_mac: Option<String>,
    /// With --bgp: bird's sessions and what it announces.
    pub bgp: Option<crate::bgp::BgpStatus>,
}

pub async fn status(ctx: &Context) -> HostStatus {
    let etcd_connected = ctx.store.ping().await.is_ok();
    let pools = match etcd_connected {
        true => ctx.store.list_pools().await.unwrap_or_default(),
        false => ctx
            .config
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.record()))
            .collect(),
    };
    let (peers, local_blocks) = ctx.cluster.with_view(|view| {
        let paths = ctx.peer_paths(view);
        let peers = view
            .hosts
            .iter()
            .filter(|(name, _)| name.as_str() != ctx.me())
            .map(|(name, host)| PeerStatus {
                host: name.clone(),
                underlay_ip: host.underlay_ip,
                underlay_ipv6: host.underlay_ipv6,
                blocks: view.blocks_of(name),
                alive: view.alive.contains(name),
                path: paths.get(name).copied().unwrap_or(PeerPath::Unrouted),
            })
            .collect();
        (peers, view.blocks_of(ctx.me()))
    });
    let route_count = ctx.kernel.routes().await.map(|r| r.len()).unwrap_or(0);
    let bgp = match ctx.bgp.get() {
        Some(speaker) => Some(speaker.status().await),
        None => None,
    };
    HostStatus {
        host: ctx.me().to_string(),
        underlay: ctx.underlay.clone(),
        pools,
        local_blocks,
        endpoint_count: ctx.endpoints.len(),
        etcd_connected,
        peers,
        route_count,
        rule_count: ctx.firewall.rule_count(),
        problems: ctx.problems(),
        mtu: ctx.mtu(),
        tunnel_ip: ctx.tunnel_ip(),
        vtep_mac: ctx.host().vtep_mac,
        bgp,
    }
}

/// Gauges for a scrape, read now.
pub async fn gauges(ctx: &Context) -> Gauges {
    let status = status(ctx).await;
    Gauges {
        endpoints: status.endpoint_count,
        local_blocks: status.local_blocks.len(),
        peers_alive: status.peers.iter().filter(|p| p.alive).count(),
        peers_down: status.peers.iter().filter(|p| !p.alive).count(),
        routes: status.route_count,
        rules: status.rule_count,
        etcd_connected: status.etcd_connected,
        bgp_sessions: status
            .bgp
            .map(|bgp| crate::bgp::sessions_by_state(&bgp.sessions))
            .unwrap_or_default(),
    }
}
