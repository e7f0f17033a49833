//! Attach, detach and repair over the fake kernel, datastore and firewall: each step made to
//! fail in turn, and the exact state left behind checked.

use std::sync::Arc;

use clap::Parser;
use weft_etcd::StoreError;

use super::error::EndpointError;
use super::{attach, detach};
use crate::config::{Config, Flags};
use crate::context::{Context, Parts};
use crate::firewall::fake::FakeFirewall;
use crate::kernel::fake::{FakeKernel, Step};
use crate::kernel::{Kernel, Underlay};
use crate::model::{port_mapping, AttachRequest, ContainerId, Route, RouteTarget};
use crate::store::fake::FakeStore;

pub(crate) struct World {
    pub(crate) ctx: Context,
    _state: tempfile::TempDir,
    pub(crate) kernel: Arc<FakeKernel>,
    pub(crate) store: Arc<FakeStore>,
    pub(crate) firewall: Arc<FakeFirewall>,
    pub(crate) sets: Arc<crate::policy::sets::FakeSets>,
}

pub(crate) const CONTAINER_NS: &str = "/run/netns/runtime-made";

impl World {
    /// The context shared as the agent's loops hold it, with the fake kernel, and what else
    /// the world keeps alive (its state directory among it).
    pub(crate) fn shared(self) -> (Arc<Context>, Arc<FakeKernel>, Box<dyn std::any::Any>) {
        let rest = (self._state, self.store, self.firewall, self.sets);
        (Arc::new(self.ctx), self.kernel, Box::new(rest))
    }
}

pub(crate) fn world() -> World {
    world_with(&["--block-size", "30"])
}

/// A host configured by `args` (its pools recorded in the fake store as the agent would).
pub(super) fn world_with(args: &[&str]) -> World {
    let flags = ["weft-agent", "--host-name", "h1"]
        .iter()
        .chain(args)
        .copied();
    let config = Config::load(Flags::parse_from(flags)).unwrap();
    let kernel = Arc::new(FakeKernel::with_namespaces(&[CONTAINER_NS]));
    let store = Arc::new(FakeStore::default());
    for pool in &config.pools {
        let record = (pool.name.clone(), pool.record());
        store.state.lock().unwrap().pools.push(record);
    }
    let firewall = Arc::new(FakeFirewall::default());
    let sets = Arc::new(crate::policy::sets::FakeSets::default());
    let state = tempfile::tempdir().unwrap();
    let ctx = Context::new(Parts {
        config,
        underlay: Underlay {
            ifname: "eth0".into(),
            index: 2,
            ip: "198.51.100.1".parse().unwrap(),
            prefix: 24,
            ipv6: Some("2001:db8:100::1".parse().unwrap()),
            mtu: 1500,
        },
        host: weft_etcd::records::HostRecord {
            underlay_ip: "198.51.100.1".parse().unwrap(),
            version: "test".into(),
            first_seen: 0,
            underlay_prefix: Some(24),
            vtep_mac: None,
            tunnel_ip: None,
            underlay_ipv6: None,
        },
        kernel: kernel.clone(),
        store: store.clone(),
        firewall: firewall.clone(),
        endpoints: vec![],
        cluster: Default::default(),
        pools: vec![],
        journal: crate::journal::Journal::open(state.path()).unwrap(),
        fabric: Default::default(),
        sets: sets.clone(),
    });
    World {
        ctx,
        sets,
        _state: state,
        kernel,
        store,
        firewall,
    }
}

pub(crate) fn request(id: &str, netns: &str, ports: &[(u32, u32)]) -> AttachRequest {
    let ports = ports
        .iter()
        .map(|(h, c)| port_mapping("tcp", *h, *c).unwrap())
        .collect();
    AttachRequest::new(id, netns, None, "", ports).unwrap()
}

