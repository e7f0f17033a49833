//! The host's own sockets (the agent's namespace: /proc/net and netlink sockets follow the
//! calling thread's namespace, and the agent's threads live in the host's). TCP listeners are
//! asked of the kernel's socket diagnostics for the listening state alone; UDP sockets are read
//! from /proc/net.

use std::io;

use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

use crate::model::Protocol;

/// TCP state LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Whether a line of /proc/net/{tcp,udp}[6] is a socket on `port` that takes connections or
/// datagrams: a TCP socket in LISTEN, or any UDP socket (UDP has no listening state).
fn takes(line: &str, protocol: Protocol, port: u16) -> bool {
    let mut fields = line.split_whitespace();
    let (Some(_slot), Some(local), Some(_remote), Some(state)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let bound = local
        .rsplit_once(':')
        .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
        == Some(port);
    bound && (protocol == Protocol::Udp || state == TCP_LISTEN)
}

pub fn listening(protocol: Protocol, port: u16) -> io::Result<bool> {
    let files = match protocol {
        Protocol::Tcp => match tcp_listening(port) {
            // A kernel without TCP socket diagnostics (`tcp_diag`): the files, slower.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPROTONOSUPPORT)) => {
                ["/proc/net/tcp", "/proc/net/tcp6"]
            }
            answer => return answer,
        },
        Protocol::Udp => ["/proc/net/udp", "/proc/net/udp6"],
    };
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            // IPv6 may be disabled: no tcp6/udp6.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if text.lines().skip(1).any(|l| takes(l, protocol, port)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `SOCK_DIAG_BY_FAMILY`: the inet_diag request and answer type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN_STATE: u32 = 10;

/// Whether a TCP socket of either family listens on `port`. Reading /proc/net/tcp walks every
/// bucket of the kernel's connection table (6 ms a file on the reference machine, whatever the
/// namespace holds); a diagnostics dump for the listening state alone walks the listeners only.
fn tcp_listening(port: u16) -> io::Result<bool> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        socket.send(&listeners_request(family), 0)?;
        let mut found = false;
        loop {
            let mut reply = Vec::with_capacity(64 * 1024);
            socket.recv(&mut reply, 0)?;
            let (ports, done) = listener_ports(&reply)?;
            found |= ports.contains(&port);
            if done {
                break;
            }
        }
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A dump request of `family`'s TCP sockets in the listening state (`inet_diag_req_v2`).
fn listeners_request(family: u8) -> Vec<u8> {
    let mut request = Vec::with_capacity(72);
    request.extend(72u32.to_ne_bytes());
    request.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend(1u32.to_ne_bytes()); // sequence
    request.extend(0u32.to_ne_bytes()); // port id: the kernel's
    request.extend([family, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend((1u32 << TCP_LISTEN_STATE).to_ne_bytes());
    request.extend([0u8; 48]); // any socket id
    request
}

/// The local ports of the sockets in one datagram of the dump's answer, and whether the dump
/// ended with it. A refusal is an error.
fn listener_ports(datagram: &[u8]) -> io::Result<(Vec<u16>, bool)> {
    let mut ports = vec![];
    let mut offset = 0;
    while offset + 16 <= datagram.len() {
        let at = |i: usize| &datagram[offset + i..];
        let len = u32::from_ne_bytes(at(0)[..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(at(4)[..2].try_into().unwrap());
        if len < 16 || offset + len > datagram.len() {
            break;
        }
        match kind {
            // A dump cut short ends with its error in the DONE message.
            NLMSG_DONE if len >= 20 => {
                let code = i32::from_ne_bytes(at(16)[..4].try_into().unwrap());
                if code < 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                return Ok((ports, true));
            }
            NLMSG_DONE => return Ok((ports, true)),
            NLMSG_ERROR if len >= 20 => {
                let code = i32::from_ne_bytes(at(16)[..4].try_into().unwrap());
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            // inet_diag_msg: family, state, timer, retrans, then the socket id, whose first
            // field is the local port in network order.
            SOCK_DIAG_BY_FAMILY if len >= 16 + 6 => {
                ports.push(u16::from_be_bytes([at(20)[0], at(21)[0]]));
            }
            _ => {}
        }
        offset += (len + 3) & !3;
    }
    Ok((ports, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![];
        m.extend(((16 + payload.len()) as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn a_listening_socket_of_this_process_is_found_and_a_closed_one_is_not() {
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(any).unwrap();
            let port = listener.local_addr().unwrap().port();
            assert!(listening(Protocol::Tcp, port).unwrap(), "{any}");
            drop(listener);
            assert!(!listening(Protocol::Tcp, port).unwrap(), "{any} closed");
        }
    }

    #[test]
    fn a_listeners_dump_is_read_to_its_end_and_a_refusal_is_an_error() {
        let request = listeners_request(libc::AF_INET6 as u8);
        assert_eq!(request.len(), 72);
        assert_eq!(
            request[16..18],
            [libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8]
        );
        assert_eq!(
            u32::from_ne_bytes(request[20..24].try_into().unwrap()),
            1 << 10
        );

        // Two listeners (ports 2222 and 80), then the end of the dump.
        let mut socket = vec![libc::AF_INET as u8, 10, 0, 0];
        socket.extend(2222u16.to_be_bytes());
        socket.extend([0u8; 66]);
        let mut other = socket.clone();
        other[4..6].copy_from_slice(&80u16.to_be_bytes());
        let mut datagram = message(SOCK_DIAG_BY_FAMILY, &socket);
        datagram.extend(message(SOCK_DIAG_BY_FAMILY, &other));
        assert_eq!(listener_ports(&datagram).unwrap(), (vec![2222, 80], false));
        datagram.extend(message(NLMSG_DONE, &0i32.to_ne_bytes()));
        assert_eq!(listener_ports(&datagram).unwrap(), (vec![2222, 80], true));

        let refused = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        let err = listener_ports(&refused).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // A dump cut short: its error comes in the DONE message, and is not "no listener".
        let cut = message(NLMSG_DONE, &(-libc::EINTR).to_ne_bytes());
        let err = listener_ports(&cut).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
    }

    #[test]
    fn listeners_are_found_by_port_and_state() {
        let listen = "   0: 00000000:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1";
        let connected = "   1: 0100007F:08AE 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1";
        let v6 = "   0: 00000000000000000000000000000000:08AE 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1";
        assert!(takes(listen, Protocol::Tcp, 2222));
        assert!(!takes(listen, Protocol::Tcp, 2223));
        assert!(!takes(connected, Protocol::Tcp, 2222));
        assert!(takes(v6, Protocol::Tcp, 2222));
        let udp = "  100: 00000000:14EC 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0";
        assert!(takes(udp, Protocol::Udp, 5356));
    }
}
