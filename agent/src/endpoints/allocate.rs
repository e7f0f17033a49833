//! Address allocation on this host: an address of this host's blocks that no endpoint, pending
//! attach or foreign record holds, a veth name no endpoint uses, a new block when the blocks are
//! full, and the endpoint record written under the address guard.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use tracing::{debug, info, warn};
use weft_etcd::records::EndpointRecord;
use weft_etcd::{alloc, BlockRef, CreateConflict, StoreError};

use super::error::EndpointError;
use super::table::{Settle, Taken};
use crate::config::PoolSettings;
use crate::context::Context;
use crate::model::{veth_name, ContainerId, Route, RouteTarget};

/// Tries before giving up when etcd keeps saying the picked address is taken.
pub(super) const ATTEMPTS: usize = 64;

/// The first veth name for `id` that no other endpoint (or pending attach) uses.
pub fn choose_veth_name(id: &ContainerId, taken: impl Fn(&str) -> bool) -> String {
    (0..)
        .map(|attempt| veth_name(id, attempt))
        .find(|name| !taken(name))
        .expect("a free name among unboundedly many")
}

/// The blocks an allocation may pick from: not those being released.
fn open_blocks(blocks: &[IpNetwork], taken: &Taken) -> Vec<IpNetwork> {
    blocks
        .iter()
        .filter(|b| !taken.retiring(b))
        .copied()
        .collect()
}

/// An address reserved in the table for an attach, with the block it lies in; settled by
/// `write` (or abandoned).
pub(super) struct Reserved {
    pub(super) ip: IpAddr,
    /// The veth name reserved with it (empty for the second address of a dual-stack endpoint).
    pub(super) name: String,
    pub(super) block: BlockRef,
}

impl Reserved {
    /// Gives the address (and name) back: the attach will not write it.
    pub(super) fn abandon(&self, ctx: &Context) {
        ctx.endpoints.settle(self.ip, &self.name, Settle::Abandoned);
    }
}

/// Allocates one address per family of `pools`: each from the first of that family's pools
/// (in order) with a free address or block left. A dual-stack endpoint's two addresses are
/// written in one transaction: both or neither.
pub async fn allocate(
    ctx: &Context,
    id: &ContainerId,
    pools: &[&PoolSettings],
    make: impl Fn(IpAddr, String) -> EndpointRecord,
) -> Result<EndpointRecord, EndpointError> {
    let (primary, secondary) = by_family(pools);
    for _ in 0..ATTEMPTS {
        let first = reserve_from(ctx, id, &primary, true).await?;
        let second = match secondary.is_empty() {
            true => None,
            false => match reserve_from(ctx, id, &secondary, false).await {
                Ok(reserved) => Some(reserved),
                Err(e) => {
                    first.abandon(ctx);
                    return Err(e);
                }
            },
        };
        let mut record = make(first.ip, first.name.clone());
        record.ipv6 = second.as_ref().map(|r| r.ip);
        let blocks = std::iter::once(first.block)
            .chain(second.map(|r| r.block))
            .collect();
        match write(ctx, record, blocks).await? {
            Written::Done(record) => return Ok(*record),
            Written::IpTaken(_) => {
                debug!("address taken in etcd by a record unknown here; trying another");
            }
            // Released after the view was read (by another agent of this host's name, or an
            // operator): try again on the view as it is now.
            Written::BlockReleased => debug!("block released meanwhile; trying another"),
        }
    }
    Err(EndpointError::Contention)
}

/// The pools of the endpoint's first address (IPv4 when there is an IPv4 pool), and those of
/// its IPv6 address when it has both families.
fn by_family<'a>(pools: &[&'a PoolSettings]) -> (Vec<&'a PoolSettings>, Vec<&'a PoolSettings>) {
    let (v4, v6): (Vec<&PoolSettings>, Vec<&PoolSettings>) =
        pools.iter().partition(|p| p.cidr.is_ipv4());
    match v4.is_empty() {
        true => (v6, vec![]),
        false => (v4, v6),
    }
}

