//! Issue 11 (hardening): one test per defect and per extra, written against the fixed behaviour
//! specified in the hardening contract. Each one fails on an agent that has the defect, at the
//! assertion that shows it.
//!
//! `support` holds what the tests share; one file per group of defects.

#[path = "hardening/boundaries.rs"]
mod boundaries;
#[path = "hardening/extras.rs"]
mod extras;
#[path = "hardening/liveness.rs"]
mod liveness;
#[path = "hardening/requests.rs"]
mod requests;
#[path = "hardening/support.rs"]
mod support;
#[path = "hardening/veths.rs"]
mod veths;
