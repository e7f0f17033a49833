//! Attach: validate (done by the caller), find or make the container's namespace, allocate,
//! wire, publish ports; any failure rolls everything back. A repeated attach of an attached
//! container repairs it.

use std::time::Instant;

use tracing::{info, warn};
use weft_etcd::records::{EndpointRecord, Protocol};

use super::allocate::allocate;
use super::error::EndpointError;
use super::{pools, reattach, requested, teardown};
use crate::context::Context;
use crate::firewall::SyncMode;
use crate::kernel::{ContainerLink, KernelError, NetnsError};
use crate::model::{AttachRequest, Mac, NetnsSpec, PortMapping};

/// The container's namespace for this attach.
struct ContainerNetns {
    path: String,
    /// Made by the agent for this container (deleted on detach or failed attach).
    owned: bool,
}

pub async fn attach(
    ctx: &Context,
    request: AttachRequest,
) -> Result<EndpointRecord, EndpointError> {
    let id = &request.container_id;
    let _guard = ctx.endpoints.lock(id).await;
    if let Some(existing) = ctx.endpoints.get(id.as_str()) {
        return reattach::reattach(ctx, existing, &request).await;
    }
    refuse_host_listeners(ctx, &request.ports)?;
    let netns = open_netns(ctx, &request).await?;
    let result = attach_into(ctx, &request, &netns).await;
    if result.is_err() && netns.owned {
        if let Err(e) = ctx.kernel.delete_netns(&netns.path) {
            warn!(container = %id, error = %e, "cannot delete namespace after failed attach");
        }
    }
    result
}

async fn open_netns(
    ctx: &Context,
    request: &AttachRequest,
) -> Result<ContainerNetns, EndpointError> {
    let path = match &request.netns {
        NetnsSpec::Pid(pid) => {
            let path = format!("/proc/{pid}/ns/net");
            return match ctx.kernel.vet_netns(&path) {
                Err(NetnsError::Missing { .. }) => Err(EndpointError::NoProcess(*pid)),
                other => other
                    .map(|_| ContainerNetns { path, owned: false })
                    .map_err(Into::into),
            };
        }
        NetnsSpec::Path(path) => path.clone(),
        NetnsSpec::Owned => {
            // No endpoint exists (we hold the container lock), so a namespace of this name is a
            // leftover of an interrupted attach of ours: create replaces it.
            let name = ctx.owned_netns_name(&request.container_id);
            let path = ctx.kernel.create_netns(&name).await?;
            if let Err(e) = ctx.kernel.vet_netns(&path) {
                let _ = ctx.kernel.delete_netns(&path);
                return Err(e.into());
            }
            return Ok(ContainerNetns { path, owned: true });
        }
    };
    ctx.kernel.vet_netns(&path)?;
    Ok(ContainerNetns { path, owned: false })
}

