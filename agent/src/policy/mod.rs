//! Network policy with Calico's semantics, enforced where each container's veth meets this host.
//!
//! `watch` keeps [`PolicyState`]'s view of the fabric (every endpoint's addresses and labels,
//! every policy) current; `plan` decides, from that view and this host's endpoints, which chains
//! and address sets should exist (pure); `render` turns the plan into iptables rules (pure);
//! `sets` is the address-set seam (ipset, with a fake; `member` its members, `ipset_netlink`
//! the member moves without the `ipset` program); `apply` carries a plan out: sets first, then
//! the chains (through the firewall seam, in one restore), then sets no rule uses any more are
//! destroyed; `join` puts an attaching endpoint into profiles that are in place, writing no rule,
//! and `leave` takes a departed one out of them.

pub mod apply;
pub mod ipset_netlink;
mod join;
pub(crate) mod leave;
pub mod member;
pub mod plan;
pub mod render;
pub mod sets;
pub mod watch;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;
use weft_etcd::records::EndpointRecord;
use weft_etcd::FabricView;

pub use apply::{police_first, sync, PolicySyncError};

use crate::firewall::chains::FamilyChains;
use sets::SetBackend;

/// What policy enforcement knows and has applied.
pub struct PolicyState {
    /// Every endpoint and policy of the fabric, as the watch last saw them.
    view: RwLock<FabricView>,
    /// The chains of the last plan whose sets are in place: every firewall write uses them.
    chains: RwLock<FamilyChains>,
    pub sets: Arc<dyn SetBackend>,
    /// Whether the chains above were written by the last firewall sync that carried them.
    chains_written: std::sync::atomic::AtomicBool,
    /// The sets in place (every set write records what it put there) and the selectors of the
    /// last full sync: an endpoint's change moves members of these without planning again, and
    /// a sync of chains first makes only the sets not among them.
    last_sets: std::sync::Mutex<Option<apply::LastSets>>,
    /// Endpoint changes seen by the watch and not yet applied to the sets.
    touched: std::sync::Mutex<Vec<apply::Touched>>,
    /// Host veths of local endpoints that left, whose pairs are still in profile sets.
    left: std::sync::Mutex<Vec<String>>,
    /// Wakes the policy loop for a sync soon.
    wake: Notify,
    /// Generations of the inputs: a sync that read them at generation G covers changes up to G.
    wanted: AtomicU64,
    applied: AtomicU64,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl PolicyState {
    pub fn new(view: FabricView, sets: Arc<dyn SetBackend>) -> Self {
        Self {
            view: RwLock::new(view),
            chains: RwLock::new(FamilyChains {
                v4: render::render(&plan::PolicyPlan::default()),
                v6: render::render(&plan::PolicyPlan::default()),
            }),
            sets,
            last_sets: Default::default(),
            touched: Default::default(),
            left: Default::default(),
            chains_written: Default::default(),
            wake: Notify::new(),
            wanted: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// The chains firewall writes carry.
    pub fn chains(&self) -> FamilyChains {
        self.chains.read().unwrap().clone()
    }

    /// Reads the fabric view without copying it.
    pub fn with_view<T>(&self, read: impl FnOnce(&FabricView) -> T) -> T {
        read(&self.view.read().unwrap())
    }

    /// Replaces the view (a fresh snapshot) and asks for a sync.
    pub fn replace(&self, view: FabricView) {
        *self.view.write().unwrap() = view;
        self.request_sync();
    }

    /// Applies watch events. A policy change asks for a full sync; an endpoint change only
    /// moves set members (the chains of this host's endpoints follow its own attaches, detaches
    /// and relabels, and every resync).
    pub fn apply(&self, events: Vec<weft_etcd::FabricEvent>, revision: i64) {
        use weft_etcd::FabricEvent as E;
        let mut full = false;
        {
            let mut view = self.view.write().unwrap();
            let mut touched = self.touched.lock().unwrap();
            for event in events {
                let old = |host: &str, id: &str| -> Vec<std::net::IpAddr> {
                    view.endpoints
                        .get(&(host.to_string(), id.to_string()))
                        .map(|e| e.addresses().collect())
                        .unwrap_or_default()
                };
                match &event {
                    E::EndpointPut(r) => touched.push(apply::Touched {
                        old: old(&r.host, &r.container_id),
                        new: Some((r.addresses().collect(), r.labels.clone())),
                    }),
                    E::EndpointDeleted { host, container_id } => touched.push(apply::Touched {
                        old: old(host, container_id),
                        new: None,
                    }),
                    E::PolicyPut(_) | E::PolicyDeleted(_) => full = true,
                }
                view.apply(event);
            }
            view.revision = revision;
        }
        match full {
            true => self.request_sync(),
            false => self.wake.notify_one(),
        }
    }

    /// Whether an endpoint with these labels is in some set of the last plan (or there is no
    /// plan yet): its arrival or departure changes set members.
    pub fn in_some_set(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match &*self.last_sets.lock().unwrap() {
            None => true,
            Some(last) => last.selectors.values().any(|s| s.matches(labels)),
        }
    }

    /// Asks the policy loop for a sync soon.
    pub fn request_sync(&self) {
        self.wanted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// A local endpoint some policy selected left (detached, or its attach rolled back): its
    /// pairs leave its profiles' sets soon, without a plan where none is needed.
    pub fn leave(&self, endpoint: &EndpointRecord) {
        self.left.lock().unwrap().push(endpoint.host_ifname.clone());
        self.wake.notify_one();
    }

    /// Whether some policy selects this endpoint (for either direction): its chains must be in
    /// place before its first packet.
    pub fn selects(&self, endpoint: &EndpointRecord) -> bool {
        self.with_view(|view| {
            view.policies.values().any(|p| {
                (p.ingress.is_some() || p.egress.is_some()) && p.selector.matches(&endpoint.labels)
            })
        })
    }

    /// Whether a full sync was asked for and has not run since.
    pub(crate) fn full_sync_pending(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.applied.load(SeqCst) < self.wanted.load(SeqCst)
    }

    /// Number of policies known.
    pub fn policy_count(&self) -> usize {
        self.with_view(|view| view.policies.len())
    }
}

/// Runs the policy loop: a quick sync soon after any change (fabric watch, attach, detach,
/// relabel), and every `period` one that reads the address sets back and repairs them.
pub async fn run(ctx: Arc<crate::context::Context>, period: std::time::Duration) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let periodic = tokio::select! {
            _ = interval.tick() => true,
            _ = ctx.policy.wake.notified() => false,
        };
        if !periodic {
            // Let a burst of watch events settle into one sync.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let sets = match periodic {
            true => crate::firewall::SyncMode::Verify,
            false => crate::firewall::SyncMode::Fast,
        };
        if let Err(e) = apply::sync_members(&ctx).await {
            tracing::warn!(error = %e, "moving address set members failed; a full sync follows");
            ctx.policy.request_sync();
        }
        if let Err(e) = leave::apply(&ctx).await {
            tracing::warn!(error = %e, "taking left endpoints out of their profiles failed; a full sync follows");
            ctx.policy.request_sync();
        }
        // An endpoint's change anywhere in the fabric wakes every host's loop; moving members
        // is all it needs. Planning again is for policy changes, local endpoints that need it
        // and the periodic read-back.
        if !periodic && !ctx.policy.full_sync_pending() {
            continue;
        }
        // The chains are read back by the reconciler's full pass (with the rest of our rules)
        // every resync interval; here the sets are.
        if let Err(e) = apply::sync_sets(&ctx, sets).await {
            tracing::warn!(error = %e, "network policy sync failed; retrying at the next change or resync");
        }
    }
}
