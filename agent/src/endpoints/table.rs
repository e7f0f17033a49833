//! This host's endpoints as the agent holds them, the addresses and veth names reserved by
//! attaches still writing their record, and one lock per container id so that an attach and a
//! detach of the same container never interleave. Short-lived locks only, never across `.await`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;
use weft_etcd::records::EndpointRecord;

use crate::model::ContainerId;

#[derive(Default)]
struct Table {
    endpoints: HashMap<String, EndpointRecord>,
    /// Addresses handed to an attach still writing its record.
    reserved_ips: HashSet<IpAddr>,
    /// Veth names chosen by an attach still writing its record.
    reserved_names: HashSet<String>,
    /// Addresses of our blocks found taken in etcd by a record we do not hold; forgotten at the
    /// next full reconciliation, so a mark cannot outlive the record that caused it.
    foreign: HashSet<IpAddr>,
    /// Blocks being given back to the pool: nothing is allocated in them.
    retiring: HashSet<IpNetwork>,
}

impl Table {
    /// Veth names of endpoints and of attaches still writing their record.
    fn taken_names(&self) -> HashSet<String> {
        let mut names: HashSet<String> = self
            .endpoints
            .values()
            .map(|e| e.host_ifname.clone())
            .collect();
        names.extend(self.reserved_names.iter().cloned());
        names
    }
}

/// What an allocation may not hand out, read under one lock.
pub struct Taken {
    pub ips: HashSet<IpAddr>,
    pub names: HashSet<String>,
    /// Blocks being released: no address of them may be picked.
    pub retiring: HashSet<IpNetwork>,
}

#[derive(Default)]
pub struct EndpointTable {
    table: Mutex<Table>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Records that must go from etcd once it answers: writes whose answer was lost (etcd may
    /// have committed them after the attach gave up) and deletes that could not be made.
    undelivered: Mutex<Vec<Undelivered>>,
    /// Endpoints whose wiring an earlier agent did not finish: verified and repaired at the
    /// first full pass.
    unverified: Mutex<Vec<String>>,
}

impl EndpointTable {
    pub fn new(endpoints: impl IntoIterator<Item = EndpointRecord>) -> Self {
        let table = Table {
            endpoints: endpoints
                .into_iter()
                .map(|e| (e.container_id.clone(), e))
                .collect(),
            ..Default::default()
        };
        Self {
            table: Mutex::new(table),
            ..Default::default()
        }
    }

    /// Remembers a record to delete from etcd when it answers.
    pub fn undeliver(&self, record: EndpointRecord) {
        self.undelivered.lock().unwrap().push(Undelivered {
            record,
            absent_since: None,
        });
    }

    /// Puts back a record still waiting to be deleted.
    pub fn keep_undelivered(&self, entry: Undelivered) {
        self.undelivered.lock().unwrap().push(entry);
    }

    /// Takes the records waiting to be deleted.
    pub fn take_undelivered(&self) -> Vec<Undelivered> {
        std::mem::take(&mut *self.undelivered.lock().unwrap())
    }

    /// Endpoints to verify at the first full pass.
    pub fn set_unverified(&self, ids: Vec<String>) {
        *self.unverified.lock().unwrap() = ids;
    }

    pub fn take_unverified(&self) -> Vec<String> {
        std::mem::take(&mut *self.unverified.lock().unwrap())
    }

    /// Waits for, then holds, the container's lock.
    pub async fn lock(&self, id: &ContainerId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap();
            // Drop locks nobody holds, so the map does not grow with every id ever seen.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Holds the container's lock if nobody holds or waits for it: background work (the
    /// registration check) writes a container's records only under it, so it never races an
    /// attach or detach of that container.
    pub fn try_lock(&self, id: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let mut locks = self.locks.lock().unwrap();
        let lock = locks.entry(id.to_string()).or_default();
        if Arc::strong_count(lock) > 1 {
            return None;
        }
        lock.clone().try_lock_owned().ok()
    }

    /// Whether an attach or detach of this container is under way (or waiting).
    pub fn busy(&self, id: &str) -> bool {
        self.locks
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|l| Arc::strong_count(l) > 1)
    }

    /// The ids with an attach or detach under way.
    pub fn busy_ids(&self) -> HashSet<String> {
        self.locks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| Arc::strong_count(l) > 1)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<EndpointRecord> {
        self.table.lock().unwrap().endpoints.get(id).cloned()
    }

    pub fn insert(&self, record: EndpointRecord) {
        self.table
            .lock()
            .unwrap()
            .endpoints
            .insert(record.container_id.clone(), record);
    }

    pub fn remove(&self, id: &str) -> Option<EndpointRecord> {
        self.table.lock().unwrap().endpoints.remove(id)
    }

    /// Every endpoint, by container id.
    pub fn list(&self) -> Vec<EndpointRecord> {
        let mut all: Vec<_> = self
            .table
            .lock()
            .unwrap()
            .endpoints
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        all
    }

    /// Whether some endpoint matches, read in place (no copy of the table).
    pub fn any(&self, matches: impl Fn(&EndpointRecord) -> bool) -> bool {
        self.table.lock().unwrap().endpoints.values().any(matches)
    }

    /// Copies of the endpoints that match only.
    pub fn matching(&self, matches: impl Fn(&EndpointRecord) -> bool) -> Vec<EndpointRecord> {
        let table = self.table.lock().unwrap();
        table
            .endpoints
            .values()
            .filter(|e| matches(e))
            .cloned()
            .collect()
    }

