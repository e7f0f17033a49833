//! Following the cluster: hosts, liveness and blocks read at one revision, then watched from it.

use etcd_client::{GetOptions, KeyValue, Txn, TxnOp};

use crate::client::{decode, get_kvs, key_of, Datastore};
use crate::cluster::{ClusterEvent, ClusterView};
use crate::error::{Result, StoreError};
use crate::records::{BlockRecord, HostRecord};

impl Datastore {
    /// Hosts, liveness and blocks read at one revision, to start a watch from.
    pub async fn snapshot(&self) -> Result<ClusterView> {
        let prefix = || Some(GetOptions::new().with_prefix());
        let response = self
            .txn(Txn::new().and_then([
                TxnOp::get(self.keys.hosts(), prefix()),
                TxnOp::get(self.keys.alives(), prefix()),
                TxnOp::get(self.keys.blocks(), prefix()),
            ]))
            .await?;
        let mut view = ClusterView {
            revision: response.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        let ops = response.op_responses();
        let [hosts, alive, blocks] = ops.as_slice() else {
            return Err(StoreError::Unavailable("short snapshot response".into()));
        };
        for kv in get_kvs(hosts)
            .iter()
            .chain(get_kvs(alive))
            .chain(get_kvs(blocks))
        {
            if let Some(event) = self.event_for_put(kv) {
                view.apply(event);
            }
        }
        Ok(view)
    }

    /// Translates a put of a watched key into a cluster event; malformed records are reported and
    /// skipped.
    fn event_for_put(&self, kv: &KeyValue) -> Option<ClusterEvent> {
        let key = key_of(kv);
        let keys = &self.keys;
        let parsed = if let Some(name) = keys.name_in(&keys.hosts(), &key) {
            decode::<HostRecord>(kv).map(|r| ClusterEvent::HostPut(name.to_string(), r))
        } else if let Some(name) = keys.name_in(&keys.alives(), &key) {
            Ok(ClusterEvent::AlivePut(name.to_string()))
        } else if let Some((pool, block)) = keys.parse_block(&key) {
            decode::<BlockRecord>(kv).map(|r| ClusterEvent::BlockPut {
                pool,
                block,
                host: r.host,
            })
        } else {
            Err(StoreError::Malformed {
                key: key.clone(),
                reason: "not a key weft writes".into(),
            })
        };
        parsed
            .inspect_err(|err| tracing::warn!(error = %err, "skipping malformed record"))
            .ok()
    }

    /// Translates a delete of a watched key into a cluster event.
    fn event_for_delete(&self, key: &str) -> Option<ClusterEvent> {
        let keys = &self.keys;
        if let Some(name) = keys.name_in(&keys.hosts(), key) {
            Some(ClusterEvent::HostDeleted(name.to_string()))
        } else if let Some(name) = keys.name_in(&keys.alives(), key) {
            Some(ClusterEvent::AliveDeleted(name.to_string()))
        } else {
            keys.parse_block(key)
                .map(|(pool, block)| ClusterEvent::BlockDeleted { pool, block })
        }
    }

    /// Starts one watch stream over hosts, liveness and blocks from `revision` (inclusive; 0:
    /// from now on).
    async fn watch_cluster(&self, revision: i64) -> Result<etcd_client::WatchStream> {
        let options = || {
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision),
            )
        };
        let keys = [self.keys.hosts(), self.keys.alives(), self.keys.blocks()];
        self.call(|mut c| {
            let keys = keys.clone();
            async move {
                let mut stream = c.watch(keys[0].clone(), options()).await?;
                stream.watch(keys[1].clone(), options()).await?;
                stream.watch(keys[2].clone(), options()).await?;
                Ok(stream)
            }
        })
        .await
    }

    /// Follows the cluster once: a snapshot (handed to `on_snapshot`), then a watch from its
    /// revision, each batch of changes handed to `on_events` with its revision. Returns Ok when
    /// the watch must be restarted from a fresh snapshot (compaction, stream closed), Err when
    /// etcd failed.
    pub async fn follow_cluster(
        &self,
        on_snapshot: impl FnOnce(ClusterView),
        on_events: impl FnMut(Vec<(ClusterEvent, i64)>),
    ) -> Result<()> {
        let snapshot = self.snapshot().await?;
        let revision = snapshot.revision;
        on_snapshot(snapshot);
        self.follow_cluster_changes(revision + 1, || {}, on_events)
            .await
    }

    /// Follows the cluster's changes from `revision` (inclusive; 0: from now on) without a
    /// snapshot: `on_watching` once the watch is in place, then each batch of changes to
    /// `on_events` with its revision. Returns as [`Self::follow_cluster`] does.
    pub async fn follow_cluster_changes(
        &self,
        revision: i64,
        on_watching: impl FnOnce(),
        mut on_events: impl FnMut(Vec<(ClusterEvent, i64)>),
    ) -> Result<()> {
        let mut stream = self.watch_cluster(revision).await?;
        on_watching();
        loop {
            let Some(response) = stream.message().await? else {
                return Ok(());
            };
            if response.canceled() || response.compact_revision() > 0 {
                tracing::info!(
                    compact_revision = response.compact_revision(),
                    reason = response.cancel_reason(),
                    "watch cancelled; re-listing"
                );
                return Ok(());
            }
            let events: Vec<(ClusterEvent, i64)> = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let parsed = match event.event_type() {
                        etcd_client::EventType::Put => self.event_for_put(kv),
                        etcd_client::EventType::Delete => self.event_for_delete(&key_of(kv)),
                    }?;
                    Some((parsed, kv.mod_revision()))
                })
                .collect();
            if !events.is_empty() {
                on_events(events);
            }
        }
    }
}