impl World {
    /// Asserts that nothing of any endpoint is left: no record, guard, link, host route,
    /// namespace of ours, port rule or local entry. Blocks and their blackholes may stay.
    pub(super) fn assert_nothing_left(&self) {
        let store = self.store.state.lock().unwrap();
        assert!(store.endpoints.is_empty(), "records: {:?}", store.endpoints);
        assert!(store.ips.is_empty(), "address guards: {:?}", store.ips);
        assert!(store.ports.is_empty(), "port guards: {:?}", store.ports);
        let kernel = self.kernel.state.lock().unwrap();
        assert!(kernel.links.is_empty(), "links: {:?}", kernel.links);
        let host_routes: Vec<&Route> = kernel
            .routes
            .iter()
            .filter(|r| r.target != RouteTarget::Blackhole)
            .collect();
        assert!(host_routes.is_empty(), "routes: {host_routes:?}");
        assert!(kernel.owned.is_empty(), "namespaces: {:?}", kernel.owned);
        assert!(
            kernel.namespaces[CONTAINER_NS].is_empty(),
            "interfaces left in the container: {:?}",
            kernel.namespaces[CONTAINER_NS]
        );
        assert!(self.firewall.ports().is_empty(), "port rules left");
        assert!(self.ctx.endpoints.is_empty(), "local endpoints left");
        assert!(
            self.ctx.journal.load().unwrap().is_empty(),
            "journal entries left"
        );
    }
}

#[tokio::test]
async fn an_attach_wires_records_and_publishes() {
    let w = world();
    let record = attach(&w.ctx, request("web", CONTAINER_NS, &[(8080, 80)]))
        .await
        .unwrap();
    assert_eq!(record.ip.to_string(), "10.65.0.0");
    let kernel = w.kernel.state.lock().unwrap();
    let link = &kernel.links[&record.host_ifname];
    assert!(kernel
        .routes
        .contains(&Route::host(record.ip, RouteTarget::Dev(link.index))));
    assert!(kernel.routes.contains(&Route {
        dst: "10.65.0.0/30".parse().unwrap(),
        target: RouteTarget::Blackhole
    }));
    drop(kernel);
    assert_eq!(w.firewall.ports().len(), 1);
    assert_eq!(w.store.state.lock().unwrap().endpoints.len(), 1);
}

/// Every kernel step of an attach, made to fail: the attach fails and leaves nothing behind.
#[tokio::test]
async fn a_failing_kernel_step_rolls_everything_back() {
    let steps = [Step::CreateVeth, Step::ConfigureInside, Step::ReplaceRoute];
    let cases = steps
        .iter()
        .flat_map(|step| [(*step, CONTAINER_NS), (*step, "")])
        .chain([(Step::CreateNetns, "")]);
    for (step, netns) in cases {
        let w = world();
        w.kernel.fail(step);
        let result = attach(&w.ctx, request("web", netns, &[(8080, 80)])).await;
        assert!(
            result.is_err(),
            "{step:?} in {netns:?} must fail the attach"
        );
        w.assert_nothing_left();
    }
}

