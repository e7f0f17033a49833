//! The kernel side of weft: veth pairs, addresses, neighbours, sysctls and `proto weft` routes,
//! all over rtnetlink (and /proc/sys for sysctls). Nothing here knows about etcd.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::netns::{NetlinkHandle, Netns, NetnsError};
use crate::sysctl;

/// The protocol number on every route the agent creates (`proto weft`); see
/// deploy/rt_protos.d/weft.conf.
pub const RT_PROTO_WEFT: u8 = 119;
/// The MAC of every host-side veth: containers reach their gateway at this address.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];
/// The gateway address every container routes through; answered by the host-side veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Prefix of every link the agent creates.
pub const LINK_PREFIX: &str = "weft";
/// Link group of retired veths awaiting deletion. Deleting a link waits for an RCU grace period
/// (~20 ms); deleting a whole group pays it once for all its links.
pub const RETIRED_GROUP: u32 = 0x7765;

const ENOENT: i32 = libc::ENOENT;
const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;
const ESRCH: i32 = libc::ESRCH;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("interface {ifname} already exists in netns {netns}")]
    IfnameTaken { ifname: String, netns: String },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// The errno of a netlink error, if it is one.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Netlink { what, source }
}

/// Where a `proto weft` route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteTarget {
    /// A local container: `dev <veth> scope link`.
    Dev(u32),
    /// A peer's block: `via <underlay ip>`.
    Via(Ipv4Addr),
    /// A local block: drop what no container claims.
    Blackhole,
}

/// One `proto weft` route as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelRoute {
    pub dst: Ipv4Network,
    pub target: RouteTarget,
}

/// Everything needed to wire one container.
#[derive(Debug, Clone)]
pub struct ContainerLink {
    pub host_ifname: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// The host's underlay interface, as found at start-up.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

/// Netlink access to the agent's own (host) namespace.
pub struct Dataplane {
    host: NetlinkHandle,
    /// None for a read-only observer (weftctl), which must not delete anything.
    reaper: Option<Reaper>,
    /// The kernel runs one dump at a time per netlink socket and answers a second with EBUSY;
    /// tasks sharing `host` (the reconciler, attaches, checks) take turns.
    dumping: tokio::sync::Mutex<()>,
}

/// Deletes retired links in the background, a whole batch per grace period, on its own thread
/// so that the wait blocks no async worker.
struct Reaper {
    wake: std::sync::mpsc::Sender<()>,
}

impl Reaper {
    fn start() -> io::Result<Self> {
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("weft-reaper".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(netlink) = NetlinkHandle::here() else {
                        tracing::error!("link reaper cannot open netlink; retired links stay");
                        return;
                    };
                    // A first pass clears links retired before a restart.
                    loop {
                        let delete = LinkUnspec::new_with_index(0)
                            .link_group(RETIRED_GROUP)
                            .build();
                        match netlink
                            .handle
                            .link()
                            .del_with_message(delete)
                            .execute()
                            .await
                        {
                            Ok(()) => {}
                            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot delete retired links"),
                        }
                        // Sleep until the next retirement; drain what queued up meanwhile.
                        if woken.recv().is_err() {
                            return;
                        }
                        while woken.try_recv().is_ok() {}
                    }
                });
            })?;
        Ok(Self { wake })
    }
}