async fn attach_into(
    ctx: &Context,
    request: &AttachRequest,
    netns: &ContainerNetns,
) -> Result<EndpointRecord, EndpointError> {
    let id = &request.container_id;
    let started = Instant::now();
    let mac = Mac::random();
    // Only the first weft interface of a namespace carries its default route.
    let secondary = ctx.endpoints.any(|e| e.netns == netns.path);
    let make = |ip, host_ifname| EndpointRecord {
        container_id: id.to_string(),
        host: ctx.me().to_string(),
        ip,
        host_ifname,
        ifname: request.ifname.to_string(),
        mac: mac.to_string(),
        netns: netns.path.clone(),
        owns_netns: netns.owned,
        ports: request.ports.clone(),
        created: weft_etcd::unix_now(),
        secondary,
        labels: request.labels.clone(),
        ipv6: None,
    };
    let record = match request.ips.as_slice() {
        [] => {
            let pools = pools::choose(&ctx.config.pools, &request.pools)?;
            allocate(ctx, id, &pools, make).await?
        }
        ips => requested::allocate_requested(ctx, id, ips, &request.pools, make).await?,
    };
    let allocated = started.elapsed();
    // Before the kernel is touched: whatever is wired from here on, the journal explains.
    if let Err(e) = ctx
        .journal
        .write(&record)
        .and_then(|()| ctx.journal.wiring(id.as_str()))
    {
        warn!(container = %id, error = %e, "cannot write the journal entry; rolling back");
        teardown::roll_back(ctx, &record).await;
        return Err(EndpointError::Journal(e));
    }
    // An endpoint some policy selects is policed from its first packet: it is in its profiles'
    // sets (address and veth), and their chains exist, before its veth does. Everyone else's
    // sets follow at once.
    if ctx.policy.selects(&record) {
        if let Err(err) = crate::policy::police_first(ctx, &record).await {
            warn!(container = %id, error = %err, "applying network policy failed; rolling back");
            teardown::roll_back(ctx, &record).await;
            return Err(err.into());
        }
    } else if ctx.policy.in_some_set(&record.labels) {
        ctx.policy.request_sync();
    }
    let link = ContainerLink {
        host_ifname: record.host_ifname.clone(),
        ifname: request.ifname.clone(),
        ip: record.ip,
        ipv6: record.ipv6,
        mac,
        mtu: ctx.mtu(),
        secondary,
    };
    if let Err(err) = wire(ctx, &record, &link).await {
        warn!(container = %id, error = %err, "attach failed; rolling back");
        teardown::roll_back(ctx, &record).await;
        return Err(err);
    }
    if !record.ports.is_empty() {
        let synced = ctx
            .firewall
            .sync(|| ctx.firewall_spec(), SyncMode::Fast, &ctx.metrics)
            .await;
        if let Err(err) = synced {
            warn!(container = %id, error = %err, "publishing ports failed; rolling back");
            teardown::roll_back(ctx, &record).await;
            return Err(err.into());
        }
        ctx.firewall.flush_udp(udp_ports(&record)).await;
    }
    if let Err(e) = ctx.journal.wired(id.as_str()) {
        warn!(container = %id, error = %e, "cannot clear the wiring mark");
    }
    info!(
        container = %id,
        ip = %record.ip,
        veth = %record.host_ifname,
        netns = %record.netns,
        allocate_ms = allocated.as_secs_f64() * 1e3,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        "attached"
    );
    Ok(record)
}

/// Wires the container. The veth name was chosen free of every other endpoint's, so a host link
/// of that name is a leftover of ours (an interrupted attach, or a veth retired moments ago and
/// not reaped yet): it is deleted and the pair made again. If the name is still taken, it is the
/// container's interface that exists.
pub(super) async fn wire(
    ctx: &Context,
    record: &EndpointRecord,
    link: &ContainerLink,
) -> Result<u32, EndpointError> {
    let taken = |netns: String| EndpointError::IfnameTaken {
        ifname: link.ifname.to_string(),
        netns,
    };
    match ctx.kernel.wire(&record.netns, link).await {
        Err(KernelError::Exists { netns, .. }) => {
            let ours = ctx
                .endpoints
                .owner_of_link(&link.host_ifname)
                .is_none_or(|owner| owner == record.container_id);
            if !ours {
                return Err(taken(netns));
            }
            // Our pair of that name, if it is still there (the reaper may be deleting a retired
            // one this very moment: then it is gone when we look, and so is its container end).
            ctx.kernel.delete_link(&link.host_ifname).await?;
            match ctx.kernel.wire(&record.netns, link).await {
                Err(KernelError::Exists { netns, .. }) => Err(taken(netns)),
                other => Ok(other?),
            }
        }
        other => Ok(other?),
    }
}

/// A published port takes every connection to that port of the host, so one a host service
/// listens on (sshd on 22) is refused unless the agent is told to override.
pub(super) fn refuse_host_listeners(
    ctx: &Context,
    ports: &[PortMapping],
) -> Result<(), EndpointError> {
    if ctx.config.allow_host_port_override {
        return Ok(());
    }
    for port in ports {
        let taken = ctx
            .kernel
            .listening(port.protocol, port.host_port)
            .map_err(|source| KernelError::Io {
                what: format!("reading the host's {} sockets", port.protocol),
                source,
            })?;
        if taken {
            return Err(EndpointError::HostPortInUse {
                protocol: port.protocol,
                port: port.host_port,
            });
        }
    }
    Ok(())
}

/// The UDP host ports of an endpoint (their conntrack entries are flushed on changes).
pub(super) fn udp_ports(record: &EndpointRecord) -> Vec<u16> {
    record
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Udp)
        .map(|p| p.host_port)
        .collect()
}
