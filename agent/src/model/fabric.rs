//! The fabric's fixed facts, defined once: the gateway every container uses, the MAC that
//! answers it, the route protocol and link names the agent owns, and how a veth is named.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::model::ContainerId;

/// The address every container routes through; answered by the host end of its veth.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway of every container: the EUI-64 link-local address of `HOST_VETH_MAC`, which
/// the host end of every veth holds.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The MAC of every host-side veth: containers reach their gateway at this address.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];
/// The protocol number on every route the agent creates (`proto weft`); see
/// deploy/rt_protos.d/weft.conf.
pub const RT_PROTO_WEFT: u8 = 119;
/// Prefix of every link the agent creates.
pub const LINK_PREFIX: &str = "weft";
/// The host's VXLAN device. Its name has a '.', which no container veth name has.
pub const TUNNEL_DEVICE: &str = "weft.vxlan";
/// VXLAN network identifier and UDP port of the fabric's tunnels.
pub const VXLAN_VNI: u32 = 4096;
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN adds to a packet (outer IPv4, UDP, VXLAN and Ethernet headers).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The MAC of a host's VXLAN device: derived from its name, so it is stable without being
/// stored anywhere but the host's record.
pub fn vtep_mac(host: &str) -> Mac {
    let hash = weft_etcd::names::stable_hash(&["vtep", host]).to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&hash[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Mac(mac)
}

/// Link group of retired veths awaiting deletion. Deleting a link waits for an RCU grace period
/// (~20 ms); deleting a whole group pays it once for all its links.
pub const RETIRED_GROUP: u32 = 0x7765;

/// The host-side veth name of a container: `weft` + 11 hex digits of a hash of its id. A name
/// can clash with a live endpoint's (44 bits of hash); `attempt` > 0 gives the alternatives
/// tried then, and the name chosen is stored in the endpoint record.
pub fn veth_name(id: &ContainerId, attempt: u32) -> String {
    let hash = match attempt {
        0 => weft_etcd::names::stable_hash(&[id.as_str()]),
        n => weft_etcd::names::stable_hash(&[id.as_str(), &n.to_string()]),
    };
    format!("{LINK_PREFIX}{:011x}", hash >> 20)
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The EUI-64 link-local address of an interface with this MAC (`fe80::` and the MAC with
    /// `ff:fe` in its middle and the universal/local bit flipped).
    pub fn link_local(&self) -> Ipv6Addr {
        let m = self.0;
        let word = |a: u8, b: u8| u16::from_be_bytes([a, b]);
        Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            word(m[0] ^ 0x02, m[1]),
            word(m[2], 0xff),
            word(0xfe, m[3]),
            word(m[4], m[5]),
        )
    }

    /// A random locally administered unicast MAC for a container interface.
    pub fn random() -> Self {
        let mut mac: [u8; 6] = rand::random();
        mac[0] = (mac[0] & 0xfe) | 0x02;
        Self(mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            *byte = parts
                .next()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{text:?} is not a MAC address"))?;
        }
        match parts.next() {
            None => Ok(Self(mac)),
            Some(_) => Err(format!("{text:?} is not a MAC address")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_the_kernel_limit_and_are_stable() {
        let id = ContainerId::new("web-1").unwrap();
        let name = veth_name(&id, 0);
        assert!(name.len() <= 15 && name.starts_with("weft"));
        assert_eq!(name, veth_name(&id, 0));
        assert_ne!(name, veth_name(&ContainerId::new("web-2").unwrap(), 0));
        assert_ne!(name, veth_name(&id, 1));
        // Persisted in endpoint records and in the kernel: the name must not change.
        assert_eq!(name, "weftd37a3405892");
    }

    #[test]
    fn known_clashes_have_alternatives() {
        let a = ContainerId::new("victim-476022").unwrap();
        let b = ContainerId::new("victim-3507330").unwrap();
        assert_eq!(
            veth_name(&a, 0),
            veth_name(&b, 0),
            "the clash the issue found"
        );
        assert_ne!(veth_name(&a, 0), veth_name(&b, 1));
    }

    #[test]
    fn link_local_addresses_are_eui64() {
        assert_eq!(Mac(HOST_VETH_MAC).link_local(), GATEWAY_V6);
        let mac: Mac = "02:00:00:00:00:0b".parse().unwrap();
        assert_eq!(mac.link_local().to_string(), "fe80::ff:fe00:b");
    }

    #[test]
    fn vtep_macs_are_stable_local_unicast_and_distinct() {
        assert_eq!(vtep_mac("h1"), vtep_mac("h1"));
        assert_ne!(vtep_mac("h1"), vtep_mac("h2"));
        assert_eq!(vtep_mac("h1").0[0] & 0x03, 0x02);
    }

    #[test]
    fn macs_round_trip_and_are_local_unicast() {
        for _ in 0..32 {
            let mac = Mac::random();
            assert_eq!(mac.0[0] & 0x03, 0x02);
            assert_eq!(mac.to_string().parse::<Mac>(), Ok(mac));
        }
        assert!("ee:ee:ee:ee:ee".parse::<Mac>().is_err());
        assert!("ee:ee:ee:ee:ee:ee:ee".parse::<Mac>().is_err());
    }
}
