//! The weft lab: hosts as network namespaces behind a router namespace, a real etcd, and one real
//! `weft-agent` per host. Used by the end-to-end tests and by `weft-lab demo`.
//!
//! On top of it: [`invariants`], which reads a whole lab and names every disagreement between
//! etcd, the agents and the kernels, and [`chaos`], the seeded randomized fault run that checks
//! them at every quiet point (`weft-lab chaos`), and [`soak`], continuous churn with faults
//! ending with nothing leaked (`weft-lab soak`).
//!
//! Everything lives in namespaces named `<prefix>-*` (and the agents' container namespaces
//! `weft-<prefix>-*`); the root namespace gets no address, route or link, so labs run side by
//! side and nothing is ever routed towards the machine's real interfaces.

pub mod bench;
pub mod bgp;
pub mod capture;
pub mod chaos;
pub mod cni;
pub mod etcd;
pub mod invariants;
pub mod lab;
pub mod passes;
pub mod probe;
pub mod sh;
pub mod soak;

pub use lab::{Lab, LabOptions};

/// Fails loudly when the suite cannot do its job: the end-to-end tests need root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests build network namespaces and must run as root; they do not skip"
    );
}
