//! The error type adapters return.

use std::path::PathBuf;

/// Result alias for adapter operations.
pub type AdapterResult<T> = Result<T, AdapterError>;

/// What went wrong inside a runtime adapter.
///
/// Each variant carries enough to tell the user what is wrong, where, and (in `hint`)
/// what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The model file could not be read or parsed.
    #[error("cannot read model {path}: {detail}")]
    InvalidModel {
        /// The file that failed.
        path: PathBuf,
        /// What the parser found.
        detail: String,
    },
    /// The model is valid but uses something the adapter cannot prune or serve.
    #[error("unsupported {what}: {detail}; {hint}")]
    Unsupported {
        /// The feature (architecture, node, dtype...).
        what: String,
        /// What was found.
        detail: String,
        /// What the user can do.
        hint: String,
    },
    /// An argument the engine passed does not fit the model (a bug on the caller's side
    /// or a plan made for another model).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Calibration data or activations are unusable (empty, NaN, out-of-vocabulary ids).
    #[error("bad calibration data: {0}")]
    Calibration(String),
    /// The runtime itself failed while loading, running or writing a model.
    #[error("runtime error in {context}: {detail}")]
    Runtime {
        /// What the adapter was doing.
        context: String,
        /// The runtime's own message (whole error chain).
        detail: String,
    },
    /// A file system error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl AdapterError {
    /// Wraps a runtime error, keeping its whole chain of causes in the message.
    pub fn runtime(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        AdapterError::Runtime {
            context: context.into(),
            detail: format!("{err:#}"),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AdapterError::Io {
            path: path.into(),
            source,
        }
    }
}
