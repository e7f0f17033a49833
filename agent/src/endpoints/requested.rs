//! A requested address: given when it lies in a pool, in a block of this host or of no host
//! (then this host claims that block), and nobody holds it; otherwise refused naming why and
//! who. Written under the same `ips/` guard as any address.

use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tracing::debug;
use weft_etcd::records::{EndpointRecord, IpRecord};
use weft_etcd::{alloc, BlockRef};

use super::allocate::{adopt, choose_veth_name, write, Written, ATTEMPTS};
use super::error::EndpointError;
use super::table::Held;
use crate::context::Context;
use crate::model::ContainerId;

/// How long to wait for a release of the address's block under way before looking again.
const RELEASE_WAIT: Duration = Duration::from_millis(20);

/// The pool holding `ip` (among those the attach names, if it names some) and the block of it
/// that holds `ip`.
fn place(
    ctx: &Context,
    pools: &[String],
    ip: IpAddr,
) -> Result<(String, IpNetwork), EndpointError> {
    let pool = super::pools::for_address(&ctx.config.pools, pools, ip)?;
    Ok((pool.name.clone(), alloc::block_of(ip, pool.block_size)))
}

/// Allocates the requested addresses (at most one per family, checked by the request) and
/// writes the endpoint record guarded by the address.
pub async fn allocate_requested(
    ctx: &Context,
    id: &ContainerId,
    ips: &[IpAddr],
    pools: &[String],
    make: impl Fn(IpAddr, String) -> EndpointRecord,
) -> Result<EndpointRecord, EndpointError> {
    let mut placed = ips
        .iter()
        .map(|ip| place(ctx, pools, *ip).map(|(pool, block)| (*ip, pool, block)));
    // The caller passes at least one address, at most one per family; a requested address is
    // allocated alone (a dual-stack pair is not requested in one write yet).
    let (ip, pool, block) = placed.next().ok_or(EndpointError::Contention)??;
    if let Some(other) = placed.next() {
        let (other, _, _) = other?;
        return Err(EndpointError::BothFamiliesRequested(ip, other));
    }
    allocate_exact(ctx, id, ip, &pool, block, make).await
}

async fn allocate_exact(
    ctx: &Context,
    id: &ContainerId,
    ip: IpAddr,
    pool: &str,
    block: IpNetwork,
    make: impl Fn(IpAddr, String) -> EndpointRecord,
) -> Result<EndpointRecord, EndpointError> {
    for _ in 0..ATTEMPTS {
        let holder = ctx
            .cluster
            .with_view(|view| view.blocks.get(&block).map(|owner| owner.host.clone()));
        match holder {
            None => {
                claim(ctx, ip, pool, block).await?;
                continue;
            }
            Some(host) if host != ctx.me() => {
                return Err(EndpointError::AddressElsewhere { ip, block, host })
            }
            Some(_) => {}
        }
        let reserved = ctx
            .endpoints
            .reserve_exact(ip, block, ctx.tunnel_ip(), |names| {
                choose_veth_name(id, names)
            });
        let name = match reserved {
            Ok(name) => name,
            Err(Held::Retiring) => {
                tokio::time::sleep(RELEASE_WAIT).await;
                continue;
            }
            Err(held) => {
                return Err(EndpointError::AddressTaken {
                    ip,
                    holder: describe_held(ctx, held),
                })
            }
        };
        let block_ref = BlockRef {
            pool: pool.to_string(),
            block,
        };
        match write(ctx, make(ip, name), vec![block_ref]).await? {
            Written::Done(record) => return Ok(*record),
            Written::IpTaken => match ctx.store.ip_holder(ip).await? {
                Some(holder) => {
                    return Err(EndpointError::AddressTaken {
                        ip,
                        holder: describe_record(&holder),
                    })
                }
                None => debug!(%ip, "requested address freed meanwhile; trying again"),
            },
            Written::BlockReleased => tokio::time::sleep(RELEASE_WAIT).await,
        }
    }
    Err(EndpointError::Contention)
}

/// Claims the free block of a requested address, or names the host that took it first.
async fn claim(
    ctx: &Context,
    ip: IpAddr,
    pool: &str,
    block: IpNetwork,
) -> Result<(), EndpointError> {
    let _claim = ctx.claim.lock().await;
    if ctx
        .cluster
        .with_view(|view| view.blocks.contains_key(&block))
    {
        return Ok(());
    }
    if ctx.store.claim_exact_block(pool, block, ctx.me()).await? {
        adopt(ctx, pool, block).await;
        return Ok(());
    }
    match ctx.store.block_holder(pool, block).await? {
        Some(host) if host != ctx.me() => Err(EndpointError::AddressElsewhere { ip, block, host }),
        // Ours after all, or released meanwhile: look again.
        _ => Ok(()),
    }
}

fn describe_held(ctx: &Context, held: Held) -> String {
    match held {
        Held::Endpoint(container) => format!("container {container}"),
        Held::Tunnel => format!("the VXLAN tunnel of host {}", ctx.me()),
        Held::Pending => "an attach under way".to_string(),
        Held::Retiring => unreachable!("a release is waited for"),
    }
}

fn describe_record(record: &IpRecord) -> String {
    match record.container_id.as_str() {
        "" => format!("the VXLAN tunnel of host {}", record.host),
        container => format!("container {container} on host {}", record.host),
    }
}
