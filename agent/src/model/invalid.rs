//! Why a value from a client or a flag was refused.

use crate::model::Protocol;

/// A refused value, with the message a client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("container id is empty")]
    EmptyContainerId,
    #[error("container id is {0} characters long; at most 64 are allowed")]
    LongContainerId(usize),
    #[error(
        "container id {0:?} is invalid: use letters, digits, '_', '.', '-', starting with a \
         letter or digit"
    )]
    ContainerId(String),
    #[error(
        "host name {0:?} is invalid: 1-63 letters, digits, '_', '.', '-', starting with a letter \
         or digit"
    )]
    HostName(String),
    #[error("interface name {0:?} must be 1 to 15 characters long")]
    IfNameLength(String),
    #[error("interface name {0:?} is reserved")]
    IfNameReserved(String),
    #[error("interface name {0:?} is invalid: use letters, digits, '_', '.', '-'")]
    IfName(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{what} {value} is out of range 1-65535")]
    PortRange { what: &'static str, value: u32 },
    #[error("host port {protocol}/{port} is requested twice")]
    PortTwice { protocol: Protocol, port: u16 },
    #[error("{0} published ports requested; at most {max} per container", max = crate::model::MAX_PORTS)]
    TooManyPorts(usize),
    #[error("pid 0 is not a process")]
    PidZero,
    #[error("give either netns or pid, not both")]
    NetnsAndPid,
    #[error("netns path contains NUL")]
    NetnsNul,
    #[error("netns {0:?} must be an absolute path")]
    NetnsRelative(String),
    #[error(transparent)]
    Label(#[from] weft_etcd::policy::LabelError),
    #[error("pool name {0:?} is invalid: letters, digits, '_', '.', '-', starting with a letter or digit")]
    PoolName(String),
    #[error("pool {0:?} is named twice")]
    PoolTwice(String),
    #[error("requested address {0:?} is not an IP address")]
    RequestedIp(String),
    #[error("two {family} addresses requested ({first}, {second}); at most one per family")]
    RequestedIpTwice {
        family: &'static str,
        first: std::net::IpAddr,
        second: std::net::IpAddr,
    },
}
