//! What the agent tells the outside about itself: Prometheus metrics, health and readiness over
//! HTTP, and systemd notifications.

pub mod health;
pub mod metrics;
pub mod notify;
