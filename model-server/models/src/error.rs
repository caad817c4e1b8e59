//! The one error type of the model library. Every variant names what failed and where (file,
//! tensor, field), so a caller can show it to a person unchanged.

use std::path::PathBuf;

/// Errors of loading, running and tokenizing for models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `config.json` (or another JSON file) is malformed or has a bad value.
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// `model_type` names an architecture this library does not implement.
    #[error("{path}: unknown model_type `{model_type}` (supported: gpt2, opt)")]
    UnknownModelType { path: PathBuf, model_type: String },
    /// A configuration is internally inconsistent (e.g. heads do not divide the width).
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// The folder has no weights file this library can read.
    #[error(
        "{dir}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )]
    NoWeights { dir: PathBuf },
    /// A weights file could not be parsed.
    #[error("{path}: cannot read weights: {reason}")]
    WeightsFile { path: PathBuf, reason: String },
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("{file}: missing tensor `{name}`")]
    MissingTensor { name: String, file: String },
    /// A tensor has the wrong shape for the configuration.
    #[error("{file}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        file: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// Tokenizer files are missing or unreadable.
    #[error("tokenizer in {dir}: {reason}")]
    Tokenizer { dir: PathBuf, reason: String },
    /// A sequence needs more positions than the model (or the request) allows.
    #[error("sequence of {len} tokens exceeds the limit of {max} positions")]
    SequenceTooLong { len: usize, max: usize },
    /// Malformed input to a model call (empty sequence, token id out of range, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the model library.
pub type Result<T> = std::result::Result<T, ModelError>;
