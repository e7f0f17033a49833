//! Requested addresses on a dual-stack host over the fakes: a pair written in one record under
//! both guards, a single one completed by an automatic address of the other family, and every
//! refusal of either address of a pair keeping nothing of the other.

use std::net::IpAddr;

use super::tests::{request, world_with, World, CONTAINER_NS};
use super::{attach, detach, EndpointError};
use crate::model::{AttachRequest, ContainerId};

const DUAL: [&str; 6] = [
    "--pool",
    "10.65.0.0/16,fd65::/48",
    "--block-size",
    "30",
    "--block-size-v6",
    "126",
];

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A request of `id` in namespace `netns` (made in the fake kernel) asking for `ips`.
fn asked(w: &World, id: &str, ips: &[&str]) -> AttachRequest {
    let netns = format!("/run/netns/{id}");
    w.kernel.add_namespace(&netns);
    request(id, &netns, &[]).with_ips(ips).unwrap()
}

/// The addresses guarded in the fake etcd, and the endpoints it holds.
fn guarded(w: &World) -> (Vec<String>, usize) {
    let store = w.store.state.lock().unwrap();
    let ips = store.ips.keys().map(|ip| ip.to_string()).collect();
    (ips, store.endpoints.len())
}

fn blocks(w: &World) -> Vec<String> {
    let store = w.store.state.lock().unwrap();
    store.blocks.keys().map(|b| b.to_string()).collect()
}

#[tokio::test]
async fn a_pair_is_given_in_one_record_and_kept_across_containers() {
    let w = world_with(&DUAL);
    let db_asking = |ips: &[&str]| request("db", CONTAINER_NS, &[]).with_ips(ips).unwrap();
    let db = attach(&w.ctx, db_asking(&["fd65::7", "10.65.7.2"]))
        .await
        .unwrap();
    assert_eq!((db.ip, db.ipv6), (ip("10.65.7.2"), Some(ip("fd65::7"))));
    assert_eq!(guarded(&w), (vec!["10.65.7.2".into(), "fd65::7".into()], 1));
    // Both blocks of nobody were claimed for it.
    assert_eq!(blocks(&w), ["10.65.7.0/30", "fd65::4/126"]);
    // The same request again is the same endpoint; another address of either family is refused.
    let same = attach(&w.ctx, db_asking(&["10.65.7.2", "fd65::7"])).await;
    assert_eq!(same.unwrap(), db);
    for other in [["10.65.7.2", "fd65::6"], ["10.65.7.3", "fd65::7"]] {
        let err = attach(&w.ctx, db_asking(&other)).await.unwrap_err();
        assert!(matches!(err, EndpointError::Differs(_)), "{err}");
    }
    // Re-created: the same request gets both addresses back.
    detach(&w.ctx, &ContainerId::new("db").unwrap())
        .await
        .unwrap();
    w.assert_nothing_left();
    let again = attach(&w.ctx, db_asking(&["10.65.7.2", "fd65::7"]))
        .await
        .unwrap();
    assert_eq!(
        (again.ip, again.ipv6),
        (ip("10.65.7.2"), Some(ip("fd65::7")))
    );
}

#[tokio::test]
async fn a_single_requested_address_gets_an_automatic_one_of_the_other_family() {
    let w = world_with(&DUAL);
    let v4 = attach(&w.ctx, asked(&w, "v4", &["10.65.7.2"]))
        .await
        .unwrap();
    assert_eq!((v4.ip, v4.ipv6), (ip("10.65.7.2"), Some(ip("fd65::"))));
    let v6 = attach(&w.ctx, asked(&w, "v6", &["fd65::9"])).await.unwrap();
    assert_eq!((v6.ip, v6.ipv6), (ip("10.65.7.0"), Some(ip("fd65::9"))));
    // Naming only the IPv4 pool leaves IPv6 out, as it does without a requested address.
    let pooled = asked(&w, "pooled", &["10.65.7.3"])
        .with_pools(&["default"])
        .unwrap();
    let pooled = attach(&w.ctx, pooled).await.unwrap();
    assert_eq!((pooled.ip, pooled.ipv6), (ip("10.65.7.3"), None));
}

#[tokio::test]
async fn an_automatic_address_taken_by_a_record_unknown_here_is_replaced() {
    let w = world_with(&DUAL);
    // The IPv6 block the host will claim has its first address held by a record only etcd knows.
    w.store
        .state
        .lock()
        .unwrap()
        .ips
        .insert(ip("fd65::"), ("h1".into(), "ghost".into()));
    let record = attach(&w.ctx, asked(&w, "a", &["10.65.7.2"]))
        .await
        .unwrap();
    assert_eq!(record.ipv6, Some(ip("fd65::1")));
}

#[tokio::test]
async fn either_address_of_a_pair_refused_keeps_nothing_of_the_other() {
    let w = world_with(&DUAL);
    attach(&w.ctx, asked(&w, "held", &["10.65.7.2", "fd65::7"]))
        .await
        .unwrap();
    let before = (guarded(&w), blocks(&w));
    // Taken here, either family: ALREADY_EXISTS naming the holder.
    for pair in [["10.65.7.1", "fd65::7"], ["10.65.7.2", "fd65::6"]] {
        let err = attach(&w.ctx, asked(&w, "thief", &pair)).await.unwrap_err();
        assert!(
            matches!(&err, EndpointError::AddressTaken { holder, .. } if holder.contains("held")),
            "{pair:?}: {err}"
        );
        assert_eq!((guarded(&w), blocks(&w)), before, "{pair:?}");
    }
    // Taken in etcd by a record this agent does not know: found on writing the pair.
    w.store
        .state
        .lock()
        .unwrap()
        .ips
        .insert(ip("fd65::5"), ("h1".into(), "ghost".into()));
    let err = attach(&w.ctx, asked(&w, "b", &["10.65.7.1", "fd65::5"]))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("container ghost on host h1"),
        "{err}"
    );
    let (ips, _) = guarded(&w);
    assert!(!ips.contains(&"10.65.7.1".to_string()), "{ips:?}");
    // In another host's block: FAILED_PRECONDITION naming it; the IPv4 block claimed for the
    // pair stays (as for a single request), its address does not.
    w.ctx
        .cluster
        .claimed("default-v6", "fd65::100/126".parse().unwrap(), "h2");
    let err = attach(&w.ctx, asked(&w, "c", &["10.65.9.1", "fd65::101"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EndpointError::AddressElsewhere { host, .. } if host == "h2"),
        "{err}"
    );
    // Outside every pool: INVALID_ARGUMENT, before anything is claimed.
    let err = attach(&w.ctx, asked(&w, "d", &["10.65.11.1", "fd66::1"]))
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::OutsidePools { .. }), "{err}");
    let (ips, endpoints) = guarded(&w);
    assert_eq!(endpoints, 1);
    assert_eq!(ips, ["10.65.7.2", "fd65::5", "fd65::7"]);
    assert!(!blocks(&w).contains(&"10.65.11.0/30".to_string()));
    assert_eq!(w.ctx.endpoints.len(), 1);
    assert_eq!(w.kernel.state.lock().unwrap().links.len(), 1);
    // Nothing stays reserved either: the refused addresses go to the next attach.
    let record = attach(&w.ctx, asked(&w, "e", &["10.65.7.1", "fd65::6"]))
        .await
        .unwrap();
    assert_eq!(record.ipv6, Some(ip("fd65::6")));
    for id in ["held", "e"] {
        detach(&w.ctx, &ContainerId::new(id).unwrap())
            .await
            .unwrap();
    }
}
