//! Carrying out a reconciliation pass through the kernel, firewall and datastore seams: each
//! step reads what it needs, applies its part of the plan and counts what it changed or could
//! not do. No decisions here beyond "did it work".

use std::collections::{BTreeMap, HashSet};
use std::io;

use tracing::warn;

use super::plan::{self, LeakPlan};
use super::ReconcileReport;
use crate::context::Context;
use crate::endpoints::{repair, teardown};
use crate::firewall::SyncMode;
use crate::model::Route;

/// The kernel state a pass works from.
pub struct KernelState {
    pub routes: Vec<Route>,
    pub links: BTreeMap<String, u32>,
}

pub fn host_sysctls(ctx: &Context, report: &mut ReconcileReport) {
    match ctx.kernel.configure_host(ctx.config.has_ipv6()) {
        Ok(n) => report.sysctls_fixed += n,
        Err(e) => {
            warn!(error = %e, "cannot set host sysctls");
            report.errors += 1;
        }
    }
}

/// Routes are read before links: a route seen here has its link in the list read next, so a
/// container being attached right now is never mistaken for stale. With `settings`, the links'
/// settings are kept for `veth_sysctls` (a full pass).
pub async fn read_kernel(
    ctx: &Context,
    settings: bool,
    report: &mut ReconcileReport,
) -> Option<KernelState> {
    let routes = ctx.kernel.routes().await;
    let links = match settings {
        true => ctx.kernel.links_with_settings().await,
        false => ctx.kernel.links().await,
    };
    match (routes, links) {
        (Ok(routes), Ok(links)) => Some(KernelState { routes, links }),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot read the kernel's routes and links");
            report.errors += 1;
            None
        }
    }
}

pub fn veth_sysctls(ctx: &Context, links: &BTreeMap<String, u32>, report: &mut ReconcileReport) {
    let veths = ctx
        .endpoints
        .flat_map(|e| Some((e.host_ifname.clone(), ctx.veth_has_ipv6(e))));
    for (name, ipv6) in &veths {
        if !links.contains_key(name) {
            continue;
        }
        match ctx.kernel.configure_listed_veth(name, *ipv6) {
            Ok(n) => report.sysctls_fixed += n,
            // The link may have been deleted since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(veth = %name, error = %e, "cannot set veth sysctls");
                report.errors += 1;
            }
        }
    }
}

/// What the leak plan is made from.
pub struct LeakObservations {
    /// Endpoints without a veth, with whether their namespace still opens.
    pub missing: Vec<(String, bool)>,
    /// Every endpoint's veth name.
    pub claimed: HashSet<String>,
    /// Namespaces of ours no endpoint uses.
    pub stray_namespaces: Vec<String>,
}

/// This host's endpoints and the containers with an attach or detach under way, taken before
/// the kernel is read: an endpoint listed here that is not busy was wired before the links are
/// listed, so its veth is in the list unless it is really gone. (Taken after, an attach that
/// ended in between would look like a missing veth and be "repaired".)
pub struct TableSnapshot {
    endpoints: Vec<weft_etcd::records::EndpointRecord>,
    busy: HashSet<String>,
}

impl TableSnapshot {
    pub fn take(ctx: &Context) -> Self {
        // The list first: an endpoint in it is either busy when `busy` is read next, or its
        // attach was over by then.
        let endpoints = ctx.endpoints.list();
        Self {
            endpoints,
            busy: ctx.endpoints.busy_ids(),
        }
    }
}

pub fn observe_leaks(
    ctx: &Context,
    table: TableSnapshot,
    links: &BTreeMap<String, u32>,
) -> LeakObservations {
    let TableSnapshot { endpoints, busy } = table;
    let missing = plan::missing_veths(&endpoints, links, &busy)
        .into_iter()
        .map(|e| {
            (
                e.container_id.clone(),
                ctx.kernel.vet_netns(&e.netns).is_ok(),
            )
        })
        .collect();
    let used: HashSet<String> = endpoints.iter().map(|e| e.netns.clone()).collect();
    let candidates = ctx.kernel.named_namespaces(&format!("weft-{}-", ctx.me()));
    let stray_namespaces = ctx.cluster.with_view(|view| {
        let hosts: Vec<&String> = view.hosts.keys().collect();
        plan::stray_namespaces(&candidates, ctx.me(), &hosts, &used, &busy)
    });
    let claimed = endpoints.into_iter().map(|e| e.host_ifname).collect();
    LeakObservations {
        missing,
        claimed,
        stray_namespaces,
    }
}

