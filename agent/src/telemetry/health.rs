//! The HTTP listener for `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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
