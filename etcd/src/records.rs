//! The JSON records stored under each key. Addresses are family-generic (`IpAddr`,
//! `IpNetwork`); both serialize as the plain text form ("10.65.0.1", "10.65.0.0/16").

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// How traffic between hosts of a pool crosses the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encapsulation {
    /// Plain routes to peers on the local subnet, VXLAN to the others (Calico's recommended
    /// mode).
    #[default]
    CrossSubnet,
    /// VXLAN to every peer.
    Vxlan,
    /// Plain routes only: peers off the local subnet are left to the underlay's routing.
    None,
}

impl Encapsulation {
    /// Whether traffic to a peer goes through the tunnel, by whether the peer is on this host's
    /// subnet. (Off the subnet without encapsulation, the underlay must carry it.)
    pub fn tunnels(self, same_subnet: bool) -> bool {
        match self {
            Encapsulation::Vxlan => true,
            Encapsulation::CrossSubnet => !same_subnet,
            Encapsulation::None => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encapsulation::CrossSubnet => "cross-subnet",
            Encapsulation::Vxlan => "vxlan",
            Encapsulation::None => "none",
        }
    }
}

impl std::fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Encapsulation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cross-subnet" => Ok(Encapsulation::CrossSubnet),
            "vxlan" => Ok(Encapsulation::Vxlan),
            "none" => Ok(Encapsulation::None),
            _ => Err(format!("{text:?}: use cross-subnet, vxlan or none")),
        }
    }
}

/// `pools/<name>`: cluster-wide pool configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub cidr: IpNetwork,
    /// Prefix length of the blocks carved from the pool.
    pub block_size: u8,
    pub nat_outgoing: bool,
    /// Pools stored before encapsulation existed read as the default.
    #[serde(default)]
    pub encapsulation: Encapsulation,
}

/// `hosts/<host>`: a host that joined the cluster; persistent until removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub underlay_ip: IpAddr,
    pub version: String,
    /// Unix seconds of the first registration.
    pub first_seen: u64,
    /// Prefix length of the underlay address on its interface (the host's subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_prefix: Option<u8>,
    /// MAC of the host's VXLAN device, when its pool may encapsulate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// Address of the host's VXLAN device (an address of the pool), idem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_ip: Option<IpAddr>,
    /// The host's IPv6 underlay address: its IPv6 blocks are routed via it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ipv6: Option<IpAddr>,
}

impl HostRecord {
    /// Whether `other`'s underlay address is on this host's subnet; hosts that did not record
    /// their prefix (older agents) count as one subnet, as they were then.
    pub fn shares_subnet_with(&self, other: &HostRecord) -> bool {
        let Some(prefix) = self.underlay_prefix else {
            return true;
        };
        ipnetwork::IpNetwork::new(self.underlay_ip, prefix)
            .map(|net| net.contains(other.underlay_ip))
            .unwrap_or(true)
    }
}

/// `alive/<host>`: present while the host's agent keeps its lease alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    pub boot_id: String,
    /// Unix seconds when the agent started.
    pub started: u64,
}

/// `blocks/<pool>/<addr-len>`: the host that owns a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub host: String,
}

/// `ips/<addr>`: the uniqueness guard of one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRecord {
    pub host: String,
    /// The endpoint holding it; empty for a host's tunnel address.
    pub container_id: String,
    /// The address of the host's VXLAN device, not a container's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tunnel: bool,
}

/// The transport protocol of a published port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    /// `tcp` or `udp`, any case; empty means tcp.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "" | "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol {text:?}: use tcp or udp")),
        }
    }
}

/// A published port of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRecord {
    pub protocol: Protocol,
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
    pub ip: IpAddr,
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
    /// Another weft interface of the namespace carries its default route; this one routes only
    /// the traffic from its own address (source-based routing in the container).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secondary: bool,
    /// The endpoint's labels, which network policy selects by (absent when empty, so records
    /// without labels keep their stored form).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The second address of a dual-stack endpoint (IPv6; `ip` is then its IPv4 address),
    /// written under its own `ips/` guard in the same transaction as `ip`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<IpAddr>,
}

impl EndpointRecord {
    /// Every address of the endpoint: `ip`, then the IPv6 one of a dual-stack endpoint.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.ipv6)
    }

    /// The endpoint's address of one family, if it has one.
    pub fn address_of(&self, v4: bool) -> Option<IpAddr> {
        self.addresses().find(|ip| ip.is_ipv4() == v4)
    }
}

pub fn encode<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_stored_form() {
        let stored = r#"{"container_id":"a","host":"h1","ip":"10.65.0.1","host_ifname":"weft0","ifname":"eth0","mac":"02:00:00:00:00:01","netns":"/run/netns/x","owns_netns":true,"ports":[{"protocol":"udp","host_port":53,"container_port":5353}],"created":7}"#;
        let record: EndpointRecord = serde_json::from_str(stored).unwrap();
        assert_eq!(record.ports[0].protocol, Protocol::Udp);
        assert_eq!(encode(&record), stored);
        assert_eq!(
            record.ipv6, None,
            "a record of before dual-stack has one address"
        );
        let dual = EndpointRecord {
            ipv6: Some("fd65::1".parse().unwrap()),
            ..record.clone()
        };
        let text = encode(&dual);
        assert!(text.ends_with(r#""created":7,"ipv6":"fd65::1"}"#), "{text}");
        assert_eq!(serde_json::from_str::<EndpointRecord>(&text).unwrap(), dual);
        assert_eq!(
            dual.addresses().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.65.0.1", "fd65::1"]
        );
        assert_eq!(dual.address_of(false), dual.ipv6);
        let pool = r#"{"cidr":"10.65.0.0/16","block_size":26,"nat_outgoing":true,"encapsulation":"vxlan"}"#;
        assert_eq!(
            encode(&serde_json::from_str::<PoolRecord>(pool).unwrap()),
            pool
        );
        // Pools stored before encapsulation existed read as the default.
        let older = r#"{"cidr":"10.65.0.0/16","block_size":26,"nat_outgoing":true}"#;
        let older: PoolRecord = serde_json::from_str(older).unwrap();
        assert_eq!(older.encapsulation, Encapsulation::CrossSubnet);
        let host = r#"{"underlay_ip":"198.51.100.1","version":"0.1.0","first_seen":7}"#;
        assert_eq!(
            encode(&serde_json::from_str::<HostRecord>(host).unwrap()),
            host
        );
    }

    #[test]
    fn protocols_parse_and_print() {
        assert_eq!("".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("sctp".parse::<Protocol>().is_err());
        assert_eq!(Protocol::Udp.to_string(), "udp");
    }
}
