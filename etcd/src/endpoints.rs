//! Endpoint records: created with their address and host-port guards in one transaction,
//! deleted with them, and written in batches when attaches queue up.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnetwork::IpNetwork;

use crate::client::{decode, decode_all, get_kvs, Datastore};
use crate::error::{Result, StoreError};
use crate::records::{encode, EndpointRecord, IpRecord, PortOwner};

/// Why an endpoint could not be created.
#[derive(Debug)]
pub enum CreateConflict {
    /// This address of the record was taken meanwhile (by a record this agent did not know of):
    /// pick another.
    IpTaken(std::net::IpAddr),
    /// The container already has an endpoint record.
    EndpointExists(Box<EndpointRecord>),
    /// A guarded write failed for a reason the caller must report.
    Store(StoreError),
}

impl From<StoreError> for CreateConflict {
    fn from(err: StoreError) -> Self {
        CreateConflict::Store(err)
    }
}

/// The block an endpoint's address lies in, with its pool: the record is written only while the
/// block is still recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    pub pool: String,
    pub block: IpNetwork,
}

impl Datastore {
    fn ip_record(endpoint: &EndpointRecord) -> String {
        encode(&IpRecord {
            host: endpoint.host.clone(),
            container_id: endpoint.container_id.clone(),
            tunnel: false,
        })
    }

    fn port_owner(endpoint: &EndpointRecord) -> String {
        encode(&PortOwner {
            container_id: endpoint.container_id.clone(),
        })
    }

