//! Carrying a policy plan out, one sync at a time: address sets first (created and filled, so no
//! rule ever names a missing set), then the chains through the firewall seam (one atomic
//! restore with the rest of our filter rules), then the sets no rule uses any more are
//! destroyed. A sync that started after a caller's change covers it, so bursts share one. An
//! attach waits only for its profiles (`police_first`); selector members follow from the
//! policy loop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ipnetwork::IpNetwork;
use weft_etcd::policy::Selector;

use weft_etcd::records::EndpointRecord;

use super::member::Member;
use super::plan::{plan, Family, PolicyPlan, SetKind, SetSpec};
use super::render::render;
use super::sets::SetError;
use crate::context::Context;
use crate::firewall::chains::FamilyChains;
use crate::firewall::sync::SyncError;
use crate::firewall::SyncMode;

#[derive(Debug, thiserror::Error)]
pub enum PolicySyncError {
    #[error("programming address sets: {0}")]
    Sets(#[from] SetError),
    #[error(transparent)]
    Firewall(#[from] SyncError),
    #[error("policy task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What one sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyReport {
    pub set_changes: usize,
    pub sets_destroyed: usize,
    pub tables_written: usize,
}

/// The plans of both families, from one reading of the inputs: every policy, every endpoint
/// of the fabric (this host's from its own table, which is ahead of the watch), and this host's
/// endpoints. A host without an IPv6 pool has no IPv6 endpoint, so its IPv6 plan is empty and
/// not made (planning is most of what an attach waits for when policies select it).
fn plan_now(ctx: &Context) -> [PolicyPlan; 2] {
    let ipv6 = ctx.config.has_ipv6();
    let local: Vec<EndpointRecord> = ctx.endpoints.list();
    ctx.policy.with_view(|view| {
        let policies: Vec<_> = view.policies.values().collect();
        let mut fabric: Vec<&EndpointRecord> = view.remote_endpoints(ctx.me()).collect();
        fabric.extend(local.iter());
        let local: Vec<&EndpointRecord> = local.iter().collect();
        let v4 = plan(Family::V4, &policies, &fabric, &local);
        let v6 = match ipv6 {
            true => plan(Family::V6, &policies, &fabric, &local),
            false => PolicyPlan::default(),
        };
        [v4, v6]
    })
}

/// An endpoint change seen by the watch: its addresses before (none if it did not exist) and
/// its addresses and labels after (if it still exists).
#[derive(Debug, Clone)]
pub struct Touched {
    pub old: Vec<IpAddr>,
    pub new: Option<(Vec<IpAddr>, BTreeMap<String, String>)>,
}

/// The selector sets of the last full sync, as applied.
#[derive(Debug, Clone, Default)]
pub struct LastSets {
    pub sets: BTreeMap<String, SetSpec>,
    pub selectors: BTreeMap<String, Selector>,
}

impl LastSets {
    /// Moves members for these endpoint changes; returns the sets that changed.
    fn apply(&mut self, touched: &[Touched]) -> BTreeMap<String, SetSpec> {
        let mut changed = BTreeMap::new();
        for (name, selector) in &self.selectors {
            let Some(spec) = self.sets.get_mut(name) else {
                continue;
            };
            let family = spec.family;
            let of_family = |ips: &[IpAddr]| -> Vec<Member> {
                ips.iter()
                    .filter(|ip| Family::of(ip) == family)
                    .map(|ip| Member::from(IpNetwork::from(*ip)))
                    .collect()
            };
            // What left and what joined, to tell a real change from one undone (an endpoint
            // written again with the same labels) without copying the set.
            let (mut left, mut joined) = (BTreeSet::new(), BTreeSet::new());
            for t in touched {
                for old in of_family(&t.old) {
                    if spec.members.remove(&old) {
                        left.insert(old);
                    }
                }
                if let Some((ips, labels)) = &t.new {
                    if selector.matches(labels) {
                        for new in of_family(ips) {
                            if !left.remove(&new) && spec.members.insert(new.clone()) {
                                joined.insert(new);
                            } else {
                                spec.members.insert(new);
                            }
                        }
                    }
                }
            }
            if !left.is_empty() || !joined.is_empty() {
                changed.insert(name.clone(), spec.clone());
            }
        }
        changed
    }
}

/// Moves set members for the endpoint changes the watch saw since the last call: no planning,
/// no firewall work, the moves sent over netlink. Returns the sets changed.
pub async fn sync_members(ctx: &Context) -> Result<usize, PolicySyncError> {
    let state = &ctx.policy;
    let touched = std::mem::take(&mut *state.touched.lock().unwrap());
    if touched.is_empty() {
        return Ok(0);
    }
    let _one = state.one_at_a_time.lock().await;
    let changed = match state.last_sets.lock().unwrap().as_mut() {
        Some(last) => last.apply(&touched),
        // No full sync yet: it will see these changes.
        None => return Ok(0),
    };
    if changed.is_empty() {
        return Ok(0);
    }
    let count = changed.len();
    let sets = state.sets.clone();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || sets.sync(&changed, SyncMode::Fast)).await??;
    tracing::debug!(
        sets = count,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        "set members moved"
    );
    Ok(count)
}

/// How much a sync does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Sets (members included), chains, then unused sets destroyed.
    Full,
    /// Chains, and only the sets they name that do not exist yet; set members and unused sets
    /// are left to the policy loop's next sync (requested here). What an attach waits for.
    ChainsFirst,
}

