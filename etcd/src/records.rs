//! The JSON records stored under each key.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// `pools/<name>`: cluster-wide pool configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub cidr: Ipv4Network,
    /// Prefix length of the blocks carved from the pool.
    pub block_size: u8,
    pub nat_outgoing: bool,
}

/// `hosts/<host>`: a host that joined the cluster; persistent until removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub underlay_ip: Ipv4Addr,
    pub version: String,
    /// Unix seconds of the first registration.
    pub first_seen: u64,
}

/// `alive/<host>`: present while the host's agent keeps its lease alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    pub boot_id: String,
    /// Unix seconds when the agent started.
    pub started: u64,
}

/// `blocks/<pool>/<a.b.c.d-len>`: the host that owns a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub host: String,
}

/// `ips/<a.b.c.d>`: the uniqueness guard of one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRecord {
    pub host: String,
    pub container_id: String,
}

/// A published port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRecord {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// `ports/<host>/<proto>/<port>`: a host-port reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOwner {
    pub container_id: String,
}

/// `endpoints/<host>/<container-id>`: one attached container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    pub host: String,
    pub ip: Ipv4Addr,
    /// Name of the host end of the veth.
    pub host_ifname: String,
    /// Name of the interface inside the container.
    pub ifname: String,
    /// MAC of the container's interface, chosen by the agent before the link is created.
    pub mac: String,
    /// Path of the container's network namespace.
    pub netns: String,
    /// True when the agent created the namespace and must delete it on detach.
    pub owns_netns: bool,
    #[serde(default)]
    pub ports: Vec<PortRecord>,
    /// Unix seconds.
    pub created: u64,
}

pub fn encode<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records always serialize")
}
