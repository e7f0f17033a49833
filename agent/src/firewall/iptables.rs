//! The iptables runner: `iptables-save` and `iptables-restore --noflush` per table (and their
//! ip6tables twins on hosts with an IPv6 pool), the last written state that lets attach and
//! detach write only the difference, and conntrack flushes.

use std::sync::Mutex;

use super::chains::{self, Chains};
use super::rules::{
    self, filter_rules, nat_rules, render, Jump, FILTER_CHAINS, FILTER_JUMPS, NAT_CHAINS, NAT_JUMPS,
};
use super::save::{by_chain, incremental_input, normalize, parse_save, restore_input};
use super::{
    command, ip6, Backend, FirewallError, FirewallReport, FirewallSpec, PortRule, SyncMode,
};

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, FirewallError> {
    Ok(command::run(program, args, input)?)
}

/// The commands of one address family.
#[derive(Debug, Clone, Copy)]
struct Family {
    name: &'static str,
    save: &'static str,
    restore: &'static str,
}

const V4: Family = Family {
    name: "iptables",
    save: "iptables-save",
    restore: "iptables-restore",
};
const V6: Family = Family {
    name: "ip6tables",
    save: "ip6tables-save",
    restore: "ip6tables-restore",
};

fn restore(family: Family, input: &str) -> Result<String, FirewallError> {
    run(family.restore, &["--noflush", "--wait"], Some(input))
}

/// One `iptables-save` of a table, read at most once per sync: the filter table's chains of ours
/// and policy's are compared against the same reading (neither write touches the other's
/// chains).
#[derive(Default)]
struct Save(Option<String>);

impl Save {
    fn of(&mut self, family: Family, table: &str) -> Result<&str, FirewallError> {
        if self.0.is_none() {
            self.0 = Some(run(family.save, &["-t", table], None)?);
        }
        Ok(self.0.as_deref().unwrap_or_default())
    }
}

/// One table's last write.
#[derive(Debug, Default, Clone)]
struct Applied {
    /// Our rules as written (normalized).
    rules: Vec<String>,
    /// Whether a full check (rules and jumps read back from the kernel) has passed since.
    verified: bool,
}

/// One table of ours: its name, chains, jumps, and what was last written to it.
struct Table {
    family: Family,
    name: &'static str,
    chains: &'static [&'static str],
    jumps: &'static [Jump],
    /// Whether rule order matters (filter, WEFT-VXLAN included: a change rewrites the table's
    /// chains whole); nat rules never overlap, compare as a set and may be appended to.
    ordered: bool,
    applied: Applied,
}

impl Table {
    /// Brings the table in line with `rules`; returns whether it was written.
    fn sync(
        &mut self,
        rules: &[String],
        mode: SyncMode,
        save: &mut Save,
    ) -> Result<bool, FirewallError> {
        let wanted = match self.ordered {
            true => by_chain(rules),
            false => normalize(rules),
        };
        if mode == SyncMode::Fast && self.applied.verified && self.applied.rules == wanted {
            return Ok(false);
        }
        // Appending is right only where order does not matter.
        if mode == SyncMode::Fast && self.applied.verified && !self.ordered {
            match restore(
                self.family,
                &incremental_input(self.name, &self.applied.rules, &wanted),
            ) {
                Ok(_) => {
                    self.applied.rules = wanted;
                    return Ok(true);
                }
                // Our chains were changed behind our back (a rule to delete is gone): fall back
                // to reading the kernel and rewriting.
                Err(e) => {
                    tracing::warn!(error = %e, "incremental iptables update failed; rewriting")
                }
            }
        }
        let state = parse_save(save.of(self.family, self.name)?);
        let jumps_present = self.jumps.iter().all(|j| state.has_jump(j));
        // Only this table's own chains: the chains policy owns are compared by `PolicyChains`.
        let held: Vec<String> = state
            .rules
            .iter()
            .filter(|r| {
                let chain = r.split_whitespace().nth(1).unwrap_or("");
                self.chains.contains(&chain)
            })
            .cloned()
            .collect();
        let held = match self.ordered {
            true => by_chain(&held),
            false => normalize(&held),
        };
        let written = if jumps_present && held == wanted {
            false
        } else {
            restore(
                self.family,
                &restore_input(self.name, self.chains, rules, self.jumps, &state),
            )?;
            true
        };
        self.applied = Applied {
            rules: wanted,
            verified: true,
        };
        Ok(written)
    }
}