/// Reserves an address of the first of `pools` (in order) that has one free or a block left.
pub(super) async fn reserve_from(
    ctx: &Context,
    id: &ContainerId,
    pools: &[&PoolSettings],
    named: bool,
) -> Result<Reserved, EndpointError> {
    let (last, earlier) = pools.split_last().ok_or(EndpointError::NoPool)?;
    for pool in earlier {
        match reserve_in(ctx, id, pool, named).await {
            Err(EndpointError::Store(StoreError::PoolExhausted { .. })) => {
                debug!(pool = %pool.name, "pool exhausted; trying the next one");
            }
            other => return other,
        }
    }
    reserve_in(ctx, id, last, named).await
}

/// Reserves an address of `pool`'s blocks of this host (and a veth name when `named`),
/// claiming a block when they are full.
async fn reserve_in(
    ctx: &Context,
    id: &ContainerId,
    pool: &PoolSettings,
    named: bool,
) -> Result<Reserved, EndpointError> {
    for _ in 0..ATTEMPTS {
        let blocks = ctx.cluster.pool_blocks_of(&pool.name, ctx.me());
        let picked = ctx.endpoints.reserve(ctx.tunnel_ip(), |taken| {
            let open = open_blocks(&blocks, taken);
            let ip = alloc::first_free_ip(&open, |ip| taken.ip(ip))?;
            let block = *open.iter().find(|b| b.contains(ip))?;
            // The second address comes with no veth: an empty name reserves nothing.
            let name = match named {
                true => choose_veth_name(id, |name| taken.name(name)),
                false => String::new(),
            };
            Some((ip, name, block))
        });
        match picked {
            Some((ip, name, block)) => {
                let block = BlockRef {
                    pool: pool.name.clone(),
                    block,
                };
                return Ok(Reserved { ip, name, block });
            }
            None => claim_block(ctx, pool, blocks.len()).await?,
        }
    }
    Err(EndpointError::Contention)
}

/// How writing a reserved address's endpoint record ended, when it did not fail outright.
pub(super) enum Written {
    Done(Box<EndpointRecord>),
    /// A record unknown here holds this address (it is marked foreign).
    IpTaken(IpAddr),
    /// A block was released after the view was read.
    BlockReleased,
}

/// Writes the endpoint record of addresses reserved in the table (its veth name reserved with
/// `record.ip`), and settles the reservations by the outcome.
pub(super) async fn write(
    ctx: &Context,
    record: EndpointRecord,
    blocks: Vec<BlockRef>,
) -> Result<Written, EndpointError> {
    let (ip, name) = (record.ip, record.host_ifname.clone());
    // The second address's reservation ends once the first one's says what became of both.
    let settle_second = |outcome: &dyn Fn(IpAddr) -> Settle| {
        if let Some(ipv6) = record.ipv6 {
            ctx.endpoints.settle(ipv6, "", outcome(ipv6));
        }
    };
    match ctx.store.create_endpoint(record.clone(), blocks).await {
        Ok(()) => {
            ctx.endpoints
                .settle(ip, &name, Settle::Written(Box::new(record.clone())));
            settle_second(&|_| Settle::Abandoned);
            Ok(Written::Done(Box::new(record)))
        }
        Err(CreateConflict::IpTaken(taken)) => {
            let outcome = |a: IpAddr| match a == taken {
                true => Settle::Foreign,
                false => Settle::Abandoned,
            };
            ctx.endpoints.settle(ip, &name, outcome(ip));
            settle_second(&outcome);
            Ok(Written::IpTaken(taken))
        }
        // Our own write, retried on another endpoint after its answer was lost.
        Err(CreateConflict::EndpointExists(existing)) if *existing == record => {
            ctx.endpoints.settle(ip, &name, Settle::Written(existing));
            settle_second(&|_| Settle::Abandoned);
            Ok(Written::Done(Box::new(record)))
        }
        Err(conflict) => {
            ctx.endpoints.settle(ip, &name, Settle::Abandoned);
            settle_second(&|_| Settle::Abandoned);
            failed(ctx, record, conflict)
        }
    }
}

