//! The reconciler: at start, every resync interval and soon after any event, it compares what
//! the kernel holds with what the cluster and this host's endpoints want, and applies only the
//! difference. `plan` decides (pure); `apply` carries a plan out; `monitor` turns kernel
//! notifications into passes and sysctl repairs. Every pass also brings bird's BGP
//! announcements up to date (`crate::bgp::sync`).

pub mod apply;
pub mod monitor;
#[cfg(test)]
mod pass_tests;
pub mod plan;
pub mod registration;
#[cfg(test)]
mod registration_tests;
pub mod steps;
pub mod tunnel;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use crate::context::Context;
use crate::telemetry::metrics;
use plan::{DeadHostTracker, LeakTracker};
use steps::{Laps, Step, StepTimes};

/// How much a reconciliation pass checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Everything: sysctls, routes, leaks, pools and iptables.
    Full,
    /// Routes and leaks only, after a watch or netlink event.
    Routes,
}

/// The outcome of one reconciliation pass.
#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub routes_replaced: usize,
    pub routes_deleted: usize,
    pub sysctls_fixed: usize,
    pub firewall_tables_written: usize,
    pub endpoints_repaired: usize,
    pub endpoints_released: usize,
    pub links_removed: usize,
    pub namespaces_removed: usize,
    /// Changes to the tunnel device and its neighbour and FDB entries.
    pub tunnel_changes: usize,
    pub errors: usize,
    pub duration: Duration,
    /// Where the time went.
    pub steps: StepTimes,
}

impl ReconcileReport {
    /// Kernel objects added, changed or removed.
    pub fn repairs(&self) -> usize {
        self.routes_replaced
            + self.routes_deleted
            + self.sysctls_fixed
            + self.firewall_tables_written
            + self.endpoints_repaired
            + self.endpoints_released
            + self.links_removed
            + self.namespaces_removed
            + self.tunnel_changes
    }
}

/// Observations kept between passes.
#[derive(Default)]
struct Trackers {
    leaks: LeakTracker,
    dead_hosts: DeadHostTracker,
    /// Records of this host it does not hold, with how many checks saw them.
    unknown_records: std::collections::HashMap<String, u32>,
    /// Peers said to get no route (said once each).
    unrouted: std::collections::BTreeSet<String>,
}

