//! The `weft.v1` gRPC API, generated at build time from `weft/v1/agent.proto`.

pub mod v1 {
    tonic::include_proto!("weft.v1");
}
