//! Block claims: a host takes a free block of a pool with a guarded create.

use std::collections::HashSet;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnetwork::IpNetwork;
use tracing::debug;

use crate::alloc;
use crate::client::{decode, key_of, Datastore};
use crate::error::{Result, StoreError};
use crate::records::{encode, BlockRecord, PoolRecord};

/// How many times a conflicting claim is retried on fresh data before giving up.
const MAX_ATTEMPTS: u32 = 32;

impl Datastore {
    /// Claims a free block of `pool` for `host`: a random free candidate, created only if nobody
    /// created it first; conflicts are retried on fresh data.
    pub async fn claim_block(
        &self,
        pool_name: &str,
        pool: &PoolRecord,
        host: &str,
    ) -> Result<IpNetwork> {
        for attempt in 0..MAX_ATTEMPTS {
            let taken: HashSet<IpNetwork> = self
                .list(&self.keys.pool_blocks(pool_name))
                .await?
                .iter()
                .filter_map(|kv| self.keys.parse_block(&key_of(kv)).map(|(_, b)| b))
                .collect();
            let Some(block) =
                alloc::pick_free_block(pool.cidr, pool.block_size, &taken, rand::random())
            else {
                return Err(StoreError::PoolExhausted {
                    pool: pool_name.to_string(),
                    cidr: pool.cidr,
                });
            };
            if self.claim_exact_block(pool_name, block, host).await? {
                return Ok(block);
            }
            debug!(%block, attempt, "block claimed by someone else first; retrying");
        }
        Err(StoreError::Contention {
            what: format!("claiming a block of pool {pool_name}"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Claims one given block for `host` if nobody holds it. Returns whether it is now ours
    /// (true also when it already was).
    pub async fn claim_exact_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool> {
        let key = self.keys.block(pool_name, block);
        let value = encode(&BlockRecord {
            host: host.to_string(),
        });
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), value.as_str(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await?;
        if response.succeeded() {
            return Ok(true);
        }
        let held = response.op_responses().first().and_then(|op| {
            crate::client::get_kvs(op)
                .first()
                .map(|kv| kv.value().to_vec())
        });
        Ok(held.as_deref() == Some(value.as_bytes()))
    }

    /// Gives a block of `host` back to its pool: deleted only while it is still `host`'s.
    /// Returns whether it was. The caller makes sure no address of it is in use or being
    /// allocated (only its owner allocates in a block).
    pub async fn release_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool> {
        let key = self.keys.block(pool_name, block);
        let value = encode(&BlockRecord {
            host: host.to_string(),
        });
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, value)])
                    .and_then([TxnOp::delete(key.as_str(), None)]),
            )
            .await?;
        Ok(response.succeeded())
    }

    /// The host holding a block, if any.
    pub async fn block_holder(&self, pool_name: &str, block: IpNetwork) -> Result<Option<String>> {
        let response = self.get(&self.keys.block(pool_name, block), None).await?;
        let record: Option<BlockRecord> = response.kvs().first().map(decode).transpose()?;
        Ok(record.map(|r| r.host))
    }
}
