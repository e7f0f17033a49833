//! What the agent's jobs share: its configuration and host facts, the kernel and datastore
//! seams, this host's endpoints, the cluster view, the firewall and the metrics. Behaviour lives
//! with each job (`endpoints`, `reconcile`, `cluster`, `api`); this is only the state they meet
//! in.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use weft_etcd::records::{Encapsulation, EndpointRecord, HostRecord, PoolRecord};
use weft_etcd::ClusterView;

use crate::cluster::ClusterState;
use crate::config::Config;
use crate::endpoints::table::EndpointTable;
use crate::firewall::{self, FirewallSpec, FirewallSync, PoolRule, PortRule};
use crate::journal::Journal;
use crate::kernel::{Kernel, Underlay};
use crate::model::ContainerId;
use crate::policy::sets::SetBackend;
use crate::policy::PolicyState;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct Context {
    pub config: Config,
    pub underlay: Underlay,
    /// This host's registration (underlay address and subnet, VTEP MAC, tunnel address): the
    /// tunnel fields are set once a peer needs the tunnel.
    host: std::sync::RwLock<HostRecord>,
    pub kernel: Arc<dyn Kernel>,
    pub store: Arc<dyn Store>,
    pub endpoints: EndpointTable,
    pub cluster: ClusterState,
    pub firewall: FirewallSync,
    /// Network policy: the fabric's endpoints and policies, and the chains and sets applied.
    pub policy: PolicyState,
    pub metrics: Metrics,
    /// Block claims one at a time: concurrent attaches that find the blocks full wait for it.
    pub claim: tokio::sync::Mutex<()>,
    /// Wakes the reconciler for a pass soon.
    pub resync: Notify,
    /// This host's memory of the endpoints it wired.
    pub journal: Journal,
    /// The index of the tunnel device (0: none), for the kernel monitor.
    pub tunnel_index: Arc<std::sync::atomic::AtomicU32>,
    /// Services containers must not reach (with --protect-datastore).
    protected: Vec<std::net::SocketAddr>,
    /// What keeps this host from being fine (records that could not be registered); empty when
    /// all is well. Shown by Status; /readyz fails while it is not empty.
    problems: Mutex<Vec<String>>,
    /// This host's BGP speaker, with --bgp (set once at start).
    pub bgp: std::sync::OnceLock<crate::bgp::Speaker>,
}

/// The parts a context is built from.
pub struct Parts {
    pub config: Config,
    pub underlay: Underlay,
    pub host: HostRecord,
    pub kernel: Arc<dyn Kernel>,
    pub store: Arc<dyn Store>,
    pub firewall: Arc<dyn firewall::Backend>,
    pub endpoints: Vec<EndpointRecord>,
    pub cluster: ClusterView,
    pub pools: Vec<(String, PoolRecord)>,
    pub journal: Journal,
    /// Every endpoint and policy of the fabric, read at start.
    pub fabric: weft_etcd::FabricView,
    pub sets: Arc<dyn SetBackend>,
}

impl Context {
    pub fn new(parts: Parts) -> Self {
        let me = parts.config.host_name.clone();
        let protected = match parts.config.protect_datastore {
            true => protected_services(&parts.config),
            false => vec![],
        };
        Self {
            protected,
            tunnel_index: Default::default(),
            config: parts.config,
            underlay: parts.underlay,
            host: std::sync::RwLock::new(parts.host),
            kernel: parts.kernel,
            store: parts.store,
            endpoints: EndpointTable::new(parts.endpoints),
            cluster: ClusterState::new(me.as_str(), parts.cluster, parts.pools),
            firewall: FirewallSync::new(parts.firewall),
            policy: PolicyState::new(parts.fabric, parts.sets),
            metrics: Metrics::default(),
            claim: Default::default(),
            resync: Notify::new(),
            journal: parts.journal,
            problems: Mutex::default(),
            bgp: Default::default(),
        }
    }

    /// What keeps this host from being fine.
    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    /// Replaces the problems; returns the previous ones.
    pub fn set_problems(&self, problems: Vec<String>) -> Vec<String> {
        std::mem::replace(&mut *self.problems.lock().unwrap(), problems)
    }

    /// This host's registration as it stands.
    pub fn host(&self) -> HostRecord {
        self.host.read().unwrap().clone()
    }

    /// This host's tunnel address, once it has one.
    pub fn tunnel_ip(&self) -> Option<std::net::IpAddr> {
        self.host.read().unwrap().tunnel_ip
    }

    /// Records the tunnel address (and the VTEP MAC that goes with it).
    pub fn set_tunnel(&self, ip: std::net::IpAddr) {
        let mut host = self.host.write().unwrap();
        host.tunnel_ip = Some(ip);
        host.vtep_mac = Some(crate::model::vtep_mac(self.config.host_name.as_str()).to_string());
    }

    /// This host's name.
    pub fn me(&self) -> &str {
        self.config.host_name.as_str()
    }

    /// Whether an endpoint's host veth carries IPv6: on a host with an IPv6 pool, or for an
    /// endpoint holding an IPv6 address (one from before its pool left this host's settings).
    pub fn veth_has_ipv6(&self, record: &weft_etcd::records::EndpointRecord) -> bool {
        self.config.has_ipv6() || record.ipv6.is_some()
    }

