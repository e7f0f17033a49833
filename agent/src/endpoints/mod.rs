//! This host's endpoints: attach, detach, repair and check, over the kernel and datastore seams.
//! Decisions that can be made from data alone (which address and veth name, what a repair must
//! do) are pure functions beside the steps that carry them out.

pub mod allocate;
pub mod attach;
pub mod check;
pub mod detach;
pub mod error;
pub mod pools;
pub mod reattach;
pub mod repair;
pub mod requested;
pub mod table;
pub mod teardown;

#[cfg(test)]
mod dual_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod requested_tests;
#[cfg(test)]
pub(crate) mod tests;

pub use attach::attach;
pub use check::check;
pub use detach::detach;
pub use error::EndpointError;

/// The link an endpoint record describes (its MAC as recorded; a record with an unreadable one
/// gets a new one).
pub(crate) fn link_of(
    ctx: &crate::context::Context,
    record: &weft_etcd::records::EndpointRecord,
) -> Result<crate::kernel::ContainerLink, EndpointError> {
    Ok(crate::kernel::ContainerLink {
        host_ifname: record.host_ifname.clone(),
        ifname: crate::model::IfName::new(&record.ifname)?,
        ip: record.ip,
        ipv6: record.ipv6,
        mac: record
            .mac
            .parse()
            .unwrap_or_else(|_| crate::model::Mac::random()),
        mtu: ctx.mtu(),
        secondary: record.secondary,
    })
}
