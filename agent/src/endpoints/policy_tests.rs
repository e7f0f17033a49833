//! Attaches and detaches of endpoints that policies select, over the fakes: policed as they
//! attach, relabelled, joining profiles in place, and leaving them.

use super::tests::{request, world, CONTAINER_NS};
use super::{attach, detach};
use crate::model::ContainerId;

/// An endpoint a policy selects gets its chains and its selectors' sets as it attaches; new
/// labels on a repeated attach are recorded and applied; a failing policy write rolls back.
#[tokio::test]
async fn labels_are_recorded_and_selected_endpoints_are_policed_as_they_attach() {
    use weft_etcd::policy::policy_from_value;
    let w = world();
    let policy_of_web = || {
        policy_from_value(
            &serde_json::json!({"name": "web", "selector": "app == 'web'", "ingress": [
                {"action": "allow", "source": {"selector": "role == 'front'"}}]}),
            "",
        )
        .unwrap()
    };
    w.ctx.policy.apply(
        vec![weft_etcd::FabricEvent::PolicyPut(Box::new(policy_of_web()))],
        1,
    );
    let labelled = |labels: &[(&str, &str)]| {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        request("web", CONTAINER_NS, &[])
            .with_labels(labels)
            .unwrap()
    };
    let record = attach(&w.ctx, labelled(&[("app", "web")])).await.unwrap();
    assert_eq!(record.labels["app"], "web");
    // Its ingress profile's chain is written, and its set holds the endpoint on its veth.
    let profile = crate::policy::plan::endpoint_plan(
        crate::policy::plan::Family::V4,
        &[&policy_of_web()],
        &record,
    );
    let [(profile, members)] = profile.as_slice() else {
        panic!("one profile: {profile:?}");
    };
    let chain = profile.chain.clone();
    assert!(w
        .firewall
        .applied
        .lock()
        .unwrap()
        .policy
        .v4
        .contains_key(&chain));
    assert_eq!(
        w.sets.sets.lock().unwrap()[&profile.set].members,
        members.iter().cloned().collect()
    );
    let stored = w
        .store
        .state
        .lock()
        .unwrap()
        .endpoints
        .values()
        .next()
        .cloned()
        .unwrap();
    assert_eq!(stored.labels, record.labels);

    // Relabelled out of the policy's selector: the record changes, the chain goes.
    let record = attach(&w.ctx, labelled(&[("app", "db")])).await.unwrap();
    assert_eq!(record.labels["app"], "db");
    let stored = w
        .store
        .state
        .lock()
        .unwrap()
        .endpoints
        .values()
        .next()
        .cloned()
        .unwrap();
    assert_eq!(stored.labels["app"], "db");
    assert!(!w
        .firewall
        .applied
        .lock()
        .unwrap()
        .policy
        .v4
        .contains_key(&chain));

    // A selected endpoint whose policy cannot be written is not attached (its profile gone
    // with the last endpoint in it, so its chains must be written again).
    detach(&w.ctx, &ContainerId::new("web").unwrap())
        .await
        .unwrap();
    crate::policy::sync(&w.ctx, crate::firewall::SyncMode::Fast)
        .await
        .unwrap();
    w.firewall.fail(true);
    assert!(attach(&w.ctx, labelled(&[("app", "web")])).await.is_err());
    w.firewall.fail(false);
    w.assert_nothing_left();
}

