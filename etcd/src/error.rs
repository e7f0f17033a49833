//! Errors of the datastore layer. Each carries the key or name a user needs to act on it.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::records::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    #[error("etcd request failed: {0}")]
    Etcd(etcd_client::Error),
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("etcd client certificate and key must be given together")]
    TlsIncomplete,
    #[error(
        "pool {name} is stored in etcd as {existing}, but this agent is configured with {wanted}; \
         fix the agent's pool settings or remove the pool"
    )]
    PoolMismatch {
        name: String,
        existing: String,
        wanted: String,
    },
    #[error("pool {pool} ({cidr}) has no free block left")]
    PoolExhausted { pool: String, cidr: IpNetwork },
    #[error("host port {protocol}/{port} is already published by container {owner}")]
    PortTaken {
        protocol: Protocol,
        port: u16,
        owner: String,
    },
    #[error("address {ip} is already held by {holder}")]
    IpTaken { ip: IpAddr, holder: String },
    #[error("malformed record at {key}: {reason}")]
    Malformed { key: String, reason: String },
    #[error("gave up after {attempts} conflicting attempts at {what}")]
    Contention { what: String, attempts: u32 },
    #[error("block {block} was released while an address in it was being allocated")]
    BlockReleased { block: IpNetwork },
}

impl From<etcd_client::Error> for StoreError {
    fn from(err: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        let unavailable = match &err {
            E::TransportError(_) | E::IoError(_) => true,
            E::GRpcStatus(status) => match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled => true,
                // The connection broke under the request (a member restarted): the request may
                // or may not have been applied, exactly as when etcd cannot be reached.
                tonic::Code::Unknown => status.message() == "transport error",
                _ => false,
            },
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(err.to_string())
        } else {
            StoreError::Etcd(err)
        }
    }
}

impl From<tokio::time::error::Elapsed> for StoreError {
    fn from(_: tokio::time::error::Elapsed) -> Self {
        StoreError::Unavailable("request timed out".into())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_broken_under_a_request_is_unavailability() {
        let reset = etcd_client::Error::GRpcStatus(tonic::Status::unknown("transport error"));
        assert!(matches!(
            StoreError::from(reset),
            StoreError::Unavailable(_)
        ));
        let refused =
            etcd_client::Error::GRpcStatus(tonic::Status::unknown("etcdserver: too many requests"));
        assert!(matches!(StoreError::from(refused), StoreError::Etcd(_)));
        let down = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader"));
        assert!(matches!(StoreError::from(down), StoreError::Unavailable(_)));
    }
}
