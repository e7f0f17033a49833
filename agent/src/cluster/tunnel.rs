//! This host's tunnel address: one address of the pool, held under the same `ips/` guard as a
//! container's (so it can never collide with one), kept across restarts.

use std::collections::HashSet;
use std::net::IpAddr;

use tracing::info;
use weft_etcd::records::{EndpointRecord, PoolRecord};
use weft_etcd::{alloc, ClusterView, Datastore, StoreError};

/// Attempts before giving up when other hosts keep taking the candidates.
const ATTEMPTS: usize = 64;

/// The address this host's VXLAN device carries: the one recorded for it if it still holds
/// it, else the first free address of its blocks (a block is claimed when none is free).
pub async fn tunnel_address(
    store: &Datastore,
    me: &str,
    pool_name: &str,
    pool: &PoolRecord,
    cluster: &ClusterView,
    endpoints: &[EndpointRecord],
) -> Result<IpAddr, StoreError> {
    if let Some(ip) = store.get_host(me).await?.and_then(|h| h.tunnel_ip) {
        let held = store.get_ip(ip).await?;
        if held.is_some_and(|r| r.host == me && r.tunnel) {
            return Ok(ip);
        }
    }
    let mut blocks = cluster.pool_blocks_of(pool_name, me);
    let mut used: HashSet<IpAddr> = endpoints.iter().map(|e| e.ip).collect();
    for _ in 0..ATTEMPTS {
        let Some(ip) = alloc::first_free_ip(&blocks, &used) else {
            let block = store.claim_block(pool_name, pool, me).await?;
            info!(%block, "claimed block for the tunnel address");
            blocks.push(block);
            blocks.sort();
            continue;
        };
        let block = *blocks
            .iter()
            .find(|b| b.contains(ip))
            .expect("ip from a block");
        if store.claim_tunnel_ip(me, ip, pool_name, block).await? {
            info!(%ip, "tunnel address taken");
            return Ok(ip);
        }
        used.insert(ip);
    }
    Err(StoreError::Contention {
        what: "taking a tunnel address".into(),
        attempts: ATTEMPTS as u32,
    })
}
