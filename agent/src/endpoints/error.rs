//! Why an endpoint operation failed, typed by cause; `api::status` maps each to a gRPC code.

use crate::firewall::sync::SyncError;
use crate::kernel::{KernelError, NetnsError};
use crate::model::Invalid;
use weft_etcd::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Firewall(#[from] SyncError),
    #[error("network policy: {0}")]
    Policy(#[from] crate::policy::PolicySyncError),
    #[error("container {0:?} is not attached here")]
    NotAttached(String),
    #[error("process {0} does not exist")]
    NoProcess(u32),
    #[error("interface {ifname} already exists in netns {netns}")]
    IfnameTaken { ifname: String, netns: String },
    #[error(
        "container {container} already has an endpoint ({ip}) written by another agent process"
    )]
    WrittenElsewhere {
        container: String,
        ip: std::net::IpAddr,
    },
    #[error("container {container} has an endpoint but its namespace is gone ({source}); detach it first")]
    NamespaceGone {
        container: String,
        source: NetnsError,
    },
    #[error("writing the agent's journal: {0}")]
    Journal(std::io::Error),
    #[error(
        "host port {protocol}/{port} is in use by a socket of this host (a service listens on \
         it); publish another port, or start the agent with --allow-host-port-override"
    )]
    HostPortInUse {
        protocol: crate::model::Protocol,
        port: u16,
    },
    /// A repeated attach asks for what cannot be changed on a live attachment.
    #[error("{0}")]
    Differs(String),
    #[error("requested address {ip} lies in no pool of this host")]
    OutsidePools { ip: std::net::IpAddr },
    #[error("requested address {ip} lies in none of the pools named ({})", .pools.join(", "))]
    OutsideNamedPools {
        ip: std::net::IpAddr,
        pools: Vec<String>,
    },
    #[error("this host has no pool named {0:?}")]
    UnknownPool(String),
    #[error("pool {0:?} is disabled: it gives no new addresses")]
    PoolDisabled(String),
    #[error("every pool of this host is disabled: there is no address to give")]
    NoPool,
    #[error("requested address {ip} is taken by {holder}")]
    AddressTaken {
        ip: std::net::IpAddr,
        holder: String,
    },
    #[error("requested address {ip} lies in block {block} of host {host}; attach it on that host")]
    AddressElsewhere {
        ip: std::net::IpAddr,
        block: ipnetwork::IpNetwork,
        host: String,
    },
    #[error("could not allocate an address: too many conflicts")]
    Contention,
    #[error("{what} of {container} went only partly: {}", .errors.join("; "))]
    Incomplete {
        what: &'static str,
        container: String,
        errors: Vec<String>,
    },
}
