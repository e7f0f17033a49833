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

fn open_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

impl LinkDumper {
    /// A dumper of the calling thread's namespace.
    pub(super) fn open() -> io::Result<Self> {
        Ok(Self {
            socket: open_socket()?,
            seq: 0,
        })
    }

    /// The links whose name `keep` accepts, with their settings if `settings`. With
    /// `settings` (a full pass), a dump that the kernel marks as interrupted (links came or went
    /// meanwhile, and one may be missing) is made once more; otherwise it is taken as it is,
    /// and the next pass reads again. A dump that fails leaves the socket mid-answer: a fresh
    /// one replaces it, opened by this thread (the agent's threads all live in the host's
    /// namespace).
    pub(super) fn dump(
        &mut self,
        keep: impl Fn(&str) -> bool,
        settings: bool,
    ) -> io::Result<Vec<DumpedLink>> {
        let attempts = if settings { 2 } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.seq = self.seq.wrapping_add(1);
            let (links, interrupted) = match self.dump_once(&keep, settings) {
                Ok(dumped) => dumped,
                Err(e) => {
                    if let Ok(fresh) = open_socket() {
                        self.socket = fresh;
                    }
                    return Err(e);
                }
            };
            if !interrupted || attempt == attempts {
                return Ok(links);
            }
        }
    }

    fn dump_once(
        &mut self,
        keep: &impl Fn(&str) -> bool,
        settings: bool,
    ) -> io::Result<(Vec<DumpedLink>, bool)> {
        self.socket.send(&request(self.seq), 0)?;
        let mut links = vec![];
        let mut interrupted = false;
        let mut reply = Vec::with_capacity(64 * 1024);
        loop {
            reply.clear();
            self.socket.recv(&mut reply, 0)?;
            let wanted = Wanted {
                seq: self.seq,
                keep,
                settings,
            };
            let read = read_datagram(&reply, &wanted, &mut links)?;
            interrupted |= read.interrupted;
            if read.done {
                return Ok((links, interrupted));
            }
        }
    }
}

/// What a dump's datagrams are read for: the answer to request `seq`, the links `keep` takes,
/// their settings if `settings`.
struct Wanted<'a, F> {
    seq: u32,
    keep: &'a F,
    settings: bool,
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

