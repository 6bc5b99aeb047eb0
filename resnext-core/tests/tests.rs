//! Integration tests of resnext-core: one test binary, topic modules.

mod backend;
mod common;
mod model;
mod ops;
mod parity;
mod weights;
