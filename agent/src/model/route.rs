//! A `proto weft` route, in either address family.

use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// Where a `proto weft` route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteTarget {
    /// A local container: `dev <veth> scope link`.
    Dev(u32),
    /// A peer's block: `via <underlay ip>`.
    Via(IpAddr),
    /// A peer's block through the tunnel: `via <peer tunnel ip> dev <tunnel> onlink`.
    Onlink { via: IpAddr, dev: u32 },
    /// A local block: drop what no container claims.
    Blackhole,
}

/// One `proto weft` route as the kernel holds it (or should).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpNetwork,
    pub target: RouteTarget,
}

impl Route {
    /// The host route of one address (/32 or /128).
    pub fn host(ip: IpAddr, target: RouteTarget) -> Self {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        Self {
            dst: IpNetwork::new(ip, len).expect("full-length prefix"),
            target,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target {
            RouteTarget::Dev(index) => write!(f, "{} dev #{index}", self.dst),
            RouteTarget::Via(gateway) => write!(f, "{} via {gateway}", self.dst),
            RouteTarget::Onlink { via, dev } => {
                write!(f, "{} via {via} dev #{dev} onlink", self.dst)
            }
            RouteTarget::Blackhole => write!(f, "blackhole {}", self.dst),
        }
    }
}
