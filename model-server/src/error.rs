//! The server's error type and its one mapping to gRPC status codes.

use superficial_models::ModelError;
use tonic::{Code, Status};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("unknown dataset `{0}`")]
    UnknownDataset(String),
    #[error("unknown job `{0}`")]
    UnknownJob(String),
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("a model named `{0}` is already loaded")]
    AlreadyLoaded(String),
    #[error("invalid `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("path `{0}` is outside the server's model root")]
    OutsideRoot(String),
    #[error("path `{0}` does not exist")]
    PathNotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Out of a resource the request needed (e.g. disk space for a dataset).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("server is overloaded: the request queue is full ({0} waiting)")]
    Overloaded(usize),
    #[error("the model worker has stopped")]
    WorkerGone,
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, reason: impl ToString) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// The gRPC code of this error: the single place where that decision is made.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::UnknownModel(_)
            | ServiceError::UnknownDataset(_)
            | ServiceError::UnknownJob(_)
            | ServiceError::PathNotFound(_) => Code::NotFound,
            ServiceError::Unauthenticated => Code::Unauthenticated,
            ServiceError::Internal(_) => Code::Internal,
            ServiceError::AlreadyLoaded(_) => Code::AlreadyExists,
            ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
            ServiceError::OutsideRoot(_) => Code::PermissionDenied,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Overloaded(_) | ServiceError::ResourceExhausted(_) => {
                Code::ResourceExhausted
            }
            ServiceError::WorkerGone => Code::Unavailable,
            ServiceError::Model(e) => match e {
                ModelError::Io { source, .. } => io_code(source).unwrap_or(Code::Internal),
                ModelError::SequenceTooLong { .. }
                | ModelError::InvalidInput(_)
                | ModelError::Config { .. }
                | ModelError::UnknownModelType { .. }
                | ModelError::InvalidConfig(_)
                | ModelError::NoWeights { .. }
                | ModelError::WeightsFile { .. }
                | ModelError::MissingTensor { .. }
                | ModelError::TensorShape { .. }
                | ModelError::Tokenizer { .. } => Code::InvalidArgument,
                _ => Code::Internal,
            },
        }
    }
}

/// The code of a file-system error a client's path can cause (a missing file, a path through a
/// file, a directory where a file was named); `None` for the server's own faults.
pub fn io_code(error: &std::io::Error) -> Option<Code> {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::NotFound => Some(Code::NotFound),
        ErrorKind::NotADirectory
        | ErrorKind::IsADirectory
        | ErrorKind::InvalidFilename
        | ErrorKind::InvalidInput
        | ErrorKind::InvalidData
        | ErrorKind::UnexpectedEof
        | ErrorKind::FileTooLarge => Some(Code::InvalidArgument),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Some(Code::PermissionDenied),
        _ => None,
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

pub type ServiceResult<T> = std::result::Result<T, ServiceError>;
