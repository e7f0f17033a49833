//! The host's links in one dump, on a netlink socket of its own, read for what weft uses of
//! them: index, name, group and the per-device settings of IPv4 and IPv6. A full pass reads
//! every link of the host; with 2,000 veths, decoding each message into `netlink_packet_route`'s
//! types (every attribute, every setting) took as long as the kernel took to dump them, and the
//! parse here reads only the attributes it needs, in place.

use std::io;

use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use crate::kernel::{nlbytes, sysctl};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// Set on a dump's messages when the table changed while it was dumped.
const NLM_F_DUMP_INTR: u16 = 0x10;

const IFLA_IFNAME: u16 = 3;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_GROUP: u16 = 27;
const IFLA_EXT_MASK: u16 = 29;
/// `IFLA_EXT_MASK`: no per-device counters (most of a dump's size, and unused).
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
/// Inside `IFLA_AF_SPEC`, per family: IPv4's devconf (u32s, `IPV4_DEVCONF_*` - 1) and IPv6's
/// (s32s, `DEVCONF_*`).
const IFLA_INET_CONF: u16 = 1;
const IFLA_INET6_CONF: u16 = 2;
const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// Where each setting weft checks sits in its family's devconf array.
const INET_CONF: [(&str, usize); 3] = [
    (sysctl::FORWARDING, 0),
    (sysctl::PROXY_ARP, 2),
    (sysctl::RP_FILTER, 7),
];
const INET6_CONF: [(&str, usize); 5] = [
    (sysctl::FORWARDING_V6, 0),
    (sysctl::ACCEPT_RA, 3),
    (sysctl::PROXY_NDP, 22),
    (sysctl::DISABLE_IPV6, 26),
    (sysctl::ACCEPT_DAD, 27),
];

/// Dumps are retried this many times when the kernel says the table changed during one.
const ATTEMPTS: usize = 3;

/// One link as the dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DumpedLink {
    pub index: u32,
    pub name: String,
    pub group: u32,
    /// Its settings by sysctl path template (those the dump shows).
    pub settings: sysctl::Known,
}

/// A netlink socket for link dumps, opened in the namespace whose links it lists.
pub(super) struct LinkDumper {
    socket: Socket,
    seq: u32,
}

impl LinkDumper {
    /// A dumper of the calling thread's namespace.
    pub(super) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// The links whose name `keep` accepts. A dump that the kernel marks as interrupted (links
    /// came or went meanwhile) is made again, up to three times; the last is taken as it is.
    pub(super) fn dump(&mut self, keep: impl Fn(&str) -> bool) -> io::Result<Vec<DumpedLink>> {
        for attempt in 1.. {
            self.seq = self.seq.wrapping_add(1);
            let (links, interrupted) = self.dump_once(&keep)?;
            if !interrupted || attempt == ATTEMPTS {
                return Ok(links);
            }
        }
        unreachable!("the attempts end with a return")
    }

    fn dump_once(&mut self, keep: &impl Fn(&str) -> bool) -> io::Result<(Vec<DumpedLink>, bool)> {
        self.socket.send(&request(self.seq), 0)?;
        let mut links = vec![];
        let mut interrupted = false;
        let mut reply = Vec::with_capacity(64 * 1024);
        loop {
            reply.clear();
            self.socket.recv(&mut reply, 0)?;
            let read = read_datagram(&reply, self.seq, keep, &mut links)?;
            interrupted |= read.interrupted;
            if read.done {
                return Ok((links, interrupted));
            }
        }
    }
}

/// `RTM_GETLINK`, a dump of all families' links without counters.
fn request(seq: u32) -> Vec<u8> {
    let mut message = Vec::with_capacity(40);
    message.extend_from_slice(&40u32.to_ne_bytes());
    message.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // ifinfomsg: family, type, index, flags, change: all zero.
    message.extend_from_slice(&[0; 16]);
    message.extend_from_slice(&8u16.to_ne_bytes());
    message.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    message.extend_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    message
}

/// What one datagram of the answer said.
#[derive(Debug, Default, PartialEq, Eq)]
struct Read {
    done: bool,
    interrupted: bool,
}

