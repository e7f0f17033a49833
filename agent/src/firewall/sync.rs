//! Shares firewall writes between concurrent callers: a sync that starts after a caller's
//! change covers it, so concurrent attaches share one iptables-restore.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Backend, FirewallError, FirewallReport, FirewallSpec, PortRule, SyncMode};
use crate::telemetry::metrics::Metrics;

/// Generations of the rules' inputs: every change bumps `wanted`; a sync that read the state at
/// generation G covers every change bumped up to G.
pub struct FirewallSync {
    backend: Arc<dyn Backend>,
    wanted: AtomicU64,
    applied: AtomicU64,
    one_at_a_time: tokio::sync::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("programming iptables: {0}")]
    Firewall(#[from] FirewallError),
    #[error("firewall task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl FirewallSync {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            wanted: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Rules for the current state (read by `spec` once this caller's turn comes), applied now
    /// unless a sync that started after the caller's change already covers it. A verification
    /// always reads the kernel back; only writes are shared.
    pub async fn sync(
        &self,
        spec: impl FnOnce() -> FirewallSpec,
        mode: SyncMode,
        metrics: &Metrics,
    ) -> Result<FirewallReport, SyncError> {
        let wanted = self.wanted.fetch_add(1, Ordering::SeqCst) + 1;
        let _one = self.one_at_a_time.lock().await;
        if mode == SyncMode::Fast && self.applied.load(Ordering::SeqCst) >= wanted {
            return Ok(FirewallReport::default());
        }
        let generation = self.wanted.load(Ordering::SeqCst);
        let spec = spec();
        let backend = self.backend.clone();
        let report = tokio::task::spawn_blocking(move || backend.sync(&spec, mode))
            .await?
            .inspect_err(|_| {
                metrics.iptables_errors.fetch_add(1, Ordering::Relaxed);
            })?;
        metrics
            .iptables_restores
            .fetch_add(report.tables_written as u64, Ordering::Relaxed);
        self.applied.store(generation, Ordering::SeqCst);
        Ok(report)
    }

    /// What is missing from the kernel for these published ports.
    pub async fn check_ports(&self, ports: Vec<PortRule>) -> Result<Vec<String>, SyncError> {
        let backend = self.backend.clone();
        Ok(tokio::task::spawn_blocking(move || backend.check_ports(&ports)).await??)
    }

    /// Existing UDP flows to these host ports would stick to their old destination; drop them.
    pub async fn flush_udp(&self, ports: Vec<u16>) {
        if ports.is_empty() {
            return;
        }
        let backend = self.backend.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            ports.into_iter().try_for_each(|p| backend.flush_udp(p))
        })
        .await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "cannot flush UDP conntrack entries");
        }
    }

    pub fn rule_count(&self) -> usize {
        self.backend.rule_count()
    }
}
