//! The tunnel device and its entries brought in line with the peers reached through it.

use std::collections::BTreeMap;

use tracing::warn;

use super::plan::peers::{set_diff, tunnel_plan, PeerPath};
use super::ReconcileReport;
use crate::context::Context;

/// Makes the device (when a peer needs it) and its neighbour and FDB entries exactly what the
/// peers need; returns its index when it exists. Removing a device no peer needs waits for
/// [`remove_unneeded`], after the routes through it are gone.
pub async fn sync(
    ctx: &Context,
    paths: &BTreeMap<String, PeerPath>,
    report: &mut ReconcileReport,
) -> Option<u32> {
    let plan = tunnel_plan(paths, ctx.config.has_ipv6());
    let wanted = ctx.vxlan_device();
    let current = match ctx.kernel.tunnel(wanted.as_ref()).await {
        Ok(current) => current,
        Err(e) => {
            warn!(error = %e, "cannot read the tunnel device");
            report.errors += 1;
            return None;
        }
    };
    let (true, Some(wanted)) = (plan.needed, wanted) else {
        return current.map(|c| c.index);
    };
    let current = match current {
        Some(current) if current.matches => current,
        _ => match ctx.kernel.ensure_tunnel(&wanted).await {
            Ok(index) => {
                report.tunnel_changes += 1;
                crate::kernel::TunnelState {
                    index,
                    matches: true,
                    ..Default::default()
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot make the tunnel device");
                report.errors += 1;
                return None;
            }
        },
    };
    let index = current.index;
    let (add, delete) = set_diff(&plan.neighbours, &current.neighbours);
    let neighbours = add
        .iter()
        .map(|e| (*e, true))
        .chain(delete.iter().map(|e| (*e, false)));
    for ((ip, mac), add) in neighbours {
        count(
            ctx.kernel.tunnel_neighbour(index, ip, mac, add).await,
            report,
        );
    }
    let (add, delete) = set_diff(&plan.fdb, &current.fdb);
    let fdb = add
        .iter()
        .map(|e| (*e, true))
        .chain(delete.iter().map(|e| (*e, false)));
    for ((mac, dst), add) in fdb {
        count(ctx.kernel.tunnel_fdb(index, mac, dst, add).await, report);
    }
    Some(index)
}

fn count(result: crate::kernel::Result<()>, report: &mut ReconcileReport) {
    match result {
        Ok(()) => report.tunnel_changes += 1,
        Err(e) => {
            warn!(error = %e, "cannot program the tunnel");
            report.errors += 1;
        }
    }
}

/// Removes the tunnel device when no peer is reached through it any more.
pub async fn remove_unneeded(
    ctx: &Context,
    paths: &BTreeMap<String, PeerPath>,
    exists: bool,
    report: &mut ReconcileReport,
) {
    if !exists || tunnel_plan(paths, false).needed {
        return;
    }
    match ctx.kernel.delete_tunnel().await {
        Ok(_) => report.tunnel_changes += 1,
        Err(e) => {
            warn!(error = %e, "cannot remove the tunnel device");
            report.errors += 1;
        }
    }
}
