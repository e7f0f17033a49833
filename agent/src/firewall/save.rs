//! The text of `iptables-save` and `iptables-restore` (the same for their ip6tables twins):
//! reading our chains and jumps out of a table's save, and writing the restore input that
//! replaces our chains whole or changes single rules. Pure.

use std::collections::BTreeMap;

use super::rules::Jump;

/// What `iptables-save` shows of our chains in one table, and which jumps exist.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableState {
    /// `-A WEFT-…` lines in order.
    pub rules: Vec<String>,
    /// Targets of jumps found in built-in chains, by chain.
    pub jumps: BTreeMap<String, Vec<String>>,
}

impl TableState {
    pub fn has_jump(&self, jump: &Jump) -> bool {
        self.jumps
            .get(jump.chain)
            .is_some_and(|targets| targets.iter().any(|t| t == jump.target))
    }
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
pub fn restore_input(
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
    for jump in jumps.iter().filter(|j| !state.has_jump(j)) {
        out.push_str(&format!("-I {} 1 {}\n", jump.chain, jump.rule));
    }
    out.push_str("COMMIT\n");
    out
}

/// The `iptables-restore --noflush` input that turns `applied` into `wanted` by deleting and
/// appending single rules (both normalized): one atomic restore whose cost does not grow with
/// the number of published ports.
pub fn incremental_input(table: &str, applied: &[String], wanted: &[String]) -> String {
    let mut input = format!("*{table}\n");
    for gone in applied.iter().filter(|r| wanted.binary_search(r).is_err()) {
        input.push_str(&gone.replacen("-A ", "-D ", 1));
        input.push('\n');
    }
    for new in wanted.iter().filter(|r| applied.binary_search(r).is_err()) {
        input.push_str(new);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    input
}

/// Our nat rules as a set, for comparison. No two of them overlap (each DNAT matches its own
/// port, each hairpin its own address), so their order within a chain does not matter and
/// incremental writes may append. (The filter table's order matters: see [`by_chain`].)
pub fn normalize(rules: &[String]) -> Vec<String> {
    let mut sorted = rules.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
}

/// Rules grouped by chain, each chain's rules in their order: the order that matters in the
/// filter table, whatever order `iptables-save` lists the chains in.
pub fn by_chain(rules: &[String]) -> Vec<String> {
    let mut grouped = rules.to_vec();
    grouped.sort_by(|a, b| chain_of(a).cmp(chain_of(b)));
    grouped
}

fn chain_of(rule: &str) -> &str {
    rule.split_whitespace().nth(1).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::rules::{NAT_CHAINS, NAT_JUMPS};

    #[test]
    fn save_output_is_parsed_for_our_chains_and_jumps() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT-PORTS - [0:0]\n\
            -A PREROUTING -m addrtype --dst-type LOCAL -j WEFT-PORTS\n\
            -A PREROUTING -j DOCKER\n\
            -A WEFT-PORTS -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.65.0.2:80\nCOMMIT\n";
        let state = parse_save(save);
        assert_eq!(state.rules.len(), 1);
        assert_eq!(state.jumps["PREROUTING"], vec!["WEFT-PORTS".to_string()]);
        assert!(state.has_jump(&NAT_JUMPS[1]));
        assert!(!state.has_jump(&NAT_JUMPS[0]));
    }

    #[test]
    fn restores_declare_our_chains_and_add_only_missing_jumps() {
        let state = parse_save("-A PREROUTING -m addrtype --dst-type LOCAL -j WEFT-PORTS\n");
        let input = restore_input(
            "nat",
            NAT_CHAINS,
            &["-A WEFT-PORTS x".into()],
            NAT_JUMPS,
            &state,
        );
        assert_eq!(
            input,
            format!(
                "*nat\n:WEFT-POSTROUTING - [0:0]\n:WEFT-NAT-OUTGOING - [0:0]\n:WEFT-PORTS - [0:0]\n\
                 -A WEFT-PORTS x\n-I POSTROUTING 1 {}\n-I OUTPUT 1 {}\nCOMMIT\n",
                NAT_JUMPS[0].rule, NAT_JUMPS[2].rule
            )
        );
    }

    #[test]
    fn incremental_writes_delete_and_append_only_the_difference() {
        let applied = normalize(&["-A WEFT-PORTS a".into(), "-A WEFT-PORTS b".into()]);
        let wanted = normalize(&["-A WEFT-PORTS b".into(), "-A WEFT-PORTS c".into()]);
        assert_eq!(
            incremental_input("nat", &applied, &wanted),
            "*nat\n-D WEFT-PORTS a\n-A WEFT-PORTS c\nCOMMIT\n"
        );
    }
}
