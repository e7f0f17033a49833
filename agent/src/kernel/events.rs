//! Kernel notifications the agent reacts to: deletions of its routes and links (repaired by a
//! reconciliation pass), and sysctl changes announced as RTM_NEWNETCONF (put back at once).

use std::collections::HashSet;
use std::io;

use crate::kernel::nlbytes::{self, parse_link};
use crate::model::{LINK_PREFIX, RETIRED_GROUP, RT_PROTO_WEFT};

/// Kernel changes that may need repair: one of our routes, links or permanent neighbour (and
/// FDB) entries deleted, or notifications lost (the socket overflowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    RouteDeleted,
    LinkDeleted,
    NeighbourDeleted,
    Lost,
}

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_DELROUTE: u16 = 25;
const RTM_DELNEIGH: u16 = 29;
const RTA_OIF: u16 = 4;

/// A socket that receives the link, route and neighbour notifications of the agent's
/// namespace.
pub fn kernel_events() -> io::Result<netlink_sys::TokioSocket> {
    use netlink_sys::AsyncSocket;
    let mut socket = netlink_sys::TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    for group in [
        RTNLGRP_LINK,
        RTNLGRP_NEIGH,
        RTNLGRP_IPV4_ROUTE,
        RTNLGRP_IPV6_ROUTE,
    ] {
        socket.socket_ref().add_membership(group)?;
    }
    // Room for the notifications of a burst of attaches and detaches; past it they are lost,
    // and the loss itself sets off a pass.
    receive_buffer(socket.socket_ref(), 4 << 20)?;
    Ok(socket)
}

/// Asks for a receive buffer of `bytes`: beyond `net.core.rmem_max` with `SO_RCVBUFFORCE` (the
/// agent has CAP_NET_ADMIN), up to it with `SO_RCVBUF` otherwise.
fn receive_buffer(socket: &impl std::os::fd::AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a socket this process holds open, and an int option given with its size.
        let done = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done == 0 {
            return Ok(());
        }
    }
    Err(io::Error::last_os_error())
}

/// What a notification says, of what the agent reacts to. Read in place: every attach and
/// detach sends several link messages of a kilobyte and more, and decoding each whole was a
/// twentieth of the agent's time under concurrent attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A link appeared or changed (`deleted`: went away).
    Link {
        deleted: bool,
        index: u32,
        name: String,
        group: u32,
    },
    /// A route went away.
    RouteDeleted { protocol: u8, oif: Option<u32> },
    /// A neighbour or FDB entry went away.
    NeighbourDeleted { ifindex: u32 },
}

/// The notices in one datagram of notifications (other messages, and malformed ones, are
/// skipped).
pub fn notices(datagram: &[u8]) -> Vec<Notice> {
    nlbytes::messages(datagram)
        .map_while(Result::ok)
        .filter_map(|m| notice(m.kind, m.payload))
        .collect()
}

fn notice(kind: u16, payload: &[u8]) -> Option<Notice> {
    match kind {
        RTM_NEWLINK | RTM_DELLINK => {
            let link = parse_link(payload)?;
            Some(Notice::Link {
                deleted: kind == RTM_DELLINK,
                index: link.index,
                name: link.name,
                group: link.group,
            })
        }
        // struct rtmsg (12 bytes; the protocol at 5), then attributes.
        RTM_DELROUTE => Some(Notice::RouteDeleted {
            protocol: *payload.get(5)?,
            oif: nlbytes::attributes(payload.get(12..)?)
                .find(|(k, _)| *k == RTA_OIF)
                .and_then(|(_, v)| nlbytes::u32_value(v)),
        }),
        // struct ndmsg (12 bytes; the interface at 4).
        RTM_DELNEIGH if payload.len() >= 12 => Some(Notice::NeighbourDeleted {
            ifindex: nlbytes::u32_at(payload, 4),
        }),
        _ => None,
    }
}

/// A sysctl of ours that the kernel announced (RTM_NEWNETCONF) with a value other than ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetconfDrift {
    /// `net.ipv4.ip_forward` (the `all` forwarding knob) went off.
    HostForwarding,
    /// `proxy_arp`, `rp_filter` or `forwarding` of this interface is not 1.
    Link(u32),
}

