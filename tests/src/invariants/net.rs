//! Prefixes of either family, as the lab writes them: block keys (`a.b.c.d-len`,
//! `fd65::c0-122`), routes, pools and Status (`a.b.c.d/len`, `fd65::c0/122`), and bare
//! addresses (a /32 or a /128).

use std::fmt;
use std::net::IpAddr;

/// An IPv4 or IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    pub addr: IpAddr,
    pub len: u8,
}

/// The two address families, for checks done once per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The length of a host prefix: 32 or 128.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// How the iptables tools of the family are named in what the checker reports.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// `inet` or `inet6`, as `ip -j` calls the family of an address.
    pub fn inet(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }
}

impl Net {
    /// Parses `addr/len`, `addr-len` or a bare address (a host prefix), of either family.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, len) = match text.split_once(['/', '-']) {
            Some((addr, len)) => (addr.parse::<IpAddr>().ok()?, Some(len.parse().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let bits = Family::of(&addr).bits();
        let len = len.unwrap_or(bits);
        (len <= bits).then_some(Net { addr, len })
    }

    /// The host prefix of an address: `/32` or `/128`.
    pub fn host(addr: IpAddr) -> Self {
        Net {
            addr,
            len: Family::of(&addr).bits(),
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// The address as a number of its family's width.
    fn number(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    fn mask(&self) -> u128 {
        let bits = u32::from(self.family().bits());
        let all = u128::MAX >> (128 - bits);
        match self.len {
            0 => 0,
            len => all & (u128::MAX << (bits - u32::from(len))),
        }
    }

    /// Whether the address is the network's first (no host bits set).
    pub fn aligned(&self) -> bool {
        Self::number(self.addr) & !self.mask() == 0
    }

    /// Whether `ip` (of the same family) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(&ip) == self.family()
            && Self::number(ip) & self.mask() == Self::number(self.addr) & self.mask()
    }

    pub fn contains_net(&self, other: &Net) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &Net) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}
