//! Registration: this host's records in etcd against what it holds (its endpoints, their blocks,
//! its host record). Records removed behind its back — an operator's `host remove`, peers
//! removing a host they took for dead — are written again where nobody took their place; where
//! somebody did, the endpoint stays wired and unregistered, and the conflict is reported
//! (Status, /readyz, the log) for an operator to settle. `plan::registration` decides; this
//! module writes.

use std::collections::HashMap;

use tracing::{info, warn};
use weft_etcd::records::EndpointRecord;
use weft_etcd::{BlockRef, CreateConflict};

use super::plan::registration::{plan, RegistrationPlan};
use crate::context::Context;

/// Carries a plan out; returns every problem left (the plan's and what the writes found).
/// `sightings` counts, from check to check, how often a record nobody here holds was seen.
pub async fn apply(
    ctx: &Context,
    mut plan: RegistrationPlan,
    sightings: &mut HashMap<String, u32>,
) -> Vec<String> {
    settle_unknown(ctx, std::mem::take(&mut plan.unknown), sightings).await;
    for (stored, held) in std::mem::take(&mut plan.rewrite) {
        let id = &held.container_id;
        // An operation under way writes its own record; none starts while the lock is held.
        let Some(_lock) = ctx.endpoints.try_lock(id) else {
            continue;
        };
        if ctx.endpoints.get(id).as_ref() != Some(&held) {
            continue;
        }
        match ctx.store.update_endpoint(&stored, &held).await {
            Ok(()) => info!(container = %id, "record differed from what is wired; written back"),
            Err(e) => plan.problems.push(format!(
                "endpoint {id} has a record that differs from its wiring: {e}"
            )),
        }
    }
    if plan.register_host {
        match ctx.store.register_host(ctx.me(), &ctx.host()).await {
            Ok(()) => info!("host record was missing; registered again"),
            Err(e) => plan
                .problems
                .push(format!("cannot register this host: {e}")),
        }
    }
    for BlockRef { pool, block } in &plan.claim {
        match ctx.store.claim_exact_block(pool, *block, ctx.me()).await {
            Ok(true) => {
                info!(%block, "block of our endpoints was released; claimed again");
                ctx.cluster.claimed(pool, *block, ctx.me());
            }
            Ok(false) => plan.problems.push(format!(
                "block {block} holding endpoints of this host was taken by another host"
            )),
            Err(e) => plan
                .problems
                .push(format!("cannot claim block {block}: {e}")),
        }
    }
    let pools = ctx.cluster.pools();
    let tunnel = ctx
        .tunnel_ip()
        .and_then(|ip| Some((ip, super::plan::registration::place(&pools, ip)?)));
    if let Some((ip, BlockRef { pool, block })) = tunnel {
        if ctx.cluster.pool_blocks_of(&pool, ctx.me()).contains(&block) {
            match ctx.store.claim_tunnel_ip(ctx.me(), ip, &pool, block).await {
                Ok(true) => {}
                Ok(false) => plan.problems.push(format!(
                    "tunnel address {ip} is held by another record; peers cannot reach this \
                     host's tunnel"
                )),
                Err(e) => plan
                    .problems
                    .push(format!("cannot register tunnel address {ip}: {e}")),
            }
        }
    }
    for (record, blocks) in plan.create {
        let unclaimed = |block: &BlockRef| {
            !ctx.cluster
                .pool_blocks_of(&block.pool, ctx.me())
                .contains(&block.block)
        };
        if blocks.iter().any(unclaimed) {
            continue;
        }
        let id = record.container_id.clone();
        // The plan saw the endpoint held and its record missing; a detach since (which deletes
        // the record first) must not see it written again, nor an attach see it written twice.
        let Some(_lock) = ctx.endpoints.try_lock(&id) else {
            continue;
        };
        if ctx.endpoints.get(&id).as_ref() != Some(&record) {
            continue;
        }
        match ctx.store.create_endpoint(record.clone(), blocks).await {
            Ok(()) => {
                info!(container = %id, ip = %record.ip, "endpoint record was missing; registered again")
            }
            Err(CreateConflict::EndpointExists(existing)) if *existing == record => {}
            Err(CreateConflict::EndpointExists(_)) => plan.problems.push(format!(
                "endpoint {id} is not registered: another record of that id exists"
            )),
            Err(CreateConflict::IpTaken(ip)) => plan.problems.push(format!(
                "endpoint {id} ({ip}) is not registered: its address is held by another record"
            )),
            Err(CreateConflict::Store(e)) => plan
                .problems
                .push(format!("endpoint {id} is not registered: {e}")),
        }
    }
    plan.problems
}

