//! An attach joining profiles that are in place: the endpoint's (address, veth) pairs go into
//! their sets and nothing else is written, so attaching the hundredth replica of a policed
//! workload costs what attaching the first unpoliced one does. Whatever is not in place (a
//! profile no local endpoint has yet, no full sync so far) is left to a plan of the whole host.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use weft_etcd::records::EndpointRecord;

use super::apply::{PolicyReport, PolicySyncError};
use super::member::Member;
use super::plan::{endpoint_plan, Family, ProfileChain, SetKind, SetSpec};
use crate::context::Context;
use crate::firewall::SyncMode;

/// Puts one endpoint into the sets of the profiles it belongs to, when those profiles are in
/// place here already (another local endpoint has them): no plan, no firewall write, its pairs
/// added over netlink. None when that takes a plan of the whole host. Holds the sync turn: a
/// whole-host sync that began before the endpoint was in the table cannot undo this.
pub(super) async fn join(
    ctx: &Context,
    endpoint: &EndpointRecord,
) -> Result<Option<PolicyReport>, PolicySyncError> {
    let state = &ctx.policy;
    let _one = state.one_at_a_time.lock().await;
    if !state.chains_written.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let started = Instant::now();
    let mut families = vec![Family::V4];
    if ctx.config.has_ipv6() {
        families.push(Family::V6);
    }
    let joins: Vec<(Family, ProfileChain, Vec<Member>)> = state.with_view(|view| {
        let policies: Vec<_> = view.policies.values().collect();
        families
            .iter()
            .flat_map(|&family| {
                endpoint_plan(family, &policies, endpoint)
                    .into_iter()
                    .map(move |(profile, members)| (family, profile, members))
            })
            .collect()
    });
    {
        let chains = state.chains.read().unwrap();
        let in_place = |family: Family, profile: &ProfileChain| match family {
            Family::V4 => chains.v4.contains_key(&profile.chain),
            Family::V6 => chains.v6.contains_key(&profile.chain),
        };
        if !joins
            .iter()
            .all(|(family, profile, _)| in_place(*family, profile))
        {
            return Ok(None);
        }
    }
    let joins = joins.into_iter().map(|(_, p, m)| (p, m)).collect();
    let changed = {
        let last = state.last_sets.lock().unwrap();
        let Some(last) = last.as_ref() else {
            return Ok(None);
        };
        match joined(&last.sets, &endpoint.host_ifname, joins) {
            Some(changed) => changed,
            None => return Ok(None),
        }
    };
    let set_changes = match changed.is_empty() {
        true => 0,
        false => {
            let sets = state.sets.clone();
            let written = changed.clone();
            let count =
                tokio::task::spawn_blocking(move || sets.sync(&written, SyncMode::Fast)).await??;
            if let Some(last) = state.last_sets.lock().unwrap().as_mut() {
                last.sets.extend(changed);
            }
            count
        }
    };
    tracing::debug!(
        container = %endpoint.container_id,
        set_changes,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        "new endpoint joined its profiles' sets"
    );
    Ok(Some(PolicyReport {
        set_changes,
        ..Default::default()
    }))
}

/// The profile sets that change when the endpoint on `veth` belongs to `joins` (and to no other
/// profile: a leftover pair of an earlier endpoint on that veth leaves), from `sets` as in
/// place. None when a set of `joins` is not in place.
fn joined(
    sets: &BTreeMap<String, SetSpec>,
    veth: &str,
    joins: Vec<(ProfileChain, Vec<Member>)>,
) -> Option<BTreeMap<String, SetSpec>> {
    let mut changed = BTreeMap::new();
    for (name, spec) in sets.iter().filter(|(_, s)| s.kind == SetKind::Profile) {
        if spec
            .members
            .iter()
            .any(|m| m.iface.as_deref() == Some(veth))
        {
            let mut spec = spec.clone();
            spec.members.retain(|m| m.iface.as_deref() != Some(veth));
            changed.insert(name.clone(), spec);
        }
    }
    for (profile, members) in joins {
        let spec = match changed.remove(&profile.set) {
            Some(spec) => spec,
            None => sets.get(&profile.set)?.clone(),
        };
        let mut spec = spec;
        spec.members.extend(members);
        changed.insert(profile.set, spec);
    }
    changed.retain(|name, spec| sets.get(name) != Some(spec));
    Some(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(set: &str) -> ProfileChain {
        ProfileChain {
            chain: set.replace("weft-4t-", "WEFT-TW-"),
            set: set.to_string(),
            direction: crate::policy::plan::Direction::Ingress,
            policies: vec![],
        }
    }

    #[test]
    fn an_attach_joins_its_profiles_and_its_veth_leaves_the_others() {
        let sets: BTreeMap<String, SetSpec> = [
            (
                "weft-4t-a".to_string(),
                SetSpec::v4_profile(&["10.65.0.2,wefta"]),
            ),
            (
                "weft-4t-b".to_string(),
                SetSpec::v4_profile(&["10.65.0.9,weftnew"]),
            ),
        ]
        .into();
        let member = |m: &str| -> Member { m.parse().unwrap() };
        let changed = joined(
            &sets,
            "weftnew",
            vec![(profile("weft-4t-a"), vec![member("10.65.0.3,weftnew")])],
        )
        .unwrap();
        assert_eq!(
            changed["weft-4t-a"].members,
            [member("10.65.0.2,wefta"), member("10.65.0.3,weftnew")].into()
        );
        assert!(
            changed["weft-4t-b"].members.is_empty(),
            "a leftover pair of its veth"
        );
        // Already in place: nothing changes; a profile whose set is not here needs a plan.
        let settled: BTreeMap<String, SetSpec> = changed.into_iter().collect();
        let again = joined(
            &settled,
            "weftnew",
            vec![(profile("weft-4t-a"), vec![member("10.65.0.3,weftnew")])],
        );
        assert_eq!(again, Some(BTreeMap::new()));
        assert_eq!(
            joined(&sets, "weftnew", vec![(profile("weft-4t-c"), vec![])]),
            None
        );
    }
}
