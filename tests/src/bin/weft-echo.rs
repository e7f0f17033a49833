//! `weft-echo PORT`: a TCP and UDP service for the lab that answers every connection and every
//! datagram with `peer=<address>:<port>`, so tests can see which source address arrived. Each
//! arrival is also printed to stdout (`tcp <peer>` / `udp <peer>`), for tests that must prove
//! that nothing arrived.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};

fn log(kind: &str, peer: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{kind} {peer}");
    let _ = out.flush();
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: weft-echo PORT");
    let udp = UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            log("udp", peer);
            let _ = udp.send_to(format!("peer={peer}\n").as_bytes(), peer);
        }
    });
    let tcp = TcpListener::bind(("0.0.0.0", port)).expect("bind tcp");
    for mut stream in tcp.incoming().flatten() {
        if let Ok(peer) = stream.peer_addr() {
            log("tcp", peer);
            let _ = stream.write_all(format!("peer={peer}\n").as_bytes());
        }
    }
}