/// Records of this host it does not hold (their writer was killed before it knew the write
/// landed): a wired container is adopted; a record seen on two checks with nothing behind it is
/// deleted, guarded by its exact value. Records of an attach under way are left alone.
async fn settle_unknown(
    ctx: &Context,
    unknown: Vec<EndpointRecord>,
    sightings: &mut HashMap<String, u32>,
) {
    let current: std::collections::HashSet<String> =
        unknown.iter().map(|e| e.container_id.clone()).collect();
    sightings.retain(|id, _| current.contains(id));
    if unknown.is_empty() {
        // The usual case: no link dump (with thousands of veths, the pass's costliest read).
        return;
    }
    let links = ctx.kernel.links().await.unwrap_or_default();
    for record in unknown {
        let id = record.container_id.clone();
        // Records of an attach under way are its own; none starts while the lock is held.
        let Some(_lock) = ctx.endpoints.try_lock(&id) else {
            continue;
        };
        if ctx.endpoints.get(&id).is_some() {
            continue;
        }
        let wired =
            links.contains_key(&record.host_ifname) && ctx.kernel.vet_netns(&record.netns).is_ok();
        if wired {
            info!(container = %id, ip = %record.ip, "adopting an endpoint recorded by an earlier agent");
            if let Err(e) = ctx.journal.write(&record) {
                warn!(container = %id, error = %e, "cannot write the journal entry");
            }
            ctx.endpoints.insert(record);
            sightings.remove(&id);
            continue;
        }
        let seen = sightings.entry(id.clone()).or_insert(0);
        *seen += 1;
        if *seen < 2 {
            continue;
        }
        match ctx.store.delete_endpoint_if_unchanged(&record).await {
            Ok(deleted) => {
                if deleted {
                    warn!(container = %id, ip = %record.ip, "deleted a record of this host with no container behind it");
                }
                sightings.remove(&id);
            }
            Err(e) => {
                warn!(container = %id, error = %e, "cannot delete a stray record; will retry")
            }
        }
    }
}

/// Checks registration now: reads this host's endpoint records, plans and applies. Problems
/// replace the previous ones (an empty list when all is registered).
pub async fn check(ctx: &Context, sightings: &mut HashMap<String, u32>) {
    let stored = match ctx.store.list_endpoints(ctx.me()).await {
        Ok(stored) => stored,
        // etcd away: nothing can be checked, and nothing is wrong with this host for it.
        Err(_) => return,
    };
    let stored: HashMap<String, EndpointRecord> = stored
        .into_iter()
        .map(|e| (e.container_id.clone(), e))
        .collect();
    let local = ctx.endpoints.list();
    let plan = ctx.cluster.with_view(|view| {
        plan(
            ctx.me(),
            view.hosts.contains_key(ctx.me()),
            &view.blocks,
            &local,
            &stored,
            &ctx.cluster.pools(),
            ctx.tunnel_ip(),
        )
    });
    let problems = apply(ctx, plan, sightings).await;
    let before = ctx.set_problems(problems.clone());
    if problems != before {
        match problems.is_empty() {
            true => info!("every endpoint of this host is registered again"),
            false => warn!(?problems, "this host's records are incomplete; not ready"),
        }
    }
}
