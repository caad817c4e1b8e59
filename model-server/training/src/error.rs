//! Errors of the training engine; each names the step or file it concerns.

use std::path::PathBuf;

use superficial_models::ModelError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A loss or gradient became NaN or infinite; training stops instead of continuing silently.
    #[error("non-finite {what} at step {step}")]
    NonFinite { step: usize, what: String },
    /// The configuration cannot be trained (zero batch, minibatch not dividing the batch, ...).
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    /// Training data does not fit the objective (wrong example kind, empty response, ...).
    #[error("invalid training data: {0}")]
    InvalidData(String),
    /// A checkpoint does not belong to this run or is damaged.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An export destination that must not be replaced (an existing file, or a folder that is
    /// not a previous export): exports never delete data they did not create.
    #[error("{path}: {reason}")]
    RefusedDestination { path: PathBuf, reason: String },
    /// The caller asked the run to stop (e.g. a cancelled job).
    #[error("training cancelled at step {step}")]
    Cancelled { step: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::Candle(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
