//! Kernel notifications the agent reacts to: deletions of its routes and links (repaired by a
//! reconciliation pass), and sysctl changes announced as RTM_NEWNETCONF (put back at once).

use std::collections::HashSet;
use std::io;

use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteProtocol};
use netlink_packet_route::RouteNetlinkMessage;

use crate::kernel::netns::NetlinkHandle;
use crate::model::{LINK_PREFIX, RETIRED_GROUP, RT_PROTO_WEFT};

/// Kernel changes that may need repair: one of our routes, links or permanent neighbour (and
/// FDB) entries deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    RouteDeleted,
    LinkDeleted,
    NeighbourDeleted,
}

/// Subscribes to link and route notifications in the agent's namespace and forwards the
/// ones that touch what we own.
/// `tunnel` holds the index of the tunnel device (0 when there is none), kept current by the
/// reconciler.
pub fn kernel_events(
    tunnel: std::sync::Arc<std::sync::atomic::AtomicU32>,
) -> io::Result<(NetlinkHandle, tokio::sync::mpsc::Receiver<KernelEvent>)> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&[
        rtnetlink::MulticastGroup::Link,
        rtnetlink::MulticastGroup::Ipv4Route,
        rtnetlink::MulticastGroup::Ipv6Route,
        rtnetlink::MulticastGroup::Neigh,
    ])?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        let forward = async move {
            let mut retiring = Retiring::default();
            while let Some((message, _)) = messages.next().await {
                let NetlinkPayload::InnerMessage(message) = message.payload else {
                    continue;
                };
                let tunnel = tunnel.load(std::sync::atomic::Ordering::Relaxed);
                let Some(event) = retiring.classify(&message, tunnel) else {
                    continue;
                };
                // A full channel already holds a pending repair; dropping is fine.
                let _ = tx.try_send(event);
            }
        };
        tokio::join!(connection, forward);
    });
    Ok((NetlinkHandle { handle, task }, rx))
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
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let i32_at = |b: &[u8], i: usize| i32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let align = |n: usize| (n + 3) & !3;
    let mut drifts = vec![];
    let mut offset = 0;
    while offset + 16 <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[offset..offset + 4].try_into().unwrap()) as usize;
        if len < 16 || offset + len > datagram.len() {
            break;
        }
        let message = &datagram[offset..offset + len];
        offset += align(len);
        // struct netconfmsg { u8 ncm_family; } padded to 4 bytes, then attributes.
        let family = message.get(16).copied().unwrap_or(0);
        let inet = family == libc::AF_INET as u8 || family == libc::AF_INET6 as u8;
        if u16_at(message, 4) != RTM_NEWNETCONF || len < 20 || !inet {
            continue;
        }
        let (mut ifindex, mut wrong_forwarding, mut wrong_link) = (None, false, false);
        let mut values = 0;
        let mut at = 20;
        while at + 4 <= message.len() {
            let attr_len = u16_at(message, at) as usize;
            if attr_len < 4 || at + attr_len > message.len() {
                break;
            }
            let kind = u16_at(message, at + 2);
            if attr_len >= 8 {
                let value = i32_at(message, at + 4);
                values += (kind != NETCONFA_IFINDEX) as usize;
                match kind {
                    NETCONFA_IFINDEX => ifindex = Some(value),
                    NETCONFA_FORWARDING => wrong_forwarding |= value != 1,
                    NETCONFA_RP_FILTER | NETCONFA_PROXY_NEIGH => wrong_link |= value != 1,
                    _ => {}
                }
            }
            at += align(attr_len);
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

fn link_is_ours(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if n.starts_with(LINK_PREFIX)))
}

fn is_retired(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Group(g) if *g == RETIRED_GROUP))
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
    pub fn classify(&mut self, message: &RouteNetlinkMessage, tunnel: u32) -> Option<KernelEvent> {
        use RouteNetlinkMessage as M;
        match message {
            M::NewLink(link) if link_is_ours(link) && is_retired(link) => {
                self.indexes.insert(link.header.index);
                None
            }
            M::DelLink(link) if link_is_ours(link) => {
                let retired = self.indexes.remove(&link.header.index) || is_retired(link);
                (!retired).then_some(KernelEvent::LinkDeleted)
            }
            M::DelRoute(route) if route.header.protocol == RouteProtocol::Other(RT_PROTO_WEFT) => {
                let through_retired = route
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if self.indexes.contains(i)));
                (!through_retired).then_some(KernelEvent::RouteDeleted)
            }
            // Neighbour and FDB entries of the tunnel device only: the host's other entries
            // come and go all the time.
            M::DelNeighbour(neighbour)
                if neighbour.header.ifindex != 0 && neighbour.header.ifindex == tunnel =>
            {
                Some(KernelEvent::NeighbourDeleted)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, group: Option<u32>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        if let Some(group) = group {
            link.attributes.push(LinkAttribute::Group(group));
        }
        link
    }

    fn weft_route(oif: u32) -> RouteNetlinkMessage {
        let mut route = netlink_packet_route::route::RouteMessage::default();
        route.header.protocol = RouteProtocol::Other(RT_PROTO_WEFT);
        route.attributes.push(RouteAttribute::Oif(oif));
        RouteNetlinkMessage::DelRoute(route)
    }

    #[test]
    fn what_goes_with_a_retired_link_asks_for_no_repair() {
        use RouteNetlinkMessage as M;
        let mut retiring = Retiring::default();
        // Someone else deletes a veth and a route of ours: repaired.
        assert_eq!(
            retiring.classify(&M::DelLink(link(5, "weft5", Some(0))), 0),
            Some(KernelEvent::LinkDeleted)
        );
        assert_eq!(
            retiring.classify(&weft_route(5), 0),
            Some(KernelEvent::RouteDeleted)
        );
        // The agent retires veth 7: its routes and then the link go quietly.
        assert_eq!(
            retiring.classify(&M::NewLink(link(7, "weft7", Some(RETIRED_GROUP))), 0),
            None
        );
        assert_eq!(retiring.classify(&weft_route(7), 0), None);
        assert_eq!(
            retiring.classify(&M::DelLink(link(7, "weft7", Some(RETIRED_GROUP))), 0),
            None
        );
        // Once gone, its index may be reused by a link that is not retired.
        assert_eq!(
            retiring.classify(&weft_route(7), 0),
            Some(KernelEvent::RouteDeleted)
        );
        // Links that are not ours, and changes that are not retirements, are no event.
        assert_eq!(
            retiring.classify(&M::NewLink(link(8, "eth1", Some(RETIRED_GROUP))), 0),
            None
        );
        assert_eq!(
            retiring.classify(&M::DelLink(link(8, "eth1", None)), 0),
            None
        );
        assert_eq!(
            retiring.classify(&M::NewLink(link(9, "weft9", None)), 0),
            None
        );
        assert_eq!(
            retiring.classify(&weft_route(9), 0),
            Some(KernelEvent::RouteDeleted)
        );
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
