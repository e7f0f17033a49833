//! `weft-echo PORT [ADDRESS]`: a TCP and UDP service (on 0.0.0.0, or ADDRESS, e.g. `::`) for the lab that answers every connection and every
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
        .expect("usage: weft-echo PORT [ADDRESS]");
    let address: std::net::IpAddr = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("an IP address"))
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let udp = UdpSocket::bind((address, port)).expect("bind udp");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            log("udp", peer);
            let _ = udp.send_to(format!("peer={peer}\n").as_bytes(), peer);
        }
    });
    let tcp = TcpListener::bind((address, port)).expect("bind tcp");
    for mut stream in tcp.incoming().flatten() {
        if let Ok(peer) = stream.peer_addr() {
            log("tcp", peer);
            let _ = stream.write_all(format!("peer={peer}\n").as_bytes());
        }
    }
}
