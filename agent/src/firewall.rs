//! iptables: SNAT for traffic leaving the fabric, DNAT for published ports, and FORWARD accepts
//! for container traffic. The agent owns the `WEFT-*` chains and only inserts jump rules into
//! built-in chains. Each table is written in one `iptables-restore --noflush` call, which
//! replaces the contents of our chains atomically and leaves every other chain untouched.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnetwork::Ipv4Network;

/// A published port of one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRule {
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub protocol: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// Everything the rules are made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallSpec {
    /// Every pool of the cluster, with its nat_outgoing setting.
    pub pools: Vec<(String, Ipv4Network, bool)>,
    pub ports: Vec<PortRule>,
}

/// A jump from a built-in chain into ours.
struct Jump {
    chain: &'static str,
    rule: &'static str,
    target: &'static str,
}

const NAT_JUMPS: &[Jump] = &[
    Jump {
        chain: "POSTROUTING",
        rule: "-m comment --comment \"weft: SNAT leaving the fabric, hairpin\" -j WEFT-POSTROUTING",
        target: "WEFT-POSTROUTING",
    },
    Jump {
        chain: "PREROUTING",
        rule: "-m addrtype --dst-type LOCAL -m comment --comment \"weft: published ports\" -j WEFT-PORTS",
        target: "WEFT-PORTS",
    },
    // Loopback destinations are left out: DNAT of 127.0.0.1 to a container cannot be routed.
    Jump {
        chain: "OUTPUT",
        rule: "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment \"weft: published ports from this host\" -j WEFT-PORTS",
        target: "WEFT-PORTS",
    },
];

const FILTER_JUMPS: &[Jump] = &[Jump {
    chain: "FORWARD",
    rule: "-m comment --comment \"weft: container traffic\" -j WEFT-FORWARD",
    target: "WEFT-FORWARD",
}];

const NAT_CHAINS: &[&str] = &["WEFT-POSTROUTING", "WEFT-NAT-OUTGOING", "WEFT-PORTS"];
const FILTER_CHAINS: &[&str] = &["WEFT-FORWARD"];

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
}

fn comment(text: &str) -> String {
    // Container ids are validated to [A-Za-z0-9_.-], so no quoting issues arise.
    format!("-m comment --comment \"weft: {text}\"")
}

/// The rules of our nat chains, one `-A` line each.
pub fn nat_rules(spec: &FirewallSpec) -> Vec<String> {
    let mut rules = vec![];
    let mut ports = spec.ports.clone();
    ports.sort();
    for p in &ports {
        // A container reaching itself through its own published port must not see a packet
        // from its own address: masquerade that one case.
        rules.push(format!(
            "-A WEFT-POSTROUTING -s {ip}/32 -d {ip}/32 -p {proto} -m {proto} --dport {cport} {c} -j MASQUERADE",
            ip = p.ip,
            proto = p.protocol,
            cport = p.container_port,
            c = comment(&format!("hairpin {}", p.container_id)),
        ));
    }
    for (name, cidr, nat) in &spec.pools {
        if *nat {
            rules.push(format!(
                "-A WEFT-POSTROUTING -s {cidr} {} -j WEFT-NAT-OUTGOING",
                comment(&format!("pool {name} has nat-outgoing"))
            ));
        }
    }
    for (name, cidr, _) in &spec.pools {
        rules.push(format!(
            "-A WEFT-NAT-OUTGOING -d {cidr} {} -j RETURN",
            comment(&format!("inside the fabric (pool {name})"))
        ));
    }
    rules.push(format!(
        "-A WEFT-NAT-OUTGOING {} -j MASQUERADE",
        comment("leaving the fabric")
    ));
    for p in &ports {
        rules.push(format!(
            "-A WEFT-PORTS -p {proto} -m {proto} --dport {hport} {c} -j DNAT --to-destination {ip}:{cport}",
            proto = p.protocol,
            hport = p.host_port,
            c = comment(&p.container_id),
            ip = p.ip,
            cport = p.container_port,
        ));
    }
    rules
}

/// The rules of our filter chains.
pub fn filter_rules() -> Vec<String> {
    vec![
        format!(
            "-A WEFT-FORWARD -i weft+ {} -j ACCEPT",
            comment("from containers")
        ),
        format!(
            "-A WEFT-FORWARD -o weft+ {} -j ACCEPT",
            comment("to containers")
        ),
    ]
}

/// What `iptables-save` shows of our chains in one table, and which jumps exist.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableState {
    /// `-A WEFT-…` lines in order.
    pub rules: Vec<String>,
    /// Targets of jumps found in built-in chains, by chain.
    pub jumps: BTreeMap<String, Vec<String>>,
}

