//! ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural
//! Networks", <https://arxiv.org/abs/1611.05431>) as typed [dfdx] modules.

pub mod builders;
pub mod error;
pub mod kernels;
pub mod ops;

pub use error::{Error, Result};
pub mod model;
pub mod nn;
pub mod optim;
pub mod params;
pub mod weights;
