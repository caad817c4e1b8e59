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
        Status::new(error.code(), hide_server_paths(error.to_string()))
    }
}

/// Folders of this process's servers whose absolute paths never reach a client: the model
/// root (a client names files relative to it) and the data directory.
static PRIVATE_FOLDERS: std::sync::RwLock<Vec<(String, &'static str)>> =
    std::sync::RwLock::new(Vec::new());

/// Registers `folder` (as given and canonical) to be shown as `shown_as` in error messages
/// (the empty string for the model root, whose paths are then the client's own words).
pub fn keep_private(folder: &std::path::Path, shown_as: &'static str) {
    let mut spellings = vec![folder.to_path_buf()];
    if let Ok(canonical) = folder.canonicalize() {
        spellings.push(canonical);
    }
    let Ok(mut folders) = PRIVATE_FOLDERS.write() else {
        return;
    };
    for spelling in spellings {
        let text = spelling.display().to_string();
        if text.is_empty() || text == "/" || text == "." {
            continue;
        }
        if !folders.iter().any(|(known, _)| *known == text) {
            folders.push((text, shown_as));
        }
    }
    // Longest first, so a folder inside another is replaced by its own name.
    folders.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
}

/// `message` with every registered folder's absolute path replaced by how it is shown.
pub fn hide_server_paths(message: String) -> String {
    let Ok(folders) = PRIVATE_FOLDERS.read() else {
        return message;
    };
    let mut message = message;
    for (folder, shown_as) in folders.iter() {
        if !message.contains(folder.as_str()) {
            continue;
        }
        let with_slash = format!("{folder}/");
        let replacement = if shown_as.is_empty() {
            String::new()
        } else {
            format!("{shown_as}/")
        };
        message = message.replace(&with_slash, &replacement);
        let bare = if shown_as.is_empty() { "." } else { shown_as };
        message = message.replace(folder.as_str(), bare);
    }
    message
}

pub type ServiceResult<T> = std::result::Result<T, ServiceError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_files_relative_to_the_private_folders() {
        keep_private(std::path::Path::new("/srv/w2s-test-models"), "");
        keep_private(
            std::path::Path::new("/srv/w2s-test-models/data"),
            "<data-dir>",
        );
        assert_eq!(
            hide_server_paths("/srv/w2s-test-models/gpt2/config.json: bad".into()),
            "gpt2/config.json: bad"
        );
        assert_eq!(
            hide_server_paths("no space in /srv/w2s-test-models/data/jobs/x".into()),
            "no space in <data-dir>/jobs/x"
        );
        assert_eq!(
            hide_server_paths("root /srv/w2s-test-models is empty".into()),
            "root . is empty"
        );
        let status = Status::from(ServiceError::PathNotFound(
            "/srv/w2s-test-models/missing".into(),
        ));
        assert_eq!(status.message(), "path `missing` does not exist");
    }
}
