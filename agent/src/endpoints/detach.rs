//! Detach: the records go first, so that while etcd cannot be reached nothing is done (the
//! container keeps working and a retry finds everything as it was); then the dataplane.

use tracing::info;

use super::error::EndpointError;
use super::teardown::dismantle;
use crate::context::Context;
use crate::model::ContainerId;

pub async fn detach(ctx: &Context, id: &ContainerId) -> Result<(), EndpointError> {
    let _guard = ctx.endpoints.lock(id).await;
    let record = match ctx.endpoints.get(id.as_str()) {
        Some(record) => record,
        None => match ctx.store.get_endpoint(ctx.me(), id.as_str()).await? {
            Some(record) => record,
            None => return Ok(()),
        },
    };
    ctx.store.delete_endpoint(&record).await?;
    let errors = dismantle(ctx, &record).await;
    if !errors.is_empty() {
        return Err(EndpointError::Incomplete {
            what: "detach",
            container: id.to_string(),
            errors,
        });
    }
    info!(container = %id, ip = %record.ip, "detached");
    Ok(())
}
