//! Keeps the fabric view current: every endpoint and policy read at one revision, then watched
//! from it; on compaction or a broken stream, a fresh snapshot replaces the view.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};
use weft_etcd::Datastore;

use crate::context::Context;

pub async fn run_fabric_watch(ctx: Arc<Context>, store: Datastore) {
    let mut backoff = Duration::from_millis(200);
    let mut failing = false;
    loop {
        let followed = store
            .follow_fabric(
                |snapshot| ctx.policy.replace(snapshot),
                |events, revision| ctx.policy.apply(events, revision),
            )
            .await;
        match followed {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                failing = false;
            }
            Err(e) => {
                ctx.metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                // Policy stays as last applied while etcd is away: one warning per outage.
                if !failing {
                    warn!(error = %e, "fabric watch interrupted; policy stays as applied until etcd answers");
                } else {
                    debug!(error = %e, "fabric watch still interrupted");
                }
                failing = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
