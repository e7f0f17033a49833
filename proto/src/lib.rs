//! The `weft.v1` gRPC API, generated at build time from `weft/v1/agent.proto`.

pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// The address every container uses as its default gateway; the host end of each veth answers it.
pub const GATEWAY: &str = "169.254.1.1";
