//! The real kernel: rtnetlink in the agent's namespace and, through namespace-bound sockets, in
//! containers' namespaces; /proc/sys for sysctls.

mod container;
mod container_v6;
mod link_dump;
mod links;
mod neigh_parms;
mod routes;
mod sockets;
mod tunnel;

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};

use crate::kernel::netns::{self, NetlinkHandle, Netns, NetnsError, NetnsId};
use crate::kernel::{
    sysctl, ContainerLink, InsideCheck, Kernel, KernelError, Result, TunnelState, Underlay,
    VxlanDevice,
};
use crate::model::{Mac, Protocol, Route, RouteTarget};

/// The errno of a netlink error, if it is one.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Netlink { what, source }
}

/// Netlink access to the agent's own (host) namespace.
pub struct Netlink {
    host: NetlinkHandle,
    /// None for a read-only observer, which must not delete anything behind the caller.
    reaper: Option<links::Reaper>,
    /// The kernel runs one dump at a time per netlink socket and answers a second with EBUSY;
    /// tasks sharing `host` (the reconciler, attaches, checks) take turns.
    dumping: tokio::sync::Mutex<()>,
    /// Our veths' settings as the last `links_with_settings` dump showed them, for
    /// `configure_listed_veth`: a full pass, which lists the links right before it checks the
    /// settings, reads from files only what the dump does not show right. Each entry serves one
    /// check; everything else (an attach, a netconf notification) reads the files.
    dumped_settings: std::sync::Mutex<std::collections::HashMap<String, sysctl::Known>>,
    /// The socket of link dumps, opened with the others in the host's namespace (a socket's
    /// namespace is fixed when it is opened); dumps run on a blocking thread.
    link_dumper: Arc<std::sync::Mutex<link_dump::LinkDumper>>,
    /// Whether this host routes IPv6 to its containers (has an IPv6 pool): its veths then get
    /// the IPv6 settings too.
    ipv6: bool,
}

impl Netlink {
    pub fn new(ipv6: bool) -> io::Result<Self> {
        Ok(Self {
            host: NetlinkHandle::here()?,
            reaper: Some(links::Reaper::start()?),
            dumping: tokio::sync::Mutex::new(()),
            dumped_settings: Default::default(),
            link_dumper: Arc::new(std::sync::Mutex::new(link_dump::LinkDumper::open()?)),
            ipv6,
        })
    }

    fn handle(&self) -> &rtnetlink::Handle {
        &self.host.handle
    }

    /// The first address of a family (global, for IPv6) on an interface, with its prefix length.
    async fn first_address(&self, index: u32, v4: bool) -> Result<Option<(IpAddr, u8)>> {
        let _turn = self.dumping.lock().await;
        let addrs = container::addresses_of(self.handle(), index, "").await?;
        Ok(addrs.iter().find_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                // An IPv6 link-local address is no underlay address: peers cannot route to it.
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip)
                    if ip.is_ipv4() == v4 && !is_link_local(ip) =>
                {
                    Some((*ip, m.header.prefix_len))
                }
                _ => None,
            })
        }))
    }

    async fn underlay_name(&self, ifname: Option<&str>) -> Result<String, String> {
        if let Some(name) = ifname {
            return Ok(name.to_string());
        }
        let index = self
            .default_route_ifindex()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                "this host has no IPv4 default route, so the underlay interface cannot be \
                 guessed; pass --underlay-interface"
                    .to_string()
            })?;
        self.link_by_index(index)
            .await
            .map_err(|e| e.to_string())?
            .as_ref()
            .and_then(links::link_name)
            .ok_or_else(|| "default route interface has no name".to_string())
    }
}

