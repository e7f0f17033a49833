//! The datastore: every read and guarded write weft makes to etcd.

use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse,
};
use ipnetwork::Ipv4Network;
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::alloc;
use crate::cluster::{BlockOwner, ClusterEvent, ClusterView};
use crate::error::{Result, StoreError};
use crate::keys::Keys;
use crate::records::{
    encode, AliveRecord, BlockRecord, EndpointRecord, HostRecord, IpRecord, PoolRecord, PortOwner,
};

/// How many times a conflicting allocation is retried on fresh data before giving up.
const MAX_ATTEMPTS: u32 = 32;
/// etcd's default limit of operations in one transaction is 128; stay below it.
const OPS_PER_TXN: usize = 100;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Upper bound of one request, so a dead etcd turns into an error instead of a hang.
    pub timeout: Duration,
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS to etcd.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// Why an endpoint could not be created.
#[derive(Debug)]
pub enum CreateConflict {
    /// The address was taken meanwhile (by a record this agent did not know of): pick another.
    IpTaken,
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

/// What `remove_host` released.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    pub blocks: usize,
    pub ips: usize,
    pub endpoints: usize,
    pub ports: usize,
}

/// A client per etcd endpoint: requests go to the one that last answered and move on to the
/// next when it is unreachable, so one dead member of a cluster costs one failed connect, not an
/// outage.
#[derive(Clone)]
pub struct Datastore {
    clients: Arc<Vec<(String, Client)>>,
    current: Arc<AtomicUsize>,
    keys: Keys,
    timeout: Duration,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Malformed {
        key,
        reason: e.to_string(),
    })
}

/// Whether etcd answered that it is between leaders. etcd sends these before doing anything
/// (no leader) or only for reads (leader changed, from its linearizable read path), so the
/// request can be sent again whatever it was.
fn is_election(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && ["etcdserver: no leader", "etcdserver: leader changed"]
                    .iter()
                    .any(|m| status.message().contains(m))
        }
        _ => false,
    }
}

