//! The ResNeXt block, stages and networks.

mod block;
mod network;
mod registry;

pub use block::{Bottleneck, Downsample, Stage};
pub use network::*;
pub use registry::{Arch, BuildRuntime, Network, TrainOutput, UnknownArch};
