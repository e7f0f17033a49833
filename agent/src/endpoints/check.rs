//! Check: one endpoint's whole dataplane verified without changing anything.

use weft_etcd::records::EndpointRecord;

use super::error::EndpointError;
use crate::context::{port_rules, Context};
use crate::model::ContainerId;

/// The host veth, its sysctls and route, everything inside the container's namespace, and the
/// iptables rules of its published ports. Returns the record and what is wrong (empty when all
/// is well). Waits for an attach or detach of the same container to finish first.
pub async fn check(
    ctx: &Context,
    id: &ContainerId,
) -> Result<(EndpointRecord, Vec<String>), EndpointError> {
    let _guard = ctx.endpoints.lock(id).await;
    let record = ctx
        .endpoints
        .get(id.as_str())
        .ok_or_else(|| EndpointError::NotAttached(id.to_string()))?;
    let mut problems = ctx
        .kernel
        .check_host_side(&record.host_ifname, &record.addresses().collect::<Vec<_>>())
        .await?;
    let link = super::link_of(ctx, &record)?;
    match ctx.kernel.vet_netns(&record.netns) {
        Ok(_) => problems.extend(
            ctx.kernel
                .check_inside(&record.netns, &link)
                .await?
                .problems,
        ),
        Err(e) => problems.push(format!("the container's namespace is gone: {e}")),
    }
    problems.extend(ctx.firewall.check_ports(port_rules(&record)).await?);
    Ok((record, problems))
}