/// Network policy's chains in one family's filter table, as last written or read back (None:
/// unknown).
struct PolicyChains {
    family: Family,
    held: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

impl PolicyChains {
    fn new(family: Family) -> Self {
        Self { family, held: None }
    }

    /// Brings the owned chains in line with `wanted`; returns whether anything was written.
    fn sync(
        &mut self,
        wanted: &Chains,
        mode: SyncMode,
        save: &mut Save,
    ) -> Result<bool, FirewallError> {
        // Our FORWARD chain jumps to the dispatch chains, whatever policy holds.
        let mut wanted = wanted.clone();
        for name in chains::DISPATCH_CHAINS {
            wanted.entry(name.to_string()).or_default();
        }
        let wanted = &wanted;
        if let (SyncMode::Fast, Some(held)) = (mode, &self.held) {
            let Some(input) = chains::restore_input(wanted, held) else {
                return Ok(false);
            };
            match restore(self.family, &input) {
                Ok(_) => {
                    self.held = Some(chains::as_held(wanted));
                    return Ok(true);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "incremental policy chain update failed; re-reading")
                }
            }
        }
        self.held = None;
        let held = chains::parse_owned(save.of(self.family, "filter")?);
        let written = match chains::restore_input(wanted, &held) {
            Some(input) => restore(self.family, &input).map(|_| true)?,
            None => false,
        };
        self.held = Some(chains::as_held(wanted));
        Ok(written)
    }

    fn rule_count(&self) -> usize {
        self.held
            .iter()
            .flat_map(|h| h.values())
            .map(Vec::len)
            .sum()
    }
}

/// What of `rules` (and the jumps to `WEFT-PORTS`) one family's nat table lacks, described.
fn missing_ports(
    family: Family,
    rules: &[String],
    jumps: &[Jump],
) -> Result<Vec<String>, FirewallError> {
    if rules.is_empty() {
        return Ok(vec![]);
    }
    let state = parse_save(&run(family.save, &["-t", "nat"], None)?);
    let mut problems: Vec<String> = rules
        .iter()
        .filter(|rule| !state.rules.contains(rule))
        .map(|rule| format!("missing {} rule (nat): {rule}", family.name))
        .collect();
    for jump in jumps.iter().filter(|j| j.target == "WEFT-PORTS") {
        if !state.has_jump(jump) {
            problems.push(format!(
                "missing {} jump (nat): -A {} {}",
                family.name, jump.chain, jump.rule
            ));
        }
    }
    Ok(problems)
}

/// The real firewall: the IPv4 tables of the agent's namespace with policy's chains, and the
/// IPv6 tables (raw, nat, filter with policy's chains) of a host with an IPv6 pool.
pub struct Iptables {
    tables: Mutex<(Table, Table, PolicyChains)>,
    v6: Mutex<(Table, Table, Table, PolicyChains)>,
}

impl Default for Iptables {
    fn default() -> Self {
        let table = |family, name, chains, jumps, ordered| Table {
            family,
            name,
            chains,
            jumps,
            ordered,
            applied: Applied::default(),
        };
        Self {
            tables: Mutex::new((
                table(V4, "nat", NAT_CHAINS, NAT_JUMPS, false),
                table(V4, "filter", FILTER_CHAINS, FILTER_JUMPS, true),
                PolicyChains::new(V4),
            )),
            v6: Mutex::new((
                table(V6, "raw", ip6::RAW_CHAINS, ip6::RAW_JUMPS, false),
                table(V6, "nat", ip6::NAT_CHAINS, ip6::NAT_JUMPS, false),
                table(V6, "filter", ip6::FILTER_CHAINS, ip6::FILTER_JUMPS, true),
                PolicyChains::new(V6),
            )),
        }
    }
}

