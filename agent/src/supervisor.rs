//! Starting and stopping the agent: connect to etcd, learn the host, register, load this host's
//! endpoints and the cluster, then run the background loops (reconciler, cluster watch,
//! liveness, kernel monitors, health listener) beside the API until shutdown. Stopping leaves
//! the dataplane in place: traffic keeps flowing without the agent.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use weft_etcd::records::{Encapsulation, HostRecord, PoolRecord};
use weft_etcd::{Datastore, EtcdConfig, StoreError};

use crate::bgp::control::ControlError;
use crate::cluster::{liveness, watch};
use crate::config::Config;
use crate::context::{Context, Parts, VERSION};
use crate::firewall::iptables::Iptables;
use crate::journal::Journal;
use crate::kernel::netlink::Netlink;
use crate::kernel::Kernel;
use crate::model::vtep_mac;
use crate::policy::sets::Ipset;
use crate::reconcile::plan::registration::startup_endpoints;
use crate::reconcile::{monitor, Pass, Reconciler};
use crate::store::Etcd;
use crate::telemetry::health::{self, Health};
use crate::telemetry::{metrics, notify};

pub struct Agent {
    pub ctx: Arc<Context>,
    datastore: Datastore,
    reconciler: Arc<Reconciler>,
}

/// What the agent loads from etcd before it starts.
struct Loaded {
    /// This host's registration.
    host: HostRecord,
    endpoints: Vec<weft_etcd::records::EndpointRecord>,
    pools: Vec<(String, PoolRecord)>,
    cluster: weft_etcd::ClusterView,
    fabric: weft_etcd::FabricView,
}

impl Agent {
    /// Connects to etcd, checks the pool, finds the underlay, registers the host and loads this
    /// host's endpoints and the cluster view. Fails with a clear message on bad configuration.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        // Before etcd, which may keep us waiting: a missing bird is a mistake to name at once.
        let bird = crate::bgp::Speaker::prepare(&config.bgp)?;
        let datastore = Datastore::connect(&EtcdConfig {
            endpoints: config.etcd.endpoints.clone(),
            prefix: config.etcd.prefix.clone(),
            timeout: config.etcd.timeout,
            tls: config.etcd.tls.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("connecting to etcd {:?}: {e}", config.etcd.endpoints))?;
        // Kernel facts first: they do not need etcd.
        let kernel = Netlink::new(config.has_ipv6())?;
        let underlay = kernel
            .underlay(config.underlay_interface.as_deref())
            .await
            .map_err(anyhow::Error::msg)?;
        kernel.configure_host(config.has_ipv6())?;
        let mut loaded = load(&config, &datastore, &underlay).await?;
        let journal = Journal::open(&config.state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the state directory {}: {e}",
                config.state_dir.display()
            )
        })?;
        loaded.endpoints = with_journal(&journal, &kernel, loaded.endpoints).await?;
        let unfinished = journal.unfinished()?;
        info!(
            host = %config.host_name,
            underlay = %underlay.ip,
            interface = %underlay.ifname,
            endpoints = loaded.endpoints.len(),
            blocks = loaded.cluster.blocks_of(config.host_name.as_str()).len(),
            "agent starting"
        );
        let ctx = Arc::new(Context::new(Parts {
            config,
            underlay,
            host: loaded.host,
            kernel: Arc::new(kernel),
            store: Arc::new(Etcd::new(datastore.clone())),
            firewall: Arc::new(Iptables::default()),
            endpoints: loaded.endpoints,
            cluster: loaded.cluster,
            pools: loaded.pools,
            journal,
            fabric: loaded.fabric,
            sets: Arc::new(Ipset::default()),
        }));
        ctx.endpoints.set_unverified(unfinished);
        if let Some(bird) = bird {
            let speaker = crate::bgp::Speaker::new(
                &ctx.config.bgp,
                bird,
                ctx.underlay.ip,
                crate::bgp::announced_v6_next_hop(ctx.config.has_ipv6(), &ctx.host()),
            )?;
            let _ = ctx.bgp.set(speaker);
        }
        let reconciler = Arc::new(Reconciler::new(ctx.clone()));
        Ok(Self {
            ctx,
            datastore,
            reconciler,
        })
    }

    /// Verifies and applies network policy, removing leftover chains and sets; a failure is
    /// retried by the policy loop.
    async fn initial_policy_sync(&self) {
        let started = std::time::Instant::now();
        match crate::policy::sync(&self.ctx, crate::firewall::SyncMode::Verify).await {
            Ok(_) => info!(
                policies = self.ctx.policy.policy_count(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "network policy verified and applied"
            ),
            Err(e) => {
                warn!(error = %e, "initial network policy sync failed; retrying in the background")
            }
        }
    }

    /// Runs the agent until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        // Policy before anything else: the first firewall write must already carry it, so a
        // restart never opens what policy closes. Leftover chains and sets go here too.
        self.initial_policy_sync().await;
        if let Some(bgp) = self.ctx.bgp.get() {
            let blocks = self.ctx.cluster.blocks_of(self.ctx.me());
            let socket = bgp.files().socket.display().to_string();
            match bgp.start(&blocks).await {
                Ok(synced) => info!(?synced, %socket, "bird announces this host's blocks"),
                Err(crate::bgp::BgpError::Control(e @ ControlError::Timeout { .. })) => {
                    warn!(error = %e, "bird hangs; trying again at every pass")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let first = self.reconciler.pass(Pass::Full).await;
        info!(
            routes_replaced = first.routes_replaced,
            routes_deleted = first.routes_deleted,
            ms = first.duration.as_secs_f64() * 1e3,
            steps = %first.steps,
            "initial reconciliation done"
        );
        let ctx = self.ctx.clone();
        let mut tasks = vec![
            tokio::spawn(self.reconciler.clone().run()),
            tokio::spawn(watch::run_watcher(ctx.clone(), self.datastore.clone())),
            tokio::spawn(liveness::run_liveness(ctx.clone(), self.datastore.clone())),
            tokio::spawn(monitor::run_kernel_monitor(ctx.clone())),
            tokio::spawn(monitor::run_netconf_monitor(ctx.clone())),
            tokio::spawn(crate::policy::watch::run_fabric_watch(
                ctx.clone(),
                self.datastore.clone(),
            )),
            tokio::spawn(crate::policy::run(ctx.clone(), ctx.config.resync_interval)),
            tokio::spawn(crate::blocks::run_releaser(ctx.clone())),
        ];
        let socket = ctx.config.socket.clone();
        let listener = crate::api::bind_socket(&socket)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
        let health = Arc::new(self);
        if let Some(addr) = ctx.config.metrics_addr {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
            info!(%addr, "serving /healthz, /readyz and /metrics");
            tasks.push(tokio::spawn(health::serve(http, health.clone())));
        }
        info!(socket = %socket.display(), "serving API");
        // systemd: ready only now, after the first full reconciliation and with the API listening.
        match notify::notify("READY=1") {
            Ok(true) => info!("notified systemd: READY=1"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot notify systemd"),
        }
        if let Some(period) = notify::watchdog_interval() {
            tasks.push(tokio::spawn(pet_watchdog(health.clone(), period)));
        }
        let served = serve_until(ctx, listener, shutdown).await;
        for task in tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(&socket);
        info!("agent stopped; dataplane left in place");
        Ok(served?)
    }
}

/// Serves the API until `shutdown`, then lets open requests finish for a moment: a client that
/// keeps its connection open past the server's GOAWAY must not keep the agent from stopping.
async fn serve_until(
    ctx: Arc<Context>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal = async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|s| *s).await;
    };
    let serving = crate::api::serve(ctx, listener, signal);
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return served,
        () = shutdown => {
            let _ = stop.send(true);
        }
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, serving).await {
        Ok(served) => served,
        Err(_) => {
            warn!("API connections still open after the shutdown grace; stopping anyway");
            Ok(())
        }
    }
}

