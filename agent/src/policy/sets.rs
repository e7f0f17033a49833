//! Address sets (ipset) for selectors, networks and profiles: the seam [`SetBackend`], the real
//! one ([`Ipset`]: members of sets in place added and deleted over netlink, anything else in one
//! `ipset restore`; additions before deletions; never a set rebuilt while rules use it) and
//! [`FakeSets`] for unit tests. Only sets named `weft-…`
//! are ever touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::ipset_netlink::{self, Change};
use super::member::Member;
use super::plan::{Family, SetKind, SetSpec};
use crate::firewall::SyncMode;

/// Prefix of every set the agent owns.
pub const SET_PREFIX: &str = "weft-";

#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct SetError {
    pub command: String,
    pub message: String,
}

/// A set as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSet {
    /// `hash:ip`, `hash:net` or `hash:net,iface`.
    pub kind: String,
    /// `inet` or `inet6`.
    pub family: String,
    pub members: BTreeSet<Member>,
}

pub type HeldSets = BTreeMap<String, HeldSet>;

/// The address-set operations policy needs. Blocking: callers run them off the async workers.
pub trait SetBackend: Send + Sync + 'static {
    /// Creates the wanted sets that are missing and adds and deletes members until each holds
    /// exactly its members (Verify reads the kernel first; Fast trusts the last state). Never
    /// destroys a set. Returns the number of changes made.
    fn sync(&self, wanted: &BTreeMap<String, SetSpec>, mode: SyncMode) -> Result<usize, SetError>;
    /// Destroys our sets that are not wanted (once no rule uses them); returns how many.
    fn prune(&self, wanted: &BTreeMap<String, SetSpec>) -> Result<usize, SetError>;
}

fn kind_name(kind: SetKind) -> &'static str {
    match kind {
        SetKind::Selector => "hash:ip",
        SetKind::Nets => "hash:net",
        SetKind::Profile => "hash:net,iface",
    }
}

/// Our sets in `ipset save` output.
pub fn parse_save(text: &str) -> HeldSets {
    let mut sets = HeldSets::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, kind, rest @ ..] if name.starts_with(SET_PREFIX) => {
                let family = rest
                    .windows(2)
                    .find(|w| w[0] == "family")
                    .map_or("inet", |w| w[1]);
                sets.insert(
                    name.to_string(),
                    HeldSet {
                        kind: kind.to_string(),
                        family: family.to_string(),
                        members: BTreeSet::new(),
                    },
                );
            }
            ["add", name, member, ..] => {
                if let (Some(set), Ok(net)) = (sets.get_mut(*name), member.parse()) {
                    set.members.insert(net);
                }
            }
            _ => {}
        }
    }
    sets
}

/// The `ipset restore` input that brings `held` to `wanted` (None: nothing to do). A set of the
/// wrong type or family is rebuilt beside it and swapped in, so rules that use it never see it
/// missing.
pub fn restore_input(wanted: &BTreeMap<String, SetSpec>, held: &HeldSets) -> Option<String> {
    let mut lines = vec![];
    // Every deletion after every addition, as over netlink (`member_moves`).
    let mut deletes = vec![];
    for (name, spec) in wanted {
        let kind = kind_name(spec.kind);
        let family = spec.family.ipset();
        let create = |name: &str| format!("create {name} {kind} family {family}");
        match held.get(name) {
            Some(h) if h.kind == kind && h.family == family => {
                for new in spec.members.difference(&h.members) {
                    lines.push(format!("add {name} {}", new));
                }
                for gone in h.members.difference(&spec.members) {
                    deletes.push(format!("del {name} {}", gone));
                }
            }
            Some(_) => {
                let temporary = "weft-swap";
                lines.push(create(temporary));
                lines.push(format!("flush {temporary}"));
                lines.extend(
                    spec.members
                        .iter()
                        .map(|m| format!("add {temporary} {}", m)),
                );
                lines.push(format!("swap {temporary} {name}"));
                lines.push(format!("destroy {temporary}"));
            }
            None => {
                lines.push(create(name));
                lines.extend(spec.members.iter().map(|m| format!("add {name} {}", m)));
            }
        }
    }
    lines.extend(deletes);
    match lines.is_empty() {
        true => None,
        false => Some(lines.join("\n") + "\n"),
    }
}

