//! Clients of the weft agent: `weftctl` (the command line) and `weft-cni` (the CNI plugin). They
//! speak the agent's gRPC API and, for cluster-wide operator commands, etcd; they never touch
//! the kernel themselves (what `weftctl ipam check` needs of it comes from the agent).

pub mod audit;
pub mod client;
pub mod cni;
pub mod ctl;
