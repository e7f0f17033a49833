//! The weft agent: a routed container fabric on one host, in the style of Project Calico.
//!
//! Layers, from the outside in: `api` (gRPC) and `supervisor` (start-up and the background
//! loops) drive `endpoints` (attach, detach, repair, check), `reconcile` (the kernel against the
//! wanted state) and `cluster` (the etcd watch and liveness). They share a `context` and reach
//! the world only through seams: `kernel` (netlink, sysctls, namespaces), `firewall`
//! (iptables) and `store` (etcd). `policy` enforces network policy (its address sets behind a
//! seam of their own). `model` holds the typed domain values; `config` the settings;
//! `telemetry` metrics, health and systemd notifications; `bgp` announces this host's blocks
//! to routers outside weft through bird2; `blocks` gives blocks that stay empty back.

pub mod api;
pub mod bgp;
pub mod blocks;
pub mod cluster;
pub mod config;
pub mod context;
pub mod endpoints;
pub mod firewall;
pub mod journal;
pub mod kernel;
pub mod model;
pub mod policy;
pub mod reconcile;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod telemetry;
#[cfg(test)]
mod testing;
