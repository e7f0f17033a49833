//! Requested addresses: each is given when it lies in a pool, in a block of this host or of no
//! host (then this host claims that block), and nobody holds it; otherwise refused naming why
//! and who. On a dual-stack host a family the request names no address of gets any free
//! address of its pools, as an attach without requested addresses would. All of the endpoint's
//! addresses are written in one record transaction under their `ips/` guards: all or none.

use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tracing::debug;
use weft_etcd::records::{EndpointRecord, IpRecord};
use weft_etcd::{alloc, BlockRef};

use super::allocate::{adopt, choose_veth_name, reserve_from, write, Reserved, Written, ATTEMPTS};
use super::error::EndpointError;
use super::pools;
use super::table::Held;
use crate::config::PoolSettings;
use crate::context::Context;
use crate::model::ContainerId;

/// How long to wait for a release of the address's block under way before looking again.
const RELEASE_WAIT: Duration = Duration::from_millis(20);

/// One address of the endpoint to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// A requested address, in `block` of `pool`.
    Exact {
        ip: IpAddr,
        pool: String,
        block: IpNetwork,
    },
    /// Any free address of these pools (of one family, in order of preference).
    Any(Vec<&'a PoolSettings>),
}

/// What an attach with requested addresses (at most one per family, checked by the request)
/// allocates, the endpoint's first address first (IPv4 when it has one): each requested
/// address in its pool (among those the attach names, if it names some), and for a family the
/// attach's pools have (those it names, else the host's defaults) but no address is requested
/// of, any free address of those pools. Pure.
pub fn plan<'a>(
    pools: &'a [PoolSettings],
    asked: &[String],
    ips: &[IpAddr],
) -> Result<Vec<Wanted<'a>>, EndpointError> {
    // [IPv4, IPv6]
    let mut wanted: [Option<Wanted<'a>>; 2] = [None, None];
    for ip in ips {
        let pool = pools::for_address(pools, asked, *ip)?;
        wanted[usize::from(ip.is_ipv6())] = Some(Wanted::Exact {
            ip: *ip,
            pool: pool.name.clone(),
            block: alloc::block_of(*ip, pool.block_size),
        });
    }
    if wanted.iter().any(Option::is_none) {
        let chosen = pools::choose(pools, asked)?;
        for (slot, v6) in [(0, false), (1, true)] {
            let family: Vec<&PoolSettings> = chosen
                .iter()
                .copied()
                .filter(|p| p.cidr.is_ipv6() == v6)
                .collect();
            if wanted[slot].is_none() && !family.is_empty() {
                wanted[slot] = Some(Wanted::Any(family));
            }
        }
    }
    Ok(wanted.into_iter().flatten().collect())
}

/// Allocates the requested addresses (and an automatic one of a family not requested, on a
/// dual-stack host) and writes the endpoint record guarded by every address.
pub async fn allocate_requested(
    ctx: &Context,
    id: &ContainerId,
    ips: &[IpAddr],
    pools: &[String],
    make: impl Fn(IpAddr, String) -> EndpointRecord,
) -> Result<EndpointRecord, EndpointError> {
    let wanted = plan(&ctx.config.pools, pools, ips)?;
    for _ in 0..ATTEMPTS {
        let Some(reserved) = reserve_all(ctx, id, &wanted).await? else {
            continue;
        };
        let mut record = make(reserved[0].ip, reserved[0].name.clone());
        record.ipv6 = reserved.get(1).map(|r| r.ip);
        let blocks = reserved.into_iter().map(|r| r.block).collect();
        match write(ctx, record, blocks).await? {
            Written::Done(record) => return Ok(*record),
            Written::IpTaken(ip) if ips.contains(&ip) => match ctx.store.ip_holder(ip).await? {
                Some(holder) => {
                    return Err(EndpointError::AddressTaken {
                        ip,
                        holder: describe_record(&holder),
                    })
                }
                None => debug!(%ip, "requested address freed meanwhile; trying again"),
            },
            Written::IpTaken(ip) => debug!(%ip, "address taken by a record unknown here"),
            Written::BlockReleased => tokio::time::sleep(RELEASE_WAIT).await,
        }
    }
    Err(EndpointError::Contention)
}

