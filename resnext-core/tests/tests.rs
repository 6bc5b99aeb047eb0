//! Integration tests of resnext-core: one test binary, topic modules.

mod backend;
mod common;
mod features;
mod fine_tune;
mod model;
mod ops;
mod parity;
mod weights;
