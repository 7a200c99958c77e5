//! Why a config file cannot be used: one [`Problem`] per thing wrong, each
//! with its path, gathered by validation and reported together.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `routes[2].upstream`.
    pub path: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Not YAML of the expected shape (unknown field, wrong type, …).
    #[error("{path}: {cause}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde_yaml's message, with the location.
        cause: String,
    },
    /// Well-formed, but wrong; every problem is listed.
    #[error("{path}: {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Each problem with its path.
        problems: Vec<Problem>,
    },
}

#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// A config text quoted for a message, cut to 64 characters: a message
/// never echoes an unbounded value.
pub(crate) fn shown(s: &str) -> String {
    const MOST: usize = 64;
    match s.char_indices().nth(MOST) {
        None => format!("{s:?}"),
        Some((at, _)) => format!("{:?}…", &s[..at]),
    }
}