impl Dataplane {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            host: NetlinkHandle::here()?,
            reaper: Some(Reaper::start()?),
            dumping: tokio::sync::Mutex::new(()),
        })
    }

    /// Netlink access for reading only: no reaper thread, nothing deleted behind the caller.
    pub fn observer() -> io::Result<Self> {
        Ok(Self {
            host: NetlinkHandle::here()?,
            reaper: None,
            dumping: tokio::sync::Mutex::new(()),
        })
    }

    /// Takes a container's veth out of service at once and has it deleted in the background:
    /// its /32 route goes now, the link joins the retired group. Returns false if there was no
    /// such link.
    pub async fn retire_link(&self, name: &str, ip: Ipv4Addr) -> Result<bool> {
        let Some(link) = link_by_name(self.handle(), name)
            .await
            .map_err(nl(format!("looking up {name}")))?
        else {
            return Ok(false);
        };
        let index = link.header.index;
        self.delete_route(&KernelRoute {
            dst: Ipv4Network::new(ip, 32).expect("/32"),
            target: RouteTarget::Dev(index),
        })
        .await?;
        let retire = LinkUnspec::new_with_index(index)
            .link_group(RETIRED_GROUP)
            .down()
            .build();
        match self.handle().link().set(retire).execute().await {
            Ok(()) => {}
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => return Ok(false),
            Err(e) => return Err(nl(format!("retiring {name}"))(e)),
        }
        if let Some(reaper) = &self.reaper {
            let _ = reaper.wake.send(());
        }
        Ok(true)
    }

    /// Whether a link is retired (awaiting deletion).
    pub fn is_retired(link: &LinkMessage) -> bool {
        link.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Group(g) if *g == RETIRED_GROUP))
    }

    fn handle(&self) -> &rtnetlink::Handle {
        &self.host.handle
    }

    /// Finds the underlay interface: `ifname` if given, else the interface of the default route.
    pub async fn underlay(&self, ifname: Option<&str>) -> Result<Underlay, String> {
        let name = match ifname {
            Some(name) => name.to_string(),
            None => {
                let index = self
                    .default_route_ifindex()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        "this host has no IPv4 default route, so the underlay interface cannot be \
                         guessed; pass --underlay-interface"
                            .to_string()
                    })?;
                link_name(&self.link_by_index(index).await.map_err(|e| e.to_string())?)
                    .ok_or("default route interface has no name")?
            }
        };
        let link = link_by_name(self.handle(), &name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("underlay interface {name} does not exist"))?;
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(1500);
        let ip = self
            .first_ipv4(link.header.index)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("underlay interface {name} has no IPv4 address"))?;
        Ok(Underlay {
            ifname: name,
            ip,
            mtu,
        })
    }

    async fn default_route_ifindex(&self) -> Result<Option<u32>> {
        let routes = self.dump_routes().await?;
        Ok(routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0 && r.header.table == 254)
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
    }

    async fn link_by_index(&self, index: u32) -> Result<LinkMessage> {
        self.handle()
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(nl(format!("looking up link {index}")))?
            .ok_or_else(|| DataplaneError::Io {
                what: format!("link {index}"),
                source: io::Error::from_raw_os_error(ENODEV),
            })
    }

    async fn first_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>> {
        use netlink_packet_route::address::AddressAttribute;
        let _turn = self.dumping.lock().await;
        let addrs = addresses_of(self.handle(), index, "").await?;
        Ok(addrs
            .iter()
            .flat_map(|m| &m.attributes)
            .find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            }))
    }

    /// Creates the veth pair with its peer born inside the container namespace, configures both
    /// ends and adds the container's /32 route. On failure the caller removes the host link.
    pub async fn wire(&self, netns: &Netns, link: &ContainerLink) -> Result<u32> {
        let inside = netns.netlink().await?;
        let inside = &inside.handle;
        // Optimistic: create first, look around only if a name is taken.
        let created = self.add_veth(netns, link).await;
        match created {
            Err(e) if errno(&e) == Some(EEXIST) => {
                // A host link of this name belongs to this container id (the name is derived
                // from it): a leftover of an interrupted attach, or a veth retired by a detach
                // moments ago and not reaped yet. Delete it (with its peer) and try again.
                self.delete_link(&link.host_ifname).await?;
                match self.add_veth(netns, link).await {
                    Err(e) if errno(&e) == Some(EEXIST) => {
                        return Err(DataplaneError::IfnameTaken {
                            ifname: link.ifname.clone(),
                            netns: netns.path().to_string(),
                        })
                    }
                    other => other.map_err(nl(format!("creating veth {}", link.host_ifname)))?,
                }
            }
            other => other.map_err(nl(format!("creating veth {}", link.host_ifname)))?,
        }

        configure_container_side(inside, link, netns.path()).await?;

        let host_index = link_by_name(self.handle(), &link.host_ifname)
            .await
            .map_err(nl(format!("looking up {}", link.host_ifname)))?
            .map(|m| m.header.index)
            .ok_or_else(|| DataplaneError::Io {
                what: format!("veth {} vanished after creation", link.host_ifname),
                source: io::Error::from_raw_os_error(ENODEV),
            })?;
        sysctl::configure_host_veth(&link.host_ifname).map_err(|source| DataplaneError::Io {
            what: format!("setting sysctls of {}", link.host_ifname),
            source,
        })?;
        self.replace_route(&KernelRoute {
            dst: Ipv4Network::new(link.ip, 32).expect("/32"),
            target: RouteTarget::Dev(host_index),
        })
        .await?;
        Ok(host_index)
    }

    /// Sets the container side up again (lo, address, routes, gateway neighbour) on a veth pair
    /// that exists; every step is idempotent.
    pub async fn rewire_inside(&self, netns: &Netns, link: &ContainerLink) -> Result<()> {
        let inside = netns.netlink().await?;
        configure_container_side(&inside.handle, link, netns.path()).await
    }

    /// What is wrong with the host side of an endpoint: its veth (present, up, not retired),
    /// the veth's sysctls and the container's /32 route through it. Empty when all is well.
    pub async fn check_host_side(&self, host_ifname: &str, ip: Ipv4Addr) -> Result<Vec<String>> {
        let mut problems = vec![];
        let Some(link) = link_by_name(self.handle(), host_ifname)
            .await
            .map_err(nl(format!("looking up {host_ifname}")))?
        else {
            problems.push(format!("host veth {host_ifname} is missing"));
            return Ok(problems);
        };
        if Self::is_retired(&link) {
            problems.push(format!("host veth {host_ifname} is being deleted"));
        }
        if !link.header.flags.contains(LinkFlags::Up) {
            problems.push(format!("host veth {host_ifname} is down"));
        }
        problems.extend(sysctl::check_host_veth(host_ifname));
        let wanted = KernelRoute {
            dst: Ipv4Network::new(ip, 32).expect("/32"),
            target: RouteTarget::Dev(link.header.index),
        };
        if !self.weft_routes().await?.contains(&wanted) {
            problems.push(format!("no route to {ip}/32 through {host_ifname}"));
        }
        Ok(problems)
    }

    /// Creates the veth pair with the peer born inside the container's namespace.
    async fn add_veth(&self, netns: &Netns, link: &ContainerLink) -> Result<(), rtnetlink::Error> {
        use std::os::fd::AsRawFd;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(link.ifname.clone())
            .address(link.mac.to_vec())
            .mtu(link.mtu)
            .setns_by_fd(netns.file().as_raw_fd())
            .build();
        // The host end is created up (one request fewer); the peer cannot be: it is registered
        // before its other half exists, and opening it then fails with ENOTCONN.
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(link.host_ifname.clone())
            .address(HOST_VETH_MAC.to_vec())
            .mtu(link.mtu)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle().link().add(veth).execute().await
    }

    /// Deletes a link by name (its veth peer goes with it). A missing link is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = link_by_name(self.handle(), name)
            .await
            .map_err(nl(format!("looking up {name}")))?
        else {
            return Ok(false);
        };
        match self.handle().link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(false),
            Err(e) => Err(nl(format!("deleting {name}"))(e)),
        }
    }

    /// The index of every `weft*` link in service (retired ones are on their way out), by name.
    pub async fn weft_links(&self) -> Result<BTreeMap<String, u32>> {
        let _turn = self.dumping.lock().await;
        let mut links = self.handle().link().get().execute();
        let mut found = BTreeMap::new();
        while let Some(msg) = links.try_next().await.map_err(nl("listing links"))? {
            if let Some(name) = link_name(&msg) {
                if name.starts_with(LINK_PREFIX) && !Self::is_retired(&msg) {
                    found.insert(name, msg.header.index);
                }
            }
        }
        Ok(found)
    }

    async fn dump_routes(&self) -> Result<Vec<RouteMessage>> {
        let _turn = self.dumping.lock().await;
        self.handle()
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))
    }

    /// Every IPv4 `proto weft` route of the main table.
    pub async fn weft_routes(&self) -> Result<Vec<KernelRoute>> {
        let routes = self.dump_routes().await?;
        Ok(routes.iter().filter_map(parse_weft_route).collect())
    }

    /// Adds or replaces a route (`ip route replace ... proto weft`).
    pub async fn replace_route(&self, route: &KernelRoute) -> Result<()> {
        self.handle()
            .route()
            .add(route_message(route))
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding route {}", describe_route(route))))
    }

    /// Deletes a route; one already gone is not an error.
    pub async fn delete_route(&self, route: &KernelRoute) -> Result<()> {
        match self
            .handle()
            .route()
            .del(route_message(route))
            .execute()
            .await
        {
            Err(e) if !matches!(errno(&e), Some(ESRCH) | Some(ENOENT)) => {
                Err(nl(format!("deleting route {}", describe_route(route)))(e))
            }
            _ => Ok(()),
        }
    }
}