/// Polices `endpoint` (of this host, about to be wired) from its first packet: it joins its
/// profiles' sets, and their chains are in place. When its profiles are here already (another
/// local endpoint has them) that is all (`join`); otherwise the whole host is planned. Its
/// address joins the selector sets it matches (on every host) when the watch brings its record.
pub async fn police_first(
    ctx: &Context,
    endpoint: &EndpointRecord,
) -> Result<PolicyReport, PolicySyncError> {
    if let Some(report) = super::join::join(ctx, endpoint).await? {
        return Ok(report);
    }
    let report = scoped(ctx, SyncMode::Fast, SyncMode::Fast, Scope::ChainsFirst).await;
    // Sets made here are not yet among those whose members the watch's changes move.
    if !matches!(&report, Ok(r) if r.set_changes == 0) {
        ctx.policy.request_sync();
    }
    report
}

/// Applies policy for the current state now (sets and firewall in `mode`).
pub async fn sync(ctx: &Context, mode: SyncMode) -> Result<PolicyReport, PolicySyncError> {
    scoped(ctx, mode, mode, Scope::Full).await
}

/// Applies policy now, reading the sets back in `sets` mode and writing the chains fast.
pub async fn sync_sets(ctx: &Context, sets: SyncMode) -> Result<PolicyReport, PolicySyncError> {
    scoped(ctx, sets, SyncMode::Fast, Scope::Full).await
}

