//! Typed layers: channel counts, kernel, stride, padding and groups are const generics,
//! spatial sizes are runtime dims. Each layer implements dfdx's [`Module`](dfdx::nn::Module)
//! (eval mode), [`ModuleMut`](dfdx::nn::ModuleMut) (training mode: batch statistics) and
//! [`TensorCollection`](dfdx::nn::TensorCollection) with torchvision's tensor names, so
//! `dev.build_module::<builders::X, f32>()`, `num_trainable_params`, `alloc_grads` and
//! friends work on them.

mod batch_norm;
mod conv;
mod linear;
mod pool;

pub use batch_norm::BatchNorm2d;
pub use conv::{Conv2d, ConvWeightShape, PerGroup};
pub use linear::Linear;
pub use pool::{GlobalAvgPool, MaxPool2d};
