//! Keeps the cluster view current: a snapshot, then a watch from the snapshot's revision; on
//! compaction or a broken stream, a fresh snapshot replaces the view.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};
use weft_etcd::Datastore;

use crate::context::Context;

pub async fn run_watcher(ctx: Arc<Context>, store: Datastore) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match watch_once(&ctx, &store).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                ctx.metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                // One warning per outage; the retries stay quiet until etcd answers again.
                if ctx.cluster.set_etcd_ok(false) {
                    warn!(error = %e, "cluster watch interrupted; re-listing when etcd answers");
                } else {
                    debug!(error = %e, "etcd still unreachable");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn watch_once(ctx: &Context, store: &Datastore) -> Result<(), weft_etcd::StoreError> {
    store
        .follow_cluster(
            |snapshot| {
                let revision = snapshot.revision;
                ctx.cluster.replace(snapshot);
                if !ctx.cluster.set_etcd_ok(true) {
                    info!(revision, "etcd answers again; cluster state re-listed");
                }
                ctx.request_resync();
            },
            |events| {
                ctx.cluster.apply(events);
                ctx.request_resync();
            },
        )
        .await
}
