//! A firewall that remembers what it was asked to hold, with failures on demand, for unit tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{Backend, FirewallError, FirewallReport, FirewallSpec, PortRule, SyncMode};

#[derive(Debug, Default)]
pub struct FakeFirewall {
    /// The spec of the last successful sync.
    pub applied: Mutex<FirewallSpec>,
    failing: AtomicBool,
}

impl FakeFirewall {
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// The published ports the firewall holds now.
    pub fn ports(&self) -> Vec<PortRule> {
        self.applied.lock().unwrap().ports.clone()
    }
}

impl Backend for FakeFirewall {
    fn sync(&self, spec: &FirewallSpec, _mode: SyncMode) -> Result<FirewallReport, FirewallError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(FirewallError::Command {
                command: "iptables-restore".into(),
                message: "injected failure".into(),
            });
        }
        let mut applied = self.applied.lock().unwrap();
        let written = (*applied != *spec) as usize;
        *applied = spec.clone();
        Ok(FirewallReport {
            tables_written: written,
            rules: spec.ports.len(),
        })
    }

    fn check_ports(&self, ports: &[PortRule]) -> Result<Vec<String>, FirewallError> {
        let applied = self.applied.lock().unwrap();
        Ok(ports
            .iter()
            .filter(|p| !applied.ports.contains(p))
            .map(|p| format!("missing DNAT for {}/{}", p.protocol, p.host_port))
            .collect())
    }

    fn flush_udp(&self, _host_port: u16) -> Result<(), FirewallError> {
        Ok(())
    }

    fn rule_count(&self) -> usize {
        self.applied.lock().unwrap().ports.len()
    }
}