fn key_of(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

/// Decodes every record of a listing, reporting and skipping the ones that do not parse: one bad
/// record must not take the whole agent down.
fn decode_all<T: DeserializeOwned>(kvs: &[KeyValue]) -> Vec<(String, T)> {
    kvs.iter()
        .filter_map(|kv| match decode(kv) {
            Ok(record) => Some((key_of(kv), record)),
            Err(err) => {
                warn!(error = %err, "skipping malformed record");
                None
            }
        })
        .collect()
}

fn get_kvs(response: &TxnOpResponse) -> &[KeyValue] {
    match response {
        TxnOpResponse::Get(get) => get.kvs(),
        _ => &[],
    }
}

impl Datastore {
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(5), config.timeout);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let mut clients = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            // Connections are made lazily, so an endpoint that is down now costs nothing here.
            let client = tokio::time::timeout(
                config.timeout,
                Client::connect([endpoint.as_str()], Some(options.clone())),
            )
            .await??;
            clients.push((endpoint.clone(), client));
        }
        if clients.is_empty() {
            return Err(StoreError::Unavailable(
                "no etcd endpoint configured".into(),
            ));
        }
        Ok(Self {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            keys: Keys::new(&config.prefix),
            timeout: config.timeout,
        })
    }

    /// Runs `op` against the current endpoint, moving on to the next ones while they are
    /// unreachable. Each try is bounded by the request timeout, the whole call by twice that.
    ///
    /// A cluster that answers but is electing a leader (after its leader died) is waited for:
    /// rounds over the endpoints repeat, with a growing pause, until one succeeds or the
    /// deadline passes. When no endpoint answers at all, the call fails after one round, so an
    /// etcd that is down fails an attach at once rather than after the deadline.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let count = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.timeout * 2;
        let mut pause = Duration::from_millis(25);
        let mut last = None;
        loop {
            let mut electing = false;
            for step in 0..count {
                let index = (start + step) % count;
                let (endpoint, client) = &self.clients[index];
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let limit = remaining.min(self.timeout);
                let error = match tokio::time::timeout(limit, op(client.clone())).await {
                    Ok(Ok(value)) => {
                        if index != start {
                            self.current.store(index, Ordering::Relaxed);
                        }
                        return Ok(value);
                    }
                    Ok(Err(e)) => {
                        electing |= is_election(&e);
                        StoreError::from(e)
                    }
                    Err(_) => StoreError::Unavailable(format!("{endpoint}: request timed out")),
                };
                if !matches!(error, StoreError::Unavailable(_)) {
                    return Err(error);
                }
                debug!(%endpoint, error = %error, "etcd endpoint unavailable; trying the next");
                last = Some(error);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !electing || remaining <= pause {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
        Err(last.unwrap_or_else(|| StoreError::Unavailable("etcd request timed out".into())))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn get(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse> {
        self.call(|mut c| {
            let options = options.clone();
            async move { c.get(key, options).await }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut response = self
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(response.take_kvs())
    }

    /// Checks that etcd answers.
    pub async fn ping(&self) -> Result<()> {
        self.get(
            &self.keys.pools(),
            Some(GetOptions::new().with_count_only().with_prefix()),
        )
        .await
        .map(|_| ())
    }

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

    /// Writes `hosts/<host>`, keeping the first-seen time of an earlier registration.
    pub async fn register_host(
        &self,
        host: &str,
        underlay_ip: Ipv4Addr,
        version: &str,
    ) -> Result<HostRecord> {
        let key = self.keys.host(host);
        let existing = self.get(&key, None).await?;
        let first_seen = existing
            .kvs()
            .first()
            .and_then(|kv| decode::<HostRecord>(kv).ok())
            .map(|r| r.first_seen)
            .unwrap_or_else(unix_now);
        let record = HostRecord {
            underlay_ip,
            version: version.to_string(),
            first_seen,
        };
        if existing.kvs().first().map(|kv| kv.value()) != Some(encode(&record).as_bytes()) {
            let value = encode(&record);
            self.call(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await?;
        }
        Ok(record)
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

    /// Refreshes a lease once. Returns false when the lease no longer exists (it expired).
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool> {
        self.call(|mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            let answer = stream.message().await?;
            Ok(answer.map(|r| r.ttl() > 0).unwrap_or(false))
        })
        .await
    }

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
    pub fn event_for_put(&self, kv: &KeyValue) -> Option<ClusterEvent> {
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
            .inspect_err(|err| warn!(error = %err, "skipping malformed record"))
            .ok()
    }

    /// Translates a delete of a watched key into a cluster event.
    pub fn event_for_delete(&self, key: &str) -> Option<ClusterEvent> {
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

    /// Starts one watch stream over hosts, liveness and blocks from `revision` (inclusive).
    pub async fn watch_cluster(&self, revision: i64) -> Result<etcd_client::WatchStream> {
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
        mut on_events: impl FnMut(Vec<(ClusterEvent, i64)>),
    ) -> Result<()> {
        let snapshot = self.snapshot().await?;
        let revision = snapshot.revision;
        on_snapshot(snapshot);
        let mut stream = self.watch_cluster(revision + 1).await?;
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
                        etcd_client::EventType::Delete => {
                            self.event_for_delete(&String::from_utf8_lossy(kv.key()))
                        }
                    }?;
                    Some((parsed, kv.mod_revision()))
                })
                .collect();
            if !events.is_empty() {
                on_events(events);
            }
        }
    }

    /// Claims a free block of `pool` for `host`: a random free candidate, created only if nobody
    /// created it first; conflicts are retried on fresh data.
    pub async fn claim_block(
        &self,
        pool_name: &str,
        pool: &PoolRecord,
        host: &str,
    ) -> Result<Ipv4Network> {
        for attempt in 0..MAX_ATTEMPTS {
            let taken: HashSet<Ipv4Network> = self
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
            let key = self.keys.block(pool_name, block);
            let record = BlockRecord {
                host: host.to_string(),
            };
            let response = self
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.as_str(), encode(&record), None)]),
                )
                .await?;
            if response.succeeded() {
                return Ok(block);
            }
            debug!(%block, attempt, "block claimed by someone else first; retrying");
        }
        Err(StoreError::Contention {
            what: format!("claiming a block of pool {pool_name}"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The guards and writes of one endpoint: its address, its record and its host ports must be
    /// free, and its block must still exist.
    fn endpoint_writes(
        &self,
        endpoint: &EndpointRecord,
        block: (&str, Ipv4Network),
    ) -> (Vec<Compare>, Vec<TxnOp>) {
        let ip_key = self.keys.ip(endpoint.ip);
        let ep_key = self.keys.endpoint(&endpoint.host, &endpoint.container_id);
        let block_key = self.keys.block(block.0, block.1);
        let mut compares = vec![
            Compare::create_revision(ip_key.as_str(), CompareOp::Equal, 0),
            Compare::create_revision(ep_key.as_str(), CompareOp::Equal, 0),
            Compare::version(block_key.as_str(), CompareOp::Greater, 0),
        ];
        let ip_record = IpRecord {
            host: endpoint.host.clone(),
            container_id: endpoint.container_id.clone(),
        };
        let mut puts = vec![
            TxnOp::put(ip_key.as_str(), encode(&ip_record), None),
            TxnOp::put(ep_key.as_str(), encode(endpoint), None),
        ];
        let owner = encode(&PortOwner {
            container_id: endpoint.container_id.clone(),
        });
        for port in &endpoint.ports {
            let key = self
                .keys
                .port(&endpoint.host, &port.protocol, port.host_port);
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
        batch: &[(EndpointRecord, (String, Ipv4Network))],
    ) -> Result<bool> {
        let mut compares = vec![];
        let mut puts = vec![];
        for (endpoint, (pool, block)) in batch {
            let (c, p) = self.endpoint_writes(endpoint, (pool, *block));
            compares.extend(c);
            puts.extend(p);
        }
        let response = self.txn(Txn::new().when(compares).and_then(puts)).await?;
        Ok(response.succeeded())
    }

    /// Writes an endpoint with its `ips/` and `ports/` guards in one transaction. Fails without
    /// writing anything if the address, the container id or a host port is already taken, or the
    /// block holding the address is no longer recorded.
    pub async fn create_endpoint(
        &self,
        endpoint: &EndpointRecord,
        block: (&str, Ipv4Network),
    ) -> Result<(), CreateConflict> {
        let (compares, puts) = self.endpoint_writes(endpoint, block);
        let ip_key = self.keys.ip(endpoint.ip);
        let ep_key = self.keys.endpoint(&endpoint.host, &endpoint.container_id);
        let block_key = self.keys.block(block.0, block.1);
        let port_keys: Vec<String> = endpoint
            .ports
            .iter()
            .map(|p| self.keys.port(&endpoint.host, &p.protocol, p.host_port))
            .collect();
        let mut reads = vec![
            TxnOp::get(ip_key.as_str(), None),
            TxnOp::get(ep_key.as_str(), None),
            TxnOp::get(block_key.as_str(), None),
        ];
        reads.extend(port_keys.iter().map(|k| TxnOp::get(k.as_str(), None)));

        let response = self
            .txn(Txn::new().when(compares).and_then(puts).or_else(reads))
            .await?;
        if response.succeeded() {
            return Ok(());
        }
        let ops = response.op_responses();
        if let Some(kv) = ops.get(1).and_then(|op| get_kvs(op).first()) {
            return Err(CreateConflict::EndpointExists(Box::new(decode(kv)?)));
        }
        if ops.get(2).is_some_and(|op| get_kvs(op).is_empty()) {
            return Err(CreateConflict::Store(StoreError::Contention {
                what: format!("allocating in block {} which was released", block.1),
                attempts: 1,
            }));
        }
        for (i, port) in endpoint.ports.iter().enumerate() {
            if let Some(kv) = ops.get(3 + i).and_then(|op| get_kvs(op).first()) {
                let owner: PortOwner = decode(kv)?;
                return Err(CreateConflict::Store(StoreError::PortTaken {
                    protocol: port.protocol.clone(),
                    port: port.host_port,
                    owner: owner.container_id,
                }));
            }
        }
        Err(CreateConflict::IpTaken)
    }

    /// Deletes an endpoint with its `ips/` and `ports/` keys in one transaction. Guard keys that
    /// now belong to someone else are left alone.
    pub async fn delete_endpoint(&self, endpoint: &EndpointRecord) -> Result<()> {
        let mine_ip = encode(&IpRecord {
            host: endpoint.host.clone(),
            container_id: endpoint.container_id.clone(),
        });
        let mine_port = encode(&PortOwner {
            container_id: endpoint.container_id.clone(),
        });
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
        ops.push(guarded(self.keys.ip(endpoint.ip), mine_ip));
        for port in &endpoint.ports {
            ops.push(guarded(
                self.keys
                    .port(&endpoint.host, &port.protocol, port.host_port),
                mine_port.clone(),
            ));
        }
        self.txn(Txn::new().and_then(ops)).await?;
        Ok(())
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
        let kvs = self
            .list(&format!("{}/endpoints/", self.keys.prefix()))
            .await?;
        Ok(decode_all(&kvs).into_iter().map(|(_, r)| r).collect())
    }

    /// Every host-port reservation as (host, protocol, port, owner).
    pub async fn list_ports(&self) -> Result<Vec<(String, String, u16, String)>> {
        let prefix = format!("{}/ports/", self.keys.prefix());
        let kvs = self.list(&prefix).await?;
        Ok(decode_all::<PortOwner>(&kvs)
            .into_iter()
            .filter_map(|(key, owner)| {
                let mut parts = key.strip_prefix(&prefix)?.split('/');
                let host = parts.next()?.to_string();
                let protocol = parts.next()?.to_string();
                let port = parts.next()?.parse().ok()?;
                Some((host, protocol, port, owner.container_id))
            })
            .collect())
    }

    /// Deletes a key if it still has the revision it was read at (repairs by `ipam check`).
    pub async fn delete_if_unchanged(&self, key: &str, mod_revision: i64) -> Result<bool> {
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
                    .and_then([TxnOp::delete(key, None)]),
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Writes a key only if it does not exist (repairs by `ipam check`).
    pub async fn create(&self, key: &str, value: &str) -> Result<bool> {
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value, None)]),
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Mod revision of every key under a prefix (for guarded repairs).
    pub async fn revisions(&self, prefix: &str) -> Result<Vec<(String, i64)>> {
        Ok(self
            .list(prefix)
            .await?
            .iter()
            .map(|kv| (key_of(kv), kv.mod_revision()))
            .collect())
    }

    /// Every `ips/` record; malformed ones are reported and skipped.
    pub async fn list_ips(&self) -> Result<Vec<(Ipv4Addr, IpRecord)>> {
        let kvs = self.list(&self.keys.ips()).await?;
        let prefix = self.keys.ips();
        Ok(decode_all::<IpRecord>(&kvs)
            .into_iter()
            .filter_map(|(key, r)| Some((key.strip_prefix(&prefix)?.parse().ok()?, r)))
            .collect())
    }

    /// Every pool; malformed ones are reported and skipped.
    pub async fn list_pools(&self) -> Result<Vec<(String, PoolRecord)>> {
        let kvs = self.list(&self.keys.pools()).await?;
        let prefix = self.keys.pools();
        Ok(decode_all::<PoolRecord>(&kvs)
            .into_iter()
            .filter_map(|(key, r)| Some((key.strip_prefix(&prefix)?.to_string(), r)))
            .collect())
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

fn describe_pool(pool: &PoolRecord) -> String {
    format!(
        "{} with /{} blocks, nat_outgoing={}",
        pool.cidr, pool.block_size, pool.nat_outgoing
    )
}

fn tls_options(files: &TlsFiles) -> Result<etcd_client::TlsOptions> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|e| StoreError::Unavailable(format!("cannot read {path}: {e}")))
    };
    let mut tls = etcd_client::TlsOptions::new();
    if let Some(ca) = &files.ca {
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Unavailable(
                "etcd client certificate and key must be given together".into(),
            ))
        }
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A store whose endpoints are never dialled: the operations below are fakes that ignore
    /// the client they are handed.
    async fn store(endpoints: usize) -> Datastore {
        Datastore::connect(&EtcdConfig {
            endpoints: (0..endpoints)
                .map(|i| format!("http://127.0.0.1:{}", 9 + i))
                .collect(),
            prefix: "/weft-test".into(),
            timeout: Duration::from_secs(1),
            tls: None,
        })
        .await
        .unwrap()
    }

    fn unavailable(message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::unavailable(message.to_string()))
    }

    #[tokio::test]
    async fn a_leader_election_is_waited_out() {
        let store = store(3).await;
        let tries = AtomicU32::new(0);
        let value = store
            .call(|_| {
                let n = tries.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(unavailable("tcp connect error")),
                        1..=4 => Err(unavailable("etcdserver: leader changed")),
                        5 => Err(unavailable("etcdserver: no leader")),
                        _ => Ok(n),
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(value, 6, "two full rounds and one more try");
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_after_one_round() {
        let store = store(3).await;
        let tries = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let result: Result<()> = store
            .call(|_| {
                tries.fetch_add(1, Ordering::SeqCst);
                async { Err(unavailable("tcp connect error")) }
            })
            .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert_eq!(tries.load(Ordering::SeqCst), 3, "each endpoint once");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn an_election_that_outlasts_the_deadline_fails_unavailable() {
        let store = store(1).await;
        let started = std::time::Instant::now();
        let result: Result<()> = store
            .call(|_| async { Err(unavailable("etcdserver: no leader")) })
            .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took <= Duration::from_secs(4),
            "bounded by twice the request timeout: {took:?}"
        );
    }

    #[test]
    fn only_answers_about_a_missing_leader_count_as_an_election() {
        let status = |code, message: &str| {
            etcd_client::Error::GRpcStatus(tonic::Status::new(code, message.to_string()))
        };
        use tonic::Code::{DeadlineExceeded, Unavailable};
        assert!(super::is_election(&status(
            Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(super::is_election(&status(
            Unavailable,
            "etcdserver: no leader"
        )));
        assert!(!super::is_election(&status(
            Unavailable,
            "etcdserver: request timed out"
        )));
        assert!(!super::is_election(&status(
            Unavailable,
            "tcp connect error"
        )));
        assert!(!super::is_election(&status(
            DeadlineExceeded,
            "etcdserver: no leader"
        )));
    }
}
