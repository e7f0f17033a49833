//! The host's own sockets, read from /proc/net (the agent's namespace: /proc/net follows the
//! reading thread's namespace, and the agent's threads live in the host's).

use std::io;

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
    let files: &[&str] = match protocol {
        Protocol::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Protocol::Udp => &["/proc/net/udp", "/proc/net/udp6"],
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

#[cfg(test)]
mod tests {
    use super::*;

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