const RTM_NEWNETCONF: u16 = 80;
const RTNLGRP_IPV4_NETCONF: u32 = 24;
const RTNLGRP_IPV6_NETCONF: u32 = 25;
const NETCONFA_IFINDEX: u16 = 1;
const NETCONFA_FORWARDING: u16 = 2;
const NETCONFA_RP_FILTER: u16 = 3;
const NETCONFA_PROXY_NEIGH: u16 = 5;
const NETCONFA_IFINDEX_ALL: i32 = -1;

/// Reads the netconf notifications in one netlink datagram and returns the drifts they show.
/// The kernel announces IPv4's `forwarding`, `rp_filter` and `proxy_arp` (as `proxy_neigh`),
/// and IPv6's `forwarding` and `proxy_ndp` (as `proxy_neigh`), one at a time when they change,
/// and all values at once when an interface appears; the latter is skipped (a new interface is
/// set up by whoever made it: for our veths, the attach running right now). `proxy_delay`,
/// `accept_ra` and `accept_dad` are never announced; the periodic resync covers those.
/// netlink-packet-route does not decode these messages, hence the hand-written parser.
pub fn parse_netconf(datagram: &[u8]) -> Vec<NetconfDrift> {
    let mut drifts = vec![];
    for message in nlbytes::messages(datagram).map_while(Result::ok) {
        // struct netconfmsg { u8 ncm_family; } padded to 4 bytes, then attributes.
        let family = message.payload.first().copied().unwrap_or(0);
        let inet = family == libc::AF_INET as u8 || family == libc::AF_INET6 as u8;
        let Some(attributes) = message.payload.get(4..) else {
            continue;
        };
        if message.kind != RTM_NEWNETCONF || !inet {
            continue;
        }
        let (mut ifindex, mut wrong_forwarding, mut wrong_link) = (None, false, false);
        let mut values = 0;
        for (kind, value) in nlbytes::attributes(attributes) {
            let Some(value) = nlbytes::u32_value(value).map(|v| v as i32) else {
                continue;
            };
            values += (kind != NETCONFA_IFINDEX) as usize;
            match kind {
                NETCONFA_IFINDEX => ifindex = Some(value),
                NETCONFA_FORWARDING => wrong_forwarding |= value != 1,
                NETCONFA_RP_FILTER | NETCONFA_PROXY_NEIGH => wrong_link |= value != 1,
                _ => {}
            }
        }
        if values != 1 {
            continue;
        }
        match ifindex {
            Some(NETCONFA_IFINDEX_ALL) if wrong_forwarding => {
                drifts.push(NetconfDrift::HostForwarding)
            }
            Some(index) if index > 0 && (wrong_forwarding || wrong_link) => {
                drifts.push(NetconfDrift::Link(index as u32))
            }
            _ => {}
        }
    }
    drifts
}

/// A socket that receives the IPv4 and IPv6 netconf notifications of the agent's namespace.
pub fn netconf_events() -> io::Result<netlink_sys::TokioSocket> {
    use netlink_sys::AsyncSocket;
    let mut socket = netlink_sys::TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_ref().add_membership(RTNLGRP_IPV4_NETCONF)?;
    socket.socket_ref().add_membership(RTNLGRP_IPV6_NETCONF)?;
    Ok(socket)
}

/// The links the agent retired (moved to its retired group on detach, to be deleted in a
/// batch), learnt from the notifications themselves: what goes with them — their routes, then
/// the links — was the agent's own doing and needs no repair pass. With thousands of endpoints a
/// pass costs tens of milliseconds of the kernel's time (a link dump walks the namespace ids for
/// every veth), so a detach storm that set one off per batch would slow every detach.
#[derive(Debug, Default)]
pub struct Retiring {
    indexes: HashSet<u32>,
}