async fn scoped(
    ctx: &Context,
    mode: SyncMode,
    firewall_mode: SyncMode,
    scope: Scope,
) -> Result<PolicyReport, PolicySyncError> {
    let state = &ctx.policy;
    let wanted = state.wanted.fetch_add(1, Ordering::SeqCst) + 1;
    let _one = state.one_at_a_time.lock().await;
    let fast = mode == SyncMode::Fast && firewall_mode == SyncMode::Fast;
    if fast && scope == Scope::Full && state.applied.load(Ordering::SeqCst) >= wanted {
        return Ok(PolicyReport::default());
    }
    let generation = state.wanted.load(Ordering::SeqCst);
    let started = Instant::now();
    let [v4, v6] = plan_now(ctx);
    let planned_in = started.elapsed();
    // Set names carry their family, so the two families' sets never meet.
    let mut planned_sets = v4.sets.clone();
    planned_sets.extend(v6.sets.clone());
    let mut selectors = v4.selectors.clone();
    selectors.extend(v6.selectors.clone());
    let mut wanted_sets = planned_sets.clone();
    if scope == Scope::ChainsFirst {
        // New sets, and the profile sets (where the new endpoint joins its profile).
        let last = state.last_sets.lock().unwrap();
        let exists = |name: &String| last.as_ref().is_some_and(|l| l.sets.contains_key(name));
        wanted_sets.retain(|name, spec| spec.kind == SetKind::Profile || !exists(name));
    }
    let narrowed = widen(&mut wanted_sets, state.last_sets.lock().unwrap().as_ref());
    let mut set_changes = match wanted_sets.is_empty() && scope == Scope::ChainsFirst {
        true => 0,
        false => write_sets(state, wanted_sets, mode).await?,
    };
    let rendered = FamilyChains {
        v4: render(&v4),
        v6: render(&v6),
    };
    // A change of set members only (an endpoint joining or leaving a selector) leaves every
    // chain as it is: no firewall work then.
    let unchanged = firewall_mode == SyncMode::Fast
        && state.chains_written.load(Ordering::SeqCst)
        && *state.chains.read().unwrap() == rendered;
    let report = match unchanged {
        true => Default::default(),
        false => {
            state.chains_written.store(false, Ordering::SeqCst);
            *state.chains.write().unwrap() = rendered;
            let report = ctx
                .firewall
                .sync(|| ctx.firewall_spec(), firewall_mode, &ctx.metrics)
                .await?;
            state.chains_written.store(true, Ordering::SeqCst);
            report
        }
    };
    if scope == Scope::Full && !narrowed.is_empty() {
        set_changes += write_sets(state, narrowed, mode).await?;
    }
    let mut done = PolicyReport {
        set_changes,
        sets_destroyed: 0,
        tables_written: report.tables_written,
    };
    if scope == Scope::Full {
        let sets = state.sets.clone();
        let wanted_sets = planned_sets;
        *state.last_sets.lock().unwrap() = Some(LastSets {
            sets: wanted_sets.clone(),
            selectors,
        });
        done.sets_destroyed = tokio::task::spawn_blocking(move || sets.prune(&wanted_sets))
            .await?
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot destroy unused address sets yet");
                0
            });
        state.applied.store(generation, Ordering::SeqCst);
    }
    if set_changes + done.sets_destroyed + report.tables_written > 0 || !fast {
        tracing::debug!(
            sets_verified = mode == SyncMode::Verify,
            chains_verified = firewall_mode == SyncMode::Verify,
            ?scope,
            set_changes,
            sets_destroyed = done.sets_destroyed,
            tables = report.tables_written,
            plan_ms = planned_in.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "network policy synced"
        );
    }
    Ok(done)
}

/// Writes `wanted` sets and records them as in place: `join` builds on that record, so it must
/// hold what every write put there (a sync of chains first included), not only full syncs.
async fn write_sets(
    state: &super::PolicyState,
    wanted: BTreeMap<String, SetSpec>,
    mode: SyncMode,
) -> Result<usize, PolicySyncError> {
    let sets = state.sets.clone();
    let (changes, wanted) = tokio::task::spawn_blocking(move || {
        let changes = sets.sync(&wanted, mode);
        (changes, wanted)
    })
    .await?;
    let changes = changes?;
    if let Some(last) = state.last_sets.lock().unwrap().as_mut() {
        last.sets.extend(wanted);
    }
    Ok(changes)
}

