//! An in-memory datastore with etcd's guards (an address, a host port, a container id and a
//! block each held once), and failures injectable per operation, for unit tests.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use ipnetwork::IpNetwork;
use weft_etcd::records::{EndpointRecord, HostRecord, IpRecord, PoolRecord, Protocol};
use weft_etcd::{alloc, BlockRef, CreateConflict, Released, StoreError};

use super::Store;

#[derive(Debug, Default)]
pub struct FakeState {
    /// Endpoints by (host, container id).
    pub endpoints: BTreeMap<(String, String), EndpointRecord>,
    /// Address guards: address → (host, container id).
    pub ips: BTreeMap<IpAddr, (String, String)>,
    /// Host-port guards: (host, protocol, port) → container id.
    pub ports: BTreeMap<(String, Protocol, u16), String>,
    /// Blocks → (pool, host).
    pub blocks: BTreeMap<IpNetwork, (String, String)>,
    pub pools: Vec<(String, PoolRecord)>,
    /// Registered hosts with their underlay address.
    pub hosts: BTreeMap<String, IpAddr>,
}

#[derive(Debug, Default)]
pub struct FakeStore {
    pub state: Mutex<FakeState>,
    /// Operations that answer UNAVAILABLE, by name ("create", "delete", "claim", ...).
    unavailable: Mutex<HashSet<&'static str>>,
}

fn down() -> StoreError {
    StoreError::Unavailable("injected outage".into())
}

impl FakeStore {
    pub fn with_pool(name: &str, pool: PoolRecord) -> Self {
        let store = Self::default();
        store.state.lock().unwrap().pools.push((name.into(), pool));
        store
    }

    /// Makes an operation answer UNAVAILABLE until `restore`.
    pub fn cut(&self, operation: &'static str) {
        self.unavailable.lock().unwrap().insert(operation);
    }

    pub fn restore(&self, operation: &'static str) {
        self.unavailable.lock().unwrap().remove(operation);
    }

