//! The library's error type.
//!
//! Every variant that comes from user input names the file (or flag) at fault, what was
//! expected and what was found, so the binaries can print it as one line and exit 1.

use std::path::{Path, PathBuf};

/// Errors raised by the `scae` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the user gave us is missing, unreadable or does not hold what we expect.
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    /// An argument or a combination of arguments is invalid.
    #[error("{0}")]
    Usage(String),
    /// An I/O failure while reading or writing `path`.
    /// (The I/O error is part of the message, not a separate cause, so that it prints once.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// The run was stopped by Ctrl-C or SIGTERM at a step boundary (exit status 130); the
    /// message says where and how to continue.
    #[error("{0}")]
    Interrupted(String),
    /// A tensor operation failed (shape bugs land here; user input is checked before).
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),
}

// Not `#[from]`: that would also make the candle error a separate cause, printed twice.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A bad-input error about `path`.
    pub fn input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Input { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), err }
    }
}

/// Attach a path to `std::io::Result`s.
pub trait IoContext<T> {
    /// Turn an I/O error into [`Error::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
