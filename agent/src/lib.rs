//! The weft agent: configuration, the kernel dataplane, the reconciler, the gRPC API, and the
//! `weftctl` client.

pub mod audit;
pub mod cni;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod error;
pub mod firewall;
pub mod metrics;
pub mod netns;
pub mod notify;
pub mod routes;
pub mod server;
pub mod sysctl;
pub mod validate;
