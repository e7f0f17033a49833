//! Attach/detach churn: workers attach a fresh container on a host drawn from a seeded
//! generator (a third with a published TCP port, a third with a UDP one), then detach it, paced
//! to a rate. Every answer is recorded with its time; a container whose attach failed is
//! detached until the agent confirms, so the run leaves nothing of its own behind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;
use weft_proto::v1 as pb;

/// How long a leftover detach is retried (an agent restart, an etcd member restart).
const DETACH_PATIENCE: Duration = Duration::from_secs(60);
/// Bound of one request.
const CALL_LIMIT: Duration = Duration::from_secs(20);
/// Host ports the churn publishes: this base plus the container's number modulo the span.
pub const PORT_BASE: u16 = 20000;
const PORT_SPAN: u64 = 20000;

/// One answer that was not success.
#[derive(Debug, Clone)]
pub struct Failed {
    /// Unix time (seconds).
    pub at: f64,
    pub host: usize,
    pub what: &'static str,
    pub code: Code,
    pub message: String,
}

/// What the churn did.
#[derive(Debug, Default)]
pub struct Tally {
    pub attaches: AtomicU64,
    pub detaches: AtomicU64,
    pub failed: Mutex<Vec<Failed>>,
    /// Containers that could not be detached within the patience: leaks.
    pub stranded: Mutex<Vec<String>>,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Runs `workers` churn loops against the agents at `sockets` until `stop` is set; together
/// they aim at `rate` operations (attach or detach) per second.
pub async fn run(
    sockets: Vec<PathBuf>,
    workers: usize,
    rate: f64,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let cycle = Duration::from_secs_f64(2.0 * workers as f64 / rate);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (sockets, stop, tally, next) =
                (sockets.clone(), stop.clone(), tally.clone(), next.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w as u64));
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let host = rng.gen_range(0..sockets.len());
                    let kind = rng.gen_range(0..3u8);
                    one_cycle(&sockets[host], host, n, kind, &tally).await;
                    if let Some(rest) = cycle.checked_sub(started.elapsed()) {
                        tokio::time::sleep(rest).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Attach container `churn-<n>` on `host`, then detach it.
async fn one_cycle(socket: &std::path::Path, host: usize, n: u64, kind: u8, tally: &Tally) {
    let id = format!("churn-{n}");
    let port = PORT_BASE as u32 + (n % PORT_SPAN) as u32;
    let ports = match kind {
        0 => vec![],
        1 => vec![("tcp", port)],
        _ => vec![("udp", port)],
    };
    let request = pb::AttachRequest {
        container_id: id.clone(),
        ports: ports
            .iter()
            .map(|(protocol, port)| pb::PortMapping {
                protocol: protocol.to_string(),
                host_port: *port,
                container_port: 80,
            })
            .collect(),
        ..Default::default()
    };
    let attached = call(socket, |mut c| async move {
        c.attach(request).await.map(|_| ())
    })
    .await;
    tally.attaches.fetch_add(1, Ordering::Relaxed);
    if let Err(status) = &attached {
        record(tally, host, "attach", status);
    }
    detach_until_done(socket, host, &id, tally).await;
}

/// Detaches until the agent says it is done (detach of an unknown id succeeds).
async fn detach_until_done(socket: &std::path::Path, host: usize, id: &str, tally: &Tally) {
    let started = Instant::now();
    loop {
        let request = pb::DetachRequest {
            container_id: id.to_string(),
        };
        let done = call(socket, |mut c| async move {
            c.detach(request).await.map(|_| ())
        })
        .await;
        tally.detaches.fetch_add(1, Ordering::Relaxed);
        match done {
            Ok(()) => return,
            Err(status) => record(tally, host, "detach", &status),
        }
        if started.elapsed() > DETACH_PATIENCE {
            tally.stranded.lock().unwrap().push(id.to_string());
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One request on a fresh connection (the agent may have restarted since the last one); a
/// socket that cannot be reached answers `UNAVAILABLE`, as the agent does while etcd is away.
async fn call<F, Fut>(socket: &std::path::Path, request: F) -> Result<(), tonic::Status>
where
    F: FnOnce(weft_proto::v1::agent_client::AgentClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let client = weft_cli::client::connect(socket)
        .await
        .map_err(tonic::Status::unavailable)?;
    match tokio::time::timeout(CALL_LIMIT, request(client)).await {
        // The agent went away under the request (it was killed): for this client it is
        // unreachable, as a socket nobody listens on is.
        // (hyper reports the broken connection as a transport error, or as the request's
        // cancellation when the connection went while it was queued).
        Ok(Err(status))
            if (status.code() == Code::Unknown && status.message() == "transport error")
                || status.code() == Code::Cancelled =>
        {
            Err(tonic::Status::unavailable(
                "the connection to the agent broke under the request",
            ))
        }
        Ok(answer) => answer,
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "no answer within the call limit",
        )),
    }
}

fn record(tally: &Tally, host: usize, what: &'static str, status: &tonic::Status) {
    tally.failed.lock().unwrap().push(Failed {
        at: unix_now(),
        host,
        what,
        code: status.code(),
        message: status.message().to_string(),
    });
}
