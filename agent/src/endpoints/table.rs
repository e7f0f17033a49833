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
    /// Every address of the endpoints, with its holder's container id: an allocation asks
    /// whether an address is taken without walking every endpoint.
    address_holders: HashMap<IpAddr, String>,
    /// Every endpoint's host veth name, with its holder's container id.
    link_holders: HashMap<String, String>,
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
    /// Holds `record` (replacing the endpoint of the same container), indexes kept in step.
    fn put(&mut self, record: EndpointRecord) {
        self.take(&record.container_id);
        let id = &record.container_id;
        for ip in record.addresses() {
            self.address_holders.insert(ip, id.clone());
        }
        self.link_holders
            .insert(record.host_ifname.clone(), id.clone());
        self.endpoints.insert(id.clone(), record);
    }

    /// Lets go of the endpoint of container `id`, indexes kept in step.
    fn take(&mut self, id: &str) -> Option<EndpointRecord> {
        let record = self.endpoints.remove(id)?;
        for ip in record.addresses() {
            if self.address_holders.get(&ip).is_some_and(|h| h == id) {
                self.address_holders.remove(&ip);
            }
        }
        if self
            .link_holders
            .get(&record.host_ifname)
            .is_some_and(|h| h == id)
        {
            self.link_holders.remove(&record.host_ifname);
        }
        Some(record)
    }
}

/// What an allocation may not hand out, asked of the table under its lock: addresses of
/// endpoints, of attaches still writing their record, foreign marks and one more (the host's
/// tunnel address); veth names of endpoints and of attaches under way; blocks being released.
/// Each question is a lookup, whatever the number of endpoints.
pub struct Taken<'a> {
    table: &'a Table,
    also: Option<IpAddr>,
}

impl Taken<'_> {
    pub fn ip(&self, ip: IpAddr) -> bool {
        let table = self.table;
        self.also == Some(ip)
            || table.address_holders.contains_key(&ip)
            || table.reserved_ips.contains(&ip)
            || table.foreign.contains(&ip)
    }

    pub fn name(&self, name: &str) -> bool {
        self.table.link_holders.contains_key(name) || self.table.reserved_names.contains(name)
    }

    /// Whether `block` is being released: no address of it may be picked.
    pub fn retiring(&self, block: &IpNetwork) -> bool {
        self.table.retiring.contains(block)
    }
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
        let mut table = Table::default();
        for record in endpoints {
            table.put(record);
        }
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
        self.table.lock().unwrap().put(record);
    }

    pub fn remove(&self, id: &str) -> Option<EndpointRecord> {
        self.table.lock().unwrap().take(id)
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
        self.table.lock().unwrap().link_holders.get(name).cloned()
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
        let picked = pick(&Taken {
            table: &table,
            also,
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
        name: impl FnOnce(&Taken) -> String,
    ) -> Result<String, Held> {
        let mut table = self.table.lock().unwrap();
        if let Some(holder) = table.address_holders.get(&ip) {
            return Err(Held::Endpoint(holder.clone()));
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
        let name = name(&Taken {
            table: &table,
            also: None,
        });
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
            Settle::Written(record) => table.put(*record),
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
            .address_holders
            .keys()
            .copied()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, ip: &str, ipv6: Option<&str>, veth: &str) -> EndpointRecord {
        EndpointRecord {
            ipv6: ipv6.map(|ip| ip.parse().unwrap()),
            ..crate::testing::endpoint("h1", id, ip, veth)
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// What the table says is taken, asked as an allocation asks.
    fn taken(table: &EndpointTable, also: Option<IpAddr>, ips: &[&str], names: &[&str]) -> bool {
        let mut answer = None;
        table.reserve(also, |taken| {
            answer = Some((
                ips.iter().map(|s| taken.ip(ip(s))).collect::<Vec<_>>(),
                names.iter().map(|n| taken.name(n)).collect::<Vec<_>>(),
            ));
            None::<(IpAddr, String, ())>
        });
        let (ips, names) = answer.unwrap();
        ips.into_iter().chain(names).all(|t| t)
    }

    #[test]
    fn addresses_and_names_are_taken_exactly_while_an_endpoint_holds_them() {
        let table = EndpointTable::new([endpoint("a", "10.65.0.1", Some("fd65::1"), "wefta")]);
        assert!(taken(&table, None, &["10.65.0.1", "fd65::1"], &["wefta"]));
        assert!(!taken(&table, None, &["10.65.0.2"], &[]));
        assert!(!taken(&table, None, &[], &["weftb"]));
        assert!(taken(&table, Some(ip("10.65.0.9")), &["10.65.0.9"], &[]));
        assert_eq!(table.owner_of_link("wefta").as_deref(), Some("a"));

        // The same container again with other addresses and veth: the old ones are free.
        table.insert(endpoint("a", "10.65.0.3", None, "weftc"));
        assert!(!taken(&table, None, &["10.65.0.1"], &[]));
        assert!(!taken(&table, None, &["fd65::1"], &[]));
        assert!(!taken(&table, None, &[], &["wefta"]));
        assert!(taken(&table, None, &["10.65.0.3"], &["weftc"]));
        assert_eq!(table.owner_of_link("wefta"), None);
        assert_eq!(table.owner_of_link("weftc").as_deref(), Some("a"));

        table.remove("a");
        assert!(!taken(&table, None, &["10.65.0.3"], &[]));
        assert!(!taken(&table, None, &[], &["weftc"]));
        assert_eq!(table.owner_of_link("weftc"), None);
    }

    #[test]
    fn reservations_hold_until_settled_and_a_written_one_becomes_the_endpoint() {
        let table = EndpointTable::default();
        let picked = table.reserve(None, |taken| {
            (!taken.ip(ip("10.65.0.1"))).then(|| (ip("10.65.0.1"), "wefta".to_string(), ()))
        });
        assert!(picked.is_some());
        assert!(taken(&table, None, &["10.65.0.1"], &["wefta"]));
        let exact = || {
            let block = "10.65.0.0/26".parse().unwrap();
            table.reserve_exact(ip("10.65.0.1"), block, None, |_| String::new())
        };
        assert_eq!(exact(), Err(Held::Pending));
        table.settle(
            ip("10.65.0.1"),
            "wefta",
            Settle::Written(Box::new(endpoint("a", "10.65.0.1", None, "wefta"))),
        );
        assert_eq!(exact(), Err(Held::Endpoint("a".into())));
        // An abandoned reservation leaves nothing taken.
        table.reserve(None, |_| Some((ip("10.65.0.2"), "weftb".to_string(), ())));
        table.settle(ip("10.65.0.2"), "weftb", Settle::Abandoned);
        assert!(!taken(&table, None, &["10.65.0.2"], &[]));
        assert!(!taken(&table, None, &[], &["weftb"]));
        // A block holding an endpoint's address is not released.
        assert!(!table.retire("10.65.0.0/26".parse().unwrap(), None));
        assert!(table.retire("10.65.1.0/26".parse().unwrap(), None));
    }
}
