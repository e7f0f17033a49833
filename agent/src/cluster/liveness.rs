//! This host's liveness: `alive/<host>` on a lease kept alive at a third of the TTL. A lease
//! that expired while etcd was away is granted again (and the host registered again) as soon
//! as etcd answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, info, warn};
use weft_etcd::records::AliveRecord;
use weft_etcd::Datastore;

use crate::context::Context;

pub async fn run_liveness(ctx: Arc<Context>, store: Datastore) {
    let ttl = ctx.config.alive_ttl.as_secs().max(2) as i64;
    let record = AliveRecord {
        boot_id: boot_id(),
        started: weft_etcd::unix_now(),
    };
    let period = ctx.config.alive_ttl / 3;
    let mut lease = None;
    let mut failures = 0u32;
    let mut missing_once = false;
    loop {
        let result = match lease {
            None => announce(&ctx, &store, &record, ttl).await.map(|id| {
                info!(lease = id, ttl, "host is alive in etcd");
                lease = Some(id);
            }),
            Some(id) => match store.keep_alive_once(id).await {
                // The key can be deleted while its lease lives (`weftctl host remove` of a host
                // that runs): put it back on the lease once the watch has shown it gone.
                Ok(true) if !ctx.cluster.alive(ctx.me()) && !missing_once => {
                    missing_once = true;
                    Ok(())
                }
                Ok(true) if !ctx.cluster.alive(ctx.me()) => {
                    missing_once = false;
                    warn!(
                        lease = id,
                        "liveness key deleted behind our back; announcing again"
                    );
                    store.announce_alive_on(ctx.me(), &record, id).await
                }
                Ok(true) => {
                    missing_once = false;
                    Ok(())
                }
                Ok(false) => {
                    warn!(lease = id, "liveness lease expired; announcing again");
                    lease = None;
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) if failures > 0 => {
                info!(failures, "liveness keep-alive works again");
                failures = 0;
            }
            Ok(()) => {}
            Err(e) => {
                ctx.metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                if failures == 0 {
                    warn!(error = %e, "liveness keep-alive failed; retrying quietly");
                } else {
                    debug!(error = %e, "liveness keep-alive failed again");
                }
                failures += 1;
            }
        }
        tokio::time::sleep(period).await;
    }
}

async fn announce(
    ctx: &Context,
    store: &Datastore,
    record: &AliveRecord,
    ttl: i64,
) -> Result<i64, weft_etcd::StoreError> {
    store.register_host(ctx.me(), &ctx.host()).await?;
    store.announce_alive(ctx.me(), record, ttl).await
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
