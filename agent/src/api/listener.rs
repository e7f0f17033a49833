//! The API socket's connections, bounded: at most [`MAX_CONNECTIONS`] at once (more are closed
//! at once), and a connection that has not spoken within [`HANDSHAKE_TIMEOUT`] is closed. Idle
//! connections that never send the HTTP/2 preface would otherwise hold descriptors and tasks
//! until the agent could accept nothing else.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

pub const MAX_CONNECTIONS: usize = 512;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection holding one of the permits.
pub struct Bounded {
    stream: UnixStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Bounded {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections and hands the ones that speak in time to the server. The accept loop
/// ends with the returned stream's receiver.
pub fn bounded(listener: UnixListener) -> ReceiverStream<std::io::Result<Bounded>> {
    let (ready, incoming) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: pause instead of spinning on the error.
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!("too many API connections; closing a new one");
                continue;
            };
            if ready.is_closed() {
                return;
            }
            let ready = ready.clone();
            tokio::spawn(async move {
                // A client speaks first (the HTTP/2 preface); one that does not is dropped.
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.readable()).await {
                    Ok(Ok(())) => {
                        let connection = Bounded {
                            stream,
                            _permit: permit,
                        };
                        let _ = ready.send(Ok(connection)).await;
                    }
                    _ => tracing::debug!("API connection silent past the handshake timeout"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}
