//! Cluster membership: pools, host registrations, liveness leases, and removing a host for good.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::client::{decode, decode_all, get_kvs, unix_now, Datastore};
use crate::cluster::BlockOwner;
use crate::error::{Result, StoreError};
use crate::records::{encode, AliveRecord, HostRecord, PoolRecord};

/// etcd's default limit of operations in one transaction is 128; stay below it.
const OPS_PER_TXN: usize = 100;

/// What `remove_host` released.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    pub blocks: usize,
    pub ips: usize,
    pub endpoints: usize,
    pub ports: usize,
}

fn describe_pool(pool: &PoolRecord) -> String {
    format!(
        "{} with /{} blocks, nat_outgoing={}, encapsulation={}",
        pool.cidr, pool.block_size, pool.nat_outgoing, pool.encapsulation
    )
}

impl Datastore {
    /// Creates the pool if absent; otherwise checks that the stored one matches `wanted`.
    pub async fn ensure_pool(&self, name: &str, wanted: &PoolRecord) -> Result<PoolRecord> {
        let key = self.keys.pool(name);
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), encode(wanted), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await?;
        if response.succeeded() {
            return Ok(wanted.clone());
        }
        let ops = response.op_responses();
        let kv = ops
            .first()
            .and_then(|op| get_kvs(op).first())
            .ok_or_else(|| StoreError::Contention {
                what: format!("creating pool {name}"),
                attempts: 1,
            })?;
        let existing: PoolRecord = decode(kv)?;
        if &existing != wanted {
            return Err(StoreError::PoolMismatch {
                name: name.to_string(),
                existing: describe_pool(&existing),
                wanted: describe_pool(wanted),
            });
        }
        Ok(existing)
    }

    /// Every pool; malformed ones are reported and skipped.
    pub async fn list_pools(&self) -> Result<Vec<(String, PoolRecord)>> {
        let prefix = self.keys.pools();
        let kvs = self.list(&prefix).await?;
        Ok(decode_all::<PoolRecord>(&kvs)
            .into_iter()
            .filter_map(|(key, r)| Some((self.keys.name_in(&prefix, &key)?.to_string(), r)))
            .collect())
    }

    /// Writes `hosts/<host>` as `wanted`, keeping the first-seen time of an earlier
    /// registration. Returns the record and whether it had to be written (absent or different).
    pub async fn register_host(
        &self,
        host: &str,
        wanted: &HostRecord,
    ) -> Result<(HostRecord, bool)> {
        let key = self.keys.host(host);
        let existing = self.get(&key, None).await?;
        let first_seen = existing
            .kvs()
            .first()
            .and_then(|kv| decode::<HostRecord>(kv).ok())
            .map(|r| r.first_seen)
            .unwrap_or_else(unix_now);
        let record = HostRecord {
            first_seen,
            ..wanted.clone()
        };
        let value = encode(&record);
        let written = existing.kvs().first().map(|kv| kv.value()) != Some(value.as_bytes());
        if written {
            self.call(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await?;
        }
        Ok((record, written))
    }

    /// The registration of `host`, if any.
    pub async fn get_host(&self, host: &str) -> Result<Option<HostRecord>> {
        let response = self.get(&self.keys.host(host), None).await?;
        response.kvs().first().map(decode).transpose()
    }

    /// Who holds an address, if anyone.
    pub async fn get_ip(&self, ip: IpAddr) -> Result<Option<crate::records::IpRecord>> {
        let response = self.get(&self.keys.ip(ip), None).await?;
        response.kvs().first().map(decode).transpose()
    }

    /// Takes `ip` as the tunnel address of `host`, in `block` (which must still be recorded):
    /// guarded like an endpoint's address. Returns whether it is now (or already was) `host`'s.
    pub async fn claim_tunnel_ip(
        &self,
        host: &str,
        ip: IpAddr,
        pool: &str,
        block: ipnetwork::IpNetwork,
    ) -> Result<bool> {
        let key = self.keys.ip(ip);
        let value = encode(&crate::records::IpRecord {
            host: host.to_string(),
            container_id: String::new(),
            tunnel: true,
        });
        let block_key = self.keys.block(pool, block);
        let response = self
            .txn(
                Txn::new()
                    .when([
                        Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                        Compare::version(block_key.as_str(), CompareOp::Greater, 0),
                    ])
                    .and_then([TxnOp::put(key.as_str(), value.as_str(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await?;
        if response.succeeded() {
            return Ok(true);
        }
        let held = response
            .op_responses()
            .first()
            .and_then(|op| get_kvs(op).first().map(|kv| kv.value().to_vec()));
        Ok(held.as_deref() == Some(value.as_bytes()))
    }

    /// Grants a lease of `ttl` seconds and writes `alive/<host>` on it. Returns the lease id.
    pub async fn announce_alive(&self, host: &str, record: &AliveRecord, ttl: i64) -> Result<i64> {
        let lease = self
            .call(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?
            .id();
        let (key, value) = (self.keys.alive(host), encode(record));
        self.call(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(lease)
    }

    /// Writes `alive/<host>` on an existing lease (after the key was deleted while the lease
    /// lived).
    pub async fn announce_alive_on(
        &self,
        host: &str,
        record: &AliveRecord,
        lease: i64,
    ) -> Result<()> {
        let (key, value) = (self.keys.alive(host), encode(record));
        self.call(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// Refreshes a lease once. Returns false when the lease no longer exists (it expired).
    ///
    /// etcd answers a keep-alive of an expired lease with TTL 0 in a normal response, or, on
    /// some paths, with a "lease not found" error: both mean the same and are reported as false,
    /// so the caller grants a new lease instead of retrying a dead one forever.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool> {
        let answer = self
            .call(|mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                let answer = stream.message().await?;
                Ok(answer.map(|r| r.ttl() > 0).unwrap_or(false))
            })
            .await;
        match answer {
            Err(StoreError::Etcd(e)) if e.to_string().contains("lease not found") => Ok(false),
            other => other,
        }
    }

    /// Removes a host for good: its blocks, IPs, endpoints, ports, liveness and registration.
    /// Peers drop their routes to it when they see its blocks go.
    pub async fn remove_host(&self, host: &str) -> Result<Released> {
        let mut released = Released::default();
        let mut deletes: Vec<TxnOp> = Vec::new();

        let view = self.snapshot().await?;
        for (block, BlockOwner { pool, host: owner }) in &view.blocks {
            if owner == host {
                deletes.push(TxnOp::delete(self.keys.block(pool, *block), None));
                released.blocks += 1;
            }
        }
        for (ip, record) in self.list_ips().await? {
            if record.host == host {
                deletes.push(TxnOp::delete(self.keys.ip(ip), None));
                released.ips += 1;
            }
        }
        for chunk in deletes.chunks(OPS_PER_TXN) {
            self.txn(Txn::new().and_then(chunk.to_vec())).await?;
        }
        let prefix = || Some(DeleteOptions::new().with_prefix());
        let response = self
            .txn(Txn::new().and_then([
                TxnOp::delete(self.keys.host_endpoints(host), prefix()),
                TxnOp::delete(self.keys.host_ports(host), prefix()),
                TxnOp::delete(self.keys.alive(host), None),
                TxnOp::delete(self.keys.host(host), None),
            ]))
            .await?;
        let ops = response.op_responses();
        let deleted = |i: usize| match ops.get(i) {
            Some(TxnOpResponse::Delete(d)) => d.deleted() as usize,
            _ => 0,
        };
        released.endpoints = deleted(0);
        released.ports = deleted(1);
        Ok(released)
    }
}
