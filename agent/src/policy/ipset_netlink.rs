//! Adding and deleting set members over netlink (ipset's protocol of nfnetlink), without
//! starting the `ipset` program: what an attach joining its profile and a member move need,
//! in a fraction of a millisecond. Creating, swapping and destroying sets stays with
//! `ipset restore`.
//!
//! Each change is one request (`IPSET_CMD_ADD`/`IPSET_CMD_DEL` with the set's name and the
//! member's address, prefix and interface), acknowledged one by one. Requests carry no
//! `NLM_F_EXCL`, so adding a member that is there or deleting one that is not succeeds, as
//! `ipset -exist restore` does.

use std::net::IpAddr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::member::Member;

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
/// The protocol version this speaks: 6, which kernels of protocol 7 still take and older ones
/// require exactly.
const IPSET_PROTOCOL: u8 = 6;
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_DATA: u16 = 7;
const ATTR_IP: u16 = 1;
const ATTR_CIDR: u16 = 3;
const ATTR_IFACE: u16 = 23;
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
/// Requests sent before their acknowledgements are read: each acknowledgement takes up to ~1 KB
/// of the receive buffer (~200 KB by default), so this stays well within it.
const BATCH: usize = 64;
/// How long to wait for the kernel's acknowledgements before giving up.
const REPLY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Del,
}

/// A change the kernel refused, or a socket error.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{change:?} {member} in {set}: error {code}")]
    Refused {
        change: Change,
        set: String,
        member: String,
        code: i32,
    },
    #[error("malformed netlink reply")]
    Malformed,
}

#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    fn nest(&mut self, kind: u16, inner: Attrs) {
        self.put(kind | NLA_F_NESTED, &inner.0);
    }
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// One request: change `member` of `set`.
pub fn request(seq: u32, change: Change, set: &str, member: &Member) -> Vec<u8> {
    let mut ip = Attrs::default();
    let (family, full) = match member.net.ip() {
        IpAddr::V4(a) => {
            ip.put(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &a.octets());
            (libc::NFPROTO_IPV4 as u8, 32)
        }
        IpAddr::V6(a) => {
            ip.put(ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &a.octets());
            (libc::NFPROTO_IPV6 as u8, 128)
        }
    };
    let mut data = Attrs::default();
    data.nest(ATTR_IP, ip);
    if member.net.prefix() != full {
        data.put(ATTR_CIDR, &[member.net.prefix()]);
    }
    if let Some(iface) = &member.iface {
        data.put(ATTR_IFACE, &nul_terminated(iface));
    }
    let mut attrs = Attrs::default();
    attrs.put(ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    attrs.put(ATTR_SETNAME, &nul_terminated(set));
    attrs.nest(ATTR_DATA, data);
    let command = match change {
        Change::Add => IPSET_CMD_ADD,
        Change::Del => IPSET_CMD_DEL,
    };
    let len = 16 + 4 + attrs.0.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | command).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0.
    out.extend_from_slice(&[family, 0, 0, 0]);
    out.extend_from_slice(&attrs.0);
    out
}

/// The acknowledgements in one reply buffer: (sequence number, error code; 0 is success).
fn acknowledgements(buf: &[u8]) -> Result<Vec<(u32, i32)>, NetlinkError> {
    let mut out = vec![];
    let mut at = 0;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    };
    while at + 16 <= buf.len() {
        let len = word(at).ok_or(NetlinkError::Malformed)? as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let seq = word(at + 8).ok_or(NetlinkError::Malformed)?;
        if len < 16 || at + len > buf.len() {
            return Err(NetlinkError::Malformed);
        }
        if kind == NLMSG_ERROR {
            let code = word(at + 16).ok_or(NetlinkError::Malformed)? as i32;
            out.push((seq, code));
        }
        at += len.next_multiple_of(4);
    }
    Ok(out)
}

fn receive_within(socket: &Socket, limit: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let timeout = libc::timeval {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_usec: limit.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket, and a timeval of the size given.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Makes `changes` in the sets of this network namespace; stops at the first refusal.
pub fn apply(changes: &[(Change, &str, &Member)]) -> Result<(), NetlinkError> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    receive_within(&socket, REPLY_WITHIN)?;
    for (batch, chunk) in changes.chunks(BATCH).enumerate() {
        let first = (batch * BATCH) as u32 + 1;
        let mut out = vec![];
        for (i, (change, set, member)) in chunk.iter().enumerate() {
            out.extend(request(first + i as u32, *change, set, member));
        }
        socket.send(&out, 0)?;
        let mut pending = chunk.len();
        while pending > 0 {
            let mut reply = Vec::with_capacity(64 * 1024);
            socket.recv(&mut reply, 0)?;
            for (seq, code) in acknowledgements(&reply)? {
                let Some(index) = seq.checked_sub(first).map(|i| i as usize) else {
                    continue;
                };
                let Some((change, set, member)) = chunk.get(index) else {
                    continue;
                };
                if code != 0 {
                    return Err(NetlinkError::Refused {
                        change: *change,
                        set: set.to_string(),
                        member: member.to_string(),
                        code: -code,
                    });
                }
                pending -= 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_the_set_and_the_member_as_ipset_sends_them() {
        let member: Member = "10.65.0.2,weftab".parse().unwrap();
        let bytes = request(7, Change::Add, "weft-4t-x", &member);
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), (6 << 8) | 9);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        assert_eq!(bytes[16], libc::NFPROTO_IPV4 as u8);
        // protocol attribute: length 5, type 1, version 6, padding.
        assert_eq!(&bytes[20..28], &[5, 0, 1, 0, 6, 0, 0, 0]);
        // set name: length 4 + 10, type 2, "weft-4t-x\0", padded to 16.
        assert_eq!(&bytes[28..32], &[14, 0, 2, 0]);
        assert_eq!(&bytes[32..42], b"weft-4t-x\0");
        // data: nested IP (nested IPv4 address in network order), then the interface.
        let data = &bytes[44..];
        assert_eq!(u16::from_ne_bytes([data[2], data[3]]), 7 | NLA_F_NESTED);
        assert_eq!(&data[4..8], &[12, 0, 1, 0x80]);
        assert_eq!(&data[8..16], &[8, 0, 1, 0x40, 10, 65, 0, 2]);
        assert_eq!(&data[16..20], &[11, 0, 23, 0]);
        assert_eq!(&data[20..27], b"weftab\0");
        // A network carries its prefix; IPv6 its family.
        let net: Member = "fe80::/10,weftab".parse().unwrap();
        let bytes = request(1, Change::Del, "weft-6f-x", &net);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), (6 << 8) | 10);
        assert_eq!(bytes[16], libc::NFPROTO_IPV6 as u8);
        assert!(bytes.windows(5).any(|w| w == [5, 0, 3, 0, 10]), "CIDR 10");
    }

    #[test]
    fn acknowledgements_are_read_with_their_codes() {
        let mut buf = vec![];
        for (seq, code) in [(1u32, 0i32), (2, -4103)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&code.to_ne_bytes());
            buf.extend_from_slice(&[0; 16]);
        }
        assert_eq!(acknowledgements(&buf).unwrap(), [(1, 0), (2, -4103)]);
        assert!(acknowledgements(&[]).unwrap().is_empty());
        assert!(acknowledgements(&buf[..20]).is_err(), "cut short");
    }
}