impl Iptables {
    /// Brings the IPv6 tables in line with `spec` (nothing on hosts without an IPv6 pool).
    fn sync_v6(
        &self,
        spec: &FirewallSpec,
        mode: SyncMode,
    ) -> Result<(usize, usize), FirewallError> {
        if !ip6::wanted(spec) {
            return Ok((0, 0));
        }
        let mut tables = self.v6.lock().unwrap();
        let (raw, nat, filter, policy) = &mut *tables;
        let mut written = raw.sync(&ip6::raw_rules(), mode, &mut Save::default())? as usize;
        written += nat.sync(&render(&ip6::nat_rules(spec)), mode, &mut Save::default())? as usize;
        // Policy's chains first, as for IPv4.
        let mut filter_save = Save::default();
        written += policy.sync(&spec.policy.v6, mode, &mut filter_save)? as usize;
        written += filter.sync(&render(&ip6::filter_rules()), mode, &mut filter_save)? as usize;
        Ok((written, Self::count_v6(&tables)))
    }

    fn count_v6((raw, nat, filter, policy): &(Table, Table, Table, PolicyChains)) -> usize {
        [raw, nat, filter]
            .iter()
            .map(|t| t.applied.rules.len())
            .sum::<usize>()
            + policy.rule_count()
    }
}

impl Backend for Iptables {
    fn sync(&self, spec: &FirewallSpec, mode: SyncMode) -> Result<FirewallReport, FirewallError> {
        let mut tables = self.tables.lock().unwrap();
        let (nat, filter, policy) = &mut *tables;
        let mut report = FirewallReport::default();
        let nat_rules = render(&nat_rules(spec));
        report.tables_written += nat.sync(&nat_rules, mode, &mut Save::default())? as usize;
        // Policy's chains first: our FORWARD chain jumps to its dispatch chains.
        let mut filter_save = Save::default();
        report.tables_written += policy.sync(&spec.policy.v4, mode, &mut filter_save)? as usize;
        let filter_rules = render(&filter_rules(spec));
        report.tables_written += filter.sync(&filter_rules, mode, &mut filter_save)? as usize;
        report.rules = nat.applied.rules.len() + filter.applied.rules.len() + policy.rule_count();
        let (written, rules) = self.sync_v6(spec, mode)?;
        report.tables_written += written;
        report.rules += rules;
        Ok(report)
    }

    fn check_ports(&self, ports: &[PortRule]) -> Result<Vec<String>, FirewallError> {
        let (v4, v6): (Vec<PortRule>, Vec<PortRule>) =
            ports.iter().cloned().partition(|p| p.ip.is_ipv4());
        let mut problems = missing_ports(V4, &rules::port_rules(&v4), NAT_JUMPS)?;
        problems.extend(missing_ports(V6, &ip6::port_rules(&v6), ip6::NAT_JUMPS)?);
        Ok(problems)
    }

    fn flush_udp(&self, host_port: u16) -> Result<(), FirewallError> {
        let port = host_port.to_string();
        match run(
            "conntrack",
            &["-D", "-p", "udp", "--orig-port-dst", &port],
            None,
        ) {
            Err(FirewallError::Command { message, .. })
                if message.contains("0 flow entries") || message.is_empty() =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    fn rule_count(&self) -> usize {
        let tables = self.tables.lock().unwrap();
        let v6 = Self::count_v6(&self.v6.lock().unwrap());
        tables.0.applied.rules.len() + tables.1.applied.rules.len() + tables.2.rule_count() + v6
    }
}
