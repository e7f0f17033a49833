//! The connection to an agent's API socket.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use weft_proto::v1::agent_client::AgentClient;

/// Connects to the agent's Unix socket.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, String> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://localhost")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    Ok(AgentClient::new(channel))
}
