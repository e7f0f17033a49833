//! BGP settings: whether this host announces its blocks to routers outside weft, as which
//! autonomous system, to which peers, with which hold time, and where bird's files live. Parsed
//! and checked here, once; typed from then on.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::{invalid, parse_duration, ConfigError, FileConfig, Flags};

/// An autonomous system number (4-octet, RFC 6793). 0 and AS_TRANS (23456) are not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Asn(u32);

impl Asn {
    pub fn new(value: u32) -> Result<Self, String> {
        match value {
            0 => Err("AS 0 is reserved".into()),
            23456 => Err("AS 23456 is AS_TRANS, not a usable AS number".into()),
            _ => Ok(Self(value)),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Asn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Asn {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let digits = text.strip_prefix("AS").unwrap_or(text);
        let value: u32 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not an AS number (1 to 4294967295)"))?;
        Self::new(value)
    }
}

/// A BGP neighbour: its address and AS number, written `IP:ASN` or `[IPv6]:ASN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BgpPeer {
    pub address: IpAddr,
    pub asn: Asn,
}

impl fmt::Display for BgpPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.asn),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.asn),
        }
    }
}

impl FromStr for BgpPeer {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let usage = || format!("{text:?} is not a peer: use IP:ASN or [IPv6]:ASN");
        let (address, asn) = match text.strip_prefix('[') {
            Some(rest) => {
                let (address, asn) = rest.split_once("]:").ok_or_else(usage)?;
                let address: std::net::Ipv6Addr = address.parse().map_err(|_| usage())?;
                (IpAddr::V6(address), asn)
            }
            None => {
                let (address, asn) = text.rsplit_once(':').ok_or_else(usage)?;
                let address: std::net::Ipv4Addr = address.parse().map_err(|_| usage())?;
                (IpAddr::V4(address), asn)
            }
        };
        if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
            return Err(format!("{text:?}: {address} cannot be a BGP neighbour"));
        }
        if let IpAddr::V4(a) = address {
            if a.is_broadcast() {
                return Err(format!("{text:?}: {address} cannot be a BGP neighbour"));
            }
        }
        let asn = asn.parse().map_err(|e: String| format!("{text:?}: {e}"))?;
        Ok(Self { address, asn })
    }
}

/// How this host speaks BGP (with `enabled` false, nothing of it runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpSettings {
    pub enabled: bool,
    /// This host's AS number.
    pub asn: Asn,
    pub peers: Vec<BgpPeer>,
    /// The hold time offered to peers (whole seconds; 0 turns keepalives off).
    pub hold_time: Duration,
    /// bird's configuration, control socket and PID file.
    pub dir: PathBuf,
}

pub const DEFAULT_ASN: u32 = 64512;

pub(super) fn bgp_settings(flags: &Flags, file: &FileConfig) -> Result<BgpSettings, ConfigError> {
    let enabled = flags.bgp.or(file.bgp).unwrap_or(false);
    let asn = Asn::new(flags.bgp_asn.or(file.bgp_asn).unwrap_or(DEFAULT_ASN))
        .map_err(|m| invalid("bgp-asn", m))?;
    let texts = match flags.bgp_peer.is_empty() {
        true => file.bgp_peer.clone().unwrap_or_default(),
        false => flags.bgp_peer.clone(),
    };
    let mut peers = vec![];
    for text in &texts {
        let peer: BgpPeer = text.parse().map_err(|m| invalid("bgp-peer", m))?;
        if peers.iter().any(|p: &BgpPeer| p.address == peer.address) {
            return Err(invalid(
                "bgp-peer",
                format!("{} is given more than once", peer.address),
            ));
        }
        peers.push(peer);
    }
    if enabled && peers.is_empty() {
        return Err(invalid(
            "bgp-peer",
            "--bgp needs at least one peer (IP:ASN)",
        ));
    }
    let text = flags
        .bgp_hold_time
        .clone()
        .or(file.bgp_hold_time.clone())
        .unwrap_or_else(|| "9s".into());
    let hold_time = parse_duration(&text).map_err(|m| invalid("bgp-hold-time", m))?;
    let whole = hold_time.subsec_nanos() == 0;
    let seconds = hold_time.as_secs();
    if !whole || !(seconds == 0 || (3..=65535).contains(&seconds)) {
        return Err(invalid(
            "bgp-hold-time",
            format!("{text:?}: BGP hold times are 0 or 3 to 65535 whole seconds"),
        ));
    }
    let dir = flags
        .bgp_dir
        .clone()
        .or(file.bgp_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/run/weft/bird"));
    if !dir.is_absolute() {
        return Err(invalid("bgp-dir", "must be an absolute path"));
    }
    Ok(BgpSettings {
        enabled,
        asn,
        peers,
        hold_time,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_both_families() {
        let peer: BgpPeer = "198.51.100.100:64513".parse().unwrap();
        assert_eq!(peer.address, "198.51.100.100".parse::<IpAddr>().unwrap());
        assert_eq!(peer.asn.get(), 64513);
        assert_eq!(peer.to_string(), "198.51.100.100:64513");
        let peer: BgpPeer = "[2001:db8::100]:4200000000".parse().unwrap();
        assert_eq!(peer.address, "2001:db8::100".parse::<IpAddr>().unwrap());
        assert_eq!(peer.asn.get(), 4_200_000_000);
        assert_eq!(peer.to_string(), "[2001:db8::100]:4200000000");
    }

    #[test]
    fn bad_peers_say_why() {
        let err = |text: &str| text.parse::<BgpPeer>().unwrap_err();
        assert_eq!(
            err("198.51.100.100"),
            "\"198.51.100.100\" is not a peer: use IP:ASN or [IPv6]:ASN"
        );
        assert_eq!(
            err("2001:db8::1:64513"),
            "\"2001:db8::1:64513\" is not a peer: use IP:ASN or [IPv6]:ASN"
        );
        assert_eq!(
            err("198.51.100.300:64513"),
            "\"198.51.100.300:64513\" is not a peer: use IP:ASN or [IPv6]:ASN"
        );
        assert_eq!(
            err("198.51.100.100:0"),
            "\"198.51.100.100:0\": AS 0 is reserved"
        );
        assert_eq!(
            err("198.51.100.100:4294967296"),
            "\"198.51.100.100:4294967296\": \"4294967296\" is not an AS number (1 to 4294967295)"
        );
        assert_eq!(
            err("0.0.0.0:64513"),
            "\"0.0.0.0:64513\": 0.0.0.0 cannot be a BGP neighbour"
        );
        assert_eq!(
            err("[::1]:64513"),
            "\"[::1]:64513\": ::1 cannot be a BGP neighbour"
        );
    }

    #[test]
    fn asns() {
        assert_eq!("AS64512".parse::<Asn>().unwrap().get(), 64512);
        assert_eq!("4294967295".parse::<Asn>().unwrap().get(), u32::MAX);
        assert!("23456".parse::<Asn>().is_err());
        assert!("-1".parse::<Asn>().is_err());
    }
}
