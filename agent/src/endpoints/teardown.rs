//! Taking an endpoint apart: after a failed attach (roll back), and after its records are gone
//! (detach, release). Every step is tried whatever the others did, and every failure reported.

use tracing::warn;
use weft_etcd::records::EndpointRecord;

use super::attach::udp_ports;
use crate::context::Context;
use crate::firewall::SyncMode;

/// Undoes a partial attach: the link (with its route), the records, the local entry and, if the
/// endpoint published ports, their rules. Failures are logged: the caller reports the attach's
/// own error.
pub async fn roll_back(ctx: &Context, record: &EndpointRecord) {
    let mut errors = vec![];
    if let Err(e) = ctx.kernel.delete_link(&record.host_ifname).await {
        errors.push(format!("deleting link {}: {e}", record.host_ifname));
    }
    if let Err(e) = ctx.store.delete_endpoint(record).await {
        errors.push(format!("deleting records (retried when etcd answers): {e}"));
        ctx.endpoints.undeliver(record.clone());
    }
    ctx.endpoints.remove(&record.container_id);
    if let Err(e) = ctx.journal.remove(&record.container_id) {
        errors.push(format!("removing journal entry: {e}"));
    }
    if !record.ports.is_empty() {
        let synced = ctx
            .firewall
            .sync(|| ctx.firewall_spec(), SyncMode::Fast, &ctx.metrics)
            .await;
        if let Err(e) = synced {
            errors.push(format!("removing port rules: {e}"));
        }
    }
    for error in errors {
        warn!(container = %record.container_id, %error, "rollback incomplete");
    }
}

/// Takes an endpoint whose records are already deleted out of this host: the local entry, its
/// port rules (and their UDP flows), its veth (out of service at once, deleted in the
/// background with others: one RCU grace period for a batch), the namespace the agent made for
/// it, and last its journal entry (an entry whose veth is gone is dropped at the next start, so
/// a crash in between cannot bring the endpoint back). Returns what failed.
pub async fn dismantle(ctx: &Context, record: &EndpointRecord) -> Vec<String> {
    let mut errors = vec![];
    ctx.endpoints.remove(&record.container_id);
    if !record.ports.is_empty() {
        let synced = ctx
            .firewall
            .sync(|| ctx.firewall_spec(), SyncMode::Fast, &ctx.metrics)
            .await;
        if let Err(e) = synced {
            errors.push(format!("removing port rules: {e}"));
        }
        ctx.firewall.flush_udp(udp_ports(record)).await;
    }
    if record.secondary {
        let unwired = match super::link_of(ctx, record) {
            Ok(link) => ctx
                .kernel
                .unwire_inside(&record.netns, &link)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = unwired {
            errors.push(format!("removing the source rule in {}: {e}", record.netns));
        }
    }
    if let Err(e) = ctx.kernel.retire_link(&record.host_ifname, record.ip).await {
        errors.push(format!("retiring {}: {e}", record.host_ifname));
    }
    if record.owns_netns {
        if let Err(e) = ctx.kernel.delete_netns(&record.netns) {
            errors.push(format!("deleting namespace {}: {e}", record.netns));
        }
    }
    if let Err(e) = ctx.journal.remove(&record.container_id) {
        errors.push(format!("removing journal entry: {e}"));
    }
    errors
}