/// The answer to a write that left nothing reserved.
fn failed(
    ctx: &Context,
    record: EndpointRecord,
    conflict: CreateConflict,
) -> Result<Written, EndpointError> {
    match conflict {
        CreateConflict::Store(StoreError::BlockReleased { .. }) => Ok(Written::BlockReleased),
        CreateConflict::EndpointExists(existing) => Err(EndpointError::WrittenElsewhere {
            container: existing.container_id,
            ip: existing.ip,
        }),
        CreateConflict::Store(e) => {
            // An answer lost on the way back: etcd may still commit the write.
            if matches!(e, StoreError::Unavailable(_)) {
                ctx.endpoints.undeliver(record);
            }
            Err(e.into())
        }
        CreateConflict::IpTaken(taken) => Ok(Written::IpTaken(taken)),
    }
}

/// Takes a tunnel address for this host (the first free address of its blocks, a block claimed
/// if need be) under the `ips/` guard, and registers it with the host's VTEP MAC.
pub async fn allocate_tunnel(ctx: &Context) -> Result<IpAddr, EndpointError> {
    let settings = tunnel_pool(&ctx.config.pools).ok_or(EndpointError::NoPool)?;
    let pool = &settings.name;
    for _ in 0..ATTEMPTS {
        let blocks = ctx.cluster.pool_blocks_of(pool, ctx.me());
        let picked = ctx.endpoints.reserve(None, |taken| {
            let open = open_blocks(&blocks, taken);
            let ip = alloc::first_free_ip(&open, |ip| taken.ip(ip))?;
            let block = *open.iter().find(|b| b.contains(ip))?;
            // No veth comes with it: an empty name reserves nothing.
            Some((ip, String::new(), block))
        });
        let Some((ip, _, block)) = picked else {
            claim_block(ctx, settings, blocks.len()).await?;
            continue;
        };
        let claimed = ctx.store.claim_tunnel_ip(ctx.me(), ip, pool, block).await;
        match claimed {
            Ok(true) => {
                ctx.endpoints.settle(ip, "", Settle::Abandoned);
                ctx.set_tunnel(ip);
                ctx.store.register_host(ctx.me(), &ctx.host()).await?;
                info!(%ip, "tunnel address taken");
                return Ok(ip);
            }
            Ok(false) => ctx.endpoints.settle(ip, "", Settle::Foreign),
            Err(e) => {
                ctx.endpoints.settle(ip, "", Settle::Abandoned);
                return Err(e.into());
            }
        }
    }
    Err(EndpointError::Contention)
}

/// The pool the host's tunnel address comes from: its first enabled IPv4 pool (the tunnel
/// carries IPv4).
pub fn tunnel_pool(pools: &[PoolSettings]) -> Option<&PoolSettings> {
    pools.iter().find(|p| !p.disabled && p.cidr.is_ipv4())
}

/// Claims one more block of `pool` unless another attach did so while we waited for the claim
/// lock.
async fn claim_block(
    ctx: &Context,
    pool: &PoolSettings,
    blocks_seen: usize,
) -> Result<(), EndpointError> {
    let _claim = ctx.claim.lock().await;
    if ctx.cluster.pool_blocks_of(&pool.name, ctx.me()).len() > blocks_seen {
        return Ok(());
    }
    let block = ctx
        .store
        .claim_block(&pool.name, &pool.record(), ctx.me())
        .await?;
    adopt(ctx, &pool.name, block).await;
    Ok(())
}

/// Takes a block just claimed into the view, with its blackhole route.
pub(super) async fn adopt(ctx: &Context, pool: &str, block: IpNetwork) {
    info!(%block, "claimed block");
    ctx.cluster.claimed(pool, block, ctx.me());
    // Unused addresses of the block must be dropped here, not sent to the default route.
    let blackhole = Route {
        dst: block,
        target: RouteTarget::Blackhole,
    };
    if let Err(e) = ctx.kernel.replace_route(&blackhole).await {
        warn!(%block, error = %e, "cannot add blackhole route; the reconciler will retry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashing_names_move_to_the_next_alternative() {
        let id = ContainerId::new("victim-3507330").unwrap();
        let other = ContainerId::new("victim-476022").unwrap();
        let taken = veth_name(&other, 0);
        let name = choose_veth_name(&id, |name| name == taken);
        assert_eq!(name, veth_name(&id, 1));
        assert_eq!(choose_veth_name(&id, |_| false), veth_name(&id, 0));
    }
}
