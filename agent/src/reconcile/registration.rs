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
pub async fn apply(ctx: &Context, mut plan: RegistrationPlan) -> Vec<String> {
    let pool = &ctx.config.pool.name;
    if plan.register_host {
        match ctx.store.register_host(ctx.me(), ctx.underlay.ip).await {
            Ok(()) => info!("host record was missing; registered again"),
            Err(e) => plan
                .problems
                .push(format!("cannot register this host: {e}")),
        }
    }
    for block in &plan.claim {
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
    for (record, block) in plan.create {
        if !ctx.cluster.pool_blocks_of(pool, ctx.me()).contains(&block) {
            continue;
        }
        let id = record.container_id.clone();
        let block = BlockRef {
            pool: pool.clone(),
            block,
        };
        match ctx.store.create_endpoint(record.clone(), block).await {
            Ok(()) => {
                info!(container = %id, ip = %record.ip, "endpoint record was missing; registered again")
            }
            Err(CreateConflict::EndpointExists(existing)) if *existing == record => {}
            Err(CreateConflict::EndpointExists(_)) => plan.problems.push(format!(
                "endpoint {id} is not registered: another record of that id exists"
            )),
            Err(CreateConflict::IpTaken) => plan.problems.push(format!(
                "endpoint {id} ({}) is not registered: its address is held by another record",
                record.ip
            )),
            Err(CreateConflict::Store(e)) => plan
                .problems
                .push(format!("endpoint {id} is not registered: {e}")),
        }
    }
    plan.problems
}

/// Checks registration now: reads this host's endpoint records, plans and applies. Problems
/// replace the previous ones (an empty list when all is registered).
pub async fn check(ctx: &Context) {
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
            ctx.pool.block_size,
        )
    });
    let problems = apply(ctx, plan).await;
    let before = ctx.set_problems(problems.clone());
    if problems != before {
        match problems.is_empty() {
            true => info!("every endpoint of this host is registered again"),
            false => warn!(?problems, "this host's records are incomplete; not ready"),
        }
    }
}
