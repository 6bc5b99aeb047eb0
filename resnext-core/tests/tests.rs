//! Integration tests of resnext-core: one test binary, topic modules.

mod backend;
mod common;
mod features;
mod fine_tune;
mod model;
mod parity;
mod weights;
