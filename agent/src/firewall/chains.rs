//! Chains owned whole (network policy's): each is wanted with its rules, and written by chain —
//! an ordered chain that differs is declared again (flushed) and refilled, an unordered one
//! (whose rules never overlap, like the per-interface dispatch) gets only its deleted and added
//! rules, and a chain no longer wanted is flushed and deleted, all in one `iptables-restore
//! --noflush` transaction. Also reads these chains back from `iptables-save`. Pure.

use std::collections::{BTreeMap, BTreeSet};

/// Name prefixes of the chains this module owns (in the filter table).
pub const OWNED_PREFIXES: &[&str] = &[
    "WEFT-TO-WL",
    "WEFT-FROM-WL",
    "WEFT-TW-",
    "WEFT-FW-",
    "WEFT-PI-",
    "WEFT-PO-",
];

/// The dispatch chains our FORWARD and INPUT chains jump to: they always exist.
pub const DISPATCH_CHAINS: [&str; 2] = ["WEFT-TO-WL", "WEFT-FROM-WL"];

pub fn is_owned(chain: &str) -> bool {
    OWNED_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// One chain as wanted: its rules as `-A CHAIN …` lines in the form `iptables-save` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedChain {
    /// Whether rule order matters (first match); if not, rules are compared as a set.
    pub ordered: bool,
    pub rules: Vec<String>,
}

/// Owned chains by name.
pub type Chains = BTreeMap<String, OwnedChain>;

/// Policy's chains of each address family: the IPv4 ones for iptables, the IPv6 ones for
/// ip6tables (written only on hosts with an IPv6 pool).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyChains {
    pub v4: Chains,
    pub v6: Chains,
}

/// What the kernel holds of the owned chains: every declared one with its rules in order.
pub fn parse_owned(save: &str) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in save.lines() {
        if let Some(rest) = line.strip_prefix(':') {
            let name = rest.split_whitespace().next().unwrap_or("");
            if is_owned(name) {
                chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if is_owned(name) {
                chains
                    .entry(name.to_string())
                    .or_default()
                    .push(line.to_string());
            }
        }
    }
    chains
}

fn same(wanted: &OwnedChain, held: &[String]) -> bool {
    match wanted.ordered {
        true => wanted.rules == held,
        false => {
            let a: BTreeSet<&String> = wanted.rules.iter().collect();
            let b: BTreeSet<&String> = held.iter().collect();
            a == b && held.len() == b.len()
        }
    }
}

/// The restore input that turns `held` into `wanted`, or None when they already agree.
/// Unordered chains that exist get single-rule deletes and appends; everything else that
/// differs is declared (which flushes it) and refilled; chains not wanted are flushed, then
/// deleted once nothing of ours jumps to them.
pub fn restore_input(wanted: &Chains, held: &BTreeMap<String, Vec<String>>) -> Option<String> {
    let mut declare = vec![];
    let mut deletes = vec![];
    let mut appends = vec![];
    let mut remove = vec![];
    for (name, chain) in wanted {
        match held.get(name) {
            Some(rules) if same(chain, rules) => {}
            Some(rules) if !chain.ordered && unique(rules) => {
                let have: BTreeSet<&String> = rules.iter().collect();
                let want: BTreeSet<&String> = chain.rules.iter().collect();
                deletes.extend(have.difference(&want).map(|r| r.replacen("-A ", "-D ", 1)));
                appends.extend(want.difference(&have).map(|r| r.to_string()));
            }
            _ => {
                declare.push(name.clone());
                appends.extend(chain.rules.iter().cloned());
            }
        }
    }
    for name in held.keys().filter(|n| !wanted.contains_key(*n)) {
        declare.push(name.clone());
        remove.push(name.clone());
    }
    if declare.is_empty() && deletes.is_empty() && appends.is_empty() {
        return None;
    }
    let mut input = String::from("*filter\n");
    for name in &declare {
        input.push_str(&format!(":{name} - [0:0]\n"));
    }
    for line in deletes.iter().chain(&appends) {
        input.push_str(line);
        input.push('\n');
    }
    for name in &remove {
        input.push_str(&format!("-X {name}\n"));
    }
    input.push_str("COMMIT\n");
    Some(input)
}

fn unique(rules: &[String]) -> bool {
    rules.iter().collect::<BTreeSet<_>>().len() == rules.len()
}

/// The chains as they will be after a successful restore of `wanted`.
pub fn as_held(wanted: &Chains) -> BTreeMap<String, Vec<String>> {
    wanted
        .iter()
        .map(|(name, chain)| (name.clone(), chain.rules.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(ordered: bool, rules: &[&str]) -> OwnedChain {
        OwnedChain {
            ordered,
            rules: rules.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn only_differences_are_written() {
        let mut wanted = Chains::new();
        wanted.insert(
            "WEFT-TO-WL".into(),
            chain(false, &["-A WEFT-TO-WL b", "-A WEFT-TO-WL c"]),
        );
        wanted.insert(
            "WEFT-PI-1".into(),
            chain(true, &["-A WEFT-PI-1 x", "-A WEFT-PI-1 y"]),
        );
        let held = parse_owned(
            "*filter\n:FORWARD ACCEPT [0:0]\n:WEFT-TO-WL - [0:0]\n:WEFT-PI-1 - [0:0]\n\
             :WEFT-TW-old - [0:0]\n:WEFT-FORWARD - [0:0]\n\
             -A WEFT-TO-WL a\n-A WEFT-TO-WL b\n-A WEFT-PI-1 y\n-A WEFT-PI-1 x\n\
             -A WEFT-TW-old z\n-A WEFT-FORWARD q\nCOMMIT\n",
        );
        assert!(!held.contains_key("WEFT-FORWARD"), "not owned here");
        let input = restore_input(&wanted, &held).unwrap();
        assert_eq!(
            input,
            "*filter\n:WEFT-PI-1 - [0:0]\n:WEFT-TW-old - [0:0]\n-D WEFT-TO-WL a\n\
             -A WEFT-PI-1 x\n-A WEFT-PI-1 y\n-A WEFT-TO-WL c\n-X WEFT-TW-old\nCOMMIT\n"
        );
        assert_eq!(restore_input(&wanted, &as_held(&wanted)), None);
    }

    #[test]
    fn missing_chains_are_declared_and_duplicates_rewritten() {
        let mut wanted = Chains::new();
        wanted.insert("WEFT-FROM-WL".into(), chain(false, &["-A WEFT-FROM-WL a"]));
        let input = restore_input(&wanted, &BTreeMap::new()).unwrap();
        assert_eq!(
            input,
            "*filter\n:WEFT-FROM-WL - [0:0]\n-A WEFT-FROM-WL a\nCOMMIT\n"
        );
        let held = parse_owned(":WEFT-FROM-WL - [0:0]\n-A WEFT-FROM-WL a\n-A WEFT-FROM-WL a\n");
        let input = restore_input(&wanted, &held).unwrap();
        assert!(input.contains(":WEFT-FROM-WL - [0:0]"), "{input}");
    }
}
