//! The cluster as this agent sees it (kept current by `watch`), whether etcd answers, the
//! cluster's pools, and this host's liveness lease (`liveness`).

pub mod liveness;
pub mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use ipnetwork::IpNetwork;
use weft_etcd::records::PoolRecord;
use weft_etcd::{ClusterEvent, ClusterView};

pub struct ClusterState {
    view: RwLock<ClusterView>,
    etcd_ok: AtomicBool,
    /// Every pool of the cluster (for "destination in no pool"), refreshed on resync.
    pools: RwLock<Vec<(String, PoolRecord)>>,
}

impl ClusterState {
    pub fn new(view: ClusterView, pools: Vec<(String, PoolRecord)>) -> Self {
        Self {
            view: RwLock::new(view),
            etcd_ok: AtomicBool::new(true),
            pools: RwLock::new(pools),
        }
    }

    /// A copy of the view.
    pub fn view(&self) -> ClusterView {
        self.view.read().unwrap().clone()
    }

    /// Reads the view without copying it.
    pub fn with_view<T>(&self, read: impl FnOnce(&ClusterView) -> T) -> T {
        read(&self.view.read().unwrap())
    }

    pub fn blocks_of(&self, host: &str) -> Vec<IpNetwork> {
        self.view.read().unwrap().blocks_of(host)
    }

    pub fn pool_blocks_of(&self, pool: &str, host: &str) -> Vec<IpNetwork> {
        self.view.read().unwrap().pool_blocks_of(pool, host)
    }

    pub fn replace(&self, view: ClusterView) {
        *self.view.write().unwrap() = view;
    }

    pub fn apply(&self, events: impl IntoIterator<Item = (ClusterEvent, i64)>) {
        let mut view = self.view.write().unwrap();
        for (event, revision) in events {
            tracing::debug!(?event, "cluster event");
            view.apply(event);
            view.revision = revision;
        }
    }

    /// Records a claim of ours at once, before its watch event arrives.
    pub fn claimed(&self, pool: &str, block: IpNetwork, host: &str) {
        self.view.write().unwrap().apply(ClusterEvent::BlockPut {
            pool: pool.to_string(),
            block,
            host: host.to_string(),
        });
    }

    pub fn pools(&self) -> Vec<(String, PoolRecord)> {
        self.pools.read().unwrap().clone()
    }

    pub fn set_pools(&self, pools: Vec<(String, PoolRecord)>) {
        *self.pools.write().unwrap() = pools;
    }

    /// Records whether etcd answered; returns the previous state.
    pub fn set_etcd_ok(&self, ok: bool) -> bool {
        self.etcd_ok.swap(ok, Ordering::Relaxed)
    }
}
