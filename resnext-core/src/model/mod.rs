//! The ResNeXt block, stages and networks, wired once over a
//! [`Backend`](crate::backend::Backend) ([`Layer`]); the networks chosen by name at run
//! time ([`Arch`], [`Network`]); one training step ([`train_step`]).

mod block;
mod layer;
mod network;
mod on_gpu;
mod registry;
mod train_step;

pub use block::{Bottleneck, Downsample, Stage, StageMeta};
pub use layer::Layer;
pub use network::*;
pub use on_gpu::OnGpu;
pub use registry::{Arch, BuildRuntime, Network, UnknownArch, MAX_CLASSES};
pub use train_step::{train_step, train_step_by, TrainOutput};