    /// What `each` makes of every endpoint, read in place (no copy of the table).
    pub fn flat_map<T, I: IntoIterator<Item = T>>(
        &self,
        each: impl FnMut(&EndpointRecord) -> I,
    ) -> Vec<T> {
        let table = self.table.lock().unwrap();
        table.endpoints.values().flat_map(each).collect()
    }

    pub fn len(&self) -> usize {
        self.table.lock().unwrap().endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoint whose host veth is `name`.
    pub fn owner_of_link(&self, name: &str) -> Option<String> {
        let table = self.table.lock().unwrap();
        table
            .endpoints
            .values()
            .find(|e| e.host_ifname == name)
            .map(|e| e.container_id.clone())
    }

    /// Reserves an address and a veth name chosen by `pick` from what is not taken (endpoints,
    /// other reservations, foreign marks, and `also`: the host's own tunnel address). `pick`
    /// returns None when nothing is free.
    pub fn reserve<T>(
        &self,
        also: Option<IpAddr>,
        pick: impl FnOnce(&Taken) -> Option<(IpAddr, String, T)>,
    ) -> Option<(IpAddr, String, T)> {
        let mut table = self.table.lock().unwrap();
        let mut ips: HashSet<IpAddr> = table
            .endpoints
            .values()
            .flat_map(|e| e.addresses())
            .collect();
        ips.extend(also);
        ips.extend(table.reserved_ips.iter().copied());
        ips.extend(table.foreign.iter().copied());
        let names = table.taken_names();
        let retiring = table.retiring.clone();
        let picked = pick(&Taken {
            ips,
            names,
            retiring,
        })?;
        table.reserved_ips.insert(picked.0);
        table.reserved_names.insert(picked.1.clone());
        Some(picked)
    }

    /// Reserves one given address of `block` (a requested one) with a veth name chosen by
    /// `name` from those not taken, or says who holds it. Foreign marks do not count: etcd is
    /// asked, and names the holder.
    pub fn reserve_exact(
        &self,
        ip: IpAddr,
        block: IpNetwork,
        tunnel: Option<IpAddr>,
        name: impl FnOnce(&HashSet<String>) -> String,
    ) -> Result<String, Held> {
        let mut table = self.table.lock().unwrap();
        if let Some(holder) = table
            .endpoints
            .values()
            .find(|e| e.addresses().any(|a| a == ip))
        {
            return Err(Held::Endpoint(holder.container_id.clone()));
        }
        if tunnel == Some(ip) {
            return Err(Held::Tunnel);
        }
        if table.reserved_ips.contains(&ip) {
            return Err(Held::Pending);
        }
        if table.retiring.contains(&block) {
            return Err(Held::Retiring);
        }
        let name = name(&table.taken_names());
        table.reserved_ips.insert(ip);
        table.reserved_names.insert(name.clone());
        Ok(name)
    }

    /// Ends a reservation; with the record when it was written (it becomes an endpoint), or
    /// marking the address foreign when etcd said someone else holds it.
    pub fn settle(&self, ip: IpAddr, name: &str, outcome: Settle) {
        let mut table = self.table.lock().unwrap();
        table.reserved_ips.remove(&ip);
        table.reserved_names.remove(name);
        match outcome {
            Settle::Written(record) => {
                table.endpoints.insert(record.container_id.clone(), *record);
            }
            Settle::Foreign => {
                table.foreign.insert(ip);
            }
            Settle::Abandoned => {}
        }
    }

    /// Marks `block` as being released if no endpoint, attach under way or foreign record holds
    /// an address of it, nor `also` (the host's tunnel address); from then on no allocation
    /// picks from it. Returns whether it was marked. Checked and marked under the lock
    /// allocations reserve under, so an allocation is either seen here or kept out.
    pub fn retire(&self, block: IpNetwork, also: Option<IpAddr>) -> bool {
        let mut table = self.table.lock().unwrap();
        let used = table
            .endpoints
            .values()
            .flat_map(|e| e.addresses())
            .chain(table.reserved_ips.iter().copied())
            .chain(table.foreign.iter().copied())
            .chain(also)
            .any(|ip| block.contains(ip));
        if used {
            return false;
        }
        table.retiring.insert(block)
    }

    /// Ends a release (done or failed): the block is in the cluster view again or gone from it.
    pub fn unretire(&self, block: IpNetwork) {
        self.table.lock().unwrap().retiring.remove(&block);
    }

    /// Forgets every foreign mark (at each full reconciliation).
    pub fn forget_foreign(&self) -> usize {
        let mut table = self.table.lock().unwrap();
        let count = table.foreign.len();
        table.foreign.clear();
        count
    }
}

/// A record that must go from etcd. A write etcd had not answered may still land after the
/// first attempt to delete it found nothing (requests of one client are not applied in order
/// once etcd stalls), so it is tried for a while after first found absent.
pub struct Undelivered {
    pub record: EndpointRecord,
    pub absent_since: Option<std::time::Instant>,
}

/// Why a requested address cannot be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// An endpoint of this host holds it (its container id).
    Endpoint(String),
    /// This host's VXLAN tunnel address.
    Tunnel,
    /// An attach under way reserved it.
    Pending,
    /// Its block is being released; it is free to claim again once that is done.
    Retiring,
}

/// How an address reservation ended.
pub enum Settle {
    Written(Box<EndpointRecord>),
    Foreign,
    Abandoned,
}
