//! The datastore seam: the etcd operations endpoint handling, allocation and reconciliation make.
//! [`Etcd`] is the real one (through the batching writer for endpoint records); [`fake::FakeStore`]
//! keeps records in memory for unit tests. The cluster watch and liveness use the datastore
//! directly (they are its clients, tested end to end).

pub mod fake;

use std::net::IpAddr;

use async_trait::async_trait;
use ipnetwork::IpNetwork;
use weft_etcd::records::{EndpointRecord, HostRecord, IpRecord, PoolRecord};
use weft_etcd::{BlockRef, CreateConflict, Datastore, EndpointWriter, Released, StoreError};

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes an endpoint with its address and host-port guards, while the blocks of its
    /// addresses exist (see `Datastore::create_endpoint`).
    async fn create_endpoint(
        &self,
        record: EndpointRecord,
        blocks: Vec<BlockRef>,
    ) -> Result<(), CreateConflict>;
    /// Replaces an endpoint's record if it still is `old` (see `Datastore::update_endpoint`).
    async fn update_endpoint(
        &self,
        old: &EndpointRecord,
        new: &EndpointRecord,
    ) -> Result<(), StoreError>;
    /// Deletes an endpoint with the guards that are still its own.
    async fn delete_endpoint(&self, record: &EndpointRecord) -> Result<(), StoreError>;
    /// Deletes an endpoint only if its record is exactly this one; returns whether it was.
    async fn delete_endpoint_if_unchanged(
        &self,
        record: &EndpointRecord,
    ) -> Result<bool, StoreError>;
    async fn get_endpoint(
        &self,
        host: &str,
        container_id: &str,
    ) -> Result<Option<EndpointRecord>, StoreError>;
    /// Claims a free block of the pool for `host`.
    async fn claim_block(
        &self,
        pool_name: &str,
        pool: &PoolRecord,
        host: &str,
    ) -> Result<IpNetwork, StoreError>;
    /// Claims one given block if nobody holds it; true when it is (now or already) ours.
    async fn claim_exact_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool, StoreError>;
    /// Gives a block of `host` back to its pool if it still is `host`'s; true when it was.
    async fn release_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool, StoreError>;
    /// The host holding a block, if any.
    async fn block_holder(
        &self,
        pool_name: &str,
        block: IpNetwork,
    ) -> Result<Option<String>, StoreError>;
    /// Who holds an address, if anyone.
    async fn ip_holder(&self, ip: IpAddr) -> Result<Option<IpRecord>, StoreError>;
    /// The endpoint records of a host.
    async fn list_endpoints(&self, host: &str) -> Result<Vec<EndpointRecord>, StoreError>;
    /// Writes the host's registration if it is absent or different.
    async fn register_host(&self, host: &str, record: &HostRecord) -> Result<(), StoreError>;
    /// Takes `ip` as the host's tunnel address (see `Datastore::claim_tunnel_ip`).
    async fn claim_tunnel_ip(
        &self,
        host: &str,
        ip: IpAddr,
        pool: &str,
        block: IpNetwork,
    ) -> Result<bool, StoreError>;
    async fn list_pools(&self) -> Result<Vec<(String, PoolRecord)>, StoreError>;
    /// Removes a host for good (its blocks, addresses and records).
    async fn remove_host(&self, host: &str) -> Result<Released, StoreError>;
    /// Whether etcd answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The real datastore.
pub struct Etcd {
    datastore: Datastore,
    writer: EndpointWriter,
}

impl Etcd {
    /// Wraps a connected datastore; starts the batching writer on the current runtime.
    pub fn new(datastore: Datastore) -> Self {
        let writer = EndpointWriter::start(datastore.clone());
        Self { datastore, writer }
    }
}

#[async_trait]
impl Store for Etcd {
    async fn create_endpoint(
        &self,
        record: EndpointRecord,
        blocks: Vec<BlockRef>,
    ) -> Result<(), CreateConflict> {
        self.writer.create(record, blocks).await
    }

    async fn update_endpoint(
        &self,
        old: &EndpointRecord,
        new: &EndpointRecord,
    ) -> Result<(), StoreError> {
        self.datastore.update_endpoint(old, new).await
    }

    async fn delete_endpoint(&self, record: &EndpointRecord) -> Result<(), StoreError> {
        self.datastore.delete_endpoint(record).await
    }

    async fn delete_endpoint_if_unchanged(
        &self,
        record: &EndpointRecord,
    ) -> Result<bool, StoreError> {
        self.datastore.delete_endpoint_if_unchanged(record).await
    }

    async fn get_endpoint(
        &self,
        host: &str,
        container_id: &str,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        self.datastore.get_endpoint(host, container_id).await
    }

    async fn claim_block(
        &self,
        pool_name: &str,
        pool: &PoolRecord,
        host: &str,
    ) -> Result<IpNetwork, StoreError> {
        self.datastore.claim_block(pool_name, pool, host).await
    }

    async fn claim_exact_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool, StoreError> {
        self.datastore
            .claim_exact_block(pool_name, block, host)
            .await
    }

    async fn release_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool, StoreError> {
        self.datastore.release_block(pool_name, block, host).await
    }

    async fn block_holder(
        &self,
        pool_name: &str,
        block: IpNetwork,
    ) -> Result<Option<String>, StoreError> {
        self.datastore.block_holder(pool_name, block).await
    }

    async fn ip_holder(&self, ip: IpAddr) -> Result<Option<IpRecord>, StoreError> {
        self.datastore.get_ip(ip).await
    }

    async fn list_endpoints(&self, host: &str) -> Result<Vec<EndpointRecord>, StoreError> {
        self.datastore.list_endpoints(host).await
    }

    async fn register_host(&self, host: &str, record: &HostRecord) -> Result<(), StoreError> {
        self.datastore.register_host(host, record).await.map(|_| ())
    }

    async fn claim_tunnel_ip(
        &self,
        host: &str,
        ip: IpAddr,
        pool: &str,
        block: IpNetwork,
    ) -> Result<bool, StoreError> {
        self.datastore.claim_tunnel_ip(host, ip, pool, block).await
    }

    async fn list_pools(&self) -> Result<Vec<(String, PoolRecord)>, StoreError> {
        self.datastore.list_pools().await
    }

    async fn remove_host(&self, host: &str) -> Result<Released, StoreError> {
        self.datastore.remove_host(host).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.datastore.ping().await
    }
}
