//! Probing a lab's dataplane from inside its namespaces, fast enough to run a whole isolation
//! matrix: TCP connects and UDP exchanges run on threads of this process that entered the
//! namespace (no process per probe), ICMP through `ping`. A blocked probe costs its timeout, so
//! callers run many at once ([`all`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sh;

/// How long a probe waits for an answer before it counts as blocked.
pub const TIMEOUT: Duration = Duration::from_millis(600);

/// What a probe tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Probe {
    Tcp(u16),
    Udp(u16),
    Icmp,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Tcp(p) => write!(f, "tcp/{p}"),
            Probe::Udp(p) => write!(f, "udp/{p}"),
            Probe::Icmp => write!(f, "icmp"),
        }
    }
}

/// Runs `work` on a new thread inside network namespace `ns` (a name under /run/netns).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    Ok(std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the namespace");
        work()
    }))
}

/// Whether `probe` from namespace `ns` to `ip` gets through (a weft-echo or [`serve_echo`]
/// service must listen there for TCP and UDP).
pub fn reach(ns: &str, ip: &str, probe: Probe) -> bool {
    if probe == Probe::Icmp {
        let wait = format!("{:.1}", TIMEOUT.as_secs_f64());
        return sh::in_ns(ns, &["ping", "-c", "1", "-W", &wait, "-q", ip])
            .is_ok_and(|o| o.status.success());
    }
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return false;
    };
    let handle = in_netns(ns, move || match probe {
        Probe::Tcp(port) => tcp(SocketAddr::new(ip, port)),
        Probe::Udp(port) => udp(SocketAddr::new(ip, port)),
        Probe::Icmp => unreachable!(),
    });
    handle.is_ok_and(|h| h.join().unwrap_or(false))
}

fn tcp(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, TIMEOUT) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let mut buf = [0u8; 64];
    // weft-echo answers at once; an echo server answers what it is sent.
    let _ = stream.write_all(b"probe\n");
    matches!(stream.read(&mut buf), Ok(n) if n > 0)
}

fn udp(addr: SocketAddr) -> bool {
    let any = match addr {
        SocketAddr::V4(_) => "0.0.0.0",
        SocketAddr::V6(_) => "::",
    };
    let Ok(socket) = UdpSocket::bind((any, 0)) else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(TIMEOUT));
    let mut buf = [0u8; 64];
    // One retry: the first datagram may meet an ARP resolution.
    for _ in 0..2 {
        if socket.send_to(b"q\n", addr).is_err() {
            return false;
        }
        if matches!(socket.recv_from(&mut buf), Ok((n, _)) if n > 0) {
            return true;
        }
    }
    false
}

/// Polls a TCP connect from `ns` to `addr` (each try bounded by 100 ms) until its outcome is
/// `reached`; returns how long that took from `since`, or None after `limit`.
pub fn tcp_becomes(
    ns: &str,
    addr: SocketAddr,
    reached: bool,
    since: std::time::Instant,
    limit: Duration,
) -> Option<Duration> {
    let handle = in_netns(ns, move || loop {
        let tried = std::time::Instant::now();
        let ok = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok();
        if ok == reached {
            // A try that failed only ends at its timeout: count from when it started.
            let at = if ok { std::time::Instant::now() } else { tried };
            return Some(at.saturating_duration_since(since));
        }
        if since.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10).saturating_sub(tried.elapsed()));
    })
    .ok()?;
    handle.join().ok().flatten()
}

/// Runs every probe at once; returns (index, reached) in input order.
pub fn all(probes: &[(String, String, Probe)]) -> Vec<bool> {
    let handles: Vec<_> = probes
        .iter()
        .cloned()
        .map(|(ns, ip, probe)| std::thread::spawn(move || reach(&ns, &ip, probe)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .collect()
}

/// A TCP echo service on `port` inside `ns` (lines sent come back), served by threads of this
/// process until it exits.
pub fn serve_echo(ns: &str, port: u16) -> Result<()> {
    let (ready, wait) = std::sync::mpsc::channel();
    in_netns(ns, move || {
        let listener = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(writer, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    })?;
    wait.recv()?.map_err(anyhow::Error::msg)
}

/// A TCP connection opened from inside a namespace, kept open to prove that an established
/// connection survives policy changes.
pub struct Connection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(ns: &str, addr: SocketAddr) -> Result<Self> {
        let stream = in_netns(ns, move || TcpStream::connect_timeout(&addr, TIMEOUT))?
            .join()
            .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends a line and waits for it to come back.
    pub fn echo(&mut self, text: &str) -> Result<()> {
        writeln!(self.stream, "{text}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        anyhow::ensure!(line.trim_end() == text, "echoed {line:?}, not {text:?}");
        Ok(())
    }
}
