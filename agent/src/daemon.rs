//! The agent's core: attach and detach, the host's view of the cluster, liveness, and the
//! reconciler — the only place where datastore state and kernel state meet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use weft_etcd::records::{AliveRecord, EndpointRecord, PoolRecord, PortRecord};
use weft_etcd::{alloc, ClusterEvent, ClusterView, CreateConflict, Datastore};

use crate::config::Config;
use crate::dataplane::{self, ContainerLink, Dataplane, KernelRoute, RouteTarget, Underlay};
use crate::error::ApiError;
use crate::firewall::{self, Firewall, FirewallSpec, PortRule};
use crate::metrics::{self, Gauges, Metrics};
use crate::netns::{self, Netns};
use crate::{routes, sysctl, validate};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a client asks for in an attach, before validation.
#[derive(Debug, Clone, Default)]
pub struct AttachSpec {
    pub container_id: String,
    pub netns: String,
    pub pid: Option<u32>,
    pub ifname: String,
    /// (protocol, host port, container port) as received.
    pub ports: Vec<(String, u32, u32)>,
}

/// What this host holds locally, guarded by one short-lived lock (never held across `.await`).
#[derive(Default)]
struct Local {
    endpoints: HashMap<String, EndpointRecord>,
    /// Addresses handed to an attach still writing its record.
    reserved: HashSet<Ipv4Addr>,
    /// Addresses of our blocks found taken in etcd by a record we do not hold.
    foreign: HashSet<Ipv4Addr>,
    /// Endpoints whose veth was found missing, with how many passes saw it so.
    missing: HashMap<String, u32>,
    /// `weft*` links with no endpoint behind them, since when.
    orphan_links: HashMap<String, Instant>,
    /// Peers seen down, since when (for automatic removal).
    down_since: HashMap<String, Instant>,
}

/// How much a reconciliation pass checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Everything: sysctls, routes, leaks, pools and iptables.
    Full,
    /// Routes and leaks only, after a watch or netlink event.
    Routes,
}

/// The outcome of one reconciliation pass.
#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub routes_replaced: usize,
    pub routes_deleted: usize,
    pub sysctls_fixed: usize,
    pub firewall_tables_written: usize,
    pub endpoints_released: usize,
    pub links_removed: usize,
    pub errors: usize,
    pub duration: Duration,
}

/// A peer as shown by `Status`.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub host: String,
    pub underlay_ip: Ipv4Addr,
    pub blocks: Vec<Ipv4Network>,
    pub alive: bool,
}

/// The agent's answer to `Status`.
#[derive(Debug, Clone)]
pub struct HostStatus {
    pub host: String,
    pub underlay: Underlay,
    pub pools: Vec<(String, PoolRecord)>,
    pub local_blocks: Vec<Ipv4Network>,
    pub endpoint_count: usize,
    pub etcd_connected: bool,
    pub peers: Vec<PeerStatus>,
    pub route_count: usize,
    pub rule_count: usize,
}

pub struct Agent {
    config: Config,
    store: Datastore,
    dataplane: Dataplane,
    underlay: Underlay,
    pool: PoolRecord,
    local: Mutex<Local>,
    cluster: RwLock<ClusterView>,
    /// One block claim at a time: concurrent attaches that find the blocks full wait for it.
    claim: tokio::sync::Mutex<()>,
    /// One attach or detach at a time per container id.
    container_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    reconcile_lock: tokio::sync::Mutex<()>,
    resync: Notify,
    etcd_ok: AtomicBool,
    /// Every pool of the cluster (for "destination in no pool"), refreshed on resync.
    pools: RwLock<Vec<(String, PoolRecord)>>,
    firewall: Arc<Mutex<Firewall>>,
    /// Firewall generations: bumped after every change of what the rules are made of; a sync
    /// that read the state at generation G covers every change bumped up to G.
    firewall_wanted: AtomicU64,
    firewall_applied: AtomicU64,
    firewall_lock: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    creator: tokio::sync::mpsc::Sender<CreateJob>,
}

/// One endpoint record waiting to be written.
struct CreateJob {
    record: EndpointRecord,
    block: (String, Ipv4Network),
    reply: tokio::sync::oneshot::Sender<Result<(), CreateConflict>>,
}

/// Endpoint records per transaction (each takes 5 or more of etcd's default 128 operations).
const MAX_BATCH: usize = 16;

/// Writes endpoint records, batching the ones that queue up while a write is in flight (group
/// commit): no added latency when idle, one raft round for many attaches under load. A batch
/// whose guards fail is retried record by record, so each attach gets its own answer.
fn spawn_creator(store: Datastore) -> tokio::sync::mpsc::Sender<CreateJob> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<CreateJob>(256);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if jobs.len() > 1 {
                let batch: Vec<_> = jobs
                    .iter()
                    .map(|j| (j.record.clone(), j.block.clone()))
                    .collect();
                match store.create_endpoints(&batch).await {
                    Ok(true) => {
                        for job in jobs {
                            let _ = job.reply.send(Ok(()));
                        }
                        continue;
                    }
                    Err(weft_etcd::StoreError::Unavailable(message)) => {
                        for job in jobs {
                            let error = weft_etcd::StoreError::Unavailable(message.clone());
                            let _ = job.reply.send(Err(CreateConflict::Store(error)));
                        }
                        continue;
                    }
                    // A guard failed (or the batch was refused): one by one.
                    Ok(false) | Err(_) => {}
                }
            }
            for job in jobs {
                let (pool, block) = &job.block;
                let result = store.create_endpoint(&job.record, (pool, *block)).await;
                let _ = job.reply.send(result);
            }
        }
    });
    tx
}

