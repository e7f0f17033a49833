//! The one place an endpoint error becomes a gRPC status.

use tonic::{Code, Status};
use weft_etcd::StoreError;

use crate::endpoints::EndpointError;
use crate::kernel::{KernelError, NetnsError};

fn netns_code(err: &NetnsError) -> Code {
    match err {
        NetnsError::Create { .. } | NetnsError::Enter { .. } => Code::Internal,
        _ => Code::InvalidArgument,
    }
}

fn store_code(err: &StoreError) -> Code {
    match err {
        StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::PoolExhausted { .. } => Code::ResourceExhausted,
        StoreError::PortTaken { .. } => Code::AlreadyExists,
        _ => Code::Internal,
    }
}

pub fn code(err: &EndpointError) -> Code {
    match err {
        EndpointError::Invalid(_)
        | EndpointError::NoProcess(_)
        | EndpointError::OutsidePools { .. }
        | EndpointError::OutsideNamedPools { .. }
        | EndpointError::UnknownPool(_) => Code::InvalidArgument,
        EndpointError::PoolDisabled(_) | EndpointError::NoPool => Code::FailedPrecondition,
        EndpointError::AddressTaken { .. } => Code::AlreadyExists,
        EndpointError::AddressElsewhere { .. } => Code::FailedPrecondition,
        EndpointError::IfnameTaken { .. } => Code::InvalidArgument,
        EndpointError::Netns(e) => netns_code(e),
        EndpointError::Kernel(KernelError::Netns(e)) => netns_code(e),
        EndpointError::Kernel(_) | EndpointError::Firewall(_) | EndpointError::Policy(_) => {
            Code::Internal
        }
        EndpointError::Store(e) => store_code(e),
        EndpointError::NotAttached(_) => Code::NotFound,
        EndpointError::WrittenElsewhere { .. } => Code::AlreadyExists,
        EndpointError::NamespaceGone { .. }
        | EndpointError::Differs(_)
        | EndpointError::HostPortInUse { .. } => Code::FailedPrecondition,
        EndpointError::Contention => Code::Unavailable,
        EndpointError::Incomplete { .. } | EndpointError::Journal(_) => Code::Internal,
    }
}

impl From<EndpointError> for Status {
    fn from(err: EndpointError) -> Self {
        Status::new(code(&err), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Invalid;

    #[test]
    fn each_cause_has_its_code() {
        let cases = [
            (
                EndpointError::Invalid(Invalid::PidZero),
                Code::InvalidArgument,
            ),
            (EndpointError::NotAttached("x".into()), Code::NotFound),
            (
                EndpointError::Store(StoreError::Unavailable("down".into())),
                Code::Unavailable,
            ),
            (
                EndpointError::Store(StoreError::PoolExhausted {
                    pool: "p".into(),
                    cidr: "10.0.0.0/30".parse().unwrap(),
                }),
                Code::ResourceExhausted,
            ),
            (
                EndpointError::Store(StoreError::PortTaken {
                    protocol: weft_etcd::records::Protocol::Tcp,
                    port: 80,
                    owner: "y".into(),
                }),
                Code::AlreadyExists,
            ),
            (
                EndpointError::Netns(NetnsError::Missing { path: "/x".into() }),
                Code::InvalidArgument,
            ),
            (
                EndpointError::NamespaceGone {
                    container: "x".into(),
                    source: NetnsError::Missing { path: "/x".into() },
                },
                Code::FailedPrecondition,
            ),
            (EndpointError::Contention, Code::Unavailable),
            (
                EndpointError::OutsidePools {
                    ip: "10.66.0.1".parse().unwrap(),
                },
                Code::InvalidArgument,
            ),
            (
                EndpointError::AddressTaken {
                    ip: "10.65.0.1".parse().unwrap(),
                    holder: "container a".into(),
                },
                Code::AlreadyExists,
            ),
            (
                EndpointError::AddressElsewhere {
                    ip: "10.65.0.1".parse().unwrap(),
                    block: "10.65.0.0/26".parse().unwrap(),
                    host: "h2".into(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (err, expected) in cases {
            assert_eq!(Status::from(err).code(), expected);
        }
    }
}