/// Reserves every wanted address, the requested ones first (a refusal then costs no automatic
/// address or block); the first address gets the veth name. None: look again (a block was
/// claimed or is being released); nothing stays reserved then, nor on an error.
async fn reserve_all(
    ctx: &Context,
    id: &ContainerId,
    wanted: &[Wanted<'_>],
) -> Result<Option<Vec<Reserved>>, EndpointError> {
    let mut order: Vec<usize> = (0..wanted.len()).collect();
    order.sort_by_key(|i| matches!(wanted[*i], Wanted::Any(_)));
    let mut reserved: Vec<Option<Reserved>> = wanted.iter().map(|_| None).collect();
    for i in order {
        let named = i == 0;
        let outcome = match &wanted[i] {
            Wanted::Exact { ip, pool, block } => {
                reserve_exact(ctx, id, *ip, pool, *block, named).await
            }
            Wanted::Any(pools) => reserve_from(ctx, id, pools, named).await.map(Some),
        };
        match outcome {
            Ok(Some(r)) => reserved[i] = Some(r),
            other => {
                reserved.iter().flatten().for_each(|r| r.abandon(ctx));
                return other.map(|_| None);
            }
        }
    }
    Ok(Some(reserved.into_iter().flatten().collect()))
}

/// Reserves one requested address (with a veth name when `named`), claiming its block if it is
/// nobody's. None: look again.
async fn reserve_exact(
    ctx: &Context,
    id: &ContainerId,
    ip: IpAddr,
    pool: &str,
    block: IpNetwork,
    named: bool,
) -> Result<Option<Reserved>, EndpointError> {
    let holder = ctx
        .cluster
        .with_view(|view| view.blocks.get(&block).map(|owner| owner.host.clone()));
    match holder {
        None => {
            claim(ctx, ip, pool, block).await?;
            return Ok(None);
        }
        Some(host) if host != ctx.me() => {
            return Err(EndpointError::AddressElsewhere { ip, block, host })
        }
        Some(_) => {}
    }
    let reserved = ctx
        .endpoints
        .reserve_exact(ip, block, ctx.tunnel_ip(), |taken| match named {
            true => choose_veth_name(id, |name| taken.name(name)),
            // The second address comes with no veth: an empty name reserves nothing.
            false => String::new(),
        });
    match reserved {
        Ok(name) => Ok(Some(Reserved {
            ip,
            name,
            block: BlockRef {
                pool: pool.to_string(),
                block,
            },
        })),
        Err(Held::Retiring) => {
            tokio::time::sleep(RELEASE_WAIT).await;
            Ok(None)
        }
        Err(held) => Err(EndpointError::AddressTaken {
            ip,
            holder: describe_held(ctx, held),
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, cidr: &str) -> PoolSettings {
        PoolSettings {
            name: name.into(),
            cidr: cidr.parse().unwrap(),
            block_size: if cidr.contains(':') { 122 } else { 26 },
            nat_outgoing: true,
            encapsulation: Default::default(),
            disabled: false,
            default: false,
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    /// The plan as text: `=ADDRESS@POOL:BLOCK` for a requested address, `*POOLS` for any one.
    fn shown(plan: Result<Vec<Wanted>, EndpointError>) -> Vec<String> {
        plan.unwrap()
            .iter()
            .map(|w| match w {
                Wanted::Exact { ip, pool, block } => format!("={ip}@{pool}:{block}"),
                Wanted::Any(pools) => {
                    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                    format!("*{}", names.join(","))
                }
            })
            .collect()
    }

    #[test]
    fn a_family_not_requested_gets_any_address_of_its_pools() {
        let pools = [
            pool("default", "10.65.0.0/16"),
            pool("default-v6", "fd65::/48"),
        ];
        let plan = |asked: &[&str], wanted: &[&str]| {
            let asked: Vec<String> = asked.iter().map(|s| s.to_string()).collect();
            shown(super::plan(&pools, &asked, &ips(wanted)))
        };
        assert_eq!(
            plan(&[], &["10.65.7.2", "fd65::7"]),
            [
                "=10.65.7.2@default:10.65.7.0/26",
                "=fd65::7@default-v6:fd65::/122"
            ]
        );
        assert_eq!(
            plan(&[], &["fd65::7", "10.65.7.2"]),
            [
                "=10.65.7.2@default:10.65.7.0/26",
                "=fd65::7@default-v6:fd65::/122"
            ],
            "the IPv4 address comes first, whatever the request's order"
        );
        assert_eq!(
            plan(&[], &["10.65.7.2"]),
            ["=10.65.7.2@default:10.65.7.0/26", "*default-v6"]
        );
        assert_eq!(
            plan(&[], &["fd65::7"]),
            ["*default", "=fd65::7@default-v6:fd65::/122"]
        );
        // Named pools decide the families, as for an attach without requested addresses.
        assert_eq!(
            plan(&["default"], &["10.65.7.2"]),
            ["=10.65.7.2@default:10.65.7.0/26"]
        );
    }

    #[test]
    fn a_single_family_host_allocates_the_requested_address_alone() {
        let pools = [pool("default", "10.65.0.0/16")];
        assert_eq!(
            shown(plan(&pools, &[], &ips(&["10.65.7.2"]))),
            ["=10.65.7.2@default:10.65.7.0/26"]
        );
        let err = plan(&pools, &[], &ips(&["fd65::7"])).unwrap_err();
        assert!(matches!(err, EndpointError::OutsidePools { .. }), "{err}");
    }

    #[test]
    fn an_address_outside_every_pool_refuses_the_pair() {
        let pools = [
            pool("default", "10.65.0.0/16"),
            pool("default-v6", "fd65::/48"),
        ];
        let err = plan(&pools, &[], &ips(&["10.65.7.2", "fd66::7"])).unwrap_err();
        assert!(
            matches!(err, EndpointError::OutsidePools { ip } if ip.to_string() == "fd66::7"),
            "{err}"
        );
    }
}