/// Repairs endpoints whose container lives, releases those whose container is gone, removes
/// links nobody claims. Containers with an attach or detach under way are left alone.
pub async fn leaks(ctx: &Context, plan: LeakPlan, report: &mut ReconcileReport) {
    for id in plan.repair {
        let Ok(container) = crate::model::ContainerId::new(&id) else {
            continue;
        };
        let _guard = ctx.endpoints.lock(&container).await;
        let Some(record) = ctx.endpoints.get(&id) else {
            continue;
        };
        warn!(container = %id, veth = %record.host_ifname, "veth missing while the container lives; repairing");
        match repair::repair(ctx, &record).await {
            Ok(()) => report.endpoints_repaired += 1,
            Err(e) => {
                warn!(container = %id, error = %e, "cannot repair endpoint; will retry");
                report.errors += 1;
            }
        }
    }
    for id in plan.release {
        release(ctx, &id, report).await;
    }
    for name in plan.orphans {
        remove_orphan(ctx, &name, report).await;
    }
    for path in plan.namespaces {
        warn!(netns = %path, "namespace of ours without an endpoint (an interrupted attach); deleting it");
        match ctx.kernel.delete_netns(&path) {
            Ok(()) => report.namespaces_removed += 1,
            Err(e) => {
                warn!(netns = %path, error = %e, "cannot delete namespace");
                report.errors += 1;
            }
        }
    }
}

/// Removes a link no endpoint claims, unless it is a container's veth: a live container is
/// never cut off for want of a record (the journal re-registers what this agent wired; what it
/// cannot explain is left to an operator, and `weftctl ipam check` names it).
async fn remove_orphan(ctx: &Context, name: &str, report: &mut ReconcileReport) {
    match ctx.kernel.peer_elsewhere(name).await {
        Ok(false) => {}
        Ok(true) => {
            tracing::debug!(veth = %name, "unexplained container veth left in place");
            return;
        }
        Err(e) => {
            warn!(veth = %name, error = %e, "cannot look at link");
            report.errors += 1;
            return;
        }
    }
    warn!(veth = %name, "link without an endpoint; removing it");
    match ctx.kernel.delete_link(name).await {
        Ok(_) => report.links_removed += 1,
        Err(e) => {
            warn!(veth = %name, error = %e, "cannot remove link");
            report.errors += 1;
        }
    }
}

/// Deletes the records whose write or delete could not be confirmed, as far as etcd answers.
pub async fn undelivered(ctx: &Context) {
    /// How long a record found absent is still looked for.
    const LOOK_FOR: std::time::Duration = std::time::Duration::from_secs(60);
    for mut entry in ctx.endpoints.take_undelivered() {
        let record = &entry.record;
        match ctx.store.delete_endpoint_if_unchanged(record).await {
            Ok(true) => warn!(
                container = %record.container_id,
                ip = %record.ip,
                "deleted the records of a failed attach that etcd committed late"
            ),
            Ok(false) => {
                let since = *entry
                    .absent_since
                    .get_or_insert_with(std::time::Instant::now);
                if since.elapsed() < LOOK_FOR {
                    ctx.endpoints.keep_undelivered(entry);
                }
            }
            Err(_) => ctx.endpoints.keep_undelivered(entry),
        }
    }
}