    /// Asks the reconciler for a pass soon.
    pub fn request_resync(&self) {
        self.resync.notify_one();
    }

    /// The MTU of container interfaces: set by hand, or the underlay's, less the VXLAN header
    /// when the pool may encapsulate.
    pub fn mtu(&self) -> u32 {
        match (self.config.mtu, self.config.encapsulation()) {
            (Some(mtu), _) => mtu,
            (None, Encapsulation::None) => self.underlay.mtu,
            (None, _) => self.underlay.mtu - crate::model::VXLAN_OVERHEAD,
        }
    }

    /// This host's VXLAN device as it should be, when the host has a tunnel address.
    pub fn vxlan_device(&self) -> Option<crate::kernel::VxlanDevice> {
        Some(crate::kernel::VxlanDevice {
            vni: crate::model::VXLAN_VNI,
            port: crate::model::VXLAN_PORT,
            local: self.underlay.ip,
            underlay_index: self.underlay.index,
            mtu: self.underlay.mtu - crate::model::VXLAN_OVERHEAD,
            mac: self.host().vtep_mac.as_deref()?.parse().ok()?,
            address: self.host().tunnel_ip?,
        })
    }

    /// This host's underlay subnet: a peer in it is reached without a tunnel.
    pub fn subnet(&self) -> ipnetwork::IpNetwork {
        ipnetwork::IpNetwork::new(self.underlay.ip, self.underlay.prefix)
            .expect("a prefix read from the interface")
    }

    /// How each peer is reached, from the cluster view.
    pub fn peer_paths(
        &self,
        view: &ClusterView,
    ) -> std::collections::BTreeMap<String, crate::reconcile::plan::peers::PeerPath> {
        crate::reconcile::plan::peers::peer_paths(
            self.me(),
            self.subnet(),
            self.config.encapsulation(),
            &view.hosts,
        )
    }

    /// The name of the namespace the agent makes for a container given none.
    pub fn owned_netns_name(&self, id: &ContainerId) -> String {
        format!("weft-{}-{id}", self.me())
    }

    /// The path of the namespace the agent makes for a container given none.
    pub fn owned_netns_path(&self, id: &ContainerId) -> String {
        format!(
            "{}/{}",
            crate::kernel::netns::NETNS_DIR,
            self.owned_netns_name(id)
        )
    }

    /// What the firewall rules are made of now.
    pub fn firewall_spec(&self) -> FirewallSpec {
        let pools = self
            .cluster
            .pools()
            .into_iter()
            .map(|(name, pool)| PoolRule {
                name,
                cidr: pool.cidr,
                nat_outgoing: pool.nat_outgoing,
            })
            .collect();
        let mut ports = self.endpoints.flat_map(port_rules);
        // In a stable order: the table is a hash map.
        ports.sort();
        let vxlan_peers = (self.config.encapsulation() != Encapsulation::None).then(|| {
            self.cluster.with_view(|view| {
                let mut peers: Vec<std::net::IpAddr> = view
                    .hosts
                    .iter()
                    .filter(|(name, _)| name.as_str() != self.me())
                    .map(|(_, host)| host.underlay_ip)
                    .collect();
                peers.sort();
                peers.dedup();
                peers
            })
        });
        FirewallSpec {
            pools,
            ports,
            protected: self.protected.clone(),
            vxlan_peers,
            policy: self.policy.chains(),
        }
    }
}

/// The etcd endpoints this agent uses and its metrics listener. An endpoint named by a host
/// name is resolved once, at start.
fn protected_services(config: &Config) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut services: Vec<std::net::SocketAddr> = config
        .etcd
        .endpoints
        .iter()
        .filter_map(|url| {
            let authority = url.split("://").last()?.split('/').next()?;
            let with_port = match authority.rsplit_once(':') {
                Some((_, port)) if port.parse::<u16>().is_ok() => authority.to_string(),
                _ => format!("{authority}:2379"),
            };
            match with_port.to_socket_addrs() {
                Ok(addrs) => Some(addrs.collect::<Vec<_>>()),
                Err(e) => {
                    tracing::warn!(endpoint = %url, error = %e, "cannot resolve etcd endpoint; it is not protected");
                    None
                }
            }
        })
        .flatten()
        // etcd on this host's loopback may listen on every address too: protect its port on
        // every local address.
        .map(|a| match a.ip().is_loopback() {
            true => std::net::SocketAddr::from(([0, 0, 0, 0], a.port())),
            false => a,
        })
        .collect();
    // A loopback metrics listener is out of containers' reach already.
    services.extend(config.metrics_addr.filter(|a| !a.ip().is_loopback()));
    services.sort();
    services.dedup();
    services
}

/// The DNAT and hairpin rules an endpoint's published ports need: one per port and address (a
/// dual-stack container's ports answer on the host's addresses of both families).
pub fn port_rules(e: &EndpointRecord) -> Vec<PortRule> {
    // Records of this host were validated when written; one that is not is skipped.
    let Ok(container_id) = ContainerId::new(&e.container_id) else {
        return vec![];
    };
    e.addresses()
        .flat_map(|ip| {
            let container_id = container_id.clone();
            e.ports.iter().map(move |p| PortRule {
                container_id: container_id.clone(),
                ip,
                protocol: p.protocol,
                host_port: p.host_port,
                container_port: p.container_port,
            })
        })
        .collect()
}
