//! The agent's gRPC API on a Unix socket: the service, the conversions between protobuf and
//! domain values, and the one mapping of errors to statuses.

mod convert;
pub mod listener;
mod service;
pub mod status;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use weft_proto::v1::agent_server::AgentServer;

pub use convert::endpoint_to_pb;

use crate::context::Context;

/// Requests larger than this are refused before they are decoded.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
    ctx: Arc<Context>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let service =
        AgentServer::new(service::Service(ctx)).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        // Clients that vanish without closing are noticed and their connections freed.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(listener::bounded(listener), shutdown)
        .await
}