    /// The guards and writes of one endpoint: its addresses (one per family), its record and its
    /// host ports must be free, and the blocks of its addresses must still exist. A dual-stack
    /// endpoint's two addresses are thus taken together or not at all.
    fn endpoint_writes(
        &self,
        endpoint: &EndpointRecord,
        blocks: &[BlockRef],
    ) -> (Vec<Compare>, Vec<TxnOp>) {
        let ep_key = self.keys.endpoint(&endpoint.host, &endpoint.container_id);
        let mut compares = vec![Compare::create_revision(
            ep_key.as_str(),
            CompareOp::Equal,
            0,
        )];
        let mut puts = vec![TxnOp::put(ep_key.as_str(), encode(endpoint), None)];
        for ip in endpoint.addresses() {
            let ip_key = self.keys.ip(ip);
            compares.push(Compare::create_revision(
                ip_key.as_str(),
                CompareOp::Equal,
                0,
            ));
            puts.push(TxnOp::put(ip_key.as_str(), Self::ip_record(endpoint), None));
        }
        for block in blocks {
            let block_key = self.keys.block(&block.pool, block.block);
            compares.push(Compare::version(block_key.as_str(), CompareOp::Greater, 0));
        }
        let owner = Self::port_owner(endpoint);
        for port in &endpoint.ports {
            let key = self
                .keys
                .port(&endpoint.host, port.protocol, port.host_port);
            compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(key, owner.clone(), None));
        }
        (compares, puts)
    }

    /// Writes several endpoints in one transaction, all guarded as `create_endpoint` guards one.
    /// Returns false, writing nothing, if any guard fails: the caller then writes them one by
    /// one to learn which. One transaction for many attaches is one raft round and one fsync.
    pub async fn create_endpoints(
        &self,
        batch: &[(EndpointRecord, Vec<BlockRef>)],
    ) -> Result<bool> {
        let mut compares = vec![];
        let mut puts = vec![];
        for (endpoint, blocks) in batch {
            let (c, p) = self.endpoint_writes(endpoint, blocks);
            compares.extend(c);
            puts.extend(p);
        }
        let response = self.txn(Txn::new().when(compares).and_then(puts)).await?;
        Ok(response.succeeded())
    }

    /// Writes an endpoint with its `ips/` and `ports/` guards in one transaction. Fails without
    /// writing anything if an address, the container id or a host port is already taken, or a
    /// block holding an address is no longer recorded.
    pub async fn create_endpoint(
        &self,
        endpoint: &EndpointRecord,
        blocks: &[BlockRef],
    ) -> Result<(), CreateConflict> {
        let (compares, puts) = self.endpoint_writes(endpoint, blocks);
        let ep_key = self.keys.endpoint(&endpoint.host, &endpoint.container_id);
        // Read back on failure, in this order: the record, the blocks, the ports, the addresses.
        let mut reads = vec![TxnOp::get(ep_key.as_str(), None)];
        reads.extend(
            blocks
                .iter()
                .map(|b| TxnOp::get(self.keys.block(&b.pool, b.block), None)),
        );
        reads.extend(endpoint.ports.iter().map(|p| {
            TxnOp::get(
                self.keys.port(&endpoint.host, p.protocol, p.host_port),
                None,
            )
        }));
        reads.extend(
            endpoint
                .addresses()
                .map(|ip| TxnOp::get(self.keys.ip(ip), None)),
        );

        let response = self
            .txn(Txn::new().when(compares).and_then(puts).or_else(reads))
            .await?;
        if response.succeeded() {
            return Ok(());
        }
        let ops = response.op_responses();
        if let Some(kv) = ops.first().and_then(|op| get_kvs(op).first()) {
            return Err(CreateConflict::EndpointExists(Box::new(decode(kv)?)));
        }
        for (i, block) in blocks.iter().enumerate() {
            if ops.get(1 + i).is_some_and(|op| get_kvs(op).is_empty()) {
                return Err(CreateConflict::Store(StoreError::BlockReleased {
                    block: block.block,
                }));
            }
        }
        let ports_at = 1 + blocks.len();
        for (i, port) in endpoint.ports.iter().enumerate() {
            if let Some(kv) = ops.get(ports_at + i).and_then(|op| get_kvs(op).first()) {
                let owner: PortOwner = decode(kv)?;
                return Err(CreateConflict::Store(StoreError::PortTaken {
                    protocol: port.protocol,
                    port: port.host_port,
                    owner: owner.container_id,
                }));
            }
        }
        let ips_at = ports_at + endpoint.ports.len();
        let taken = endpoint
            .addresses()
            .enumerate()
            .find(|(i, _)| {
                ops.get(ips_at + i)
                    .is_some_and(|op| !get_kvs(op).is_empty())
            })
            .map_or(endpoint.ip, |(_, ip)| ip);
        Err(CreateConflict::IpTaken(taken))
    }

    /// Deletes an endpoint with its `ips/` and `ports/` keys in one transaction. Guard keys that
    /// now belong to someone else are left alone.
    pub async fn delete_endpoint(&self, endpoint: &EndpointRecord) -> Result<()> {
        self.txn(Txn::new().and_then(self.endpoint_deletes(endpoint)))
            .await?;
        Ok(())
    }

    /// Deletes an endpoint as `delete_endpoint` does, but only if its record is exactly
    /// `endpoint` (a write whose answer was lost: it may or may not have landed, and the id may
    /// have been attached again since). Returns whether it was there.
    pub async fn delete_endpoint_if_unchanged(&self, endpoint: &EndpointRecord) -> Result<bool> {
        let key = self.keys.endpoint(&endpoint.host, &endpoint.container_id);
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::value(
                        key.as_str(),
                        CompareOp::Equal,
                        encode(endpoint),
                    )])
                    .and_then(self.endpoint_deletes(endpoint)),
            )
            .await?;
        Ok(response.succeeded())
    }

    /// The endpoint key, and its guard keys where they are still the endpoint's own.
    fn endpoint_deletes(&self, endpoint: &EndpointRecord) -> Vec<TxnOp> {
        let mut ops = vec![TxnOp::delete(
            self.keys.endpoint(&endpoint.host, &endpoint.container_id),
            None,
        )];
        // Conditional deletes as nested transactions: each guard key goes only if it is ours.
        let guarded = |key: String, value: String| {
            TxnOp::txn(
                Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, value)])
                    .and_then([TxnOp::delete(key, None)]),
            )
        };
        for ip in endpoint.addresses() {
            ops.push(guarded(self.keys.ip(ip), Self::ip_record(endpoint)));
        }
        let owner = Self::port_owner(endpoint);
        for port in &endpoint.ports {
            ops.push(guarded(
                self.keys
                    .port(&endpoint.host, port.protocol, port.host_port),
                owner.clone(),
            ));
        }
        ops
    }

    /// Replaces an endpoint's record with `new` (same container, same address) if it still is
    /// `old`: host ports `new` adds are reserved under their guard, those it drops are released.
    /// Fails with `PortTaken` if an added port is someone else's, `Contention` if the record
    /// changed meanwhile; nothing is written then.
    pub async fn update_endpoint(&self, old: &EndpointRecord, new: &EndpointRecord) -> Result<()> {
        let ep_key = self.keys.endpoint(&old.host, &old.container_id);
        let owner = Self::port_owner(new);
        let added: Vec<_> = new
            .ports
            .iter()
            .filter(|p| !old.ports.contains(p))
            .collect();
        let dropped: Vec<_> = old
            .ports
            .iter()
            .filter(|p| !new.ports.contains(p))
            .collect();
        let port_key =
            |p: &crate::records::PortRecord| self.keys.port(&new.host, p.protocol, p.host_port);
        let mut compares = vec![Compare::value(
            ep_key.as_str(),
            CompareOp::Equal,
            encode(old),
        )];
        let mut ops = vec![TxnOp::put(ep_key.as_str(), encode(new), None)];
        for p in &added {
            // A port kept under another container port is already ours: rewrite it.
            if !old
                .ports
                .iter()
                .any(|o| o.protocol == p.protocol && o.host_port == p.host_port)
            {
                compares.push(Compare::create_revision(port_key(p), CompareOp::Equal, 0));
            }
            ops.push(TxnOp::put(port_key(p), owner.clone(), None));
        }
        for p in dropped.iter().filter(|p| {
            !new.ports
                .iter()
                .any(|n| n.protocol == p.protocol && n.host_port == p.host_port)
        }) {
            let key = port_key(p);
            ops.push(TxnOp::txn(
                Txn::new()
                    .when([Compare::value(
                        key.as_str(),
                        CompareOp::Equal,
                        owner.clone(),
                    )])
                    .and_then([TxnOp::delete(key, None)]),
            ));
        }
        let reads: Vec<TxnOp> = added
            .iter()
            .map(|p| TxnOp::get(port_key(p), None))
            .collect();
        let response = self
            .txn(Txn::new().when(compares).and_then(ops).or_else(reads))
            .await?;
        if response.succeeded() {
            return Ok(());
        }
        for (p, op) in added.iter().zip(response.op_responses()) {
            if let Some(kv) = get_kvs(&op).first() {
                let holder: PortOwner = decode(kv)?;
                if holder.container_id != new.container_id {
                    return Err(StoreError::PortTaken {
                        protocol: p.protocol,
                        port: p.host_port,
                        owner: holder.container_id,
                    });
                }
            }
        }
        Err(StoreError::Contention {
            what: format!("updating the record of {}", new.container_id),
            attempts: 1,
        })
    }

    pub async fn get_endpoint(
        &self,
        host: &str,
        container_id: &str,
    ) -> Result<Option<EndpointRecord>> {
        let response = self
            .get(&self.keys.endpoint(host, container_id), None)
            .await?;
        response.kvs().first().map(decode).transpose()
    }

    /// The endpoints of `host`; malformed records are reported and skipped.
    pub async fn list_endpoints(&self, host: &str) -> Result<Vec<EndpointRecord>> {
        let kvs = self.list(&self.keys.host_endpoints(host)).await?;
        Ok(decode_all(&kvs).into_iter().map(|(_, r)| r).collect())
    }

    /// Every endpoint of every host; malformed ones are reported and skipped.
    pub async fn list_all_endpoints(&self) -> Result<Vec<EndpointRecord>> {
        let kvs = self.list(&self.keys.endpoints()).await?;
        Ok(decode_all(&kvs).into_iter().map(|(_, r)| r).collect())
    }
}

