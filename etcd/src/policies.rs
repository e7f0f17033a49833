//! Network policies in etcd (`policies/<name>`): applied all-or-nothing in one transaction,
//! listed, read and deleted; and the fabric watch (every endpoint and every policy, read at one
//! revision, then followed from it) that lets each agent enforce selectors fabric-wide.

use etcd_client::{EventType, GetOptions, KeyValue, Txn, TxnOp, WatchOptions};

use crate::client::{get_kvs, key_of, Datastore};
use crate::error::{Result, StoreError};
use crate::fabric::{FabricEvent, FabricView};
use crate::policy::{policy_from_value, Policy};
use crate::records::{encode, EndpointRecord};

impl Datastore {
    /// Writes every policy in one transaction: all of them or, on any failure, none.
    pub async fn put_policies(&self, policies: &[Policy]) -> Result<()> {
        let puts: Vec<TxnOp> = policies
            .iter()
            .map(|p| TxnOp::put(self.keys.policy(&p.name), encode(&p.to_json()), None))
            .collect();
        self.txn(Txn::new().and_then(puts)).await?;
        Ok(())
    }

    /// Every policy, by name; malformed ones are reported and skipped.
    pub async fn list_policies(&self) -> Result<Vec<Policy>> {
        let kvs = self.list(&self.keys.policies()).await?;
        Ok(kvs.iter().filter_map(|kv| self.decode_policy(kv)).collect())
    }

    pub async fn get_policy(&self, name: &str) -> Result<Option<Policy>> {
        let response = self.get(&self.keys.policy(name), None).await?;
        match response.kvs().first() {
            None => Ok(None),
            Some(kv) => self.parse_policy(kv).map(Some),
        }
    }

    /// Deletes a policy; returns whether it existed.
    pub async fn delete_policy(&self, name: &str) -> Result<bool> {
        let response = self
            .txn(Txn::new().and_then([TxnOp::delete(self.keys.policy(name), None)]))
            .await?;
        Ok(response
            .op_responses()
            .iter()
            .any(|op| matches!(op, etcd_client::TxnOpResponse::Delete(d) if d.deleted() > 0)))
    }

    fn parse_policy(&self, kv: &KeyValue) -> Result<Policy> {
        let key = key_of(kv);
        let malformed = |reason: String| StoreError::Malformed {
            key: key.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(kv.value()).map_err(|e| malformed(e.to_string()))?;
        let policy = policy_from_value(&value, "").map_err(|e| malformed(e.to_string()))?;
        match self.keys.parse_policy(&key) == Some(policy.name.as_str()) {
            true => Ok(policy),
            false => Err(malformed(format!("names policy {:?}", policy.name))),
        }
    }

    fn decode_policy(&self, kv: &KeyValue) -> Option<Policy> {
        self.parse_policy(kv)
            .inspect_err(|err| tracing::warn!(error = %err, "skipping malformed policy"))
            .ok()
    }

    /// Every endpoint and policy, read at one revision.
    pub async fn fabric_snapshot(&self) -> Result<FabricView> {
        let prefix = || Some(GetOptions::new().with_prefix());
        let response = self
            .txn(Txn::new().and_then([
                TxnOp::get(self.keys.endpoints(), prefix()),
                TxnOp::get(self.keys.policies(), prefix()),
            ]))
            .await?;
        let mut view = FabricView {
            revision: response.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        let ops = response.op_responses();
        let [endpoints, policies] = ops.as_slice() else {
            return Err(StoreError::Unavailable("short snapshot response".into()));
        };
        for kv in get_kvs(endpoints).iter().chain(get_kvs(policies)) {
            if let Some(event) = self.fabric_put(kv) {
                view.apply(event);
            }
        }
        Ok(view)
    }

    fn fabric_put(&self, kv: &KeyValue) -> Option<FabricEvent> {
        let key = key_of(kv);
        if self.keys.parse_endpoint(&key).is_some() {
            return match serde_json::from_slice::<EndpointRecord>(kv.value()) {
                Ok(record) => Some(FabricEvent::EndpointPut(Box::new(record))),
                Err(e) => {
                    tracing::warn!(key, error = %e, "skipping malformed endpoint record");
                    None
                }
            };
        }
        self.decode_policy(kv)
            .map(|p| FabricEvent::PolicyPut(Box::new(p)))
    }

    fn fabric_delete(&self, key: &str) -> Option<FabricEvent> {
        if let Some((host, container_id)) = self.keys.parse_endpoint(key) {
            return Some(FabricEvent::EndpointDeleted { host, container_id });
        }
        self.keys
            .parse_policy(key)
            .map(|name| FabricEvent::PolicyDeleted(name.to_string()))
    }

    /// Follows endpoints and policies once: a snapshot (handed to `on_snapshot`), then a watch
    /// from its revision, each batch of changes handed to `on_events`. Returns Ok when the watch
    /// must be restarted from a fresh snapshot (compaction, stream closed), Err when etcd failed.
    pub async fn follow_fabric(
        &self,
        on_snapshot: impl FnOnce(FabricView),
        mut on_events: impl FnMut(Vec<FabricEvent>, i64),
    ) -> Result<()> {
        let snapshot = self.fabric_snapshot().await?;
        let revision = snapshot.revision;
        on_snapshot(snapshot);
        let options = || {
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            )
        };
        let keys = [self.keys.endpoints(), self.keys.policies()];
        let mut stream = self
            .call(|mut c| {
                let keys = keys.clone();
                async move {
                    let mut stream = c.watch(keys[0].clone(), options()).await?;
                    stream.watch(keys[1].clone(), options()).await?;
                    Ok(stream)
                }
            })
            .await?;
        loop {
            let Some(response) = stream.message().await? else {
                return Ok(());
            };
            if response.canceled() || response.compact_revision() > 0 {
                tracing::info!(
                    compact_revision = response.compact_revision(),
                    "fabric watch cancelled; re-listing"
                );
                return Ok(());
            }
            let mut last = 0;
            let events: Vec<FabricEvent> = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    last = last.max(kv.mod_revision());
                    match event.event_type() {
                        EventType::Put => self.fabric_put(kv),
                        EventType::Delete => self.fabric_delete(&key_of(kv)),
                    }
                })
                .collect();
            if !events.is_empty() {
                on_events(events, last);
            }
        }
    }
}
