//! Passes over the fake kernel and datastore: what each kind reads of the kernel.

use std::sync::Arc;

use super::{Pass, Reconciler};
use crate::endpoints::attach;
use crate::endpoints::tests::{request, world, CONTAINER_NS};

#[tokio::test]
async fn only_a_full_pass_reads_the_links_settings() {
    let (ctx, kernel, _rest) = world().shared();
    attach(&ctx, request("web", CONTAINER_NS, &[]))
        .await
        .unwrap();
    let reconciler = Reconciler::new(Arc::clone(&ctx));
    let dumps = || {
        let state = kernel.state.lock().unwrap();
        (state.link_dumps, state.settings_dumps)
    };
    let (links, settings) = dumps();
    let report = reconciler.pass(Pass::Routes).await;
    assert_eq!(dumps(), (links + 1, settings), "a routes pass: names only");
    assert!(report.steps.get(super::Step::ReadKernel) > std::time::Duration::ZERO);

    let report = reconciler.pass(Pass::Full).await;
    assert_eq!(
        dumps(),
        (links + 2, settings + 1),
        "a full pass: with settings"
    );
    assert_eq!(report.errors, 0, "{report:?}");
    let steps: Vec<_> = report.steps.taken().map(|(s, _)| s).collect();
    for step in [
        super::Step::Host,
        super::Step::Registration,
        super::Step::Firewall,
    ] {
        assert!(steps.contains(&step), "{step:?} timed in {steps:?}");
    }
}
