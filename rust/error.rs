//! One error type for the whole core. Algorithm code returns `Result<T>`; only `rust/py/` turns an
//! `Error` into a Python exception, so every variant says which Python class it becomes.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file (becomes FileNotFoundError / PermissionError / OSError).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file whose content is not what its format requires (becomes a ferrolm error / ValueError).
    /// `location` is "file", "file:line" or "file: field"; `message` says what was expected.
    #[error("{location}: {message}")]
    Format { location: String, message: String },

    /// An argument that cannot be used as given (becomes a ferrolm error / ValueError).
    #[error("{0}")]
    Invalid(String),

    /// A token that is not in the vocabulary (becomes KeyError).
    #[error("unknown token {0}")]
    UnknownToken(String),

    /// Text that contains a special token the caller did not allow (becomes a ferrolm error / ValueError).
    #[error(
        "encountered text corresponding to disallowed special token {token:?} at byte {offset}. \
         Pass it in allowed_special to encode it as a special token, or in disallowed_special=() \
         (or use encode_ordinary) to encode it as ordinary text"
    )]
    DisallowedSpecial { token: String, offset: usize },

    /// The regular-expression engine gave up on a custom pattern (e.g. its backtracking limit).
    #[error("pattern {pattern:?} failed on the input: {message}")]
    Regex { pattern: String, message: String },

    /// The user interrupted a long call (becomes KeyboardInterrupt).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn format(location: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Format {
            location: location.into(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}