/// Kernel changes that may need repair: one of our routes or links deleted.
pub enum KernelEvent {
    RouteDeleted,
    LinkDeleted,
}

/// Subscribes to link and IPv4 route notifications in the agent's namespace and forwards the
/// ones that touch what we own.
pub fn kernel_events() -> io::Result<(NetlinkHandle, tokio::sync::mpsc::Receiver<KernelEvent>)> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage as M;
    let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&[
        rtnetlink::MulticastGroup::Link,
        rtnetlink::MulticastGroup::Ipv4Route,
    ])?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        let forward = async move {
            while let Some((message, _)) = messages.next().await {
                let event = match message.payload {
                    NetlinkPayload::InnerMessage(M::DelRoute(route))
                        if route.header.protocol == RouteProtocol::Other(RT_PROTO_WEFT) =>
                    {
                        KernelEvent::RouteDeleted
                    }
                    NetlinkPayload::InnerMessage(M::DelLink(link))
                        if link_name(&link).is_some_and(|n| n.starts_with(LINK_PREFIX)) =>
                    {
                        KernelEvent::LinkDeleted
                    }
                    _ => continue,
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
const NETCONFA_IFINDEX: u16 = 1;
const NETCONFA_FORWARDING: u16 = 2;
const NETCONFA_RP_FILTER: u16 = 3;
const NETCONFA_PROXY_NEIGH: u16 = 5;
const NETCONFA_IFINDEX_ALL: i32 = -1;

/// Reads the IPv4 netconf notifications in one netlink datagram and returns the drifts they
/// show. The kernel announces `forwarding`, `rp_filter` and `proxy_arp` (as `proxy_neigh`) one
/// at a time when they change, and all values at once when an interface appears; the latter is
/// skipped (a new interface is set up by whoever made it: for our veths, the attach running
/// right now). `proxy_delay` and `accept_ra` are never announced; the periodic resync covers
/// those. netlink-packet-route does not decode these messages, hence the hand-written parser.
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
        if u16_at(message, 4) != RTM_NEWNETCONF || len < 20 || message[16] != libc::AF_INET as u8 {
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

/// A socket that receives the IPv4 netconf notifications of the agent's namespace.
pub fn netconf_events() -> io::Result<netlink_sys::TokioSocket> {
    use netlink_sys::AsyncSocket;
    let mut socket = netlink_sys::TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_ref().add_membership(RTNLGRP_IPV4_NETCONF)?;
    Ok(socket)
}

impl Dataplane {
    /// The name of interface `index`, if it exists.
    pub async fn link_name_of(&self, index: u32) -> Result<Option<String>> {
        match self.link_by_index(index).await {
            Ok(link) => Ok(link_name(&link)),
            Err(DataplaneError::Io { source, .. }) if source.raw_os_error() == Some(ENODEV) => {
                Ok(None)
            }
            Err(DataplaneError::Netlink { source, .. })
                if matches!(errno(&source), Some(ENODEV) | Some(ENOENT)) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// What was found inside a container's namespace.
#[derive(Debug, Default)]
pub struct InsideCheck {
    /// Whether the container's interface exists at all (if not, its veth pair is broken).
    pub interface_present: bool,
    /// What is wrong, one sentence each; empty when all is well.
    pub problems: Vec<String>,
}

/// Checks inside a container's namespace: `lo` up; `ifname` present and up, holding `ip`/32;
/// the gateway's on-link route, the default route through it and its permanent neighbour entry.
pub async fn check_container_side(
    netns: &Netns,
    ifname: &str,
    ip: Ipv4Addr,
) -> Result<InsideCheck> {
    use netlink_packet_route::address::AddressAttribute;
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
    let path = netns.path();
    let inside = netns.netlink().await?;
    let handle = &inside.handle;
    let mut problems = vec![];
    let lo = handle
        .link()
        .get()
        .match_index(1)
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("looking up lo in {path}")))?;
    if !lo.is_some_and(|lo| lo.header.flags.contains(LinkFlags::Up)) {
        problems.push(format!("lo is down in {path}"));
    }
    let Some(link) = link_by_name(handle, ifname)
        .await
        .map_err(nl(format!("looking up {ifname} in {path}")))?
    else {
        problems.push(format!("{ifname} is missing in {path}"));
        return Ok(InsideCheck {
            interface_present: false,
            problems,
        });
    };
    let index = link.header.index;
    if !link.header.flags.contains(LinkFlags::Up) {
        problems.push(format!("{ifname} is down in {path}"));
    }

    let addresses = addresses_of(handle, index, path).await?;
    let holds = addresses.iter().any(|m| {
        m.header.prefix_len == 32
            && m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip))
    });
    if !holds {
        problems.push(format!("{ifname} in {path} does not hold {ip}/32"));
    }

    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing routes in {path}")))?;
    let route_to = |prefix_len: u8, dst: Option<Ipv4Addr>, gateway: Option<Ipv4Addr>| {
        routes.iter().any(|r| {
            let attr_dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let attr_gateway = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            r.header.table == 254
                && r.header.destination_prefix_length == prefix_len
                && attr_dst == dst
                && attr_gateway == gateway
                && r.attributes.contains(&RouteAttribute::Oif(index))
        })
    };
    if !route_to(32, Some(GATEWAY), None) {
        problems.push(format!(
            "no on-link route to {GATEWAY} via {ifname} in {path}"
        ));
    }
    if !route_to(0, None, Some(GATEWAY)) {
        problems.push(format!("no default route via {GATEWAY} in {path}"));
    }

    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing neighbours in {path}")))?;
    let gateway_entry = neighbours.iter().any(|n| {
        n.header.ifindex == index
            && n.header.state == NeighbourState::Permanent
            && n.attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    GATEWAY,
                )))
            && n.attributes.contains(&NeighbourAttribute::LinkLayerAddress(
                HOST_VETH_MAC.to_vec(),
            ))
    });
    if !gateway_entry {
        problems.push(format!(
            "no permanent neighbour {GATEWAY} -> {} on {ifname} in {path}",
            format_mac(&HOST_VETH_MAC)
        ));
    }
    Ok(InsideCheck {
        interface_present: true,
        problems,
    })
}

