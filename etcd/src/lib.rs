//! weft's datastore layer: the etcd key layout, the records, and every allocation as a guarded
//! transaction. It never touches the kernel.

pub mod alloc;
pub mod cluster;
mod error;
pub mod keys;
pub mod records;
mod store;

pub use cluster::{BlockOwner, ClusterEvent, ClusterView};
pub use error::{Result, StoreError};
pub use keys::Keys;
pub use store::{unix_now, CreateConflict, Datastore, EtcdConfig, Released, TlsFiles};
