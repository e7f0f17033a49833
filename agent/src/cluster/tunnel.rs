//! This host's tunnel address as it stands in etcd: kept across restarts when the host still
//! holds its guard. (A new one is taken when a peer first needs the tunnel:
//! `endpoints::allocate::allocate_tunnel`.)

use std::net::IpAddr;

use weft_etcd::{Datastore, StoreError};

/// The tunnel address recorded for this host, if its `ips/` guard is still the host's.
pub async fn existing(store: &Datastore, me: &str) -> Result<Option<IpAddr>, StoreError> {
    let Some(ip) = store.get_host(me).await?.and_then(|h| h.tunnel_ip) else {
        return Ok(None);
    };
    let held = store.get_ip(ip).await?;
    Ok(held.is_some_and(|r| r.host == me && r.tunnel).then_some(ip))
}