impl Retiring {
    /// The repair a notification calls for, if any (`tunnel`: the tunnel device's index, 0
    /// when there is none).
    pub fn classify(&mut self, notice: &Notice, tunnel: u32) -> Option<KernelEvent> {
        match notice {
            Notice::Link {
                deleted,
                index,
                name,
                group,
            } if name.starts_with(LINK_PREFIX) => {
                let retired = *group == RETIRED_GROUP;
                if !deleted {
                    if retired {
                        self.indexes.insert(*index);
                    }
                    return None;
                }
                let retired = self.indexes.remove(index) || retired;
                (!retired).then_some(KernelEvent::LinkDeleted)
            }
            Notice::RouteDeleted { protocol, oif } if *protocol == RT_PROTO_WEFT => {
                let through_retired = oif.is_some_and(|i| self.indexes.contains(&i));
                (!through_retired).then_some(KernelEvent::RouteDeleted)
            }
            // Neighbour and FDB entries of the tunnel device only: the host's other entries
            // come and go all the time.
            Notice::NeighbourDeleted { ifindex } if *ifindex != 0 && *ifindex == tunnel => {
                Some(KernelEvent::NeighbourDeleted)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::link::{LinkAttribute, LinkMessage};
    use netlink_packet_route::neighbour::NeighbourMessage;
    use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
    use netlink_packet_route::RouteNetlinkMessage as M;

    /// The notice a message makes, encoded as the kernel sends it by `netlink_packet_route`.
    fn notice_of(message: M) -> Notice {
        let mut message = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        let mut read = notices(&bytes);
        assert_eq!(read.len(), 1, "{read:?}");
        read.remove(0)
    }

    fn link(index: u32, name: &str, group: Option<u32>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        link.attributes.push(LinkAttribute::Mtu(1500));
        if let Some(group) = group {
            link.attributes.push(LinkAttribute::Group(group));
        }
        link
    }

    fn new_link(index: u32, name: &str, group: Option<u32>) -> Notice {
        notice_of(M::NewLink(link(index, name, group)))
    }

    fn del_link(index: u32, name: &str, group: Option<u32>) -> Notice {
        notice_of(M::DelLink(link(index, name, group)))
    }

    fn weft_route(oif: u32) -> Notice {
        let mut route = RouteMessage::default();
        route.header.protocol = RouteProtocol::Other(RT_PROTO_WEFT);
        route.attributes.push(RouteAttribute::Priority(5));
        route.attributes.push(RouteAttribute::Oif(oif));
        notice_of(M::DelRoute(route))
    }

    #[test]
    fn notifications_are_read_in_place() {
        assert_eq!(
            new_link(7, "weft7", Some(RETIRED_GROUP)),
            Notice::Link {
                deleted: false,
                index: 7,
                name: "weft7".into(),
                group: RETIRED_GROUP
            }
        );
        assert_eq!(
            weft_route(9),
            Notice::RouteDeleted {
                protocol: RT_PROTO_WEFT,
                oif: Some(9)
            }
        );
        let mut neighbour = NeighbourMessage::default();
        neighbour.header.ifindex = 12;
        assert_eq!(
            notice_of(M::DelNeighbour(neighbour)),
            Notice::NeighbourDeleted { ifindex: 12 }
        );
        // Other messages are no notice; a truncated one ends the datagram.
        assert!(notices(&[0u8; 10]).is_empty());
    }

    #[test]
    fn what_goes_with_a_retired_link_asks_for_no_repair() {
        let mut retiring = Retiring::default();
        // Someone else deletes a veth and a route of ours: repaired.
        assert_eq!(
            retiring.classify(&del_link(5, "weft5", Some(0)), 0),
            Some(KernelEvent::LinkDeleted)
        );
        assert_eq!(
            retiring.classify(&weft_route(5), 0),
            Some(KernelEvent::RouteDeleted)
        );
        // The agent retires veth 7: its routes and then the link go quietly.
        assert_eq!(
            retiring.classify(&new_link(7, "weft7", Some(RETIRED_GROUP)), 0),
            None
        );
        assert_eq!(retiring.classify(&weft_route(7), 0), None);
        assert_eq!(
            retiring.classify(&del_link(7, "weft7", Some(RETIRED_GROUP)), 0),
            None
        );
        // Once gone, its index may be reused by a link that is not retired.
        assert_eq!(
            retiring.classify(&weft_route(7), 0),
            Some(KernelEvent::RouteDeleted)
        );
        // Links that are not ours, and changes that are not retirements, are no event.
        assert_eq!(
            retiring.classify(&new_link(8, "eth1", Some(RETIRED_GROUP)), 0),
            None
        );
        assert_eq!(retiring.classify(&del_link(8, "eth1", None), 0), None);
        assert_eq!(retiring.classify(&new_link(9, "weft9", None), 0), None);
        assert_eq!(
            retiring.classify(&weft_route(9), 0),
            Some(KernelEvent::RouteDeleted)
        );
        // A neighbour entry of the tunnel device only.
        let gone = |ifindex| Notice::NeighbourDeleted { ifindex };
        assert_eq!(
            retiring.classify(&gone(4), 4),
            Some(KernelEvent::NeighbourDeleted)
        );
        assert_eq!(retiring.classify(&gone(5), 4), None);
        assert_eq!(retiring.classify(&gone(0), 0), None);
    }

    fn netconf(family: u8, attrs: &[(u16, i32)]) -> Vec<u8> {
        let len = 16 + 4 + attrs.len() * 8;
        let mut m = vec![];
        m.extend((len as u32).to_ne_bytes());
        m.extend(RTM_NEWNETCONF.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend([family, 0, 0, 0]);
        for (kind, value) in attrs {
            m.extend(8u16.to_ne_bytes());
            m.extend(kind.to_ne_bytes());
            m.extend(value.to_ne_bytes());
        }
        m
    }

    #[test]
    fn netconf_notifications_show_only_values_other_than_ours() {
        let inet = libc::AF_INET as u8;
        let ok = netconf(inet, &[(NETCONFA_IFINDEX, 7), (NETCONFA_PROXY_NEIGH, 1)]);
        assert!(parse_netconf(&ok).is_empty());
        let off = netconf(inet, &[(NETCONFA_IFINDEX, 7), (NETCONFA_RP_FILTER, 0)]);
        assert_eq!(parse_netconf(&off), vec![NetconfDrift::Link(7)]);
        let loose = netconf(inet, &[(NETCONFA_IFINDEX, 7), (NETCONFA_RP_FILTER, 2)]);
        assert_eq!(parse_netconf(&loose), vec![NetconfDrift::Link(7)]);
        let host = netconf(inet, &[(NETCONFA_IFINDEX, -1), (NETCONFA_FORWARDING, 0)]);
        assert_eq!(parse_netconf(&host), vec![NetconfDrift::HostForwarding]);
        // The `default` template (-2) and other families are not ours.
        let default = netconf(inet, &[(NETCONFA_IFINDEX, -2), (NETCONFA_FORWARDING, 0)]);
        assert!(parse_netconf(&default).is_empty());
        let bridge = netconf(
            libc::AF_BRIDGE as u8,
            &[(NETCONFA_IFINDEX, 7), (NETCONFA_FORWARDING, 0)],
        );
        assert!(parse_netconf(&bridge).is_empty());
        // IPv6: forwarding and proxy_ndp of a veth, and forwarding of `all`.
        let inet6 = libc::AF_INET6 as u8;
        let v6 = netconf(inet6, &[(NETCONFA_IFINDEX, 7), (NETCONFA_FORWARDING, 0)]);
        assert_eq!(parse_netconf(&v6), vec![NetconfDrift::Link(7)]);
        let ndp = netconf(inet6, &[(NETCONFA_IFINDEX, 7), (NETCONFA_PROXY_NEIGH, 0)]);
        assert_eq!(parse_netconf(&ndp), vec![NetconfDrift::Link(7)]);
        let all6 = netconf(inet6, &[(NETCONFA_IFINDEX, -1), (NETCONFA_FORWARDING, 0)]);
        assert_eq!(parse_netconf(&all6), vec![NetconfDrift::HostForwarding]);
        // A new interface is announced with all its values at once: not a change to judge.
        let appeared = netconf(
            inet,
            &[
                (NETCONFA_IFINDEX, 9),
                (NETCONFA_FORWARDING, 1),
                (NETCONFA_RP_FILTER, 0),
                (NETCONFA_PROXY_NEIGH, 0),
            ],
        );
        assert!(parse_netconf(&appeared).is_empty());
        // Several messages in one datagram; a truncated tail is ignored.
        let mut both = off.clone();
        both.extend(&host);
        both.extend(&ok[..10]);
        assert_eq!(
            parse_netconf(&both),
            vec![NetconfDrift::Link(7), NetconfDrift::HostForwarding]
        );
        assert!(parse_netconf(&[0u8; 3]).is_empty());
    }
}