/// One endpoint record waiting to be written.
struct CreateJob {
    record: EndpointRecord,
    blocks: Vec<BlockRef>,
    reply: tokio::sync::oneshot::Sender<Result<(), CreateConflict>>,
}

/// Endpoint records per transaction (each takes 5 or more of etcd's default 128 operations).
const MAX_BATCH: usize = 16;

/// Writes endpoint records, batching the ones that queue up while a write is in flight (group
/// commit): no added latency when idle, one raft round for many attaches under load. A batch
/// whose guards fail is retried record by record, so each attach gets its own answer.
#[derive(Clone)]
pub struct EndpointWriter {
    jobs: tokio::sync::mpsc::Sender<CreateJob>,
}

impl EndpointWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Datastore) -> Self {
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<CreateJob>(256);
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                write_batch(&store, batch).await;
            }
        });
        Self { jobs }
    }

    /// Writes one endpoint, possibly together with others queued meanwhile.
    pub async fn create(
        &self,
        record: EndpointRecord,
        blocks: Vec<BlockRef>,
    ) -> Result<(), CreateConflict> {
        let stopped =
            || CreateConflict::Store(StoreError::Unavailable("endpoint writer stopped".into()));
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = CreateJob {
            record,
            blocks,
            reply,
        };
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn write_batch(store: &Datastore, jobs: Vec<CreateJob>) {
    if jobs.len() > 1 {
        let batch: Vec<_> = jobs
            .iter()
            .map(|j| (j.record.clone(), j.blocks.clone()))
            .collect();
        match store.create_endpoints(&batch).await {
            Ok(true) => {
                for job in jobs {
                    let _ = job.reply.send(Ok(()));
                }
                return;
            }
            Err(StoreError::Unavailable(message)) => {
                for job in jobs {
                    let error = StoreError::Unavailable(message.clone());
                    let _ = job.reply.send(Err(CreateConflict::Store(error)));
                }
                return;
            }
            // A guard failed (or the batch was refused): one by one.
            Ok(false) | Err(_) => {}
        }
    }
    for job in jobs {
        let result = store.create_endpoint(&job.record, &job.blocks).await;
        let _ = job.reply.send(result);
    }
}