/// The members to add and delete when every wanted set is in place with its type and family
/// (None when a set must be made or rebuilt: that is `ipset restore`'s work). Every addition
/// comes before every deletion: an endpoint moving from one profile's set to another's is in
/// both for a moment, never in neither (which would leave it unpoliced).
fn member_moves<'a>(
    wanted: &'a BTreeMap<String, SetSpec>,
    held: &'a HeldSets,
) -> Option<Vec<(Change, &'a String, &'a Member)>> {
    let (mut adds, mut dels) = (vec![], vec![]);
    for (name, spec) in wanted {
        let h = held.get(name)?;
        if h.kind != kind_name(spec.kind) || h.family != spec.family.ipset() {
            return None;
        }
        dels.extend(
            h.members
                .difference(&spec.members)
                .map(|m| (Change::Del, name, m)),
        );
        adds.extend(
            spec.members
                .difference(&h.members)
                .map(|m| (Change::Add, name, m)),
        );
    }
    adds.extend(dels);
    Some(adds)
}

/// The held state after `wanted` was restored.
fn as_held(wanted: &BTreeMap<String, SetSpec>) -> HeldSets {
    wanted
        .iter()
        .map(|(name, spec)| {
            let held = HeldSet {
                kind: kind_name(spec.kind).to_string(),
                family: spec.family.ipset().to_string(),
                members: spec.members.clone(),
            };
            (name.clone(), held)
        })
        .collect()
}

/// Brings `held` to `wanted` with one `ipset restore`; returns the number of changes.
fn restore(wanted: &BTreeMap<String, SetSpec>, held: &HeldSets) -> Result<usize, SetError> {
    match restore_input(wanted, held) {
        Some(input) => {
            ipset(&["-exist", "restore"], Some(&input))?;
            Ok(input.lines().count())
        }
        None => Ok(0),
    }
}

fn ipset(args: &[&str], input: Option<&str>) -> Result<String, SetError> {
    crate::firewall::command::run("ipset", args, input).map_err(|failed| SetError {
        command: failed.command,
        message: failed.message,
    })
}

/// The real sets of the agent's namespace, with what was last written.
#[derive(Default)]
pub struct Ipset {
    held: Mutex<Option<HeldSets>>,
}

impl Ipset {
    fn read(&self) -> Result<HeldSets, SetError> {
        Ok(parse_save(&ipset(&["save"], None)?))
    }
}

impl SetBackend for Ipset {
    fn sync(&self, wanted: &BTreeMap<String, SetSpec>, mode: SyncMode) -> Result<usize, SetError> {
        let mut held = self.held.lock().unwrap();
        let mut current = match (mode, held.take()) {
            (SyncMode::Fast, Some(known)) => known,
            _ => self.read()?,
        };
        // On failure (someone changed our sets meanwhile) the state stays unknown: the next
        // sync reads it again. Members only moving in sets that are in place go over netlink;
        // anything else is `ipset restore`'s. Sets of ours not wanted stay until `prune`:
        // rules may still use them.
        let changes = match member_moves(wanted, &current) {
            Some(moves) if moves.is_empty() => 0,
            Some(moves) => {
                let moves: Vec<_> = moves.iter().map(|(c, s, m)| (*c, s.as_str(), *m)).collect();
                match ipset_netlink::apply(&moves) {
                    Ok(()) => moves.len(),
                    // Whatever the kernel took or refused, `ipset` brings the sets where they
                    // should be from what it reads back.
                    Err(e) => {
                        tracing::warn!(error = %e, "moving set members over netlink failed; using ipset");
                        current = self.read()?;
                        restore(wanted, &current)?
                    }
                }
            }
            None => restore(wanted, &current)?,
        };
        if changes > 0 {
            current.extend(as_held(wanted));
        }
        *held = Some(current);
        Ok(changes)
    }

    fn prune(&self, wanted: &BTreeMap<String, SetSpec>) -> Result<usize, SetError> {
        let mut held = self.held.lock().unwrap();
        let Some(known) = held.as_mut() else {
            return Ok(0);
        };
        let doomed: Vec<String> = known
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        let mut destroyed = 0;
        for name in doomed {
            match ipset(&["destroy", &name], None) {
                Ok(_) => destroyed += 1,
                Err(e) if e.message.contains("does not exist") => {}
                // Still used by a rule (a firewall write that failed): next time.
                Err(e) => {
                    tracing::debug!(set = %name, error = %e, "cannot destroy set yet");
                    continue;
                }
            }
            known.remove(&name);
        }
        Ok(destroyed)
    }
}

/// Sets in memory, for unit tests.
#[derive(Debug, Default)]
pub struct FakeSets {
    pub sets: Mutex<BTreeMap<String, SetSpec>>,
}