fn read_datagram<F: Fn(&str) -> bool>(
    datagram: &[u8],
    wanted: &Wanted<'_, F>,
    links: &mut Vec<DumpedLink>,
) -> io::Result<Read> {
    let mut read = Read::default();
    for message in nlbytes::messages(datagram) {
        let message = message.map_err(|_| malformed("message length"))?;
        if message.seq != wanted.seq {
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
                let link = nlbytes::parse_link(message.payload)
                    .ok_or_else(|| malformed("link message"))?;
                if (wanted.keep)(&link.name) {
                    let known = match (wanted.settings, link.spec) {
                        (true, Some(spec)) => settings(spec),
                        _ => vec![],
                    };
                    links.push(DumpedLink {
                        index: link.index,
                        name: link.name,
                        group: link.group,
                        settings: known,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(read)
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
        // Every setting read, and each of its neighbours, has a value of its own: a setting
        // read from the wrong slot shows.
        let mut inet = InetDevConf::default();
        (inet.forwarding, inet.mc_forwarding, inet.proxy_arp) = (11, 12, 13);
        (inet.accept_redirects, inet.shared_media, inet.rp_filter) = (14, 17, 18);
        inet.accept_source_route = 19;
        let mut inet6 = Inet6DevConf::default();
        (inet6.forwarding, inet6.hoplimit, inet6.mtu6) = (21, 22, 23);
        (inet6.accept_ra, inet6.accept_redirects) = (24, 25);
        (inet6.accept_ra_rt_info_max_plen, inet6.proxy_ndp) = (42, 43);
        (inet6.optimistic_dad, inet6.mc_forwarding) = (44, 46);
        (inet6.disable_ipv6, inet6.accept_dad, inet6.force_tllao) = (47, 48, 49);
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

    /// The answer to request `seq`, `weft*` links with their settings.
    fn wanted(seq: u32) -> Wanted<'static, fn(&str) -> bool> {
        const WEFT: fn(&str) -> bool = weft;
        Wanted {
            seq,
            keep: &WEFT,
            settings: true,
        }
    }

    #[test]
    fn a_link_is_read_as_netlink_packet_route_encodes_it() {
        let mut datagram = encoded(42, "weft1a2b", 5, 0);
        datagram.extend(encoded(1, "lo", 5, 0));
        let mut links = vec![];
        let read = read_datagram(&datagram, &wanted(5), &mut links).unwrap();
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
            (sysctl::FORWARDING, 11),
            (sysctl::PROXY_ARP, 13),
            (sysctl::RP_FILTER, 18),
            (sysctl::FORWARDING_V6, 21),
            (sysctl::ACCEPT_RA, 24),
            (sysctl::PROXY_NDP, 43),
            (sysctl::DISABLE_IPV6, 47),
            (sysctl::ACCEPT_DAD, 48),
        ];
        expected.sort();
        assert_eq!(settings, expected);

        let read = read_datagram(&done(5, 0), &wanted(5), &mut links).unwrap();
        assert!(read.done);
    }

    #[test]
    fn interruptions_errors_and_stale_answers_are_told_apart() {
        let mut links = vec![];
        let intr = encoded(3, "weft0003", 9, NLM_F_DUMP_INTR);
        let read = read_datagram(&intr, &wanted(9), &mut links).unwrap();
        assert!(read.interrupted);
        // A message of another request is not part of this dump.
        let stale = encoded(4, "weft0004", 8, 0);
        read_datagram(&stale, &wanted(9), &mut links).unwrap();
        assert_eq!(links.len(), 1);
        // A dump cut short says so in its DONE message.
        let err = read_datagram(&done(9, -libc::EINTR), &wanted(9), &mut links).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
        // A length past the datagram's end is malformed, not read beyond.
        let mut cut = encoded(5, "weft0005", 9, 0);
        cut.truncate(cut.len() - 8);
        assert!(read_datagram(&cut, &wanted(9), &mut links).is_err());
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

    /// In a namespace of its own (a thread that leaves the test's namespace; root, as the
    /// suite runs): a veth pair whose settings are set apart from their defaults, dumped and
    /// compared with their files, and the dump's links with `netlink_packet_route`'s listing.
    #[test]
    fn a_real_dump_agrees_with_the_settings_files_and_the_library() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a namespace of the test's own (the suite runs as root)");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(dump_a_namespace_of_our_own());
        })
        .join()
        .unwrap();
    }

    async fn dump_a_namespace_of_our_own() {
        let (connection, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(connection);
        let veth = rtnetlink::LinkVeth::new("weftdump0", "weftdump1").build();
        handle.link().add(veth).execute().await.unwrap();
        let writes = [
            ("/proc/sys/net/ipv4/conf/weftdump0/proxy_arp", "1"),
            ("/proc/sys/net/ipv4/conf/weftdump0/rp_filter", "2"),
            ("/proc/sys/net/ipv4/conf/weftdump0/forwarding", "1"),
            ("/proc/sys/net/ipv6/conf/weftdump0/accept_ra", "2"),
            ("/proc/sys/net/ipv6/conf/weftdump0/proxy_ndp", "1"),
            ("/proc/sys/net/ipv6/conf/weftdump0/forwarding", "1"),
            ("/proc/sys/net/ipv6/conf/weftdump0/accept_dad", "2"),
        ];
        for (path, value) in writes {
            std::fs::write(path, value).unwrap();
        }
        let mut dumper = LinkDumper::open().unwrap();
        let ours = dumper.dump(|n| n == "weftdump0", true).unwrap();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].settings.len(), 8, "{:?}", ours[0].settings);
        for (template, value) in &ours[0].settings {
            let file = sysctl::read(&template.replace("{}", "weftdump0")).unwrap();
            assert_eq!(file, value.to_string(), "{template}");
        }
        assert!(dumper.dump(|n| n == "weftdump0", false).unwrap()[0]
            .settings
            .is_empty());

        let mut dumped: Vec<(u32, String)> = dumper
            .dump(|_| true, false)
            .unwrap()
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let mut listed = vec![];
        let mut links = handle.link().get().execute();
        while let Some(link) = links.try_next().await.unwrap() {
            let name = super::super::links::link_name(&link).unwrap();
            listed.push((link.header.index, name));
        }
        dumped.sort();
        listed.sort();
        assert_eq!(dumped.len(), 3, "lo and the pair: {dumped:?}");
        assert_eq!(dumped, listed);
    }
}
