//! The API socket's connections, bounded: at most [`MAX_CONNECTIONS`] serving at once (more are
//! closed at once), at most [`MAX_SILENT`] waiting to speak (a newer one displaces the oldest),
//! and a connection that has not spoken within [`HANDSHAKE_TIMEOUT`] is closed. Idle
//! connections that never send the HTTP/2 preface would otherwise hold descriptors and tasks
//! until the agent could accept nothing else.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

pub const MAX_CONNECTIONS: usize = 512;
/// Connections that have not spoken yet, at most.
pub const MAX_SILENT: usize = 256;
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

/// Connections waiting to speak, oldest first, each with a way to drop it.
#[derive(Default)]
struct Silent {
    next: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// Accepts connections and hands the ones that speak in time to the server. At most
/// [`MAX_SILENT`] may wait to speak: a new one drops the oldest, so a flood of silent
/// connections never keeps a real client out. The accept loop ends with the returned stream.
pub fn bounded(listener: UnixListener) -> ReceiverStream<std::io::Result<Bounded>> {
    let (ready, incoming) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let silent = Arc::new(Mutex::new(Silent::default()));
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
            if ready.is_closed() {
                return;
            }
            let (id, dropped) = {
                let mut silent = silent.lock().unwrap();
                if silent.waiting.len() >= MAX_SILENT {
                    if let Some((_, drop_oldest)) = silent.waiting.pop_front() {
                        let _ = drop_oldest.send(());
                    }
                }
                let (drop, dropped) = oneshot::channel();
                silent.next += 1;
                let id = silent.next;
                silent.waiting.push_back((id, drop));
                (id, dropped)
            };
            tokio::spawn(admit(
                stream,
                dropped,
                id,
                silent.clone(),
                permits.clone(),
                ready.clone(),
            ));
        }
    });
    ReceiverStream::new(incoming)
}

/// Waits until the peer has sent something (true) or closed (false), without consuming it: the
/// bytes are the server's. Readiness alone can be spurious, so the socket is peeked.
async fn first_bytes(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        if stream.readable().await.is_err() {
            return false;
        }
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut byte = 0u8;
            // SAFETY: recv writes at most one byte into `byte`, which outlives the call.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match n {
                n if n >= 0 => Ok(n > 0),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
        match peeked {
            Ok(spoke) => return spoke,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        }
    }
}

/// Waits for a connection to speak (or to be dropped for a newer one, or to time out), then
/// hands it to the server if a permit is free.
async fn admit(
    stream: UnixStream,
    dropped: oneshot::Receiver<()>,
    id: u64,
    silent: Arc<Mutex<Silent>>,
    permits: Arc<Semaphore>,
    ready: mpsc::Sender<std::io::Result<Bounded>>,
) {
    let spoke = tokio::select! {
        spoke = tokio::time::timeout(HANDSHAKE_TIMEOUT, first_bytes(&stream)) => {
            matches!(spoke, Ok(true))
        }
        _ = dropped => false,
    };
    silent
        .lock()
        .unwrap()
        .waiting
        .retain(|(other, _)| *other != id);
    if !spoke {
        tracing::debug!("API connection silent past the handshake timeout, or displaced");
        return;
    }
    let Ok(permit) = permits.try_acquire_owned() else {
        tracing::debug!("too many API connections; closing a new one");
        return;
    };
    let connection = Bounded {
        stream,
        _permit: permit,
    };
    let _ = ready.send(Ok(connection)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_never_keep_a_speaking_one_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let mut incoming = bounded(UnixListener::bind(&path).unwrap());
        let mut silent = vec![];
        // Twice the limit: the first half is displaced by the second (and the fds of both ends
        // of every connection stay within this process's usual limit of 1024).
        for _ in 0..(MAX_SILENT * 2) {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        let mut client = UnixStream::connect(&path).await.unwrap();
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let admitted = tokio::time::timeout(Duration::from_secs(2), incoming.next())
            .await
            .expect("the speaking connection is admitted at once")
            .unwrap()
            .unwrap();
        drop(admitted);
        // The displaced silent connections were closed: reading one gives end of file.
        let mut closed = 0;
        for stream in &silent[..MAX_SILENT] {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_millis(100), stream.readable())
                .await
                .map(|_| stream.try_read(&mut buf));
            if let Ok(Ok(0)) = read {
                closed += 1;
            }
        }
        assert_eq!(
            closed, MAX_SILENT,
            "the oldest silent connections were dropped"
        );
    }
}
