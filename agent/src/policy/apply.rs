//! Carrying a policy plan out, one sync at a time: address sets first (created and filled, so no
//! rule ever names a missing set), then the chains through the firewall seam (one atomic
//! restore with the rest of our filter rules), then the sets no rule uses any more are
//! destroyed. A sync that started after a caller's change covers it, so bursts share one.

use std::sync::atomic::Ordering;
use std::time::Instant;

use weft_etcd::records::EndpointRecord;

use super::plan::{plan, Family};
use super::render::render;
use super::sets::SetError;
use crate::context::Context;
use crate::firewall::sync::SyncError;
use crate::firewall::SyncMode;

#[derive(Debug, thiserror::Error)]
pub enum PolicySyncError {
    #[error("programming address sets: {0}")]
    Sets(#[from] SetError),
    #[error(transparent)]
    Firewall(#[from] SyncError),
    #[error("policy task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What one sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyReport {
    pub set_changes: usize,
    pub sets_destroyed: usize,
    pub tables_written: usize,
}

/// Applies policy for the current state now (sets and firewall in `mode`).
pub async fn sync(ctx: &Context, mode: SyncMode) -> Result<PolicyReport, PolicySyncError> {
    sync_with(ctx, mode, mode).await
}

/// The inputs of a plan: every policy, every endpoint of the fabric (this host's from its own
/// table, which is ahead of the watch), and this host's endpoints.
fn plan_now(ctx: &Context, family: Family) -> super::plan::PolicyPlan {
    let local: Vec<EndpointRecord> = ctx.endpoints.list();
    ctx.policy.with_view(|view| {
        let policies: Vec<_> = view.policies.values().collect();
        let mut fabric: Vec<&EndpointRecord> = view.remote_endpoints(ctx.me()).collect();
        fabric.extend(local.iter());
        let local: Vec<&EndpointRecord> = local.iter().collect();
        plan(family, &policies, &fabric, &local)
    })
}

/// Like [`sync`], with the sets and the firewall checked to different depths (the policy loop
/// reads the sets back every resync; the reconciler verifies the chains).
pub async fn sync_with(
    ctx: &Context,
    sets_mode: SyncMode,
    firewall_mode: SyncMode,
) -> Result<PolicyReport, PolicySyncError> {
    let state = &ctx.policy;
    let wanted = state.wanted.fetch_add(1, Ordering::SeqCst) + 1;
    let _one = state.one_at_a_time.lock().await;
    let fast = sets_mode == SyncMode::Fast && firewall_mode == SyncMode::Fast;
    if fast && state.applied.load(Ordering::SeqCst) >= wanted {
        return Ok(PolicyReport::default());
    }
    let generation = state.wanted.load(Ordering::SeqCst);
    let started = Instant::now();
    // IPv4 only for now; the plan and the sets are per family.
    let planned = plan_now(ctx, Family::V4);
    let planned_in = started.elapsed();
    let sets = state.sets.clone();
    let wanted_sets = planned.sets.clone();
    let set_changes =
        tokio::task::spawn_blocking(move || sets.sync(&wanted_sets, sets_mode)).await??;
    *state.chains.write().unwrap() = render(&planned);
    let report = ctx
        .firewall
        .sync(|| ctx.firewall_spec(), firewall_mode, &ctx.metrics)
        .await?;
    let sets = state.sets.clone();
    let wanted_sets = planned.sets;
    let wanted_count = wanted_sets.len();
    let sets_destroyed = tokio::task::spawn_blocking(move || sets.prune(&wanted_sets))
        .await?
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot destroy unused address sets yet");
            0
        });
    state.applied.store(generation, Ordering::SeqCst);
    let done = PolicyReport {
        set_changes,
        sets_destroyed,
        tables_written: report.tables_written,
    };
    if set_changes + sets_destroyed + report.tables_written > 0 || !fast {
        tracing::debug!(
            verified = !fast,
            sets = wanted_count,
            set_changes,
            sets_destroyed,
            tables = report.tables_written,
            plan_ms = planned_in.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "network policy synced"
        );
    }
    Ok(done)
}
