//! The agent's API errors, and the one place they become gRPC statuses.

use weft_etcd::StoreError;

use crate::dataplane::DataplaneError;
use crate::netns::NetnsError;

/// An error of an API call, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        match err {
            StoreError::Unavailable(_) => ApiError::Unavailable(message),
            StoreError::PoolExhausted { .. } => ApiError::ResourceExhausted(message),
            StoreError::PortTaken { .. } => ApiError::AlreadyExists(message),
            _ => ApiError::Internal(message),
        }
    }
}

impl From<NetnsError> for ApiError {
    fn from(err: NetnsError) -> Self {
        match err {
            NetnsError::Create { .. } | NetnsError::Enter { .. } => {
                ApiError::Internal(err.to_string())
            }
            _ => ApiError::InvalidArgument(err.to_string()),
        }
    }
}

impl From<DataplaneError> for ApiError {
    fn from(err: DataplaneError) -> Self {
        match err {
            DataplaneError::Netns(e) => e.into(),
            DataplaneError::IfnameTaken { .. } => ApiError::InvalidArgument(err.to_string()),
            _ => ApiError::Internal(err.to_string()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        use tonic::Code;
        let code = match &err {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, err.to_string())
    }
}