/// The addresses of interface `index` (`netns`: where, for error messages; empty for the host).
/// The whole dump is read: a stream dropped halfway leaves netlink-proto with replies it cannot
/// deliver (and a warning in the log).
async fn addresses_of(
    handle: &rtnetlink::Handle,
    index: u32,
    netns: &str,
) -> Result<Vec<netlink_packet_route::address::AddressMessage>> {
    let place = if netns.is_empty() {
        String::new()
    } else {
        format!(" in {netns}")
    };
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing addresses of #{index}{place}")))
}

async fn configure_container_side(
    inside: &rtnetlink::Handle,
    link: &ContainerLink,
    netns: &str,
) -> Result<()> {
    let index = link_by_name(inside, &link.ifname)
        .await
        .map_err(nl(format!("looking up {} in {netns}", link.ifname)))?
        .map(|m| m.header.index)
        .ok_or_else(|| DataplaneError::Io {
            what: format!("{} missing in {netns} after creation", link.ifname),
            source: io::Error::from_raw_os_error(ENODEV),
        })?;
    // The gateway is on-link through eth0 and answered from a permanent neighbour entry, so it
    // works even where the host's proxy ARP would stay silent (no default route on the host).
    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(GATEWAY)
        .output_interface(index)
        .build();
    // Pipelined: the requests go out on one socket in this order without waiting for each
    // other's answers; the kernel handles them in order, so each still finds what the ones
    // before it made. lo is always the first device of a namespace (LOOPBACK_IFINDEX).
    let (lo, address, up, gateway, default, neighbour) = futures::join!(
        set_up(inside, 1),
        inside
            .address()
            .add(index, IpAddr::V4(link.ip), 32)
            .execute(),
        set_up(inside, index),
        inside.route().add(gateway_route).replace().execute(),
        inside.route().add(default_route).replace().execute(),
        inside
            .neighbours()
            .add(index, IpAddr::V4(GATEWAY))
            .link_layer_address(&HOST_VETH_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute(),
    );
    lo.map_err(nl(format!("bringing up lo in {netns}")))?;
    match address {
        Err(e) if errno(&e) != Some(EEXIST) => {
            return Err(nl(format!("adding {}/32 in {netns}", link.ip))(e))
        }
        _ => {}
    }
    up.map_err(nl(format!("bringing up {} in {netns}", link.ifname)))?;
    gateway.map_err(nl(format!("adding gateway route in {netns}")))?;
    default.map_err(nl(format!("adding default route in {netns}")))?;
    neighbour.map_err(nl(format!("adding gateway neighbour in {netns}")))?;
    Ok(())
}

async fn set_up(handle: &rtnetlink::Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// Looks a link up by name; `None` when it does not exist.
async fn link_by_name(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn route_message(route: &KernelRoute) -> RouteMessage {
    let builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix())
        .protocol(RouteProtocol::Other(RT_PROTO_WEFT));
    match route.target {
        RouteTarget::Dev(index) => builder.output_interface(index).scope(RouteScope::Link),
        RouteTarget::Via(gateway) => builder.gateway(gateway),
        RouteTarget::Blackhole => builder.kind(RouteType::BlackHole),
    }
    .build()
}

fn parse_weft_route(msg: &RouteMessage) -> Option<KernelRoute> {
    let header = &msg.header;
    if header.protocol != RouteProtocol::Other(RT_PROTO_WEFT)
        || header.address_family != AddressFamily::Inet
        || header.table != 254
    {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    let target = match (header.kind, gateway, oif) {
        (RouteType::BlackHole, _, _) => RouteTarget::Blackhole,
        (_, Some(gateway), _) => RouteTarget::Via(gateway),
        (_, None, Some(index)) => RouteTarget::Dev(index),
        _ => return None,
    };
    Some(KernelRoute {
        dst: Ipv4Network::new(dst, header.destination_prefix_length).ok()?,
        target,
    })
}

pub fn describe_route(route: &KernelRoute) -> String {
    match route.target {
        RouteTarget::Dev(index) => format!("{} dev #{index}", route.dst),
        RouteTarget::Via(gateway) => format!("{} via {gateway}", route.dst),
        RouteTarget::Blackhole => format!("blackhole {}", route.dst),
    }
}

/// The host-side veth name of a container: `weft` + 11 hex digits of a hash of its id.
pub fn host_ifname(container_id: &str) -> String {
    // FNV-1a, then a finalizer so that ids differing in one character differ in every digit:
    // stable across versions and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    format!("{LINK_PREFIX}{:011x}", hash >> 20)
}

/// A random locally administered unicast MAC for a container interface.
pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand_bytes();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

fn rand_bytes() -> [u8; 6] {
    let mut bytes = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    bytes
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_fit_the_kernel_limit_and_are_stable() {
        let name = host_ifname("web-1");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("weft"));
        assert_eq!(name, host_ifname("web-1"));
        assert_ne!(name, host_ifname("web-2"));
    }

    /// One RTM_NEWNETCONF message as the kernel builds it: header, netconfmsg, attributes.
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
        let v6 = netconf(
            libc::AF_INET6 as u8,
            &[(NETCONFA_IFINDEX, 7), (NETCONFA_FORWARDING, 0)],
        );
        assert!(parse_netconf(&v6).is_empty());
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

    #[test]
    fn macs_round_trip_and_are_local_unicast() {
        let mac = random_mac();
        assert_eq!(mac[0] & 0x03, 0x02);
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        assert_eq!(parse_mac("ee:ee:ee:ee:ee"), None);
        assert_eq!(parse_mac("ee:ee:ee:ee:ee:ee:ee"), None);
    }

    #[test]
    fn route_messages_parse_back() {
        for target in [
            RouteTarget::Dev(7),
            RouteTarget::Via("198.51.100.2".parse().unwrap()),
            RouteTarget::Blackhole,
        ] {
            let route = KernelRoute {
                dst: "10.65.0.64/26".parse().unwrap(),
                target,
            };
            assert_eq!(parse_weft_route(&route_message(&route)), Some(route));
        }
    }
}
