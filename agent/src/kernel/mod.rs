//! The kernel seam: everything the agent does to links, addresses, routes, neighbours, sysctls
//! and namespaces goes through [`Kernel`]. [`netlink::Netlink`] is the real implementation
//! (rtnetlink and /proc/sys); [`fake::FakeKernel`] is an in-memory one for unit tests of the
//! logic above it. Nothing here knows about etcd.

pub mod events;
pub mod fake;
pub mod netlink;
pub mod netns;
pub mod nlbytes;
pub mod sysctl;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;

use async_trait::async_trait;

use crate::model::{IfName, Mac, Protocol, Route};
pub use netns::{NetnsError, NetnsId};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Creating a veth pair found a name taken: the host end's, or the container end's.
    #[error("veth {host_ifname} or interface {ifname} in netns {netns} already exists")]
    Exists {
        host_ifname: String,
        ifname: String,
        netns: String,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Everything needed to wire one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerLink {
    pub host_ifname: String,
    pub ifname: IfName,
    pub ip: IpAddr,
    /// The IPv6 address of a dual-stack container (`ip` is then its IPv4 address).
    pub ipv6: Option<IpAddr>,
    pub mac: Mac,
    pub mtu: u32,
    /// Another interface of the namespace carries the default route: this one gets routes for
    /// its own source address only (a rule and a table of its own).
    pub secondary: bool,
}

impl ContainerLink {
    /// Every address of the container: `ip`, then the IPv6 one of a dual-stack container.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.ipv6)
    }

    /// The container's address of one family, if it has one.
    pub fn address_of(&self, v4: bool) -> Option<IpAddr> {
        self.addresses().find(|ip| ip.is_ipv4() == v4)
    }
}

/// The host's underlay interface, as found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub ifname: String,
    pub index: u32,
    pub ip: IpAddr,
    /// Prefix length of `ip` on the interface: the host's subnet.
    pub prefix: u8,
    /// The interface's first global IPv6 address, if it has one: peers route this host's IPv6
    /// blocks via it.
    pub ipv6: Option<IpAddr>,
    pub mtu: u32,
}

/// The host's VXLAN device as wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub vni: u32,
    pub port: u16,
    /// The underlay address packets leave from.
    pub local: IpAddr,
    pub underlay_index: u32,
    pub mtu: u32,
    pub mac: Mac,
    /// The host's tunnel address (one of the pool's).
    pub address: IpAddr,
}

/// What the kernel holds of the VXLAN device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelState {
    pub index: u32,
    /// Whether the device is up with the wanted settings and address.
    pub matches: bool,
    /// Its permanent neighbour entries: (peer tunnel address, peer VTEP MAC).
    pub neighbours: BTreeSet<(IpAddr, Mac)>,
    /// Its permanent FDB entries: (peer VTEP MAC, peer underlay address).
    pub fdb: BTreeSet<(Mac, IpAddr)>,
}

/// What was found inside a container's namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InsideCheck {
    /// Whether the container's interface exists at all (if not, its veth pair is broken).
    pub interface_present: bool,
    /// What is wrong, one sentence each; empty when all is well.
    pub problems: Vec<String>,
}

