//! Blocks given back: a block of this host that has held no address for
//! `--block-release-after` goes back to its pool (never a pool's last block on the host), so
//! autoscaled hosts do not leave blocks behind. `plan` decides which are due; this module
//! releases them without ever racing an allocation:
//!
//! 1. Only this host allocates in its blocks. Under the lock allocations reserve under, the
//!    block is checked empty (endpoints, attaches under way, foreign records, the tunnel
//!    address) and marked retiring; no allocation picks from it from then on.
//! 2. The block key is deleted only while it is still this host's (a guarded delete).
//! 3. The view drops it and the mark is lifted. An attach that read the view before and picks
//!    an address of the block afterwards is refused by etcd (its write requires the block to
//!    exist) and tries again on the view as it is.
//!
//! A write of an earlier agent of this host, still in flight when it was killed, lands within
//! one etcd request: the grace is required to be longer than that (`--etcd-timeout`).

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use crate::context::Context;
use plan::EmptySince;

/// Checks this host's blocks for emptiness until the agent stops; nothing with
/// `--block-release-after off`.
pub async fn run_releaser(ctx: Arc<Context>) {
    let Some(after) = ctx.config.block_release_after else {
        return;
    };
    let period = (after / 10).clamp(Duration::from_millis(100), Duration::from_secs(10));
    let mut empty = EmptySince::default();
    loop {
        tokio::time::sleep(period).await;
        release_due(&ctx, &mut empty, after).await;
    }
}

/// One check: notes empty blocks and releases those whose grace is over.
pub async fn release_due(ctx: &Context, empty: &mut EmptySince, after: Duration) {
    let blocks: BTreeMap<IpNetwork, String> = ctx.cluster.with_view(|view| {
        view.blocks
            .iter()
            .filter(|(_, owner)| owner.host == ctx.me())
            .map(|(block, owner)| (*block, owner.pool.clone()))
            .collect()
    });
    let mut used: BTreeSet<IpAddr> = ctx
        .endpoints
        .list()
        .iter()
        .flat_map(|e| e.addresses().collect::<Vec<_>>())
        .collect();
    used.extend(ctx.tunnel_ip());
    for (pool, block) in empty.due(&blocks, &used, Instant::now(), after) {
        empty.forget(block);
        release(ctx, &pool, block).await;
    }
}

/// Releases one block if it is still empty.
async fn release(ctx: &Context, pool: &str, block: IpNetwork) {
    if !ctx.endpoints.retire(block, ctx.tunnel_ip()) {
        return;
    }
    match ctx.store.release_block(pool, block, ctx.me()).await {
        Ok(true) => {
            ctx.cluster.released(pool, block);
            ctx.metrics.blocks_released.fetch_add(1, Ordering::Relaxed);
            info!(%block, pool, "released a block that held no address");
            // Its blackhole route goes with the next pass.
            ctx.request_resync();
        }
        Ok(false) => warn!(%block, "block to release is no longer this host's"),
        Err(e) => warn!(%block, error = %e, "cannot release block; will retry"),
    }
    ctx.endpoints.unretire(block);
}