/// Reads our part of `iptables-save` output.
pub fn parse_save(text: &str) -> TableState {
    let mut state = TableState::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or("");
        if chain.starts_with("WEFT-") {
            state.rules.push(line.to_string());
        } else if let Some(target) = line.split(" -j ").nth(1) {
            let target = target.split_whitespace().next().unwrap_or("");
            if target.starts_with("WEFT-") {
                state
                    .jumps
                    .entry(chain.to_string())
                    .or_default()
                    .push(target.to_string());
            }
        }
    }
    state
}

/// Builds the `iptables-restore --noflush` input for one table: our chains (declaring a chain
/// flushes it within the same atomic commit) and any missing jump.
fn restore_input(
    table: &str,
    chains: &[&str],
    rules: &[String],
    jumps: &[Jump],
    state: &TableState,
) -> String {
    let mut out = format!("*{table}\n");
    for chain in chains {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in rules {
        out.push_str(rule);
        out.push('\n');
    }
    for jump in jumps {
        let present = state
            .jumps
            .get(jump.chain)
            .is_some_and(|targets| targets.iter().any(|t| t == jump.target));
        if !present {
            out.push_str(&format!("-I {} 1 {}\n", jump.chain, jump.rule));
        }
    }
    out.push_str("COMMIT\n");
    out
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, FirewallError> {
    let shown = format!("{program} {}", args.join(" "));
    let fail = |message: String| FirewallError::Command {
        command: shown.clone(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    // A program that fails early stops reading; its own message says more than the broken
    // pipe our write would report, so the exit status is looked at first.
    let written = match input {
        Some(input) => child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes()),
        None => Ok(()),
    };
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    written.map_err(|e| fail(e.to_string()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Our rules as a set, for comparison. Rules are rendered in the exact form `iptables-save`
/// prints, and no two of our rules overlap (each DNAT matches its own port, each hairpin its own
/// address), so their order within a chain does not matter and incremental writes may append.
pub fn normalize(rules: &[String]) -> Vec<String> {
    let mut sorted = rules.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
}

/// One table's last write.
#[derive(Debug, Default, Clone)]
struct Applied {
    /// Our rules as written (normalized).
    rules: Vec<String>,
    /// Whether a full check (rules and jumps read back from the kernel) has passed since.
    verified: bool,
}

/// The outcome of one sync.
#[derive(Debug, Default, Clone, Copy)]
pub struct FirewallReport {
    /// Tables rewritten (0 when everything already matched).
    pub tables_written: usize,
    /// Rules in our chains after the sync.
    pub rules: usize,
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

/// Keeps our chains equal to the spec.
#[derive(Default)]
pub struct Firewall {
    nat: Applied,
    filter: Applied,
}

impl Firewall {
    /// Brings both tables in line with `spec`. Blocking: runs iptables-save/-restore.
    pub fn sync(
        &mut self,
        spec: &FirewallSpec,
        mode: SyncMode,
    ) -> Result<FirewallReport, FirewallError> {
        let mut report = FirewallReport::default();
        let nat = nat_rules(spec);
        report.tables_written +=
            sync_table("nat", NAT_CHAINS, &nat, NAT_JUMPS, &mut self.nat, mode)? as usize;
        let filter = filter_rules();
        report.tables_written += sync_table(
            "filter",
            FILTER_CHAINS,
            &filter,
            FILTER_JUMPS,
            &mut self.filter,
            mode,
        )? as usize;
        report.rules = self.rule_count();
        Ok(report)
    }

    /// Rules in our chains as last written.
    pub fn rule_count(&self) -> usize {
        self.nat.rules.len() + self.filter.rules.len()
    }
}

fn sync_table(
    table: &str,
    chains: &[&str],
    rules: &[String],
    jumps: &[Jump],
    applied: &mut Applied,
    mode: SyncMode,
) -> Result<bool, FirewallError> {
    let wanted = normalize(rules);
    if mode == SyncMode::Fast && applied.verified {
        if applied.rules == wanted {
            return Ok(false);
        }
        // Only the difference: appends and deletes of single rules, one atomic restore whose
        // cost does not grow with the number of published ports.
        let mut input = format!("*{table}\n");
        for gone in applied
            .rules
            .iter()
            .filter(|r| wanted.binary_search(r).is_err())
        {
            input.push_str(&gone.replacen("-A ", "-D ", 1));
            input.push('\n');
        }
        for new in wanted
            .iter()
            .filter(|r| applied.rules.binary_search(r).is_err())
        {
            input.push_str(new);
            input.push('\n');
        }
        input.push_str("COMMIT\n");
        match run("iptables-restore", &["--noflush", "--wait"], Some(&input)) {
            Ok(_) => {
                applied.rules = wanted;
                return Ok(true);
            }
            // Our chains were changed behind our back (a rule to delete is gone): fall back to
            // reading the kernel and rewriting.
            Err(e) => tracing::warn!(error = %e, "incremental iptables update failed; rewriting"),
        }
    }
    let state = parse_save(&run("iptables-save", &["-t", table], None)?);
    let jumps_present = jumps.iter().all(|j| {
        state
            .jumps
            .get(j.chain)
            .is_some_and(|targets| targets.iter().any(|t| t == j.target))
    });
    let written = if jumps_present && normalize(&state.rules) == wanted {
        false
    } else {
        let input = restore_input(table, chains, rules, jumps, &state);
        run("iptables-restore", &["--noflush", "--wait"], Some(&input))?;
        true
    };
    *applied = Applied {
        rules: wanted,
        verified: true,
    };
    Ok(written)
}

/// What is missing from the kernel's nat table for these published ports of one container: their
/// DNAT and hairpin rules, and the jumps into `WEFT-PORTS`. Reads `iptables-save`; no ports, no
/// read.
pub fn check_ports(ports: &[PortRule]) -> Result<Vec<String>, FirewallError> {
    if ports.is_empty() {
        return Ok(vec![]);
    }
    let spec = FirewallSpec {
        pools: vec![],
        ports: ports.to_vec(),
    };
    // Without pools, the only rule not about these ports is the final MASQUERADE.
    let wanted: Vec<String> = nat_rules(&spec)
        .into_iter()
        .filter(|r| !r.starts_with("-A WEFT-NAT-OUTGOING"))
        .collect();
    let state = parse_save(&run("iptables-save", &["-t", "nat"], None)?);
    let mut problems: Vec<String> = wanted
        .iter()
        .filter(|rule| !state.rules.contains(rule))
        .map(|rule| format!("missing iptables rule (nat): {rule}"))
        .collect();
    for jump in NAT_JUMPS.iter().filter(|j| j.target == "WEFT-PORTS") {
        let present = state
            .jumps
            .get(jump.chain)
            .is_some_and(|targets| targets.iter().any(|t| t == jump.target));
        if !present {
            problems.push(format!(
                "missing iptables jump (nat): -A {} {}",
                jump.chain, jump.rule
            ));
        }
    }
    Ok(problems)
}

/// Drops conntrack entries of a UDP host port, so existing flows do not stick to a container
/// that is gone (or miss one that just arrived). No entries is not an error.
pub fn flush_udp_conntrack(host_port: u16) -> Result<(), FirewallError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FirewallSpec {
        FirewallSpec {
            pools: vec![
                ("default".into(), "10.65.0.0/16".parse().unwrap(), true),
                ("internal".into(), "10.66.0.0/16".parse().unwrap(), false),
            ],
            ports: vec![PortRule {
                container_id: "web".into(),
                ip: "10.65.0.5".parse().unwrap(),
                protocol: "tcp".into(),
                host_port: 8080,
                container_port: 80,
            }],
        }
    }

    #[test]
    fn only_nat_outgoing_pools_are_masqueraded_and_pools_are_exempt() {
        let rules = nat_rules(&spec());
        let jumps: Vec<_> = rules
            .iter()
            .filter(|r| r.ends_with("-j WEFT-NAT-OUTGOING"))
            .collect();
        assert_eq!(jumps.len(), 1);
        assert!(jumps[0].contains("-s 10.65.0.0/16"));
        let returns: Vec<_> = rules.iter().filter(|r| r.ends_with("-j RETURN")).collect();
        assert_eq!(returns.len(), 2, "every pool is inside the fabric");
        assert!(rules
            .last()
            .unwrap()
            .contains("--to-destination 10.65.0.5:80"));
    }

    #[test]
    fn save_output_is_parsed_for_our_chains_and_jumps() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT-PORTS - [0:0]\n\
            -A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment \"weft: x\" -j WEFT-PORTS\n\
            -A PREROUTING -j DOCKER\n\
            -A WEFT-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.65.0.5:80\nCOMMIT\n";
        let state = parse_save(text);
        assert_eq!(state.rules.len(), 1);
        assert_eq!(
            state.jumps.get("PREROUTING"),
            Some(&vec!["WEFT-PORTS".to_string()])
        );
        let input = restore_input("nat", NAT_CHAINS, &[], NAT_JUMPS, &state);
        assert!(
            !input.contains("-I PREROUTING"),
            "present jump is not added again"
        );
        assert!(input.contains("-I POSTROUTING 1"));
        assert!(input.contains("-I OUTPUT 1"));
        assert!(input.ends_with("COMMIT\n"));
    }
}
