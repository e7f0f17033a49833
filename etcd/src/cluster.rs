//! The cluster as one agent sees it: hosts, which of them are alive, and who owns which block.
//! Built from a snapshot and kept current by watch events. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::records::HostRecord;

/// One change seen on the watched prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    HostPut(String, HostRecord),
    HostDeleted(String),
    AlivePut(String),
    AliveDeleted(String),
    BlockPut {
        pool: String,
        block: IpNetwork,
        host: String,
    },
    BlockDeleted {
        pool: String,
        block: IpNetwork,
    },
}

/// Owner of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOwner {
    pub pool: String,
    pub host: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub hosts: BTreeMap<String, HostRecord>,
    pub alive: BTreeSet<String>,
    pub blocks: BTreeMap<IpNetwork, BlockOwner>,
    /// The etcd revision this view reflects.
    pub revision: i64,
}

impl ClusterView {
    pub fn apply(&mut self, event: ClusterEvent) {
        match event {
            ClusterEvent::HostPut(name, record) => {
                self.hosts.insert(name, record);
            }
            ClusterEvent::HostDeleted(name) => {
                self.hosts.remove(&name);
            }
            ClusterEvent::AlivePut(name) => {
                self.alive.insert(name);
            }
            ClusterEvent::AliveDeleted(name) => {
                self.alive.remove(&name);
            }
            ClusterEvent::BlockPut { pool, block, host } => {
                self.blocks.insert(block, BlockOwner { pool, host });
            }
            ClusterEvent::BlockDeleted { block, .. } => {
                self.blocks.remove(&block);
            }
        }
    }

    /// Blocks owned by `host`, in address order.
    pub fn blocks_of(&self, host: &str) -> Vec<IpNetwork> {
        self.blocks
            .iter()
            .filter(|(_, owner)| owner.host == host)
            .map(|(block, _)| *block)
            .collect()
    }

    /// Blocks of `pool` owned by `host`, in address order.
    pub fn pool_blocks_of(&self, pool: &str, host: &str) -> Vec<IpNetwork> {
        self.blocks
            .iter()
            .filter(|(_, owner)| owner.host == host && owner.pool == pool)
            .map(|(block, _)| *block)
            .collect()
    }

    /// Every block of every other known host, with the underlay address to route it through.
    /// A block whose owner has no host record (yet, or any more) gets no route: there is nowhere
    /// to send it.
    pub fn peer_routes(&self, me: &str) -> BTreeMap<IpNetwork, IpAddr> {
        self.blocks
            .iter()
            .filter(|(_, owner)| owner.host != me)
            .filter_map(|(block, owner)| {
                let host = self.hosts.get(&owner.host)?;
                Some((*block, host.underlay_ip))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(ip: &str) -> HostRecord {
        HostRecord {
            underlay_ip: ip.parse().unwrap(),
            version: "test".into(),
            first_seen: 0,
            underlay_prefix: None,
            vtep_mac: None,
            tunnel_ip: None,
            underlay_ipv6: None,
        }
    }

    fn block_put(block: &str, host: &str) -> ClusterEvent {
        ClusterEvent::BlockPut {
            pool: "default".into(),
            block: block.parse().unwrap(),
            host: host.into(),
        }
    }

    #[test]
    fn peer_routes_follow_events() {
        let mut view = ClusterView::default();
        view.apply(ClusterEvent::HostPut("a".into(), host("198.51.100.1")));
        view.apply(ClusterEvent::HostPut("b".into(), host("198.51.100.2")));
        view.apply(block_put("10.65.0.0/26", "a"));
        view.apply(block_put("10.65.0.64/26", "b"));
        view.apply(block_put("10.65.0.128/26", "c"));

        let routes = view.peer_routes("a");
        assert_eq!(routes.len(), 1, "own block and hostless block get no route");
        assert_eq!(
            routes.get(&"10.65.0.64/26".parse().unwrap()),
            Some(&"198.51.100.2".parse().unwrap())
        );

        view.apply(ClusterEvent::HostDeleted("b".into()));
        assert!(view.peer_routes("a").is_empty());
        view.apply(ClusterEvent::HostPut("c".into(), host("198.51.100.3")));
        view.apply(ClusterEvent::BlockDeleted {
            pool: "default".into(),
            block: "10.65.0.64/26".parse().unwrap(),
        });
        assert_eq!(view.peer_routes("a").len(), 1);
        assert_eq!(view.blocks_of("a"), vec!["10.65.0.0/26".parse().unwrap()]);
        assert_eq!(
            view.pool_blocks_of("default", "a"),
            vec!["10.65.0.0/26".parse().unwrap()]
        );
        assert!(view.pool_blocks_of("other", "a").is_empty());
    }
}
