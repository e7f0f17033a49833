//! Reliability and security: restarts without disruption, etcd outages, dead hosts and leaks,
//! tampering, spoofing, concurrency, hostile input, and access control.
//!
//! `support` holds what the tests share; one file per group.

#[path = "reliability/access.rs"]
mod access;
#[path = "reliability/concurrency.rs"]
mod concurrency;
#[path = "reliability/repair.rs"]
mod repair;
#[path = "reliability/restarts.rs"]
mod restarts;
#[path = "reliability/support.rs"]
mod support;
