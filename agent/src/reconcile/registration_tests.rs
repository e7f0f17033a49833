//! The registration check over the fake kernel and datastore: what it reads of the kernel.

use std::collections::HashMap;

use super::registration::check;
use crate::endpoints::attach;
use crate::endpoints::tests::{request, world, CONTAINER_NS};

#[tokio::test]
async fn a_registered_host_is_checked_without_listing_its_links() {
    let w = world();
    let record = attach(&w.ctx, request("web", CONTAINER_NS, &[]))
        .await
        .unwrap();
    let dumps = || w.kernel.state.lock().unwrap().link_dumps;
    let before = dumps();
    check(&w.ctx, &mut HashMap::new()).await;
    assert_eq!(dumps(), before, "nothing unknown: no link dump");
    assert!(w.ctx.problems().is_empty(), "{:?}", w.ctx.problems());

    // A record of this host the agent does not hold, its veth present: the links are listed,
    // and the endpoint adopted.
    w.ctx.endpoints.remove("web");
    check(&w.ctx, &mut HashMap::new()).await;
    assert_eq!(dumps(), before + 1);
    assert_eq!(w.ctx.endpoints.get("web"), Some(record));
}
