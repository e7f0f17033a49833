//! This host's endpoints: attach, detach, repair and check, over the kernel and datastore seams.
//! Decisions that can be made from data alone (which address and veth name, what a repair must
//! do) are pure functions beside the steps that carry them out.

pub mod allocate;
pub mod attach;
pub mod check;
pub mod detach;
pub mod error;
pub mod repair;
pub mod table;
pub mod teardown;

#[cfg(test)]
mod tests;

pub use attach::attach;
pub use check::check;
pub use detach::detach;
pub use error::EndpointError;