    fn check(&self, operation: &'static str) -> Result<(), StoreError> {
        match self.unavailable.lock().unwrap().contains(operation) {
            true => Err(down()),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Store for FakeStore {
    async fn create_endpoint(
        &self,
        record: EndpointRecord,
        blocks: Vec<BlockRef>,
    ) -> Result<(), CreateConflict> {
        self.check("create")?;
        let mut state = self.state.lock().unwrap();
        let key = (record.host.clone(), record.container_id.clone());
        if let Some(existing) = state.endpoints.get(&key) {
            return Err(CreateConflict::EndpointExists(Box::new(existing.clone())));
        }
        if let Some(gone) = blocks.iter().find(|b| !state.blocks.contains_key(&b.block)) {
            return Err(CreateConflict::Store(StoreError::BlockReleased {
                block: gone.block,
            }));
        }
        for p in &record.ports {
            if let Some(owner) = state
                .ports
                .get(&(record.host.clone(), p.protocol, p.host_port))
            {
                return Err(CreateConflict::Store(StoreError::PortTaken {
                    protocol: p.protocol,
                    port: p.host_port,
                    owner: owner.clone(),
                }));
            }
        }
        if let Some(taken) = record.addresses().find(|ip| state.ips.contains_key(ip)) {
            return Err(CreateConflict::IpTaken(taken));
        }
        for ip in record.addresses() {
            state.ips.insert(ip, key.clone());
        }
        for p in &record.ports {
            state.ports.insert(
                (record.host.clone(), p.protocol, p.host_port),
                record.container_id.clone(),
            );
        }
        state.endpoints.insert(key, record);
        Ok(())
    }

    async fn update_endpoint(
        &self,
        old: &EndpointRecord,
        new: &EndpointRecord,
    ) -> Result<(), StoreError> {
        self.check("update")?;
        let mut state = self.state.lock().unwrap();
        let key = (old.host.clone(), old.container_id.clone());
        if state.endpoints.get(&key) != Some(old) {
            return Err(StoreError::Contention {
                what: "updating a record".into(),
                attempts: 1,
            });
        }
        for p in &new.ports {
            let port = (new.host.clone(), p.protocol, p.host_port);
            if let Some(owner) = state.ports.get(&port).filter(|o| **o != new.container_id) {
                return Err(StoreError::PortTaken {
                    protocol: p.protocol,
                    port: p.host_port,
                    owner: owner.clone(),
                });
            }
        }
        for p in &old.ports {
            state
                .ports
                .remove(&(old.host.clone(), p.protocol, p.host_port));
        }
        for p in &new.ports {
            let port = (new.host.clone(), p.protocol, p.host_port);
            state.ports.insert(port, new.container_id.clone());
        }
        state.endpoints.insert(key, new.clone());
        Ok(())
    }

    async fn delete_endpoint(&self, record: &EndpointRecord) -> Result<(), StoreError> {
        self.check("delete")?;
        let mut state = self.state.lock().unwrap();
        let key = (record.host.clone(), record.container_id.clone());
        state.endpoints.remove(&key);
        for ip in record.addresses() {
            if state.ips.get(&ip) == Some(&key) {
                state.ips.remove(&ip);
            }
        }
        for p in &record.ports {
            let port = (record.host.clone(), p.protocol, p.host_port);
            if state.ports.get(&port) == Some(&record.container_id) {
                state.ports.remove(&port);
            }
        }
        Ok(())
    }

    async fn delete_endpoint_if_unchanged(
        &self,
        record: &EndpointRecord,
    ) -> Result<bool, StoreError> {
        self.check("delete")?;
        let key = (record.host.clone(), record.container_id.clone());
        if self.state.lock().unwrap().endpoints.get(&key) != Some(record) {
            return Ok(false);
        }
        self.delete_endpoint(record).await.map(|()| true)
    }

    async fn get_endpoint(
        &self,
        host: &str,
        container_id: &str,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        self.check("get")?;
        let state = self.state.lock().unwrap();
        Ok(state
            .endpoints
            .get(&(host.to_string(), container_id.to_string()))
            .cloned())
    }

    async fn claim_block(
        &self,
        pool_name: &str,
        pool: &PoolRecord,
        host: &str,
    ) -> Result<IpNetwork, StoreError> {
        self.check("claim")?;
        let mut state = self.state.lock().unwrap();
        let taken: HashSet<IpNetwork> = state.blocks.keys().copied().collect();
        // Lowest free block: deterministic for tests.
        let block =
            alloc::pick_free_block(pool.cidr, pool.block_size, &taken, 0).ok_or_else(|| {
                StoreError::PoolExhausted {
                    pool: pool_name.to_string(),
                    cidr: pool.cidr,
                }
            })?;
        state
            .blocks
            .insert(block, (pool_name.to_string(), host.to_string()));
        Ok(block)
    }

    async fn claim_exact_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool, StoreError> {
        self.check("claim")?;
        let mut state = self.state.lock().unwrap();
        let owner = state
            .blocks
            .entry(block)
            .or_insert_with(|| (pool_name.to_string(), host.to_string()));
        Ok(owner.1 == host)
    }

    async fn block_holder(
        &self,
        _pool_name: &str,
        block: IpNetwork,
    ) -> Result<Option<String>, StoreError> {
        self.check("get")?;
        let state = self.state.lock().unwrap();
        Ok(state.blocks.get(&block).map(|(_, host)| host.clone()))
    }

    async fn ip_holder(&self, ip: IpAddr) -> Result<Option<IpRecord>, StoreError> {
        self.check("get")?;
        let state = self.state.lock().unwrap();
        Ok(state.ips.get(&ip).map(|(host, id)| IpRecord {
            host: host.clone(),
            container_id: id.clone(),
            tunnel: id.is_empty(),
        }))
    }

    async fn release_block(
        &self,
        pool_name: &str,
        block: IpNetwork,
        host: &str,
    ) -> Result<bool, StoreError> {
        self.check("release")?;
        let mut state = self.state.lock().unwrap();
        let ours = (pool_name.to_string(), host.to_string());
        if state.blocks.get(&block) != Some(&ours) {
            return Ok(false);
        }
        state.blocks.remove(&block);
        Ok(true)
    }

    async fn list_endpoints(&self, host: &str) -> Result<Vec<EndpointRecord>, StoreError> {
        self.check("list")?;
        let state = self.state.lock().unwrap();
        Ok(state
            .endpoints
            .values()
            .filter(|e| e.host == host)
            .cloned()
            .collect())
    }

    async fn register_host(&self, host: &str, record: &HostRecord) -> Result<(), StoreError> {
        self.check("register")?;
        self.state
            .lock()
            .unwrap()
            .hosts
            .insert(host.to_string(), record.underlay_ip);
        Ok(())
    }

    async fn claim_tunnel_ip(
        &self,
        host: &str,
        ip: IpAddr,
        _pool: &str,
        _block: IpNetwork,
    ) -> Result<bool, StoreError> {
        self.check("claim")?;
        let mut state = self.state.lock().unwrap();
        let holder = state
            .ips
            .entry(ip)
            .or_insert_with(|| (host.to_string(), String::new()));
        Ok(*holder == (host.to_string(), String::new()))
    }

    async fn list_pools(&self) -> Result<Vec<(String, PoolRecord)>, StoreError> {
        self.check("pools")?;
        Ok(self.state.lock().unwrap().pools.clone())
    }

    async fn remove_host(&self, host: &str) -> Result<Released, StoreError> {
        self.check("remove")?;
        let mut state = self.state.lock().unwrap();
        let mut released = Released::default();
        state.blocks.retain(|_, (_, owner)| {
            let keep = owner != host;
            released.blocks += !keep as usize;
            keep
        });
        state.ips.retain(|_, (owner, _)| {
            let keep = owner != host;
            released.ips += !keep as usize;
            keep
        });
        state.endpoints.retain(|(owner, _), _| {
            let keep = owner != host;
            released.endpoints += !keep as usize;
            keep
        });
        state.ports.retain(|(owner, _, _), _| {
            let keep = owner != host;
            released.ports += !keep as usize;
            keep
        });
        Ok(released)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check("ping")
    }
}
