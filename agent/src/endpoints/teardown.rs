//! Taking an endpoint apart: after a failed attach (roll back), and after its records are gone
//! (detach, release). Every step is tried whatever the others did, and every failure reported.

use tracing::warn;
use weft_etcd::records::EndpointRecord;

use super::attach::udp_ports;
use super::error::EndpointError;
use crate::context::Context;
use crate::firewall::SyncMode;
use crate::model::ContainerId;

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
    // Its pairs leave its profiles' sets from the policy loop (a profile it leaves empty goes,
    // chain and sets, with the plan the loop then asks for); its selector memberships with the
    // watch's news of its deleted record.
    if ctx.policy.selects(record) {
        ctx.policy.leave(record);
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
    if ctx.policy.selects(record) {
        ctx.policy.leave(record);
    }
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
    if !record.secondary {
        if let Err(e) = promote_successor(ctx, record).await {
            errors.push(format!(
                "giving the default route to another interface: {e}"
            ));
        }
    }
    errors
}

/// The interface that carried a namespace's default route is gone: the oldest remaining weft
/// interface of that namespace takes it over, so the container keeps a way out.
async fn promote_successor(ctx: &Context, gone: &EndpointRecord) -> Result<(), EndpointError> {
    let Some(successor) = ctx
        .endpoints
        .matching(|e| e.netns == gone.netns && e.secondary)
        .into_iter()
        .min_by_key(|e| (e.created, e.container_id.clone()))
    else {
        return Ok(());
    };
    let id = ContainerId::new(&successor.container_id)?;
    let _guard = ctx.endpoints.lock(&id).await;
    let Some(current) = ctx.endpoints.get(id.as_str()).filter(|e| e.secondary) else {
        return Ok(());
    };
    let promoted = EndpointRecord {
        secondary: false,
        ..current.clone()
    };
    ctx.store.update_endpoint(&current, &promoted).await?;
    ctx.endpoints.insert(promoted.clone());
    ctx.journal
        .write(&promoted)
        .map_err(EndpointError::Journal)?;
    // The source rule goes with the secondary role; the main table gets the routes.
    ctx.kernel
        .unwire_inside(&current.netns, &super::link_of(ctx, &current)?)
        .await?;
    ctx.kernel
        .rewire_inside(&promoted.netns, &super::link_of(ctx, &promoted)?)
        .await?;
    tracing::info!(container = %id, netns = %promoted.netns, "carries the namespace's default route now");
    Ok(())
}
