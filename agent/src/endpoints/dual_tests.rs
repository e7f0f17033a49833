//! Dual-stack attaches over the fakes: one address of each family written in one record under
//! both guards, wired on both sides; and nothing kept of either when one family fails.

use super::tests::{request, world_with, World, CONTAINER_NS};
use super::{attach, detach, EndpointError};
use crate::kernel::fake::Step;
use crate::model::{ContainerId, Route, RouteTarget};
use weft_etcd::StoreError;

const DUAL: [&str; 6] = [
    "--pool",
    "10.65.0.0/16,fd65::/48",
    "--block-size",
    "30",
    "--block-size-v6",
    "126",
];

fn dual() -> World {
    world_with(&DUAL)
}

#[tokio::test]
async fn a_dual_stack_attach_takes_one_address_of_each_family_in_one_record() {
    let w = dual();
    let record = attach(&w.ctx, request("web", CONTAINER_NS, &[]))
        .await
        .unwrap();
    assert_eq!(record.ip.to_string(), "10.65.0.0");
    assert_eq!(record.ipv6.unwrap().to_string(), "fd65::");
    {
        let store = w.store.state.lock().unwrap();
        let guarded: Vec<String> = store.ips.keys().map(|ip| ip.to_string()).collect();
        assert_eq!(guarded, ["10.65.0.0", "fd65::"]);
        assert_eq!(store.endpoints.values().next(), Some(&record));
    }
    let (index, routes) = {
        let kernel = w.kernel.state.lock().unwrap();
        let index = kernel.links[&record.host_ifname].index;
        (index, kernel.routes.clone())
    };
    for (dst, target) in [
        ("10.65.0.0/32", RouteTarget::Dev(index)),
        ("fd65::/128", RouteTarget::Dev(index)),
        ("10.65.0.0/30", RouteTarget::Blackhole),
        ("fd65::/126", RouteTarget::Blackhole),
    ] {
        let route = Route {
            dst: dst.parse().unwrap(),
            target,
        };
        assert!(routes.contains(&route), "{route:?} missing");
    }
    // The next container takes the next address of each family; detach frees both.
    w.kernel.add_namespace("/run/netns/second");
    let second = attach(&w.ctx, request("db", "/run/netns/second", &[])).await;
    assert_eq!(second.unwrap().ipv6.unwrap().to_string(), "fd65::1");
    for id in ["web", "db"] {
        detach(&w.ctx, &ContainerId::new(id).unwrap())
            .await
            .unwrap();
    }
    w.kernel.remove_namespace("/run/netns/second");
    w.assert_nothing_left();
}

#[tokio::test]
async fn an_ipv6_wiring_failure_rolls_both_families_back() {
    let w = dual();
    w.kernel.fail(Step::WireV6);
    let err = attach(&w.ctx, request("web", CONTAINER_NS, &[])).await;
    assert!(matches!(err, Err(EndpointError::Kernel(_))), "{err:?}");
    w.assert_nothing_left();
    // Nothing stays reserved either: the same addresses go to the next attach.
    w.kernel.heal(Step::WireV6);
    let record = attach(&w.ctx, request("web", CONTAINER_NS, &[]))
        .await
        .unwrap();
    assert_eq!(record.ip.to_string(), "10.65.0.0");
    assert_eq!(record.ipv6.unwrap().to_string(), "fd65::");
}

#[tokio::test]
async fn an_exhausted_ipv6_pool_keeps_no_ipv4_address_either() {
    // One IPv6 address in all: the second attach finds none.
    let w = world_with(&[
        "--pool",
        "10.65.0.0/16,fd65::/128",
        "--block-size-v6",
        "128",
    ]);
    let first = attach(&w.ctx, request("web", CONTAINER_NS, &[])).await;
    assert_eq!(first.unwrap().ipv6.unwrap().to_string(), "fd65::");
    w.kernel.add_namespace("/run/netns/second");
    let err = attach(&w.ctx, request("db", "/run/netns/second", &[])).await;
    assert!(
        matches!(
            err,
            Err(EndpointError::Store(StoreError::PoolExhausted { .. }))
        ),
        "{err:?}"
    );
    {
        let store = w.store.state.lock().unwrap();
        assert_eq!(store.endpoints.len(), 1);
        assert_eq!(store.ips.len(), 2, "only web's two guards: {:?}", store.ips);
    }
    // The IPv4 address the failed attach had reserved is free again.
    detach(&w.ctx, &ContainerId::new("web").unwrap())
        .await
        .unwrap();
    let again = attach(&w.ctx, request("db", "/run/netns/second", &[])).await;
    assert_eq!(again.unwrap().ip.to_string(), "10.65.0.0");
}

#[tokio::test]
async fn an_ipv6_only_host_gives_ipv6_only_endpoints() {
    let w = world_with(&["--pool", "fd65::/48"]);
    let record = attach(&w.ctx, request("web", CONTAINER_NS, &[]))
        .await
        .unwrap();
    assert_eq!(record.ip.to_string(), "fd65::");
    assert_eq!(record.ipv6, None);
    assert_eq!(record.address_of(true), None);
}