fn read_datagram(
    datagram: &[u8],
    seq: u32,
    keep: &impl Fn(&str) -> bool,
    links: &mut Vec<DumpedLink>,
) -> io::Result<Read> {
    let mut read = Read::default();
    for message in nlbytes::messages(datagram) {
        let message = message.map_err(|_| malformed("message length"))?;
        if message.seq != seq {
            // An answer to an earlier, abandoned request on this socket.
            continue;
        }
        read.interrupted |= message.flags & NLM_F_DUMP_INTR != 0;
        match message.kind {
            NLMSG_DONE | NLMSG_ERROR => {
                let code = nlbytes::u32_value(message.payload).unwrap_or(0) as i32;
                if code < 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                read.done = true;
                return Ok(read);
            }
            RTM_NEWLINK => {
                let link = parse_link(message.payload).ok_or_else(|| malformed("link message"))?;
                if keep(&link.name) {
                    links.push(DumpedLink {
                        settings: link.spec.map(settings).unwrap_or_default(),
                        index: link.index,
                        name: link.name,
                        group: link.group,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(read)
}

/// What a link message (`RTM_NEWLINK` or `RTM_DELLINK`) says of the link: its index, name and
/// group, and its per-family settings (`IFLA_AF_SPEC`) to read if wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkHeader<'a> {
    pub index: u32,
    pub name: String,
    pub group: u32,
    pub spec: Option<&'a [u8]>,
}

/// Reads a link message's payload (ifinfomsg, then attributes); None when too short.
pub fn parse_link(payload: &[u8]) -> Option<LinkHeader<'_>> {
    let attributes = payload.get(16..)?;
    let mut link = LinkHeader {
        index: nlbytes::u32_at(payload, 4),
        name: String::new(),
        group: 0,
        spec: None,
    };
    for (kind, value) in nlbytes::attributes(attributes) {
        match kind {
            IFLA_IFNAME => link.name = nlbytes::string_value(value),
            IFLA_GROUP => link.group = nlbytes::u32_value(value).unwrap_or(0),
            IFLA_AF_SPEC => link.spec = Some(value),
            _ => {}
        }
    }
    Some(link)
}

/// The settings in an `IFLA_AF_SPEC`.
fn settings(spec: &[u8]) -> sysctl::Known {
    let mut known = vec![];
    for (family, conf) in nlbytes::attributes(spec) {
        let (wanted, layout): (u16, &[(&'static str, usize)]) = match family {
            AF_INET => (IFLA_INET_CONF, &INET_CONF),
            AF_INET6 => (IFLA_INET6_CONF, &INET6_CONF),
            _ => continue,
        };
        for (kind, values) in nlbytes::attributes(conf) {
            if kind != wanted {
                continue;
            }
            for (path, i) in layout {
                if let Some(v) = values.get(i * 4..).and_then(nlbytes::u32_value) {
                    known.push((*path, v as i32));
                }
            }
        }
    }
    known
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the kernel's link dump has a malformed {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::nlbytes::{u16_at, u32_at};
    use futures::TryStreamExt;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::link::{
        AfSpecInet, AfSpecInet6, AfSpecUnspec, Inet6DevConf, InetDevConf, LinkAttribute,
        LinkMessage,
    };
    use netlink_packet_route::RouteNetlinkMessage;

    /// A link message as the kernel would send it, encoded by `netlink_packet_route`.
    fn encoded(index: u32, name: &str, seq: u32, flags: u16) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        let mut inet = InetDevConf::default();
        (inet.forwarding, inet.proxy_arp, inet.rp_filter) = (1, 1, 2);
        inet.accept_local = 1;
        let mut inet6 = Inet6DevConf::default();
        (inet6.forwarding, inet6.accept_ra, inet6.proxy_ndp) = (1, 0, 1);
        (inet6.disable_ipv6, inet6.accept_dad, inet6.hoplimit) = (1, 0, 64);
        link.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Group(7),
            LinkAttribute::AfSpecUnspec(vec![
                AfSpecUnspec::Inet(vec![AfSpecInet::DevConf(inet)]),
                AfSpecUnspec::Inet6(vec![AfSpecInet6::DevConf(inet6)]),
            ]),
        ];
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut message = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)),
        );
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        let mut m = vec![];
        m.extend(20u32.to_ne_bytes());
        m.extend(NLMSG_DONE.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(code.to_ne_bytes());
        m
    }

    fn weft(name: &str) -> bool {
        name.starts_with("weft")
    }

    #[test]
    fn a_link_is_read_as_netlink_packet_route_encodes_it() {
        let mut datagram = encoded(42, "weft1a2b", 5, 0);
        datagram.extend(encoded(1, "lo", 5, 0));
        let mut links = vec![];
        let read = read_datagram(&datagram, 5, &weft, &mut links).unwrap();
        assert_eq!(read, Read::default());
        assert_eq!(links.len(), 1, "lo is not kept");
        let link = &links[0];
        assert_eq!(
            (link.index, link.name.as_str(), link.group),
            (42, "weft1a2b", 7)
        );
        let mut settings = link.settings.clone();
        settings.sort();
        let mut expected = vec![
            (sysctl::FORWARDING, 1),
            (sysctl::PROXY_ARP, 1),
            (sysctl::RP_FILTER, 2),
            (sysctl::FORWARDING_V6, 1),
            (sysctl::ACCEPT_RA, 0),
            (sysctl::PROXY_NDP, 1),
            (sysctl::DISABLE_IPV6, 1),
            (sysctl::ACCEPT_DAD, 0),
        ];
        expected.sort();
        assert_eq!(settings, expected);

        let read = read_datagram(&done(5, 0), 5, &weft, &mut links).unwrap();
        assert!(read.done);
    }

    #[test]
    fn interruptions_errors_and_stale_answers_are_told_apart() {
        let mut links = vec![];
        let intr = encoded(3, "weft0003", 9, NLM_F_DUMP_INTR);
        let read = read_datagram(&intr, 9, &weft, &mut links).unwrap();
        assert!(read.interrupted);
        // A message of another request is not part of this dump.
        let stale = encoded(4, "weft0004", 8, 0);
        read_datagram(&stale, 9, &weft, &mut links).unwrap();
        assert_eq!(links.len(), 1);
        // A dump cut short says so in its DONE message.
        let err = read_datagram(&done(9, -libc::EINTR), 9, &weft, &mut links).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
        // A length past the datagram's end is malformed, not read beyond.
        let mut cut = encoded(5, "weft0005", 9, 0);
        cut.truncate(cut.len() - 8);
        assert!(read_datagram(&cut, 9, &weft, &mut links).is_err());
    }

    #[test]
    fn the_request_asks_for_a_dump_without_counters() {
        let request = request(7);
        assert_eq!(request.len(), 40);
        assert_eq!(u32_at(&request, 0), 40);
        assert_eq!(u16_at(&request, 4), RTM_GETLINK);
        assert_eq!(u16_at(&request, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32_at(&request, 8), 7);
        assert_eq!(u16_at(&request, 34), IFLA_EXT_MASK);
        assert_eq!(u32_at(&request, 36), RTEXT_FILTER_SKIP_STATS);
    }

    #[tokio::test]
    async fn this_namespace_dumps_the_links_netlink_packet_route_lists() {
        let mut dumper = LinkDumper::open().unwrap();
        let mut dumped: Vec<(u32, String)> = dumper
            .dump(|_| true)
            .unwrap()
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let (connection, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(connection);
        let mut listed = vec![];
        let mut links = handle.link().get().execute();
        while let Some(link) = links.try_next().await.unwrap() {
            let name = super::super::links::link_name(&link).unwrap();
            listed.push((link.header.index, name));
        }
        dumped.sort();
        listed.sort();
        assert_eq!(dumped, listed);
        let lo = dumper.dump(|n| n == "lo").unwrap();
        assert_eq!(lo.len(), 1);
        assert_eq!(lo[0].index, 1);
        assert!(lo[0].settings.iter().any(|(p, _)| *p == sysctl::FORWARDING));
    }
}