/// Verifies and repairs the endpoints an earlier agent did not finish wiring.
pub async fn unverified(ctx: &Context, report: &mut ReconcileReport) {
    let mut again = vec![];
    for id in ctx.endpoints.take_unverified() {
        let Ok(container) = crate::model::ContainerId::new(&id) else {
            continue;
        };
        let _guard = ctx.endpoints.lock(&container).await;
        let Some(record) = ctx.endpoints.get(&id) else {
            // Its attach never wrote a record (or rolled back): nothing to verify.
            let _ = ctx.journal.wired(&id);
            continue;
        };
        match repair::repair(ctx, &record).await {
            Ok(()) => {
                report.endpoints_repaired += 1;
                let _ = ctx.journal.wired(&id);
            }
            Err(e) => {
                warn!(container = %id, error = %e, "cannot finish an interrupted attach; will retry");
                report.errors += 1;
                again.push(id);
            }
        }
    }
    ctx.endpoints.set_unverified(again);
}

/// Releases an endpoint whose container is gone: its records, then what is left of it here.
async fn release(ctx: &Context, id: &str, report: &mut ReconcileReport) {
    let Ok(container) = crate::model::ContainerId::new(id) else {
        return;
    };
    let _guard = ctx.endpoints.lock(&container).await;
    let Some(record) = ctx.endpoints.get(id) else {
        return;
    };
    warn!(container = %id, ip = %record.ip, "container namespace gone; releasing the endpoint");
    if let Err(e) = ctx.store.delete_endpoint(&record).await {
        warn!(container = %id, error = %e, "cannot release endpoint; will retry");
        report.errors += 1;
        return;
    }
    let errors = teardown::dismantle(ctx, &record).await;
    report.endpoints_released += 1;
    for error in errors {
        warn!(container = %id, %error, "release incomplete");
        report.errors += 1;
    }
}

pub async fn routes(
    ctx: &Context,
    kernel: &KernelState,
    paths: &std::collections::BTreeMap<String, plan::peers::PeerPath>,
    tunnel: Option<u32>,
    report: &mut ReconcileReport,
) {
    let desired = ctx.cluster.with_view(|view| {
        let endpoints = ctx.endpoints.list();
        plan::desired_routes(ctx.me(), view, &endpoints, &kernel.links, paths, tunnel)
    });
    let diff = plan::route_diff(&desired, &kernel.routes);
    for route in &diff.replace {
        match ctx.kernel.replace_route(route).await {
            Ok(()) => report.routes_replaced += 1,
            Err(e) => {
                warn!(error = %e, "cannot program route");
                report.errors += 1;
            }
        }
    }
    for route in &diff.delete {
        match ctx.kernel.delete_route(route).await {
            Ok(()) => report.routes_deleted += 1,
            Err(e) => {
                warn!(error = %e, "cannot delete route");
                report.errors += 1;
            }
        }
    }
}

/// Re-reads the pools and verifies iptables.
pub async fn firewall(ctx: &Context, report: &mut ReconcileReport) {
    if let Ok(pools) = ctx.store.list_pools().await {
        ctx.cluster.set_pools(pools);
    }
    sync_firewall(ctx, SyncMode::Verify, report).await;
}

/// Writes the firewall if what it is made of changed (no read of the kernel).
pub async fn firewall_fast(ctx: &Context, report: &mut ReconcileReport) {
    sync_firewall(ctx, SyncMode::Fast, report).await;
}

async fn sync_firewall(ctx: &Context, mode: SyncMode, report: &mut ReconcileReport) {
    let synced = ctx
        .firewall
        .sync(|| ctx.firewall_spec(), mode, &ctx.metrics)
        .await;
    match synced {
        Ok(fw) => report.firewall_tables_written += fw.tables_written,
        Err(e) => {
            warn!(error = %e, "cannot program iptables");
            report.errors += 1;
        }
    }
}

/// Removes a host that was down too long. Returns whether it is gone.
pub async fn remove_host(ctx: &Context, host: &str) -> bool {
    match ctx.store.remove_host(host).await {
        Ok(released) => {
            warn!(
                %host,
                blocks = released.blocks,
                ips = released.ips,
                "removed a host that was down too long"
            );
            true
        }
        Err(e) => {
            warn!(%host, error = %e, "cannot remove dead host");
            false
        }
    }
}