/// How long stopping waits for open API requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// etcd may be down while this host restarts: the dataplane keeps forwarding, and the agent
/// waits for etcd instead of exiting. Wrong configuration still stops it at once.
async fn load(
    config: &Config,
    store: &Datastore,
    underlay: &crate::kernel::Underlay,
) -> anyhow::Result<Loaded> {
    let me = config.host_name.as_str();
    let mut waited = false;
    loop {
        let loaded = async {
            for pool in &config.pools {
                store.ensure_pool(&pool.name, &pool.record()).await?;
            }
            let endpoints = store.list_endpoints(me).await?;
            // Kept across restarts; a first one is taken when a peer needs the tunnel.
            let tunnel_ip = match config.encapsulation() {
                Encapsulation::None => None,
                _ => crate::cluster::tunnel::existing(store, me).await?,
            };
            let host = HostRecord {
                underlay_ip: underlay.ip,
                version: VERSION.to_string(),
                first_seen: 0,
                underlay_prefix: Some(underlay.prefix),
                vtep_mac: tunnel_ip.map(|_| vtep_mac(me).to_string()),
                tunnel_ip,
                underlay_ipv6: underlay.ipv6,
            };
            let (host, _) = store.register_host(me, &host).await?;
            Ok::<_, StoreError>(Loaded {
                host,
                endpoints,
                pools: store.list_pools().await?,
                cluster: store.snapshot().await?,
                fabric: store.fabric_snapshot().await?,
            })
        }
        .await;
        match loaded {
            Ok(loaded) => return Ok(loaded),
            Err(StoreError::Unavailable(e)) => {
                if !waited {
                    warn!(error = %e, "etcd is unreachable; waiting for it (traffic is unaffected)");
                    waited = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// This host's endpoints: the stored records and the journal's, reconciled (see
/// `startup_endpoints`).
async fn with_journal(
    journal: &Journal,
    kernel: &Netlink,
    stored: Vec<weft_etcd::records::EndpointRecord>,
) -> anyhow::Result<Vec<weft_etcd::records::EndpointRecord>> {
    let links = kernel.links().await?;
    let start = startup_endpoints(stored, journal.load()?, &links);
    for record in &start.to_journal {
        journal.write(record)?;
    }
    for id in &start.to_forget {
        info!(container = %id, "journal entry without record or veth; forgetting it");
        journal.remove(id)?;
    }
    Ok(start.endpoints)
}

/// Only a live agent pets the watchdog: stalled loops get it restarted.
async fn pet_watchdog(agent: Arc<Agent>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        if agent.alive() {
            let _ = notify::notify("WATCHDOG=1");
        }
    }
}

impl Health for Agent {
    fn alive(&self) -> bool {
        // The reconciler passes at least once per resync interval; allow for slow passes.
        let last = self.ctx.metrics.last_pass_ms.load(Ordering::Relaxed);
        let limit =
            (self.ctx.config.resync_interval * 3 + Duration::from_secs(5)).as_millis() as u64;
        metrics::now_ms().saturating_sub(last) <= limit
    }

    async fn ready(&self) -> bool {
        self.ctx.metrics.reconciled.load(Ordering::Relaxed)
            && self.ctx.problems().is_empty()
            && self.ctx.store.ping().await.is_ok()
    }

    async fn metrics(&self) -> String {
        let gauges = crate::status::gauges(&self.ctx).await;
        self.ctx.metrics.render(&gauges)
    }
}