#[async_trait]
impl Kernel for Netlink {
    async fn underlay(&self, ifname: Option<&str>) -> Result<Underlay, String> {
        let name = self.underlay_name(ifname).await?;
        let link = links::link_by_name(self.handle(), &name)
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
        let (ip, prefix) = self
            .first_address(link.header.index, true)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("underlay interface {name} has no IPv4 address"))?;
        let ipv6 = self
            .first_address(link.header.index, false)
            .await
            .map_err(|e| e.to_string())?
            .map(|(ip, _)| ip);
        Ok(Underlay {
            ifname: name,
            index: link.header.index,
            ip,
            prefix,
            ipv6,
            mtu,
        })
    }

    fn configure_host(&self, ipv6: bool) -> io::Result<usize> {
        sysctl::configure_host(ipv6)
    }

    async fn links(&self) -> Result<BTreeMap<String, u32>> {
        self.weft_links(false).await
    }

    async fn links_with_settings(&self) -> Result<BTreeMap<String, u32>> {
        self.weft_links(true).await
    }

    async fn link_name(&self, index: u32) -> Result<Option<String>> {
        Ok(self
            .link_by_index(index)
            .await?
            .as_ref()
            .and_then(links::link_name))
    }

    async fn peer_elsewhere(&self, name: &str) -> Result<bool> {
        let link = links::link_by_name(self.handle(), name)
            .await
            .map_err(nl(format!("looking up {name}")))?;
        Ok(link.is_some_and(|l| {
            l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)))
        }))
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        self.remove_link(name).await
    }

    async fn retire_link(&self, name: &str, ip: IpAddr) -> Result<bool> {
        self.retire(name, ip).await
    }

    fn configure_veth(&self, name: &str, ipv6: bool) -> io::Result<usize> {
        sysctl::configure_host_veth(name, ipv6)
    }

    fn configure_listed_veth(&self, name: &str, ipv6: bool) -> io::Result<usize> {
        let known = self.dumped_settings.lock().unwrap().remove(name);
        sysctl::configure_host_veth_knowing(name, ipv6, &known.unwrap_or_default())
    }

    async fn routes(&self) -> Result<Vec<Route>> {
        self.weft_routes().await
    }

    async fn replace_route(&self, route: &Route) -> Result<()> {
        self.replace(route).await
    }

    async fn delete_route(&self, route: &Route) -> Result<()> {
        self.delete(route).await
    }

    async fn tunnel(&self, wanted: Option<&VxlanDevice>) -> Result<Option<TunnelState>> {
        self.read_tunnel(wanted).await
    }

    async fn ensure_tunnel(&self, wanted: &VxlanDevice) -> Result<u32> {
        self.make_tunnel(wanted).await
    }

    async fn delete_tunnel(&self) -> Result<bool> {
        self.remove_link(crate::model::TUNNEL_DEVICE).await
    }

    async fn tunnel_neighbour(&self, index: u32, ip: IpAddr, mac: Mac, add: bool) -> Result<()> {
        self.neighbour(index, ip, mac, add).await
    }

    async fn tunnel_fdb(&self, index: u32, mac: Mac, dst: IpAddr, add: bool) -> Result<()> {
        self.fdb(index, mac, dst, add).await
    }

    fn listening(&self, protocol: Protocol, port: u16) -> io::Result<bool> {
        sockets::listening(protocol, port)
    }

    fn vet_netns(&self, path: &str) -> Result<NetnsId, NetnsError> {
        Netns::open(path).map(|ns| ns.id())
    }

    async fn create_netns(&self, name: &str) -> Result<String, NetnsError> {
        let stale = netns::named_path(name);
        netns::delete_named(&stale).map_err(|source| NetnsError::Create {
            path: stale.display().to_string(),
            source,
        })?;
        netns::create_named(name)
            .await
            .map(|path| path.display().to_string())
    }

    fn named_namespaces(&self, prefix: &str) -> Vec<String> {
        netns::named_with_prefix(prefix)
    }

    fn delete_netns(&self, path: &str) -> io::Result<()> {
        netns::delete_named(std::path::Path::new(path))
    }

    async fn wire(&self, netns: &str, link: &ContainerLink) -> Result<u32> {
        let netns = Netns::open(netns)?;
        let inside = netns.netlink().await?;
        match self.add_veth(&netns, link).await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                return Err(KernelError::Exists {
                    host_ifname: link.host_ifname.clone(),
                    ifname: link.ifname.to_string(),
                    netns: netns.path().to_string(),
                })
            }
            other => other.map_err(nl(format!("creating veth {}", link.host_ifname)))?,
        }
        // Before the container end comes up: with IPv6, the host end gets its link-local
        // address (the IPv6 gateway) when its carrier does, and must take it without DAD;
        // without, IPv6 is off on it before the carrier could set any of it up.
        let ipv6 = self.ipv6 || link.ipv6.is_some();
        sysctl::set_new_host_veth(&link.host_ifname, ipv6).map_err(|source| KernelError::Io {
            what: format!("setting sysctls of {}", link.host_ifname),
            source,
        })?;
        container::configure(&inside.handle, link, netns.path()).await?;
        let host_index = self.index_of(&link.host_ifname).await?;
        for ip in link.addresses() {
            self.replace(&Route::host(ip, RouteTarget::Dev(host_index)))
                .await?;
        }
        Ok(host_index)
    }

    async fn rewire_inside(&self, netns: &str, link: &ContainerLink) -> Result<()> {
        let netns = Netns::open(netns)?;
        let inside = netns.netlink().await?;
        container::configure(&inside.handle, link, netns.path()).await
    }

    async fn unwire_inside(&self, netns: &str, link: &ContainerLink) -> Result<()> {
        if !link.secondary {
            return Ok(());
        }
        let netns = match Netns::open(netns) {
            Ok(netns) => netns,
            Err(NetnsError::Missing { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let inside = netns.netlink().await?;
        for ip in link.addresses() {
            container::remove_source_rules(&inside.handle, ip, None, netns.path()).await?;
        }
        Ok(())
    }

    async fn check_inside(&self, netns: &str, link: &ContainerLink) -> Result<InsideCheck> {
        let netns = Netns::open(netns)?;
        let inside = netns.netlink().await?;
        container::check(&inside.handle, netns.path(), link).await
    }

    async fn check_host_side(&self, host_ifname: &str, ips: &[IpAddr]) -> Result<Vec<String>> {
        let mut problems = vec![];
        let Some(link) = links::link_by_name(self.handle(), host_ifname)
            .await
            .map_err(nl(format!("looking up {host_ifname}")))?
        else {
            problems.push(format!("host veth {host_ifname} is missing"));
            return Ok(problems);
        };
        if links::is_retired(&link) {
            problems.push(format!("host veth {host_ifname} is being deleted"));
        }
        if !link.header.flags.contains(LinkFlags::Up) {
            problems.push(format!("host veth {host_ifname} is down"));
        }
        let ipv6 = self.ipv6 || ips.iter().any(IpAddr::is_ipv6);
        problems.extend(sysctl::check_host_veth(host_ifname, ipv6));
        let routes = self.weft_routes().await?;
        for ip in ips {
            let wanted = Route::host(*ip, RouteTarget::Dev(link.header.index));
            if !routes.contains(&wanted) {
                problems.push(format!("no route to {} through {host_ifname}", wanted.dst));
            }
        }
        Ok(problems)
    }
}

/// Whether `ip` is an IPv6 link-local address (fe80::/10).
fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}