#[tokio::test]
async fn a_failing_firewall_rolls_everything_back() {
    let w = world();
    w.firewall.fail(true);
    let result = attach(&w.ctx, request("web", "", &[(8080, 80)])).await;
    assert!(
        matches!(result, Err(EndpointError::Firewall(_))),
        "{result:?}"
    );
    w.firewall.fail(false);
    // The rollback's own sync failed too; the next one removes the rule.
    w.ctx
        .firewall
        .sync(
            || w.ctx.firewall_spec(),
            crate::firewall::SyncMode::Verify,
            &w.ctx.metrics,
        )
        .await
        .unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn an_unreachable_datastore_fails_the_attach_before_any_kernel_change() {
    let w = world();
    w.store.cut("claim");
    let result = attach(&w.ctx, request("web", "", &[])).await;
    assert!(
        matches!(
            result,
            Err(EndpointError::Store(StoreError::Unavailable(_)))
        ),
        "{result:?}"
    );
    w.assert_nothing_left();
}

#[tokio::test]
async fn a_rollback_keeps_going_when_one_of_its_steps_fails() {
    let w = world();
    w.kernel.fail(Step::ConfigureInside);
    w.kernel.fail(Step::DeleteLink);
    assert!(attach(&w.ctx, request("web", CONTAINER_NS, &[]))
        .await
        .is_err());
    // The link could not be deleted, but the records went anyway.
    let store = w.store.state.lock().unwrap();
    assert!(store.endpoints.is_empty() && store.ips.is_empty());
    assert!(w.ctx.endpoints.is_empty());
    assert_eq!(w.kernel.state.lock().unwrap().links.len(), 1);
}

#[tokio::test]
async fn detach_removes_everything_and_does_nothing_while_etcd_is_away() {
    let w = world();
    let id = ContainerId::new("web").unwrap();
    attach(&w.ctx, request("web", "", &[(8080, 80)]))
        .await
        .unwrap();
    w.store.cut("delete");
    let result = detach(&w.ctx, &id).await;
    assert!(
        matches!(
            result,
            Err(EndpointError::Store(StoreError::Unavailable(_)))
        ),
        "{result:?}"
    );
    assert_eq!(
        w.kernel.state.lock().unwrap().links.len(),
        1,
        "nothing done"
    );
    assert_eq!(w.ctx.endpoints.len(), 1);
    assert_eq!(w.firewall.ports().len(), 1);
    w.store.restore("delete");
    detach(&w.ctx, &id).await.unwrap();
    w.assert_nothing_left();
    detach(&w.ctx, &id).await.expect("an unknown id detaches");
}

#[tokio::test]
async fn clashing_veth_names_never_take_each_others_link() {
    let w = world();
    let first = attach(&w.ctx, request("victim-476022", CONTAINER_NS, &[]))
        .await
        .unwrap();
    let index = w.kernel.state.lock().unwrap().links[&first.host_ifname].index;
    w.kernel.add_namespace("/run/netns/other");
    let second = attach(&w.ctx, request("victim-3507330", "/run/netns/other", &[]))
        .await
        .unwrap();
    assert_ne!(first.host_ifname, second.host_ifname);
    let kernel = w.kernel.state.lock().unwrap();
    assert_eq!(
        kernel.links[&first.host_ifname].index, index,
        "first veth untouched"
    );
    assert!(kernel
        .routes
        .contains(&Route::host(first.ip, RouteTarget::Dev(index))));
}

#[tokio::test]
async fn a_repeated_attach_repairs_a_deleted_veth() {
    let w = world();
    let record = attach(&w.ctx, request("web", "", &[])).await.unwrap();
    w.kernel.delete_link(&record.host_ifname).await.unwrap();
    let again = attach(&w.ctx, request("web", "", &[])).await.unwrap();
    assert_eq!(again, record);
    let kernel = w.kernel.state.lock().unwrap();
    let link = &kernel.links[&record.host_ifname];
    assert!(kernel
        .routes
        .contains(&Route::host(record.ip, RouteTarget::Dev(link.index))));
}

#[tokio::test]
async fn addresses_fill_a_block_then_the_next_one_is_claimed() {
    let w = world();
    let mut ips = vec![];
    for i in 0..5 {
        let record = attach(&w.ctx, request(&format!("c{i}"), "", &[]))
            .await
            .unwrap();
        ips.push(record.ip.to_string());
    }
    assert_eq!(
        ips,
        [
            "10.65.0.0",
            "10.65.0.1",
            "10.65.0.2",
            "10.65.0.3",
            "10.65.0.4"
        ]
    );
    assert_eq!(w.store.state.lock().unwrap().blocks.len(), 2);
}

#[tokio::test]
async fn the_second_interface_of_a_namespace_takes_the_default_route_when_the_first_goes() {
    let w = world();
    let first = attach(&w.ctx, request("eth", CONTAINER_NS, &[]))
        .await
        .unwrap();
    let second = attach(
        &w.ctx,
        AttachRequest::new("net", CONTAINER_NS, None, "net1", vec![]).unwrap(),
    )
    .await
    .unwrap();
    assert!(!first.secondary && second.secondary);
    detach(&w.ctx, &ContainerId::new("eth").unwrap())
        .await
        .unwrap();
    let promoted = w.ctx.endpoints.get("net").unwrap();
    assert!(
        !promoted.secondary,
        "the remaining interface carries the default route"
    );
    let stored =
        w.store.state.lock().unwrap().endpoints[&("h1".to_string(), "net".to_string())].clone();
    assert_eq!(stored, promoted);
    assert_eq!(w.ctx.journal.load().unwrap(), vec![promoted]);
}

#[tokio::test]
async fn a_block_being_released_is_never_allocated_from_and_an_emptied_one_goes() {
    let w = world();
    let block = |text: &str| -> ipnetwork::IpNetwork { text.parse().unwrap() };
    for i in 0..5 {
        attach(&w.ctx, request(&format!("c{i}"), "", &[]))
            .await
            .unwrap();
    }
    detach(&w.ctx, &ContainerId::new("c4").unwrap())
        .await
        .unwrap();
    // 10.65.0.4/30 is empty now; while it is marked retiring an attach claims a third block
    // rather than pick from it, and a block in use cannot be marked.
    assert!(!w.ctx.endpoints.retire(block("10.65.0.0/30"), None));
    assert!(w.ctx.endpoints.retire(block("10.65.0.4/30"), None));
    let record = attach(&w.ctx, request("c5", "", &[])).await.unwrap();
    assert_eq!(record.ip.to_string(), "10.65.0.8");
    w.ctx.endpoints.unretire(block("10.65.0.4/30"));

    let mut empty = crate::blocks::plan::EmptySince::default();
    crate::blocks::release_due(&w.ctx, &mut empty, std::time::Duration::ZERO).await;
    let held: Vec<_> = w
        .store
        .state
        .lock()
        .unwrap()
        .blocks
        .keys()
        .copied()
        .collect();
    assert_eq!(held, [block("10.65.0.0/30"), block("10.65.0.8/30")]);
    assert_eq!(
        w.ctx.cluster.blocks_of("h1"),
        [block("10.65.0.0/30"), block("10.65.0.8/30")]
    );
    // Emptied entirely, the host keeps the pool's lowest block.
    for i in [0, 1, 2, 3, 5] {
        detach(&w.ctx, &ContainerId::new(&format!("c{i}")).unwrap())
            .await
            .unwrap();
    }
    crate::blocks::release_due(&w.ctx, &mut empty, std::time::Duration::ZERO).await;
    assert_eq!(w.ctx.cluster.blocks_of("h1"), [block("10.65.0.0/30")]);
}

#[tokio::test]
async fn a_requested_address_is_given_once_kept_across_containers_and_refused_by_cause() {
    let w = world();
    let asked = |id: &str, ip: &str| request(id, CONTAINER_NS, &[]).with_ips(&[ip]).unwrap();
    let ip = |text: &str| -> std::net::IpAddr { text.parse().unwrap() };
    // A block of nobody is claimed for it.
    let a = attach(&w.ctx, asked("a", "10.65.7.2")).await.unwrap();
    assert_eq!(a.ip, ip("10.65.7.2"));
    assert_eq!(
        w.ctx.cluster.blocks_of("h1"),
        ["10.65.7.0/30".parse().unwrap()]
    );
    // The same request again is the same endpoint; another address for it is refused.
    assert_eq!(attach(&w.ctx, asked("a", "10.65.7.2")).await.unwrap(), a);
    let moved = attach(&w.ctx, asked("a", "10.65.7.3")).await.unwrap_err();
    assert!(matches!(moved, EndpointError::Differs(_)), "{moved}");

    let refused = |e: EndpointError| e.to_string();
    let taken = attach(&w.ctx, asked("b", "10.65.7.2")).await.unwrap_err();
    assert!(
        matches!(taken, EndpointError::AddressTaken { .. }),
        "{taken}"
    );
    assert!(refused(taken).contains("container a"));
    // Held in etcd by a record this agent does not know.
    w.store
        .state
        .lock()
        .unwrap()
        .ips
        .insert(ip("10.65.7.1"), ("h1".into(), "ghost".into()));
    let foreign = attach(&w.ctx, asked("b", "10.65.7.1")).await.unwrap_err();
    assert!(refused(foreign).contains("container ghost on host h1"));
    // Another host's block, known to the view or found on claiming it.
    w.ctx
        .cluster
        .claimed("default", "10.65.9.0/30".parse().unwrap(), "h2");
    let elsewhere = attach(&w.ctx, asked("b", "10.65.9.1")).await.unwrap_err();
    assert!(matches!(&elsewhere, EndpointError::AddressElsewhere { host, .. } if host == "h2"));
    w.store.state.lock().unwrap().blocks.insert(
        "10.65.11.0/30".parse().unwrap(),
        ("default".into(), "h3".into()),
    );
    let raced = attach(&w.ctx, asked("b", "10.65.11.1")).await.unwrap_err();
    assert!(matches!(&raced, EndpointError::AddressElsewhere { host, .. } if host == "h3"));
    for outside in ["10.66.0.1", "fd65::1"] {
        let err = attach(&w.ctx, asked("b", outside)).await.unwrap_err();
        assert!(matches!(err, EndpointError::OutsidePools { .. }), "{err}");
    }
    // Nothing of the refused attaches is left.
    assert_eq!(w.store.state.lock().unwrap().endpoints.len(), 1);
    assert_eq!(w.ctx.endpoints.len(), 1);
    assert_eq!(w.kernel.state.lock().unwrap().links.len(), 1);

    // Detached, the address goes to the next container that asks for it.
    detach(&w.ctx, &ContainerId::new("a").unwrap())
        .await
        .unwrap();
    let c = attach(&w.ctx, asked("c", "10.65.7.2")).await.unwrap();
    assert_eq!(c.ip, ip("10.65.7.2"));
}
