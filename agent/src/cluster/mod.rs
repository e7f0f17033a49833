//! The cluster as this agent sees it (kept current by `watch`), whether etcd answers, the
//! cluster's pools, and this host's liveness lease (`liveness`).

pub mod liveness;
pub mod tunnel;
pub mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use ipnetwork::IpNetwork;
use weft_etcd::records::PoolRecord;
use weft_etcd::{ClusterEvent, ClusterView};

pub struct ClusterState {
    me: String,
    view: RwLock<ClusterView>,
    /// Set when a record of this host (its registration, liveness or a block) was deleted:
    /// registration is checked at the next pass instead of the next full one.
    self_touched: AtomicBool,
    etcd_ok: AtomicBool,
    /// Every pool of the cluster (for "destination in no pool"), refreshed on resync.
    pools: RwLock<Vec<(String, PoolRecord)>>,
}

impl ClusterState {
    pub fn new(me: &str, view: ClusterView, pools: Vec<(String, PoolRecord)>) -> Self {
        Self {
            me: me.to_string(),
            view: RwLock::new(view),
            self_touched: AtomicBool::new(false),
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

    /// Replaces the view with a fresh snapshot; a snapshot that lacks this host's records
    /// counts as their deletion.
    pub fn replace(&self, view: ClusterView) {
        let mut current = self.view.write().unwrap();
        let mine = |v: &ClusterView| (v.hosts.contains_key(&self.me), v.blocks_of(&self.me));
        let (had_host, had_blocks) = mine(&current);
        let (has_host, has_blocks) = mine(&view);
        if (had_host && !has_host) || had_blocks.iter().any(|b| !has_blocks.contains(b)) {
            self.self_touched.store(true, Ordering::Relaxed);
        }
        *current = view;
    }

    pub fn apply(&self, events: impl IntoIterator<Item = (ClusterEvent, i64)>) {
        let mut view = self.view.write().unwrap();
        for (event, revision) in events {
            tracing::debug!(?event, "cluster event");
            let touched = match &event {
                ClusterEvent::HostDeleted(host) | ClusterEvent::AliveDeleted(host) => {
                    *host == self.me
                }
                ClusterEvent::BlockDeleted { block, .. } => view
                    .blocks
                    .get(block)
                    .is_some_and(|owner| owner.host == self.me),
                _ => false,
            };
            if touched {
                self.self_touched.store(true, Ordering::Relaxed);
            }
            view.apply(event);
            view.revision = revision;
        }
    }

    /// Whether a record of this host was deleted since the last call.
    pub fn take_self_touched(&self) -> bool {
        self.self_touched.swap(false, Ordering::Relaxed)
    }

    /// Whether this host's liveness key is in the view.
    pub fn alive(&self, host: &str) -> bool {
        self.view.read().unwrap().alive.contains(host)
    }

    /// Records a claim of ours at once, before its watch event arrives.
    pub fn claimed(&self, pool: &str, block: IpNetwork, host: &str) {
        self.view.write().unwrap().apply(ClusterEvent::BlockPut {
            pool: pool.to_string(),
            block,
            host: host.to_string(),
        });
    }

    /// Records a release of ours at once, before its watch event arrives.
    pub fn released(&self, pool: &str, block: IpNetwork) {
        self.view
            .write()
            .unwrap()
            .apply(ClusterEvent::BlockDeleted {
                pool: pool.to_string(),
                block,
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
