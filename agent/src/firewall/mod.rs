//! iptables: SNAT for traffic leaving the fabric, DNAT for published ports, and FORWARD accepts
//! for container traffic. The agent owns the `WEFT-*` chains and only inserts jump rules into
//! built-in chains. Each table is written in one `iptables-restore --noflush` call, which
//! replaces the contents of our chains atomically and leaves every other chain untouched.
//!
//! `rules` decides and renders (pure; `ip6` for IPv6); `save` reads and writes the
//! save/restore text (pure); `chains` diffs the chains network policy owns whole (pure);
//! `iptables` runs the commands (through `command`, which `ipset` uses too); `sync` shares writes between concurrent callers.
//! [`Backend`] is the seam unit tests replace.

pub mod chains;
pub mod command;
pub mod fake;
pub mod ip6;
pub mod iptables;
pub mod rules;
pub mod save;
pub mod sync;

pub use rules::{FirewallSpec, PoolRule, PortRule};
pub use sync::FirewallSync;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
}

impl From<command::CommandFailed> for FirewallError {
    fn from(failed: command::CommandFailed) -> Self {
        FirewallError::Command {
            command: failed.command,
            message: failed.message,
        }
    }
}

/// How much to check before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Read the kernel's rules and jumps back and repair any difference (resync).
    Verify,
    /// Write our chains if the wanted rules changed, trusting the last verified state for the
    /// rest (attach and detach: one iptables-restore, no reads).
    Fast,
}

/// The outcome of one sync.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FirewallReport {
    /// Tables rewritten (0 when everything already matched).
    pub tables_written: usize,
    /// Rules in our chains after the sync.
    pub rules: usize,
}

/// The firewall operations of the agent. Blocking: callers run them off the async workers.
pub trait Backend: Send + Sync + 'static {
    /// Brings our chains in line with `spec`.
    fn sync(&self, spec: &FirewallSpec, mode: SyncMode) -> Result<FirewallReport, FirewallError>;
    /// What is missing from the kernel for these published ports (rules and jumps).
    fn check_ports(&self, ports: &[PortRule]) -> Result<Vec<String>, FirewallError>;
    /// Drops conntrack entries of a UDP host port, so flows do not stick to a gone container.
    fn flush_udp(&self, host_port: u16) -> Result<(), FirewallError>;
    /// Rules in our chains as last written.
    fn rule_count(&self) -> usize;
}
