//! The library's error type.

use std::path::PathBuf;
use ziplm_plugin_api::AdapterError;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ziplm, each with what is wrong, where, and (where
/// there is one) what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The runtime adapter failed.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A numerical step failed (a Gram matrix that is not positive definite, NaN
    /// weights...).
    #[error("{context}: {detail}")]
    Numerical {
        /// The block or step concerned.
        context: String,
        /// What failed and how to fix it.
        detail: String,
    },
    /// Calibration activations are unusable.
    #[error("calibration of {context}: {detail}")]
    Calibration {
        /// The block concerned.
        context: String,
        /// What is wrong with the activations.
        detail: String,
    },
    /// No plan within the shape constraints meets the budget.
    #[error(
        "the budget of {requested_ms:.3} ms cannot be met: the fastest model the runtime's shape \
         constraints allow takes {fastest_ms:.3} ms (dense: {dense_ms:.3} ms, {max_speedup:.2}x at most); \
         set a budget of at least {fastest_ms:.3} ms"
    )]
    ImpossibleBudget {
        /// The budget asked for.
        requested_ms: f64,
        /// The fastest prediction under maximal pruning.
        fastest_ms: f64,
        /// The dense model's prediction.
        dense_ms: f64,
        /// `dense_ms / fastest_ms`.
        max_speedup: f64,
    },
    /// An argument or a file's content is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A file system error with its path.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file that exists but cannot be parsed.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
}

impl Error {
    /// An I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A numerical failure in `context`.
    pub fn numerical(context: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Numerical {
            context: context.into(),
            detail: detail.into(),
        }
    }
}