/// Keeps, in the profile sets about to be written, the members they hold now (as of the last
/// full sync): an endpoint leaves a profile only once the chains are written, so one moving to
/// another profile (relabelled) is policed by its old profile until its new one dispatches.
/// Returns the profile sets as planned whose members must then go.
fn widen(
    wanted: &mut BTreeMap<String, SetSpec>,
    last: Option<&LastSets>,
) -> BTreeMap<String, SetSpec> {
    let mut narrowed = BTreeMap::new();
    let Some(last) = last else {
        return narrowed;
    };
    for (name, spec) in wanted.iter_mut() {
        let Some(held) = last.sets.get(name) else {
            continue;
        };
        if spec.kind != SetKind::Profile || held.members.is_subset(&spec.members) {
            continue;
        }
        narrowed.insert(name.clone(), spec.clone());
        spec.members.extend(held.members.iter().cloned());
    }
    narrowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::plan::SetKind;

    #[test]
    fn endpoints_leave_a_profile_only_after_the_chains_are_written() {
        let last = LastSets {
            sets: [
                (
                    "weft-4t-a".to_string(),
                    SetSpec::v4_profile(&["10.65.0.2,wefta"]),
                ),
                (
                    "weft-4t-b".to_string(),
                    SetSpec::v4_profile(&["10.65.0.3,weftb"]),
                ),
            ]
            .into(),
            selectors: BTreeMap::new(),
        };
        // a's endpoint moved to b (relabelled): b gains it at once, a keeps it until after.
        let mut wanted: BTreeMap<String, SetSpec> = [
            ("weft-4t-a".to_string(), SetSpec::v4_profile(&[])),
            (
                "weft-4t-b".to_string(),
                SetSpec::v4_profile(&["10.65.0.3,weftb", "10.65.0.2,wefta"]),
            ),
        ]
        .into();
        let narrowed = widen(&mut wanted, Some(&last));
        assert_eq!(wanted["weft-4t-a"], last.sets["weft-4t-a"]);
        assert_eq!(wanted["weft-4t-b"].members.len(), 2);
        assert_eq!(narrowed.keys().collect::<Vec<_>>(), ["weft-4t-a"]);
        assert!(narrowed["weft-4t-a"].members.is_empty());
        assert!(
            widen(&mut wanted, None).is_empty(),
            "no sync before: nothing held"
        );
    }

    #[test]
    fn endpoint_changes_move_members_of_the_sets_their_labels_match() {
        let selector = Selector::parse("role == 'front'").unwrap();
        let mut last = LastSets::default();
        last.selectors.insert("weft-4s-a".into(), selector);
        last.sets.insert(
            "weft-4s-a".into(),
            SetSpec {
                kind: SetKind::Selector,
                family: Family::V4,
                members: ["10.65.0.1/32".parse().unwrap()].into(),
            },
        );
        let front: BTreeMap<String, String> = [("role".into(), "front".into())].into();
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        // A new frontend joins (a dual-stack one: its IPv4 address only, in an IPv4 set); an
        // unrelated endpoint changes nothing.
        let changed = last.apply(&[
            Touched {
                old: vec![],
                new: Some((ips(&["10.65.0.2", "fd65::2"]), front.clone())),
            },
            Touched {
                old: vec![],
                new: Some((ips(&["10.65.0.3"]), BTreeMap::new())),
            },
        ]);
        assert_eq!(
            changed["weft-4s-a"].members,
            [
                "10.65.0.1/32".parse().unwrap(),
                "10.65.0.2/32".parse().unwrap()
            ]
            .into()
        );
        // Relabelled away, and deleted: both leave; the same labels again change nothing.
        let changed = last.apply(&[
            Touched {
                old: ips(&["10.65.0.2", "fd65::2"]),
                new: Some((ips(&["10.65.0.2", "fd65::2"]), BTreeMap::new())),
            },
            Touched {
                old: ips(&["10.65.0.1"]),
                new: None,
            },
        ]);
        assert!(changed["weft-4s-a"].members.is_empty());
        let unchanged = last.apply(&[Touched {
            old: ips(&["10.65.0.3"]),
            new: Some((ips(&["10.65.0.3"]), BTreeMap::new())),
        }]);
        assert!(unchanged.is_empty());
    }
}
