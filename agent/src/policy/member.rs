//! A member of an address set: an address or network, and for the sets that dispatch a
//! profile's traffic (`hash:net,iface`) the veth it must come from or leave by. Written and
//! read in the form `ipset save` prints.

use std::fmt;
use std::str::FromStr;

use ipnetwork::IpNetwork;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub net: IpNetwork,
    pub iface: Option<String>,
}

impl Member {
    pub fn on(net: IpNetwork, iface: &str) -> Self {
        Self {
            net,
            iface: Some(iface.to_string()),
        }
    }
}

impl From<IpNetwork> for Member {
    fn from(net: IpNetwork) -> Self {
        Self { net, iface: None }
    }
}

impl fmt::Display for Member {
    /// A single address bare, a network with its length, then `,iface` when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.net.is_ipv4() { 32 } else { 128 };
        match self.net.prefix() == full {
            true => write!(f, "{}", self.net.ip())?,
            false => write!(f, "{}", self.net)?,
        }
        match &self.iface {
            Some(iface) => write!(f, ",{iface}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Member {
    type Err = ipnetwork::IpNetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, iface) = match s.split_once(',') {
            Some((net, iface)) => (net, Some(iface.to_string())),
            None => (s, None),
        };
        Ok(Self {
            net: net.parse()?,
            iface,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_read_back_as_written() {
        for text in [
            "10.65.0.2",
            "10.1.0.0/16",
            "fd65::2,weftabc",
            "fe80::/10,weftabc",
        ] {
            let member: Member = text.parse().unwrap();
            assert_eq!(member.to_string(), text);
        }
        let address: Member = "10.65.0.2/32".parse().unwrap();
        assert_eq!(address.to_string(), "10.65.0.2", "as ipset prints it");
        assert!("10.65.0.300,weftabc".parse::<Member>().is_err());
    }
}