pub struct Reconciler {
    ctx: Arc<Context>,
    trackers: Mutex<Trackers>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reconciler {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            trackers: Default::default(),
            one_at_a_time: Default::default(),
        }
    }

    /// Runs passes every resync interval (full) and soon after any request (routes only).
    pub async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.ctx.config.resync_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let periodic = tokio::select! {
                _ = interval.tick() => true,
                _ = self.ctx.resync.notified() => false,
            };
            if !periodic {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.pass(if periodic { Pass::Full } else { Pass::Routes })
                .await;
            if periodic {
                self.remove_dead_hosts().await;
            }
        }
    }

    /// One reconciliation pass. Every pass diffs routes and collects leaks; a full pass (at
    /// start and every resync interval) also checks sysctls, re-reads the pools and verifies
    /// iptables. Passes triggered by watch and netlink events stay light: with many peers
    /// claiming blocks they come often, and must not fork iptables-save or read thousands of
    /// sysctl files each time.
    pub async fn pass(&self, pass: Pass) -> ReconcileReport {
        let _one = self.one_at_a_time.lock().await;
        let started = Instant::now();
        let mut laps = Laps::start();
        let mut report = ReconcileReport::default();
        let full = pass == Pass::Full;
        if full {
            apply::host_sysctls(&self.ctx, &mut report);
            self.ctx.endpoints.forget_foreign();
            laps.lap(Step::Host);
        }
        apply::undelivered(&self.ctx).await;
        laps.lap(Step::Undelivered);
        if full {
            apply::unverified(&self.ctx, &mut report).await;
            laps.lap(Step::Unverified);
        }
        // A record of ours deleted (seen by the watch) is checked at once, all of them at every
        // full pass.
        if self.ctx.cluster.take_self_touched() || full {
            let mut sightings = std::mem::take(&mut self.trackers.lock().unwrap().unknown_records);
            registration::check(&self.ctx, &mut sightings).await;
            self.trackers.lock().unwrap().unknown_records = sightings;
            laps.lap(Step::Registration);
        }
        let table = apply::TableSnapshot::take(&self.ctx);
        let kernel = apply::read_kernel(&self.ctx, full, &mut report).await;
        laps.lap(Step::ReadKernel);
        if let Some(kernel) = kernel {
            if full {
                apply::veth_sysctls(&self.ctx, &kernel.links, &mut report);
                laps.lap(Step::VethSysctls);
            }
            let leaks = {
                let observed = apply::observe_leaks(&self.ctx, table, &kernel.links);
                let mut trackers = self.trackers.lock().unwrap();
                let inputs = plan::LeakInputs {
                    missing: &observed.missing,
                    links: &kernel.links,
                    claimed: &observed.claimed,
                    stray_namespaces: &observed.stray_namespaces,
                };
                let plan =
                    trackers
                        .leaks
                        .plan(&inputs, Instant::now(), self.ctx.config.resync_interval);
                trackers.leaks.done(&plan);
                plan
            };
            let relinked = !leaks.repair.is_empty() || !leaks.orphans.is_empty();
            apply::leaks(&self.ctx, leaks, &mut report).await;
            laps.lap(Step::Leaks);
            // A veth made again has a new index (and its own route already): read again, or
            // the route diff would take its route for stale.
            let kernel = match relinked {
                true => apply::read_kernel(&self.ctx, false, &mut report).await,
                false => Some(kernel),
            };
            laps.lap(Step::ReadKernel);
            if let Some(kernel) = kernel {
                self.routes(&kernel, &mut report).await;
                laps.lap(Step::Routes);
            }
        }
        if full {
            apply::firewall(&self.ctx, &mut report).await;
            laps.lap(Step::Firewall);
        }
        crate::bgp::sync(&self.ctx, full);
        laps.lap(Step::Bgp);
        report.duration = started.elapsed();
        report.steps = laps.times();
        self.record(pass, &report);
        report
    }

    /// The tunnel, then the routes (some go through the tunnel), then the tunnel's removal when
    /// no peer needs it (its routes are gone by then).
    async fn routes(&self, kernel: &apply::KernelState, report: &mut ReconcileReport) {
        let (paths, needs_tunnel) = self.ctx.cluster.with_view(|view| {
            let needs = plan::peers::needs_tunnel(
                self.ctx.me(),
                self.ctx.subnet(),
                self.ctx.config.encapsulation(),
                &view.hosts,
            );
            (self.ctx.peer_paths(view), needs)
        });
        if needs_tunnel && self.ctx.tunnel_ip().is_none() {
            if let Err(e) = crate::endpoints::allocate::allocate_tunnel(&self.ctx).await {
                tracing::warn!(error = %e, "cannot take a tunnel address; will retry");
                report.errors += 1;
            }
        }
        self.warn_unrouted(&paths);
        let tunnel = tunnel::sync(&self.ctx, &paths, report).await;
        self.ctx
            .tunnel_index
            .store(tunnel.unwrap_or(0), Ordering::Relaxed);
        apply::routes(&self.ctx, kernel, &paths, tunnel, report).await;
        tunnel::remove_unneeded(&self.ctx, &paths, tunnel.is_some(), report).await;
        if self.ctx.config.encapsulation() != weft_etcd::records::Encapsulation::None {
            // The peers allowed to send VXLAN follow the cluster.
            apply::firewall_fast(&self.ctx, report).await;
        }
    }

    /// Says once per peer that it gets no route from weft: a peer whose tunnel is pending, or
    /// one left to the underlay without `--bgp` (with it, that is the design).
    fn warn_unrouted(&self, paths: &std::collections::BTreeMap<String, plan::peers::PeerPath>) {
        use plan::peers::PeerPath;
        let bgp = self.ctx.config.bgp.enabled;
        let mut trackers = self.trackers.lock().unwrap();
        let unrouted: std::collections::BTreeMap<&String, PeerPath> = paths
            .iter()
            .filter(|(_, p)| match p {
                PeerPath::Unrouted => true,
                PeerPath::Underlay => !bgp,
                _ => false,
            })
            .map(|(h, p)| (h, *p))
            .collect();
        trackers.unrouted.retain(|h| unrouted.contains_key(h));
        for (host, path) in unrouted {
            if !trackers.unrouted.insert(host.clone()) {
                continue;
            }
            match path {
                PeerPath::Underlay => {
                    tracing::warn!(peer = %host, "peer is off this host's subnet and the pool's encapsulation is none: weft gives it no route, the underlay must carry the pool (use --bgp, or an encapsulation)")
                }
                _ => {
                    tracing::warn!(peer = %host, "peer is to be reached through the tunnel but has published no tunnel address yet: no route until it does")
                }
            }
        }
    }

    fn record(&self, pass: Pass, report: &ReconcileReport) {
        let full = pass == Pass::Full;
        let metrics = &self.ctx.metrics;
        metrics
            .repairs
            .fetch_add(report.repairs() as u64, Ordering::Relaxed);
        metrics.reconcile_seconds.observe(report.duration);
        metrics.passes.record(full, &report.steps);
        if full {
            tracing::debug!(
                ms = report.duration.as_secs_f64() * 1e3,
                steps = %report.steps,
                "full pass"
            );
        }
        metrics
            .last_pass_ms
            .store(metrics::now_ms(), Ordering::Relaxed);
        if full && report.errors == 0 {
            metrics.reconciled.store(true, Ordering::Relaxed);
        }
        if report.repairs() > 0 {
            info!(
                replaced = report.routes_replaced,
                deleted = report.routes_deleted,
                sysctls = report.sysctls_fixed,
                iptables_tables = report.firewall_tables_written,
                repaired = report.endpoints_repaired,
                released = report.endpoints_released,
                links_removed = report.links_removed,
                namespaces_removed = report.namespaces_removed,
                tunnel = report.tunnel_changes,
                errors = report.errors,
                ms = report.duration.as_secs_f64() * 1e3,
                "reconciled"
            );
        }
    }

    /// Removes peers that have been down longer than `remove-dead-hosts-after` (when set).
    async fn remove_dead_hosts(&self) {
        let Some(after) = self.ctx.config.remove_dead_hosts_after else {
            return;
        };
        let doomed = self.ctx.cluster.with_view(|view| {
            self.trackers.lock().unwrap().dead_hosts.plan(
                view,
                self.ctx.me(),
                Instant::now(),
                after,
            )
        });
        for host in doomed {
            if apply::remove_host(&self.ctx, &host).await {
                self.trackers.lock().unwrap().dead_hosts.removed(&host);
            }
        }
    }
}