impl SetBackend for FakeSets {
    fn sync(&self, wanted: &BTreeMap<String, SetSpec>, _: SyncMode) -> Result<usize, SetError> {
        let mut sets = self.sets.lock().unwrap();
        let changed = wanted
            .iter()
            .filter(|(n, s)| sets.get(*n) != Some(s))
            .count();
        sets.extend(wanted.iter().map(|(n, s)| (n.clone(), s.clone())));
        Ok(changed)
    }

    fn prune(&self, wanted: &BTreeMap<String, SetSpec>) -> Result<usize, SetError> {
        let mut sets = self.sets.lock().unwrap();
        let before = sets.len();
        sets.retain(|name, _| wanted.contains_key(name));
        Ok(before - sets.len())
    }
}

impl Family {
    /// The family of a set's `family` word.
    pub fn from_ipset(word: &str) -> Self {
        match word {
            "inet6" => Family::V6,
            _ => Family::V4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: SetKind, members: &[&str]) -> SetSpec {
        SetSpec {
            kind,
            family: Family::V4,
            members: members.iter().map(|m| m.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn members_move_over_netlink_only_between_sets_in_place_and_join_before_they_leave() {
        let held = parse_save(
            "create weft-4t-a hash:net,iface family inet\nadd weft-4t-a 10.65.0.2,weftx\n\
             create weft-4t-b hash:net,iface family inet\n",
        );
        let mut wanted = BTreeMap::new();
        wanted.insert("weft-4t-a".to_string(), spec(SetKind::Profile, &[]));
        wanted.insert(
            "weft-4t-b".to_string(),
            spec(SetKind::Profile, &["10.65.0.2,weftx"]),
        );
        let moves = member_moves(&wanted, &held).unwrap();
        let moves: Vec<(Change, &str, String)> = moves
            .iter()
            .map(|(c, s, m)| (*c, s.as_str(), m.to_string()))
            .collect();
        assert_eq!(
            moves,
            [
                (Change::Add, "weft-4t-b", "10.65.0.2,weftx".to_string()),
                (Change::Del, "weft-4t-a", "10.65.0.2,weftx".to_string()),
            ]
        );
        // A set to make, or one of another type: ipset restore's work.
        wanted.insert("weft-4t-c".to_string(), spec(SetKind::Profile, &[]));
        assert!(member_moves(&wanted, &held).is_none());
        let mut other_type = BTreeMap::new();
        other_type.insert("weft-4t-a".to_string(), spec(SetKind::Selector, &[]));
        assert!(member_moves(&other_type, &held).is_none());
    }

    #[test]
    fn save_output_is_read_and_only_differences_are_restored() {
        let save = "create weft-4s-a hash:ip family inet hashsize 1024 maxelem 65536\n\
                    add weft-4s-a 10.65.0.2\nadd weft-4s-a 10.65.0.3\n\
                    create weft-4n-b hash:net family inet hashsize 1024\nadd weft-4n-b 10.1.0.0/16\n\
                    create other hash:ip family inet\nadd other 1.2.3.4\n";
        let held = parse_save(save);
        assert_eq!(held.len(), 2, "foreign sets are not ours");
        assert_eq!(held["weft-4n-b"].kind, "hash:net");
        let mut wanted = BTreeMap::new();
        wanted.insert(
            "weft-4s-a".to_string(),
            spec(SetKind::Selector, &["10.65.0.3", "10.65.0.4"]),
        );
        wanted.insert(
            "weft-4n-b".to_string(),
            spec(SetKind::Nets, &["10.1.0.0/16"]),
        );
        wanted.insert(
            "weft-4n-c".to_string(),
            spec(SetKind::Nets, &["10.2.0.1/32"]),
        );
        assert_eq!(
            restore_input(&wanted, &held).unwrap(),
            "create weft-4n-c hash:net family inet\nadd weft-4n-c 10.2.0.1\n\
             add weft-4s-a 10.65.0.4\ndel weft-4s-a 10.65.0.2\n",
            "deletions after every addition"
        );
        assert_eq!(restore_input(&wanted, &as_held(&wanted)), None);
    }

    #[test]
    fn a_set_of_the_wrong_type_is_swapped() {
        let held = parse_save("create weft-4s-a hash:net family inet\n");
        let mut wanted = BTreeMap::new();
        wanted.insert(
            "weft-4s-a".to_string(),
            spec(SetKind::Selector, &["10.65.0.2"]),
        );
        let input = restore_input(&wanted, &held).unwrap();
        assert!(input.contains("swap weft-swap weft-4s-a"), "{input}");
    }
}
