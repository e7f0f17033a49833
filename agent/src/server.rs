//! The gRPC service on a Unix socket, and the agent's run loop.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_etcd::records::{EndpointRecord, PortRecord};
use weft_proto::v1 as pb;
use weft_proto::v1::agent_server::AgentServer;

use crate::daemon::{Agent, AttachSpec, HostStatus, VERSION};
use crate::error::ApiError;
use std::sync::atomic::Ordering;

/// Requests larger than this are refused before they are decoded.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub fn endpoint_to_pb(record: &EndpointRecord) -> pb::Endpoint {
    pb::Endpoint {
        container_id: record.container_id.clone(),
        host: record.host.clone(),
        ip: record.ip.to_string(),
        gateway: weft_proto::GATEWAY.to_string(),
        mac: record.mac.clone(),
        host_ifname: record.host_ifname.clone(),
        netns: record.netns.clone(),
        ports: record.ports.iter().map(port_to_pb).collect(),
        ifname: record.ifname.clone(),
    }
}

fn port_to_pb(port: &PortRecord) -> pb::PortMapping {
    pb::PortMapping {
        protocol: port.protocol.clone(),
        host_port: port.host_port.into(),
        container_port: port.container_port.into(),
    }
}

fn status_to_pb(status: HostStatus) -> pb::StatusResponse {
    pb::StatusResponse {
        host: status.host,
        underlay_ip: status.underlay.ip.to_string(),
        underlay_interface: status.underlay.ifname,
        pools: status
            .pools
            .into_iter()
            .map(|(name, pool)| pb::Pool {
                name,
                cidr: pool.cidr.to_string(),
                block_size: pool.block_size.into(),
                nat_outgoing: pool.nat_outgoing,
            })
            .collect(),
        local_blocks: status.local_blocks.iter().map(|b| b.to_string()).collect(),
        endpoint_count: status.endpoint_count as u32,
        etcd_connected: status.etcd_connected,
        version: VERSION.to_string(),
        peers: status
            .peers
            .into_iter()
            .map(|p| pb::Peer {
                host: p.host,
                underlay_ip: p.underlay_ip.to_string(),
                blocks: p.blocks.iter().map(|b| b.to_string()).collect(),
                alive: p.alive,
            })
            .collect(),
        route_count: status.route_count as u32,
        rule_count: status.rule_count as u32,
    }
}

struct Service(Arc<Agent>);

#[tonic::async_trait]
impl pb::agent_server::Agent for Service {
    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let req = request.into_inner();
        let spec = AttachSpec {
            container_id: req.container_id,
            netns: req.netns,
            pid: req.pid,
            ifname: req.ifname,
            ports: req
                .ports
                .into_iter()
                .map(|p| (p.protocol, p.host_port, p.container_port))
                .collect(),
        };
        let started = std::time::Instant::now();
        let result = self.0.attach(spec).await;
        let metrics = &self.0.metrics;
        metrics.attach_seconds.observe(started.elapsed());
        match &result {
            Ok(_) => metrics.attach_ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                if matches!(e, ApiError::Unavailable(_)) {
                    metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                }
                metrics.attach_failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok(Response::new(pb::AttachResponse {
            endpoint: Some(endpoint_to_pb(&result?)),
        }))
    }

    async fn detach(
        &self,
        request: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.0.detach(&request.into_inner().container_id).await;
        let metrics = &self.0.metrics;
        metrics.detach_seconds.observe(started.elapsed());
        match &result {
            Ok(()) => metrics.detach_ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                if matches!(e, ApiError::Unavailable(_)) {
                    metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                }
                metrics.detach_failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        result?;
        Ok(Response::new(pb::DetachResponse {}))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let record = self.0.get(&request.into_inner().container_id)?;
        Ok(Response::new(endpoint_to_pb(&record)))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let (record, problems) = self.0.check(&request.into_inner().container_id).await?;
        Ok(Response::new(pb::CheckResponse {
            endpoint: Some(endpoint_to_pb(&record)),
            problems,
        }))
    }

    async fn list(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(pb::ListResponse {
            endpoints: self.0.list().iter().map(endpoint_to_pb).collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(status_to_pb(self.0.status().await)))
    }
}

/// Binds the API socket: its directory is created root-only-writable (0755) and the socket itself
/// is made 0600 before any client can use it.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // Bind under a umask that leaves the socket 0600 from its first instant.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let service = AgentServer::new(Service(agent)).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// Runs a started agent: the reconciler, the cluster watch, liveness and the API, until
/// `shutdown` resolves. The dataplane is left in place: traffic keeps flowing without the agent.
pub async fn run(agent: Arc<Agent>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let first = agent.reconcile(crate::daemon::Pass::Full).await;
    info!(
        routes_replaced = first.routes_replaced,
        routes_deleted = first.routes_deleted,
        ms = first.duration.as_secs_f64() * 1e3,
        "initial reconciliation done"
    );
    let mut tasks = vec![
        tokio::spawn(agent.clone().run_reconciler()),
        tokio::spawn(agent.clone().run_watcher()),
        tokio::spawn(agent.clone().run_liveness()),
        tokio::spawn(agent.clone().run_kernel_monitor()),
        tokio::spawn(agent.clone().run_netconf_monitor()),
    ];
    let socket = agent.socket_path();
    let listener = bind_socket(&socket)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
    if let Some(addr) = agent.config().metrics_addr {
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
        info!(%addr, "serving /healthz, /readyz and /metrics");
        tasks.push(tokio::spawn(crate::metrics::serve(http, agent.clone())));
    }
    info!(socket = %socket.display(), "serving API");
    // systemd: ready only now, after the first full reconciliation and with the API listening.
    match crate::notify::notify("READY=1") {
        Ok(true) => info!("notified systemd: READY=1"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "cannot notify systemd"),
    }
    if let Some(period) = crate::notify::watchdog_interval() {
        let watched = agent.clone();
        tasks.push(tokio::spawn(async move {
            use crate::metrics::Health;
            loop {
                tokio::time::sleep(period).await;
                // Only a live agent pets the watchdog: stalled loops get it restarted.
                if watched.alive() {
                    let _ = crate::notify::notify("WATCHDOG=1");
                }
            }
        }));
    }
    let served = serve(agent, listener, shutdown).await;
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    info!("agent stopped; dataplane left in place");
    Ok(served?)
}