/// A replica joining a profile keeps the members a sync of chains first put there: an endpoint
/// that joined an existing profile and a new one (chains first) stays in the existing profile's
/// set when the next replica joins it, before any full sync ran.
#[tokio::test]
async fn a_joining_replica_keeps_members_that_a_chains_first_sync_added() {
    use weft_etcd::policy::policy_from_value;
    let w = world();
    let policy = |doc: serde_json::Value| {
        let policy = policy_from_value(&doc, "").unwrap();
        weft_etcd::FabricEvent::PolicyPut(Box::new(policy))
    };
    w.ctx.policy.apply(
        vec![
            policy(serde_json::json!({"name": "in", "selector": "app == 'web'", "ingress": []})),
            policy(serde_json::json!({"name": "out", "selector": "role == 'x'", "egress": []})),
        ],
        1,
    );
    let attach_labelled = |id: &str, labels: &[(&str, &str)]| {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        attach(&w.ctx, request(id, "", &[]).with_labels(labels).unwrap())
    };
    // The ingress profile in place, and known to a full sync.
    attach_labelled("first", &[("app", "web")]).await.unwrap();
    crate::policy::sync(&w.ctx, crate::firewall::SyncMode::Fast)
        .await
        .unwrap();
    // Joins it and a new egress profile: chains first.
    let both = attach_labelled("both", &[("app", "web"), ("role", "x")])
        .await
        .unwrap();
    // Joins the ingress profile only: in place.
    attach_labelled("replica", &[("app", "web")]).await.unwrap();
    let ingress = crate::policy::plan::endpoint_plan(
        crate::policy::plan::Family::V4,
        &[&policy_from_value(
            &serde_json::json!({"name": "in", "selector": "app == 'web'", "ingress": []}),
            "",
        )
        .unwrap()],
        &both,
    );
    let (profile, members) = &ingress[0];
    let held = w.sets.sets.lock().unwrap()[&profile.set].members.clone();
    assert!(
        members.iter().all(|m| held.contains(m)),
        "{members:?} kept in {held:?}"
    );
    assert_eq!(held.len(), 3, "first, both and the replica: {held:?}");
}

/// A detached replica's pairs leave its profile's set from the policy loop without a plan of
/// the host; the last replica's departure asks for the plan that takes the profile away.
#[tokio::test]
async fn a_detached_replica_leaves_its_profile_without_a_plan_and_the_last_asks_for_one() {
    use weft_etcd::policy::policy_from_value;
    let w = world();
    let web = policy_from_value(
        &serde_json::json!({"name": "web", "selector": "app == 'web'", "ingress": []}),
        "",
    )
    .unwrap();
    w.ctx
        .policy
        .apply(vec![weft_etcd::FabricEvent::PolicyPut(Box::new(web))], 1);
    let replica = |id: &str| {
        let labels = [("app".to_string(), "web".to_string())].into();
        attach(&w.ctx, request(id, "", &[]).with_labels(labels).unwrap())
    };
    let a = replica("a").await.unwrap();
    let b = replica("b").await.unwrap();
    crate::policy::sync(&w.ctx, crate::firewall::SyncMode::Fast)
        .await
        .unwrap();
    assert!(!w.ctx.policy.full_sync_pending());
    let on = |veth: &str| {
        let sets = w.sets.sets.lock().unwrap();
        let suffix = format!(",{veth}");
        sets.iter()
            .filter(|(_, spec)| {
                spec.members
                    .iter()
                    .any(|m| m.to_string().ends_with(&suffix))
            })
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>()
    };
    let profile = on(&b.host_ifname);
    assert_eq!(on(&a.host_ifname), profile, "one profile set for both");

    detach(&w.ctx, &ContainerId::new("a").unwrap())
        .await
        .unwrap();
    assert_eq!(crate::policy::leave::apply(&w.ctx).await.unwrap(), 1);
    assert!(on(&a.host_ifname).is_empty(), "a's pairs left");
    assert_eq!(on(&b.host_ifname), profile, "b stays");
    assert!(!w.ctx.policy.full_sync_pending(), "no plan for a replica");

    detach(&w.ctx, &ContainerId::new("b").unwrap())
        .await
        .unwrap();
    assert_eq!(crate::policy::leave::apply(&w.ctx).await.unwrap(), 1);
    assert!(w.sets.sets.lock().unwrap()[&profile[0]].members.is_empty());
    assert!(
        w.ctx.policy.full_sync_pending(),
        "the last one asks for the plan"
    );
}
