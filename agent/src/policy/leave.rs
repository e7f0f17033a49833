//! A local endpoint leaving (detached, or its attach rolled back): its (address, veth) pairs
//! leave its profiles' sets and nothing else is written, so detaching one replica of a policed
//! workload costs no plan of the whole host, as attaching it costs none (`join`). A profile left
//! with no member here (its chain and set go), or a veth another endpoint has taken meanwhile,
//! is left to such a plan.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::apply::PolicySyncError;
use super::plan::{SetKind, SetSpec};
use crate::context::Context;
use crate::firewall::SyncMode;

/// The profile sets that change when the endpoints on `veths` leave, from `sets` as in place,
/// and whether one of them is left empty.
pub(super) fn without(
    sets: &BTreeMap<String, SetSpec>,
    veths: &BTreeSet<String>,
) -> (BTreeMap<String, SetSpec>, bool) {
    let on_left = |iface: &Option<String>| iface.as_ref().is_some_and(|i| veths.contains(i));
    let mut changed = BTreeMap::new();
    let mut emptied = false;
    for (name, spec) in sets.iter().filter(|(_, s)| s.kind == SetKind::Profile) {
        if !spec.members.iter().any(|m| on_left(&m.iface)) {
            continue;
        }
        let mut spec = spec.clone();
        spec.members.retain(|m| !on_left(&m.iface));
        emptied |= spec.members.is_empty();
        changed.insert(name.clone(), spec);
    }
    (changed, emptied)
}

/// Takes the pairs of the endpoints that left since the last call out of their profiles' sets
/// (over netlink, like the watch's member moves); asks for a plan of the whole host where that
/// is not enough. Returns the sets changed.
pub async fn apply(ctx: &Context) -> Result<usize, PolicySyncError> {
    let state = &ctx.policy;
    let left = std::mem::take(&mut *state.left.lock().unwrap());
    if left.is_empty() {
        return Ok(0);
    }
    let _one = state.one_at_a_time.lock().await;
    // A veth some endpoint holds again: its pairs are that endpoint's business now (a join
    // replaces them, an unpoliced endpoint needs them gone), which only a plan can tell.
    let (taken, veths): (Vec<String>, Vec<String>) = left
        .into_iter()
        .partition(|veth| ctx.endpoints.owner_of_link(veth).is_some());
    let veths: BTreeSet<String> = veths.into_iter().collect();
    let (changed, emptied) = match state.last_sets.lock().unwrap().as_ref() {
        Some(last) => without(&last.sets, &veths),
        // No sync has written any set yet: the one asked for will plan without them.
        None => return Ok(0),
    };
    if !taken.is_empty() || emptied {
        state.request_sync();
    }
    if changed.is_empty() {
        return Ok(0);
    }
    let count = changed.len();
    let started = Instant::now();
    let sets = state.sets.clone();
    let written = changed.clone();
    tokio::task::spawn_blocking(move || sets.sync(&written, SyncMode::Fast)).await??;
    if let Some(last) = state.last_sets.lock().unwrap().as_mut() {
        last.sets.extend(changed);
    }
    tracing::debug!(
        sets = count,
        veths = veths.len(),
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        "endpoints left their profiles' sets"
    );
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::plan::Family;

    fn veths(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_leaving_endpoint_takes_its_pairs_out_of_every_profile_and_nothing_else() {
        let sets: BTreeMap<String, SetSpec> = [
            (
                "weft-4t-a".to_string(),
                SetSpec::v4_profile(&["10.65.0.2,wefta", "10.65.0.3,weftb"]),
            ),
            (
                "weft-6t-a".to_string(),
                SetSpec {
                    kind: SetKind::Profile,
                    family: Family::V6,
                    members: ["fd65::2,wefta", "fe80::/10,wefta", "fd65::3,weftb"]
                        .iter()
                        .map(|m| m.parse().unwrap())
                        .collect(),
                },
            ),
            (
                "weft-4t-c".to_string(),
                SetSpec::v4_profile(&["10.65.0.4,weftc"]),
            ),
            (
                "weft-4s-x".to_string(),
                SetSpec {
                    kind: SetKind::Selector,
                    family: Family::V4,
                    members: ["10.65.0.2/32".parse().unwrap()].into(),
                },
            ),
        ]
        .into();
        let (changed, emptied) = without(&sets, &veths(&["wefta"]));
        assert!(!emptied, "b is still in both profiles");
        assert_eq!(
            changed.keys().collect::<Vec<_>>(),
            ["weft-4t-a", "weft-6t-a"]
        );
        assert_eq!(
            changed["weft-4t-a"],
            SetSpec::v4_profile(&["10.65.0.3,weftb"])
        );
        assert_eq!(
            changed["weft-6t-a"].members,
            ["fd65::3,weftb".parse().unwrap()].into(),
            "the link-local pair goes too"
        );
        // A selector set is the watch's business, whatever addresses it holds.
        let (changed, emptied) = without(&sets, &veths(&["weftc", "weftz"]));
        assert!(emptied, "c was the last of its profile here");
        assert_eq!(changed.keys().collect::<Vec<_>>(), ["weft-4t-c"]);
        let (changed, emptied) = without(&sets, &veths(&["weftz"]));
        assert!(changed.is_empty() && !emptied);
    }
}