/// The DNAT and hairpin rules an endpoint's published ports need.
fn port_rules(e: &EndpointRecord) -> impl Iterator<Item = PortRule> + '_ {
    e.ports.iter().map(|p| PortRule {
        container_id: e.container_id.clone(),
        ip: e.ip,
        protocol: p.protocol.clone(),
        host_port: p.host_port,
        container_port: p.container_port,
    })
}

impl Agent {
    /// Connects to etcd, checks the pool, finds the underlay, registers the host and loads this
    /// host's endpoints and the cluster view. Fails with a clear message on bad configuration.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Self>> {
        let store = Datastore::connect(&weft_etcd::EtcdConfig {
            endpoints: config.etcd_endpoints.clone(),
            prefix: config.etcd_prefix.clone(),
            timeout: config.etcd_timeout,
            tls: tls_files(&config),
        })
        .await
        .map_err(|e| anyhow::anyhow!("connecting to etcd {:?}: {e}", config.etcd_endpoints))?;
        let wanted = PoolRecord {
            cidr: config.pool,
            block_size: config.block_size,
            nat_outgoing: config.nat_outgoing,
        };
        // Kernel facts first: they do not need etcd.
        let dataplane = Dataplane::new()?;
        let underlay = dataplane
            .underlay(config.underlay_interface.as_deref())
            .await
            .map_err(anyhow::Error::msg)?;
        sysctl::configure_host()?;
        // etcd may be down while this host restarts: the dataplane keeps forwarding, and the
        // agent waits for etcd instead of exiting. Wrong configuration still stops it at once.
        let mut waited = false;
        let (pool, endpoints, pools, cluster) = loop {
            let loaded = async {
                let pool = store.ensure_pool(&config.pool_name, &wanted).await?;
                store
                    .register_host(&config.host_name, underlay.ip, VERSION)
                    .await?;
                let endpoints = store.list_endpoints(&config.host_name).await?;
                let pools = store.list_pools().await?;
                let cluster = store.snapshot().await?;
                Ok::<_, weft_etcd::StoreError>((pool, endpoints, pools, cluster))
            }
            .await;
            match loaded {
                Ok(loaded) => break loaded,
                Err(weft_etcd::StoreError::Unavailable(e)) => {
                    if !waited {
                        warn!(error = %e, "etcd is unreachable; waiting for it (traffic is unaffected)");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        info!(
            host = %config.host_name,
            underlay = %underlay.ip,
            interface = %underlay.ifname,
            endpoints = endpoints.len(),
            blocks = cluster.blocks_of(&config.host_name).len(),
            "agent starting"
        );
        let creator = spawn_creator(store.clone());
        Ok(Arc::new(Self {
            local: Mutex::new(Local {
                endpoints: endpoints
                    .into_iter()
                    .map(|e| (e.container_id.clone(), e))
                    .collect(),
                ..Default::default()
            }),
            cluster: RwLock::new(cluster),
            config,
            store,
            dataplane,
            underlay,
            pool,
            claim: Default::default(),
            container_locks: Default::default(),
            reconcile_lock: Default::default(),
            resync: Notify::new(),
            etcd_ok: AtomicBool::new(true),
            pools: RwLock::new(pools),
            firewall: Default::default(),
            firewall_wanted: AtomicU64::new(0),
            firewall_applied: AtomicU64::new(0),
            firewall_lock: Default::default(),
            metrics: Metrics::default(),
            creator,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn me(&self) -> &str {
        &self.config.host_name
    }

    /// Asks the reconciler for a pass soon.
    pub fn request_resync(&self) {
        self.resync.notify_one();
    }

    /// Whether an attach or detach of this container is under way (or waiting).
    fn container_busy(&self, id: &str) -> bool {
        self.container_locks
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|l| Arc::strong_count(l) > 1)
    }

    async fn lock_container(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.container_locks.lock().unwrap();
            // Drop locks nobody holds, so the map does not grow with every id ever seen.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn owned_netns_name(&self, container_id: &str) -> String {
        format!("weft-{}-{}", self.me(), container_id)
    }

    // ---- attach -------------------------------------------------------------------------------

    pub async fn attach(&self, spec: AttachSpec) -> Result<EndpointRecord, ApiError> {
        validate::container_id(&spec.container_id).map_err(ApiError::InvalidArgument)?;
        let ifname = if spec.ifname.is_empty() {
            "eth0".to_string()
        } else {
            spec.ifname.clone()
        };
        validate::ifname(&ifname).map_err(ApiError::InvalidArgument)?;
        let ports = validate::ports(&spec.ports).map_err(ApiError::InvalidArgument)?;
        if spec.pid == Some(0) {
            return Err(ApiError::InvalidArgument("pid 0 is not a process".into()));
        }
        if !spec.netns.is_empty() && spec.pid.is_some() {
            return Err(ApiError::InvalidArgument(
                "give either netns or pid, not both".into(),
            ));
        }
        if spec.netns.contains('\0') {
            return Err(ApiError::InvalidArgument("netns path contains NUL".into()));
        }
        if !spec.netns.is_empty() && !spec.netns.starts_with('/') {
            return Err(ApiError::InvalidArgument(format!(
                "netns {:?} must be an absolute path",
                spec.netns
            )));
        }

        let id = spec.container_id.as_str();
        let _guard = self.lock_container(id).await;
        let existing = self.local.lock().unwrap().endpoints.get(id).cloned();
        if let Some(existing) = existing {
            self.repair(&existing).await?;
            return Ok(existing);
        }

        let (netns, owned) = self.open_netns(&spec).await?;
        let result = self.attach_into(id, &ifname, &netns, owned, ports).await;
        if result.is_err() && owned {
            if let Err(e) = netns::delete_named(std::path::Path::new(netns.path())) {
                warn!(container = id, error = %e, "cannot delete namespace after failed attach");
            }
        }
        result
    }

    async fn open_netns(&self, spec: &AttachSpec) -> Result<(Netns, bool), ApiError> {
        if let Some(pid) = spec.pid {
            let path = format!("/proc/{pid}/ns/net");
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(ApiError::InvalidArgument(format!(
                    "process {pid} does not exist"
                )));
            }
            return Ok((Netns::open(&path)?, false));
        }
        if !spec.netns.is_empty() {
            return Ok((Netns::open(&spec.netns)?, false));
        }
        let path = netns::named_path(&self.owned_netns_name(&spec.container_id));
        // No endpoint exists (we hold the container lock), so a namespace of this name is a
        // leftover of an interrupted attach of ours.
        netns::delete_named(&path).map_err(|e| {
            ApiError::Internal(format!("removing stale namespace {}: {e}", path.display()))
        })?;
        let path = netns::create_named(&self.owned_netns_name(&spec.container_id)).await?;
        let path = path.display().to_string();
        match Netns::open(&path) {
            Ok(ns) => Ok((ns, true)),
            Err(e) => {
                let _ = netns::delete_named(std::path::Path::new(&path));
                Err(e.into())
            }
        }
    }

    async fn attach_into(
        &self,
        id: &str,
        ifname: &str,
        netns: &Netns,
        owns_netns: bool,
        ports: Vec<PortRecord>,
    ) -> Result<EndpointRecord, ApiError> {
        let started = Instant::now();
        let mac = dataplane::random_mac();
        let record = self
            .allocate(|ip| EndpointRecord {
                container_id: id.to_string(),
                host: self.me().to_string(),
                ip,
                host_ifname: dataplane::host_ifname(id),
                ifname: ifname.to_string(),
                mac: dataplane::format_mac(&mac),
                netns: netns.path().to_string(),
                owns_netns,
                ports: ports.clone(),
                created: weft_etcd::unix_now(),
            })
            .await?;
        let allocated = started.elapsed();
        let link = ContainerLink {
            host_ifname: record.host_ifname.clone(),
            ifname: ifname.to_string(),
            ip: record.ip,
            mac,
            mtu: self.underlay.mtu,
        };
        if let Err(err) = self.dataplane.wire(netns, &link).await {
            warn!(container = id, error = %err, "attach failed; rolling back");
            self.roll_back(&record).await;
            return Err(err.into());
        }
        if !record.ports.is_empty() {
            if let Err(err) = self.sync_firewall(firewall::SyncMode::Fast).await {
                warn!(container = id, error = %err, "publishing ports failed; rolling back");
                self.roll_back(&record).await;
                return Err(err);
            }
            self.flush_udp_flows(&record.ports).await;
        }
        info!(
            container = id,
            ip = %record.ip,
            veth = %record.host_ifname,
            netns = %record.netns,
            allocate_ms = allocated.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "attached"
        );
        Ok(record)
    }

    /// Undoes a partial attach: the link (with its route), then the records.
    async fn roll_back(&self, record: &EndpointRecord) {
        if let Err(e) = self.dataplane.delete_link(&record.host_ifname).await {
            warn!(container = %record.container_id, error = %e, "rollback: cannot delete link");
        }
        if let Err(e) = self.store.delete_endpoint(record).await {
            warn!(container = %record.container_id, error = %e, "rollback: cannot delete records");
        }
        self.local
            .lock()
            .unwrap()
            .endpoints
            .remove(&record.container_id);
        if !record.ports.is_empty() {
            if let Err(e) = self.sync_firewall(firewall::SyncMode::Fast).await {
                warn!(container = %record.container_id, error = %e, "rollback: cannot remove rules");
            }
        }
    }

    /// Rules for the current state, applied now unless a sync that started after the caller's
    /// change already covers it (concurrent attaches share one iptables-restore).
    async fn sync_firewall(
        &self,
        mode: firewall::SyncMode,
    ) -> Result<firewall::FirewallReport, ApiError> {
        let wanted = self.firewall_wanted.fetch_add(1, Ordering::SeqCst) + 1;
        let _one = self.firewall_lock.lock().await;
        // A verification always reads the kernel back; only writes are shared.
        if mode == firewall::SyncMode::Fast
            && self.firewall_applied.load(Ordering::SeqCst) >= wanted
        {
            return Ok(Default::default());
        }
        let generation = self.firewall_wanted.load(Ordering::SeqCst);
        let spec = self.firewall_spec();
        let firewall = self.firewall.clone();
        let report =
            tokio::task::spawn_blocking(move || firewall.lock().unwrap().sync(&spec, mode))
                .await
                .map_err(|e| ApiError::Internal(format!("firewall task: {e}")))?
                .map_err(|e| {
                    self.metrics.iptables_errors.fetch_add(1, Ordering::Relaxed);
                    ApiError::Internal(format!("programming iptables: {e}"))
                })?;
        self.metrics
            .iptables_restores
            .fetch_add(report.tables_written as u64, Ordering::Relaxed);
        self.firewall_applied.store(generation, Ordering::SeqCst);
        Ok(report)
    }

    fn firewall_spec(&self) -> FirewallSpec {
        let pools = self
            .pools
            .read()
            .unwrap()
            .iter()
            .map(|(name, pool)| (name.clone(), pool.cidr, pool.nat_outgoing))
            .collect();
        let local = self.local.lock().unwrap();
        let ports = local.endpoints.values().flat_map(port_rules).collect();
        FirewallSpec { pools, ports }
    }

    /// Existing UDP flows to a host port would stick to their old destination; drop them.
    async fn flush_udp_flows(&self, ports: &[PortRecord]) {
        let udp: Vec<u16> = ports
            .iter()
            .filter(|p| p.protocol == "udp")
            .map(|p| p.host_port)
            .collect();
        if udp.is_empty() {
            return;
        }
        let flushed = tokio::task::spawn_blocking(move || {
            udp.into_iter().try_for_each(firewall::flush_udp_conntrack)
        })
        .await;
        if let Ok(Err(e)) = flushed {
            warn!(error = %e, "cannot flush UDP conntrack entries");
        }
    }

    /// Picks an address in this host's blocks (claiming a block when they are full) and writes
    /// the endpoint record guarded by the address. The record is visible to the reconciler from
    /// the moment it is written, so the route the dataplane adds is never taken for stale.
    async fn allocate(
        &self,
        make: impl Fn(Ipv4Addr) -> EndpointRecord,
    ) -> Result<EndpointRecord, ApiError> {
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let blocks = self.cluster.read().unwrap().blocks_of(self.me());
            let picked = {
                let mut local = self.local.lock().unwrap();
                let mut used: HashSet<Ipv4Addr> = local.endpoints.values().map(|e| e.ip).collect();
                used.extend(local.reserved.iter().copied());
                used.extend(local.foreign.iter().copied());
                let ip = alloc::first_free_ip(&blocks, &used);
                if let Some(ip) = ip {
                    local.reserved.insert(ip);
                }
                ip
            };
            let Some(ip) = picked else {
                self.claim_block(blocks.len()).await?;
                continue;
            };
            let block = *blocks
                .iter()
                .find(|b| b.contains(ip))
                .expect("ip from a block");
            let record = make(ip);
            let outcome = self.create_endpoint(&record, block).await;
            let mut local = self.local.lock().unwrap();
            local.reserved.remove(&ip);
            match outcome {
                Ok(()) => {
                    local
                        .endpoints
                        .insert(record.container_id.clone(), record.clone());
                    return Ok(record);
                }
                Err(CreateConflict::IpTaken) => {
                    debug!(%ip, "address taken in etcd by a record unknown here; trying another");
                    local.foreign.insert(ip);
                }
                // Our own write, retried on another endpoint after its answer was lost.
                Err(CreateConflict::EndpointExists(existing)) if *existing == record => {
                    local
                        .endpoints
                        .insert(record.container_id.clone(), record.clone());
                    return Ok(record);
                }
                Err(CreateConflict::EndpointExists(existing)) => {
                    return Err(ApiError::AlreadyExists(format!(
                        "container {} already has an endpoint ({}) written by another agent \
                         process",
                        existing.container_id, existing.ip
                    )));
                }
                Err(CreateConflict::Store(e)) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable(
            "could not allocate an address: too many conflicts".into(),
        ))
    }

    /// Writes an endpoint through the batching writer: attaches that arrive while a write is in
    /// flight go to etcd together in the next transaction.
    async fn create_endpoint(
        &self,
        record: &EndpointRecord,
        block: Ipv4Network,
    ) -> Result<(), CreateConflict> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = CreateJob {
            record: record.clone(),
            block: (self.config.pool_name.clone(), block),
            reply,
        };
        if self.creator.send(job).await.is_err() {
            return Err(CreateConflict::Store(weft_etcd::StoreError::Unavailable(
                "endpoint writer stopped".into(),
            )));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CreateConflict::Store(weft_etcd::StoreError::Unavailable(
                "endpoint writer stopped".into(),
            )))
        })
    }

    /// Claims one more block unless another attach did so while we waited for the claim lock.
    async fn claim_block(&self, blocks_seen: usize) -> Result<(), ApiError> {
        let _claim = self.claim.lock().await;
        if self.cluster.read().unwrap().blocks_of(self.me()).len() > blocks_seen {
            return Ok(());
        }
        let block = self
            .store
            .claim_block(&self.config.pool_name, &self.pool, self.me())
            .await?;
        info!(%block, "claimed block");
        self.cluster.write().unwrap().apply(ClusterEvent::BlockPut {
            pool: self.config.pool_name.clone(),
            block,
            host: self.me().to_string(),
        });
        // Unused addresses of the block must be dropped here, not sent to the default route.
        if let Err(e) = self
            .dataplane
            .replace_route(&KernelRoute {
                dst: block,
                target: RouteTarget::Blackhole,
            })
            .await
        {
            warn!(%block, error = %e, "cannot add blackhole route; the reconciler will retry");
        }
        Ok(())
    }

    /// Brings a known endpoint's dataplane back if it was damaged: a missing veth is rebuilt in
    /// the recorded namespace; a present one gets its sysctls, route and container side checked
    /// and set again where they differ, and its port rules verified.
    async fn repair(&self, record: &EndpointRecord) -> Result<(), ApiError> {
        let links = self.dataplane.weft_links().await?;
        let link = ContainerLink {
            host_ifname: record.host_ifname.clone(),
            ifname: record.ifname.clone(),
            ip: record.ip,
            mac: dataplane::parse_mac(&record.mac).unwrap_or_else(dataplane::random_mac),
            mtu: self.underlay.mtu,
        };
        if let Some(index) = links.get(&record.host_ifname) {
            sysctl::configure_host_veth(&record.host_ifname).map_err(|e| {
                ApiError::Internal(format!("sysctls of {}: {e}", record.host_ifname))
            })?;
            self.dataplane
                .replace_route(&KernelRoute {
                    dst: Ipv4Network::new(record.ip, 32).expect("/32"),
                    target: RouteTarget::Dev(*index),
                })
                .await?;
            if !record.ports.is_empty() {
                self.sync_firewall(firewall::SyncMode::Verify).await?;
            }
            let netns = Netns::open(&record.netns).map_err(|e| {
                ApiError::FailedPrecondition(format!(
                    "container {} has an endpoint but its namespace is gone ({e}); detach it \
                     first",
                    record.container_id
                ))
            })?;
            let inside = dataplane::check_container_side(&netns, &record.ifname, record.ip).await?;
            if inside.problems.is_empty() {
                return Ok(());
            }
            info!(container = %record.container_id, problems = ?inside.problems, "repairing container side");
            if !inside.interface_present {
                // The pair is broken (its peer renamed or moved away): build it again.
                self.dataplane.delete_link(&record.host_ifname).await?;
                self.dataplane.wire(&netns, &link).await?;
            } else {
                self.dataplane.rewire_inside(&netns, &link).await?;
            }
            return Ok(());
        }
        let netns = match Netns::open(&record.netns) {
            Ok(ns) => ns,
            Err(_) if record.owns_netns => {
                let name = self.owned_netns_name(&record.container_id);
                netns::delete_named(&netns::named_path(&name)).ok();
                let path = netns::create_named(&name).await?;
                Netns::open(&path.display().to_string())?
            }
            Err(e) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "container {} has an endpoint but its namespace is gone ({e}); detach it \
                     first",
                    record.container_id
                )))
            }
        };
        self.dataplane.wire(&netns, &link).await?;
        info!(container = %record.container_id, "repaired endpoint dataplane");
        Ok(())
    }

    // ---- detach, get, list --------------------------------------------------------------------

    pub async fn detach(&self, container_id: &str) -> Result<(), ApiError> {
        validate::container_id(container_id).map_err(ApiError::InvalidArgument)?;
        let _guard = self.lock_container(container_id).await;
        let known = self
            .local
            .lock()
            .unwrap()
            .endpoints
            .get(container_id)
            .cloned();
        let record = match known {
            Some(record) => record,
            None => match self.store.get_endpoint(self.me(), container_id).await? {
                Some(record) => record,
                None => return Ok(()),
            },
        };
        // Out of the local state first, so its rules go before its link does. Put back on
        // failure, so a retry finds it.
        self.local.lock().unwrap().endpoints.remove(container_id);
        let result = self.detach_record(&record).await;
        if result.is_err() {
            self.local
                .lock()
                .unwrap()
                .endpoints
                .insert(container_id.to_string(), record.clone());
        }
        result?;
        info!(container = container_id, ip = %record.ip, "detached");
        Ok(())
    }

    async fn detach_record(&self, record: &EndpointRecord) -> Result<(), ApiError> {
        if !record.ports.is_empty() {
            self.sync_firewall(firewall::SyncMode::Fast).await?;
            self.flush_udp_flows(&record.ports).await;
        }
        // Out of service now, deleted in the background with others (one RCU grace period for
        // a whole batch instead of one per container).
        self.dataplane
            .retire_link(&record.host_ifname, record.ip)
            .await?;
        if record.owns_netns {
            netns::delete_named(std::path::Path::new(&record.netns)).map_err(|e| {
                ApiError::Internal(format!("deleting namespace {}: {e}", record.netns))
            })?;
        }
        self.store.delete_endpoint(record).await?;
        Ok(())
    }

    pub fn get(&self, container_id: &str) -> Result<EndpointRecord, ApiError> {
        self.local
            .lock()
            .unwrap()
            .endpoints
            .get(container_id)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!("container {container_id:?} is not attached here"))
            })
    }

    /// Verifies one endpoint's whole dataplane without changing anything: the host veth, its
    /// sysctls and /32 route, everything inside the container's namespace, and the iptables rules
    /// of its published ports. Returns the record and what is wrong (empty when all is well).
    /// Waits for an attach or detach of the same container to finish first.
    pub async fn check(
        &self,
        container_id: &str,
    ) -> Result<(EndpointRecord, Vec<String>), ApiError> {
        validate::container_id(container_id).map_err(ApiError::InvalidArgument)?;
        let _guard = self.lock_container(container_id).await;
        let record = self.get(container_id)?;
        let mut problems = self
            .dataplane
            .check_host_side(&record.host_ifname, record.ip)
            .await?;
        match Netns::open(&record.netns) {
            Ok(netns) => problems.extend(
                dataplane::check_container_side(&netns, &record.ifname, record.ip)
                    .await?
                    .problems,
            ),
            Err(e) => problems.push(format!("the container's namespace is gone: {e}")),
        }
        let ports: Vec<PortRule> = port_rules(&record).collect();
        let firewall = tokio::task::spawn_blocking(move || firewall::check_ports(&ports))
            .await
            .map_err(|e| ApiError::Internal(format!("firewall task: {e}")))?
            .map_err(|e| ApiError::Internal(format!("reading iptables: {e}")))?;
        problems.extend(firewall);
        Ok((record, problems))
    }

    pub fn list(&self) -> Vec<EndpointRecord> {
        let mut all: Vec<_> = self
            .local
            .lock()
            .unwrap()
            .endpoints
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        all
    }

    // ---- status -------------------------------------------------------------------------------

    pub async fn status(&self) -> HostStatus {
        let etcd_connected = self.store.ping().await.is_ok();
        let pools = match etcd_connected {
            true => self.store.list_pools().await.unwrap_or_default(),
            false => vec![(self.config.pool_name.clone(), self.pool.clone())],
        };
        let cluster = self.cluster.read().unwrap().clone();
        let peers = cluster
            .hosts
            .iter()
            .filter(|(name, _)| name.as_str() != self.me())
            .map(|(name, host)| PeerStatus {
                host: name.clone(),
                underlay_ip: host.underlay_ip,
                blocks: cluster.blocks_of(name),
                alive: cluster.alive.contains(name),
            })
            .collect();
        let endpoint_count = self.local.lock().unwrap().endpoints.len();
        let rule_count = self.firewall.lock().unwrap().rule_count();
        let route_count = self
            .dataplane
            .weft_routes()
            .await
            .map(|r| r.len())
            .unwrap_or(0);
        HostStatus {
            host: self.me().to_string(),
            underlay: self.underlay.clone(),
            pools,
            local_blocks: cluster.blocks_of(self.me()),
            endpoint_count,
            etcd_connected,
            peers,
            route_count,
            rule_count,
        }
    }

    // ---- reconciliation -----------------------------------------------------------------------

    /// The routes this host should hold: a /32 per local container whose veth exists, a
    /// blackhole per local block, and each peer block via its host's underlay address.
    fn desired_routes(&self, links: &BTreeMap<String, u32>) -> BTreeMap<Ipv4Network, RouteTarget> {
        let cluster = self.cluster.read().unwrap();
        let mut desired: BTreeMap<Ipv4Network, RouteTarget> = cluster
            .peer_routes(self.me())
            .into_iter()
            .map(|(block, via)| (block, RouteTarget::Via(via)))
            .collect();
        for block in cluster.blocks_of(self.me()) {
            desired.insert(block, RouteTarget::Blackhole);
        }
        drop(cluster);
        for endpoint in self.local.lock().unwrap().endpoints.values() {
            if let Some(index) = links.get(&endpoint.host_ifname) {
                desired.insert(
                    Ipv4Network::new(endpoint.ip, 32).expect("/32"),
                    RouteTarget::Dev(*index),
                );
            }
        }
        desired
    }

    /// One reconciliation pass. Every pass diffs routes and collects leaks; a full pass (at
    /// start and every resync interval) also checks sysctls, re-reads the pools and verifies
    /// iptables. Passes triggered by watch and netlink events stay light: with many peers
    /// claiming blocks they come often, and must not fork iptables-save or read thousands of
    /// sysctl files each time.
    pub async fn reconcile(&self, pass: Pass) -> ReconcileReport {
        let _one_at_a_time = self.reconcile_lock.lock().await;
        let started = Instant::now();
        let mut report = ReconcileReport::default();
        let full = pass == Pass::Full;
        if full {
            match sysctl::configure_host() {
                Ok(n) => report.sysctls_fixed += n,
                Err(e) => {
                    warn!(error = %e, "cannot set host sysctls");
                    report.errors += 1;
                }
            }
        }
        // Routes are read before links: a route seen here has its link in the list read next,
        // so a container being attached right now is never mistaken for stale.
        let actual = match self.dataplane.weft_routes().await {
            Ok(routes) => routes,
            Err(e) => {
                warn!(error = %e, "cannot list routes");
                report.errors += 1;
                return report;
            }
        };
        let links = match self.dataplane.weft_links().await {
            Ok(links) => links,
            Err(e) => {
                warn!(error = %e, "cannot list links");
                report.errors += 1;
                return report;
            }
        };
        let endpoint_links: Vec<String> = if full {
            let local = self.local.lock().unwrap();
            local
                .endpoints
                .values()
                .map(|e| e.host_ifname.clone())
                .collect()
        } else {
            vec![]
        };
        for name in endpoint_links.iter().filter(|n| links.contains_key(*n)) {
            match sysctl::configure_host_veth(name) {
                Ok(n) => report.sysctls_fixed += n,
                // The link may have been deleted since it was listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(veth = %name, error = %e, "cannot set veth sysctls");
                    report.errors += 1;
                }
            }
        }
        self.collect_leaks(&links, &mut report).await;
        let desired = self.desired_routes(&links);
        let diff = routes::diff(&desired, &actual);
        for route in &diff.replace {
            match self.dataplane.replace_route(route).await {
                Ok(()) => report.routes_replaced += 1,
                Err(e) => {
                    warn!(error = %e, "cannot program route");
                    report.errors += 1;
                }
            }
        }
        for route in &diff.delete {
            match self.dataplane.delete_route(route).await {
                Ok(()) => report.routes_deleted += 1,
                Err(e) => {
                    warn!(error = %e, "cannot delete route");
                    report.errors += 1;
                }
            }
        }
        if full {
            if let Ok(pools) = self.store.list_pools().await {
                *self.pools.write().unwrap() = pools;
            }
            match self.sync_firewall(firewall::SyncMode::Verify).await {
                Ok(fw) => report.firewall_tables_written += fw.tables_written,
                Err(e) => {
                    warn!(error = %e, "cannot program iptables");
                    report.errors += 1;
                }
            }
        }
        report.duration = started.elapsed();
        let repairs = report.routes_replaced
            + report.routes_deleted
            + report.sysctls_fixed
            + report.firewall_tables_written
            + report.endpoints_released
            + report.links_removed;
        self.metrics
            .repairs
            .fetch_add(repairs as u64, Ordering::Relaxed);
        self.metrics.reconcile_seconds.observe(report.duration);
        self.metrics
            .last_pass_ms
            .store(metrics::now_ms(), Ordering::Relaxed);
        if full && report.errors == 0 {
            self.metrics.reconciled.store(true, Ordering::Relaxed);
        }
        if report.routes_replaced
            + report.routes_deleted
            + report.sysctls_fixed
            + report.firewall_tables_written
            + report.endpoints_released
            + report.links_removed
            > 0
        {
            info!(
                replaced = report.routes_replaced,
                deleted = report.routes_deleted,
                sysctls = report.sysctls_fixed,
                iptables_tables = report.firewall_tables_written,
                released = report.endpoints_released,
                links_removed = report.links_removed,
                errors = report.errors,
                ms = report.duration.as_secs_f64() * 1e3,
                "reconciled"
            );
        }
        report
    }

    /// Releases what no longer has a container behind it: an endpoint whose veth is gone (seen
    /// on two passes: its namespace was deleted behind our back), and a `weft*` link no endpoint
    /// claims (after a grace period of one resync interval). Containers with an attach or
    /// detach under way are left alone.
    async fn collect_leaks(&self, links: &BTreeMap<String, u32>, report: &mut ReconcileReport) {
        let grace = self.config.resync_interval;
        let (vanished, orphans) = {
            let mut local = self.local.lock().unwrap();
            let mut vanished = vec![];
            let endpoints: Vec<(String, String)> = local
                .endpoints
                .values()
                .map(|e| (e.container_id.clone(), e.host_ifname.clone()))
                .collect();
            for (id, ifname) in &endpoints {
                if links.contains_key(ifname) || self.container_busy(id) {
                    local.missing.remove(id);
                    continue;
                }
                let seen = local.missing.entry(id.clone()).or_insert(0);
                *seen += 1;
                if *seen >= 2 {
                    vanished.push(id.clone());
                }
            }
            let Local {
                missing,
                endpoints: known,
                ..
            } = &mut *local;
            missing.retain(|id, _| known.contains_key(id));
            let claimed: HashSet<&String> = endpoints.iter().map(|(_, ifname)| ifname).collect();
            let now = Instant::now();
            let mut orphans = vec![];
            let current: HashSet<&String> = links
                .keys()
                .filter(|name| !claimed.contains(name))
                .collect();
            local.orphan_links.retain(|name, _| current.contains(name));
            for name in current {
                let since = *local.orphan_links.entry(name.clone()).or_insert(now);
                if now.duration_since(since) >= grace {
                    orphans.push(name.clone());
                }
            }
            (vanished, orphans)
        };
        for id in vanished {
            let _guard = self.lock_container(&id).await;
            let Some(record) = self.local.lock().unwrap().endpoints.remove(&id) else {
                continue;
            };
            warn!(container = %id, ip = %record.ip, "veth vanished; releasing the endpoint");
            match self.detach_record(&record).await {
                Ok(()) => {
                    report.endpoints_released += 1;
                    self.local.lock().unwrap().missing.remove(&id);
                }
                Err(e) => {
                    warn!(container = %id, error = %e, "cannot release endpoint; will retry");
                    self.local
                        .lock()
                        .unwrap()
                        .endpoints
                        .insert(id.clone(), record);
                    report.errors += 1;
                }
            }
        }
        for name in orphans {
            warn!(veth = %name, "link without an endpoint; removing it");
            match self.dataplane.delete_link(&name).await {
                Ok(_) => {
                    report.links_removed += 1;
                    self.local.lock().unwrap().orphan_links.remove(&name);
                }
                Err(e) => {
                    warn!(veth = %name, error = %e, "cannot remove link");
                    report.errors += 1;
                }
            }
        }
    }

    /// Removes peers that have been down longer than `remove-dead-hosts-after` (when set).
    async fn remove_dead_hosts(&self) {
        let Some(after) = self.config.remove_dead_hosts_after else {
            return;
        };
        let doomed: Vec<String> = {
            let cluster = self.cluster.read().unwrap();
            let mut local = self.local.lock().unwrap();
            let now = Instant::now();
            local.down_since.retain(|host, _| {
                cluster.hosts.contains_key(host) && !cluster.alive.contains(host)
            });
            for host in cluster.hosts.keys() {
                if host != self.me() && !cluster.alive.contains(host) {
                    local.down_since.entry(host.clone()).or_insert(now);
                }
            }
            local
                .down_since
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= after)
                .map(|(host, _)| host.clone())
                .collect()
        };
        for host in doomed {
            match self.store.remove_host(&host).await {
                Ok(released) => {
                    warn!(
                        %host,
                        blocks = released.blocks,
                        ips = released.ips,
                        "removed a host that was down too long"
                    );
                    self.local.lock().unwrap().down_since.remove(&host);
                }
                Err(e) => warn!(%host, error = %e, "cannot remove dead host"),
            }
        }
    }

    /// Runs reconciliation at start, every resync interval, and soon after any request.
    pub async fn run_reconciler(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.config.resync_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let periodic = tokio::select! {
                _ = interval.tick() => true,
                _ = self.resync.notified() => false,
            };
            if !periodic {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.reconcile(if periodic { Pass::Full } else { Pass::Routes })
                .await;
            if periodic {
                self.remove_dead_hosts().await;
            }
        }
    }

    /// Asks for a repair pass whenever one of our routes or links is deleted.
    pub async fn run_kernel_monitor(self: Arc<Self>) {
        let (_handle, mut events) = match dataplane::kernel_events() {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "cannot watch kernel events; relying on periodic resync");
                return;
            }
        };
        while events.recv().await.is_some() {
            self.request_resync();
        }
    }

    /// Puts back, within milliseconds, a flipped `ip_forward` or a flipped `proxy_arp`,
    /// `rp_filter` or `forwarding` of an endpoint's veth, as the kernel announces the change.
    pub async fn run_netconf_monitor(self: Arc<Self>) {
        use netlink_sys::AsyncSocketExt;
        let socket = match dataplane::netconf_events() {
            Ok(socket) => socket,
            Err(e) => {
                warn!(error = %e, "cannot watch sysctl changes; relying on periodic resync");
                return;
            }
        };
        loop {
            let datagram = match socket.recv_from_full().await {
                Ok((datagram, _)) => datagram,
                Err(e) => {
                    // ENOBUFS: notifications were lost; the next resync catches up. Anything
                    // else would repeat at once, so pause before reading again.
                    debug!(error = %e, "netconf socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            for drift in dataplane::parse_netconf(&datagram) {
                self.restore_sysctls(drift).await;
            }
        }
    }

    async fn restore_sysctls(&self, drift: dataplane::NetconfDrift) {
        let (what, result) = match drift {
            dataplane::NetconfDrift::HostForwarding => {
                ("ip_forward".to_string(), sysctl::configure_host())
            }
            dataplane::NetconfDrift::Link(index) => {
                let Ok(Some(name)) = self.dataplane.link_name_of(index).await else {
                    return;
                };
                // Only settled endpoints: an attach under way sets the veth's sysctls itself,
                // and a veth being detached no longer matters.
                let owner = self
                    .local
                    .lock()
                    .unwrap()
                    .endpoints
                    .values()
                    .find(|e| e.host_ifname == name)
                    .map(|e| e.container_id.clone());
                if owner.is_none_or(|id| self.container_busy(&id)) {
                    return;
                }
                let result = sysctl::configure_host_veth(&name);
                (name, result)
            }
        };
        match result {
            Ok(0) => {}
            Ok(changed) => {
                self.metrics
                    .repairs
                    .fetch_add(changed as u64, Ordering::Relaxed);
                info!(%what, changed, "sysctls changed behind our back; restored");
            }
            Err(e) => warn!(%what, error = %e, "cannot restore sysctls"),
        }
    }

    // ---- cluster watch and liveness -----------------------------------------------------------

    /// Keeps the cluster view current: a snapshot, then a watch from the snapshot's revision;
    /// on compaction or a broken stream, a fresh snapshot replaces the view.
    pub async fn run_watcher(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.watch_once().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    self.metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                    // One warning per outage; the retries stay quiet until etcd answers again.
                    if self.etcd_ok.swap(false, Ordering::Relaxed) {
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

    async fn watch_once(&self) -> Result<(), weft_etcd::StoreError> {
        self.store
            .follow_cluster(
                |snapshot| {
                    let revision = snapshot.revision;
                    *self.cluster.write().unwrap() = snapshot;
                    if !self.etcd_ok.swap(true, Ordering::Relaxed) {
                        info!(revision, "etcd answers again; cluster state re-listed");
                    }
                    self.request_resync();
                },
                |events| {
                    let mut cluster = self.cluster.write().unwrap();
                    for (event, revision) in events {
                        debug!(?event, "cluster event");
                        cluster.apply(event);
                        cluster.revision = revision;
                    }
                    drop(cluster);
                    self.request_resync();
                },
            )
            .await
    }

    /// Keeps `alive/<host>` on a lease; if the lease is lost (etcd was away longer than the TTL),
    /// registers again with a new one. A failure streak is logged once, then at debug level.
    pub async fn run_liveness(self: Arc<Self>) {
        let ttl = self.config.alive_ttl.as_secs().max(2) as i64;
        let record = AliveRecord {
            boot_id: boot_id(),
            started: weft_etcd::unix_now(),
        };
        let period = self.config.alive_ttl / 3;
        let mut lease = None;
        let mut failures = 0u32;
        loop {
            let result = match lease {
                None => self.announce(&record, ttl).await.map(|id| {
                    info!(lease = id, ttl, "host is alive in etcd");
                    lease = Some(id);
                }),
                Some(id) => match self.store.keep_alive_once(id).await {
                    Ok(true) => Ok(()),
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
                    self.metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
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

    async fn announce(&self, record: &AliveRecord, ttl: i64) -> Result<i64, weft_etcd::StoreError> {
        self.store
            .register_host(self.me(), self.underlay.ip, VERSION)
            .await?;
        self.store.announce_alive(self.me(), record, ttl).await
    }

    /// Gauges for a scrape, read now.
    pub async fn gauges(&self) -> Gauges {
        let status = self.status().await;
        Gauges {
            endpoints: status.endpoint_count,
            local_blocks: status.local_blocks.len(),
            peers_alive: status.peers.iter().filter(|p| p.alive).count(),
            peers_down: status.peers.iter().filter(|p| !p.alive).count(),
            routes: status.route_count,
            rules: status.rule_count,
            etcd_connected: status.etcd_connected,
        }
    }

    pub fn socket_path(&self) -> PathBuf {
        self.config.socket.clone()
    }
}

fn tls_files(config: &Config) -> Option<weft_etcd::TlsFiles> {
    (config.etcd_cacert.is_some() || config.etcd_cert.is_some() || config.etcd_key.is_some()).then(
        || weft_etcd::TlsFiles {
            ca: config.etcd_cacert.clone(),
            cert: config.etcd_cert.clone(),
            key: config.etcd_key.clone(),
        },
    )
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl metrics::Health for Agent {
    fn alive(&self) -> bool {
        // The reconciler passes at least once per resync interval; allow for slow passes.
        let last = self.metrics.last_pass_ms.load(Ordering::Relaxed);
        let limit = (self.config.resync_interval * 3 + Duration::from_secs(5)).as_millis() as u64;
        metrics::now_ms().saturating_sub(last) <= limit
    }

    async fn ready(&self) -> bool {
        self.metrics.reconciled.load(Ordering::Relaxed) && self.store.ping().await.is_ok()
    }

    async fn metrics(&self) -> String {
        let gauges = self.gauges().await;
        self.metrics.render(&gauges)
    }
}
