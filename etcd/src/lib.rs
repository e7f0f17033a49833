//! weft's datastore layer: the etcd key layout, the records, and every allocation as a guarded
//! transaction. It never touches the kernel.
//!
//! [`Datastore`] is one facade over etcd; its methods live with their job: `client` (connection,
//! failover, TLS), `registry` (pools, hosts, liveness, host removal), `endpoints` (guarded
//! create and delete, the batching writer), `blocks` (claims), `watch` (snapshot and follow) and
//! `admin` (operator reads and guarded repairs), `policies` (network policies and the fabric
//! watch). `cluster`, `fabric`, `policy` and `alloc` are pure.

mod admin;
pub mod alloc;
mod blocks;
mod client;
pub mod cluster;
mod endpoints;
mod error;
pub mod fabric;
pub mod keys;
pub mod names;
mod policies;
pub mod policy;
pub mod records;
mod registry;
mod watch;

pub use admin::PortReservation;
pub use client::{unix_now, Datastore, EtcdConfig, TlsFiles};
pub use cluster::{BlockOwner, ClusterEvent, ClusterView};
pub use endpoints::{BlockRef, CreateConflict, EndpointWriter};
pub use error::{Result, StoreError};
pub use fabric::{FabricEvent, FabricView};
pub use keys::Keys;
pub use registry::Released;