/// The kernel operations of the agent. Host-namespace operations act on the agent's own
/// namespace; container operations name the container's namespace by path.
#[async_trait]
pub trait Kernel: Send + Sync + 'static {
    /// Finds the underlay interface: `ifname` if given, else the interface of the default route.
    async fn underlay(&self, ifname: Option<&str>) -> Result<Underlay, String>;
    /// Host-wide sysctls (`ip_forward`, and IPv6 forwarding when the host has an IPv6 pool);
    /// returns how many had to change.
    fn configure_host(&self, ipv6: bool) -> io::Result<usize>;

    /// The index of every `weft*` link in service (retired ones are on their way out), by name.
    async fn links(&self) -> Result<BTreeMap<String, u32>>;
    /// As `links`, keeping what the listing shows of each veth's settings for the
    /// `configure_listed_veth` checks that follow it (a full pass).
    async fn links_with_settings(&self) -> Result<BTreeMap<String, u32>> {
        self.links().await
    }
    /// The name of interface `index`, if it exists.
    async fn link_name(&self, index: u32) -> Result<Option<String>>;
    /// Whether a link is a veth whose peer lives in another namespace (a container's, then).
    async fn peer_elsewhere(&self, name: &str) -> Result<bool>;
    /// Deletes a link by name (its veth peer goes with it). A missing link is not an error.
    async fn delete_link(&self, name: &str) -> Result<bool>;
    /// Takes a container's veth out of service now (its route goes, the link is retired) and has
    /// it deleted in the background. Returns false if there was no such link.
    async fn retire_link(&self, name: &str, ip: IpAddr) -> Result<bool>;
    /// The per-veth sysctls of a host veth; returns how many had to change. `ipv6`: the veth
    /// carries IPv6 (the host has an IPv6 pool, or its endpoint an IPv6 address); without, IPv6
    /// is off on it.
    fn configure_veth(&self, name: &str, ipv6: bool) -> io::Result<usize>;
    /// As `configure_veth`, right after `links_with_settings()`: the settings that listing
    /// showed with their value already are not read again (a full pass checks thousands of
    /// veths this way).
    fn configure_listed_veth(&self, name: &str, ipv6: bool) -> io::Result<usize> {
        self.configure_veth(name, ipv6)
    }

    /// Every `proto weft` route of the main table.
    async fn routes(&self) -> Result<Vec<Route>>;
    /// Adds or replaces a route (`ip route replace ... proto weft`).
    async fn replace_route(&self, route: &Route) -> Result<()>;
    /// Deletes a route; one already gone is not an error.
    async fn delete_route(&self, route: &Route) -> Result<()>;

    /// Whether a socket of the host (the agent's namespace) listens on this port: a TCP socket
    /// in LISTEN, or any bound UDP socket.
    fn listening(&self, protocol: Protocol, port: u16) -> io::Result<bool>;

    /// The VXLAN device, if it exists (compared with `wanted` when given).
    async fn tunnel(&self, wanted: Option<&VxlanDevice>) -> Result<Option<TunnelState>>;
    /// Makes the VXLAN device as wanted; returns its index.
    async fn ensure_tunnel(&self, wanted: &VxlanDevice) -> Result<u32>;
    /// Removes the VXLAN device (its routes, neighbours and FDB entries go with it).
    async fn delete_tunnel(&self) -> Result<bool>;
    /// Adds (replacing) or deletes a permanent neighbour on the tunnel device.
    async fn tunnel_neighbour(&self, index: u32, ip: IpAddr, mac: Mac, add: bool) -> Result<()>;
    /// Adds (replacing) or deletes a permanent FDB entry on the tunnel device.
    async fn tunnel_fdb(&self, index: u32, mac: Mac, dst: IpAddr, add: bool) -> Result<()>;

    /// Opens and vets a container namespace (a network namespace other than the agent's own or
    /// the machine's) and returns its identity.
    fn vet_netns(&self, path: &str) -> Result<NetnsId, NetnsError>;
    /// Creates a named namespace owned by the agent, replacing a leftover of that name (the
    /// agent only names namespaces of containers it holds no endpoint for); returns its path.
    async fn create_netns(&self, name: &str) -> Result<String, NetnsError>;
    /// The paths of the named namespaces whose name starts with `prefix`.
    fn named_namespaces(&self, prefix: &str) -> Vec<String>;
    /// Deletes a namespace the agent created. A missing one is not an error.
    fn delete_netns(&self, path: &str) -> io::Result<()>;

    /// Creates the veth pair with its peer born inside the container namespace, configures both
    /// ends and adds the container's host route. Returns the host end's index. A name already
    /// taken is [`KernelError::Exists`]; on any other failure the caller removes the host link.
    async fn wire(&self, netns: &str, link: &ContainerLink) -> Result<u32>;
    /// Sets the container side up again on a veth pair that exists; idempotent.
    async fn rewire_inside(&self, netns: &str, link: &ContainerLink) -> Result<()>;
    /// Removes what the container side holds beyond its interface (the source rule of a
    /// secondary interface): the interface itself goes with its veth. A namespace that is gone
    /// is not an error.
    async fn unwire_inside(&self, netns: &str, link: &ContainerLink) -> Result<()>;
    /// What is wrong inside the container's namespace.
    async fn check_inside(&self, netns: &str, link: &ContainerLink) -> Result<InsideCheck>;
    /// What is wrong with the host side of an endpoint: its veth, its sysctls, its routes (one
    /// per address).
    async fn check_host_side(&self, host_ifname: &str, ips: &[IpAddr]) -> Result<Vec<String>>;
}
