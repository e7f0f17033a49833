//! Prometheus metrics, and the HTTP listener serving them with `/healthz` and `/readyz`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Counters and histograms the agent updates as it works.
#[derive(Default)]
pub struct Metrics {
    pub attach_ok: AtomicU64,
    pub attach_failed: AtomicU64,
    pub detach_ok: AtomicU64,
    pub detach_failed: AtomicU64,
    pub attach_seconds: Histogram,
    pub detach_seconds: Histogram,
    pub reconcile_seconds: Histogram,
    pub repairs: AtomicU64,
    pub etcd_errors: AtomicU64,
    pub iptables_restores: AtomicU64,
    pub iptables_errors: AtomicU64,
    /// Set once the first full reconciliation is done.
    pub reconciled: AtomicBool,
    /// Unix milliseconds of the last reconciliation pass (liveness of the loops).
    pub last_pass_ms: AtomicU64,
}

/// Values read at scrape time.
pub struct Gauges {
    pub endpoints: usize,
    pub local_blocks: usize,
    pub peers_alive: usize,
    pub peers_down: usize,
    pub routes: usize,
    pub rules: usize,
    pub etcd_connected: bool,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Metrics {
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, values: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in values {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "weft_attach_total",
            "Attach requests by result.",
            &[
                ("{result=\"ok\"}", load(&self.attach_ok)),
                ("{result=\"error\"}", load(&self.attach_failed)),
            ],
        );
        counter(
            &mut out,
            "weft_detach_total",
            "Detach requests by result.",
            &[
                ("{result=\"ok\"}", load(&self.detach_ok)),
                ("{result=\"error\"}", load(&self.detach_failed)),
            ],
        );
        self.attach_seconds.render(
            &mut out,
            "weft_attach_duration_seconds",
            "Time to serve an attach request.",
        );
        self.detach_seconds.render(
            &mut out,
            "weft_detach_duration_seconds",
            "Time to serve a detach request.",
        );
        self.reconcile_seconds.render(
            &mut out,
            "weft_reconcile_duration_seconds",
            "Time of one reconciliation pass.",
        );
        counter(
            &mut out,
            "weft_repairs_total",
            "Kernel objects the reconciler had to add, change or remove.",
            &[("", load(&self.repairs))],
        );
        counter(
            &mut out,
            "weft_etcd_errors_total",
            "Failed etcd requests.",
            &[("", load(&self.etcd_errors))],
        );
        counter(
            &mut out,
            "weft_iptables_restore_total",
            "iptables-restore runs by result.",
            &[
                ("{result=\"ok\"}", load(&self.iptables_restores)),
                ("{result=\"error\"}", load(&self.iptables_errors)),
            ],
        );
        let gauge = |out: &mut String, name: &str, help: &str, values: &[(&str, usize)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, value) in values {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        gauge(
            &mut out,
            "weft_endpoints",
            "Endpoints on this host.",
            &[("", gauges.endpoints)],
        );
        gauge(
            &mut out,
            "weft_local_blocks",
            "Blocks owned by this host.",
            &[("", gauges.local_blocks)],
        );
        gauge(
            &mut out,
            "weft_peers",
            "Other hosts by liveness.",
            &[
                ("{state=\"alive\"}", gauges.peers_alive),
                ("{state=\"down\"}", gauges.peers_down),
            ],
        );
        gauge(
            &mut out,
            "weft_routes",
            "Routes with proto weft in the kernel.",
            &[("", gauges.routes)],
        );
        gauge(
            &mut out,
            "weft_iptables_rules",
            "Rules in the WEFT-* chains.",
            &[("", gauges.rules)],
        );
        gauge(
            &mut out,
            "weft_etcd_connected",
            "Whether etcd answered the last request.",
            &[("", gauges.etcd_connected as usize)],
        );
        gauge(
            &mut out,
            "weft_ready",
            "Whether the first reconciliation is done and etcd answers.",
            &[(
                "",
                (self.reconciled.load(Ordering::Relaxed) && gauges.etcd_connected) as usize,
            )],
        );
        out
    }
}

/// What the HTTP listener needs from the agent.
pub trait Health: Send + Sync + 'static {
    /// Whether the agent's loops are running (`/healthz`).
    fn alive(&self) -> bool;
    /// Whether the agent can serve attaches (`/readyz`).
    fn ready(&self) -> impl std::future::Future<Output = bool> + Send;
    /// The Prometheus exposition (`/metrics`).
    fn metrics(&self) -> impl std::future::Future<Output = String> + Send;
}

/// Serves `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1 (one request per connection).
pub async fn serve<H: Health>(listener: TcpListener, health: Arc<H>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (bounded); the body, if any, is ignored.
            while len < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..]))
                    .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, content_type, body) = match (method, path) {
                ("GET", "/healthz") if health.alive() => {
                    ("200 OK", "text/plain", "ok\n".to_string())
                }
                ("GET", "/healthz") => (
                    "503 Service Unavailable",
                    "text/plain",
                    "loops stalled\n".into(),
                ),
                ("GET", "/readyz") if health.ready().await => {
                    ("200 OK", "text/plain", "ready\n".into())
                }
                ("GET", "/readyz") => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n".into(),
                ),
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    health.metrics().await,
                ),
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1"));
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 2"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(out.contains("x_seconds_count 2"));
    }
}
