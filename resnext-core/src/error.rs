//! The library's error type.

use dfdx::tensor::CpuError;

use crate::backend::device::GpuError;

/// Errors from ops, modules and the model: every message names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input's shape does not fit the op.
    #[error("{op}: {msg}")]
    Shape {
        /// The op or module that rejected the input.
        op: &'static str,
        /// What was wrong, with the sizes involved.
        msg: String,
    },
    /// The tensor backend failed (allocation).
    #[error("tensor backend: {0}")]
    Device(CpuError),
    /// The GPU could not be opened or failed ([`GpuError`]).
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A loss or activation became NaN or infinite.
    #[error("non-finite value: {0}")]
    NonFinite(String),
}

impl From<CpuError> for Error {
    fn from(e: CpuError) -> Self {
        Error::Device(e)
    }
}

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Shape {
        op,
        msg: msg.into(),
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
