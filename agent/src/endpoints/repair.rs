//! Repair of one endpoint's dataplane: decided from what is observed (`plan`, pure), then
//! carried out (`repair`). A missing veth is rebuilt in the recorded namespace (a namespace the
//! agent owns is made again); a present one gets its sysctls, route and container side set again
//! where they differ, and its port rules verified.

use tracing::info;
use weft_etcd::records::EndpointRecord;

use super::attach::wire;
use super::error::EndpointError;
use crate::context::Context;
use crate::firewall::SyncMode;
use crate::kernel::{ContainerLink, InsideCheck, NetnsError};
use crate::model::{ContainerId, Route, RouteTarget};

/// What was observed of an endpoint.
#[derive(Debug)]
pub struct Observed {
    /// The index of the host veth, if it is in service.
    pub host_link: Option<u32>,
    /// Whether the recorded namespace opens (and the reason it does not).
    pub netns: Result<(), NetnsError>,
    pub owns_netns: bool,
    /// What is wrong inside, when the host veth and the namespace are there.
    pub inside: Option<InsideCheck>,
}

/// What to do inside the container's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsideFix {
    Nothing,
    /// Address, routes or neighbour differ: set them again.
    Rewire,
    /// The container's interface is gone (renamed, moved, deleted): make the pair again.
    RebuildPair,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairPlan {
    /// The veth is there: host side set again, then inside as needed.
    HostSide(InsideFix),
    /// The veth is gone: make the pair again, in a new namespace if the agent's own is gone.
    Rebuild { new_namespace: bool },
    /// The namespace is gone and not the agent's to make again.
    NamespaceGone,
}

pub fn plan(observed: &Observed) -> RepairPlan {
    match (&observed.host_link, &observed.netns) {
        (_, Err(_)) if observed.owns_netns => RepairPlan::Rebuild {
            new_namespace: true,
        },
        (_, Err(_)) => RepairPlan::NamespaceGone,
        (None, Ok(())) => RepairPlan::Rebuild {
            new_namespace: false,
        },
        (Some(_), Ok(())) => RepairPlan::HostSide(match &observed.inside {
            Some(inside) if !inside.interface_present => InsideFix::RebuildPair,
            Some(inside) if !inside.problems.is_empty() => InsideFix::Rewire,
            _ => InsideFix::Nothing,
        }),
    }
}

async fn observe(
    ctx: &Context,
    record: &EndpointRecord,
    link: &ContainerLink,
) -> Result<Observed, EndpointError> {
    let host_link = ctx.kernel.links().await?.get(&record.host_ifname).copied();
    let netns = ctx.kernel.vet_netns(&record.netns).map(|_| ());
    let inside = match (host_link, &netns) {
        (Some(_), Ok(())) => Some(ctx.kernel.check_inside(&record.netns, link).await?),
        _ => None,
    };
    Ok(Observed {
        host_link,
        netns,
        owns_netns: record.owns_netns,
        inside,
    })
}

/// Brings a known endpoint's dataplane back if it was damaged.
pub async fn repair(ctx: &Context, record: &EndpointRecord) -> Result<(), EndpointError> {
    let link = super::link_of(ctx, record)?;
    let observed = observe(ctx, record, &link).await?;
    match plan(&observed) {
        RepairPlan::HostSide(inside) => {
            let index = observed.host_link.expect("planned with a host link");
            repair_host_side(ctx, record, index).await?;
            match inside {
                InsideFix::Nothing => return Ok(()),
                InsideFix::Rewire => ctx.kernel.rewire_inside(&record.netns, &link).await?,
                InsideFix::RebuildPair => {
                    ctx.kernel.delete_link(&record.host_ifname).await?;
                    wire(ctx, record, &link).await?;
                }
            }
            let problems = observed.inside.map(|i| i.problems).unwrap_or_default();
            info!(container = %record.container_id, ?problems, "repaired container side");
        }
        RepairPlan::Rebuild { new_namespace } => {
            if new_namespace {
                let id = ContainerId::new(&record.container_id)?;
                ctx.kernel.create_netns(&ctx.owned_netns_name(&id)).await?;
            }
            wire(ctx, record, &link).await?;
            info!(container = %record.container_id, "repaired endpoint dataplane");
        }
        RepairPlan::NamespaceGone => {
            return Err(EndpointError::NamespaceGone {
                container: record.container_id.clone(),
                source: observed
                    .netns
                    .expect_err("planned with a missing namespace"),
            })
        }
    }
    Ok(())
}

async fn repair_host_side(
    ctx: &Context,
    record: &EndpointRecord,
    index: u32,
) -> Result<(), EndpointError> {
    ctx.kernel
        .configure_veth(&record.host_ifname, ctx.veth_has_ipv6(record))
        .map_err(|source| crate::kernel::KernelError::Io {
            what: format!("sysctls of {}", record.host_ifname),
            source,
        })?;
    for ip in record.addresses() {
        ctx.kernel
            .replace_route(&Route::host(ip, RouteTarget::Dev(index)))
            .await?;
    }
    if !record.ports.is_empty() {
        ctx.firewall
            .sync(|| ctx.firewall_spec(), SyncMode::Verify, &ctx.metrics)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(host_link: bool, netns: bool, owns: bool, inside: Option<InsideCheck>) -> Observed {
        Observed {
            host_link: host_link.then_some(7),
            netns: if netns {
                Ok(())
            } else {
                Err(NetnsError::Missing { path: "/x".into() })
            },
            owns_netns: owns,
            inside,
        }
    }

    fn inside(present: bool, problems: &[&str]) -> Option<InsideCheck> {
        Some(InsideCheck {
            interface_present: present,
            problems: problems.iter().map(|p| p.to_string()).collect(),
        })
    }

    #[test]
    fn each_observation_has_its_repair() {
        let cases = [
            (
                observed(true, true, false, inside(true, &[])),
                RepairPlan::HostSide(InsideFix::Nothing),
            ),
            (
                observed(true, true, false, inside(true, &["lo is down"])),
                RepairPlan::HostSide(InsideFix::Rewire),
            ),
            (
                observed(true, true, false, inside(false, &["eth0 is missing"])),
                RepairPlan::HostSide(InsideFix::RebuildPair),
            ),
            (
                observed(false, true, false, None),
                RepairPlan::Rebuild {
                    new_namespace: false,
                },
            ),
            (
                observed(false, false, true, None),
                RepairPlan::Rebuild {
                    new_namespace: true,
                },
            ),
            (
                observed(true, false, true, None),
                RepairPlan::Rebuild {
                    new_namespace: true,
                },
            ),
            (
                observed(false, false, false, None),
                RepairPlan::NamespaceGone,
            ),
        ];
        for (observed, expected) in cases {
            assert_eq!(plan(&observed), expected, "{observed:?}");
        }
    }
}
