//! Typed layers: channel counts, kernel, stride, padding and groups are const generics,
//! spatial sizes are runtime dims. Each layer implements dfdx's [`Module`](dfdx::nn::Module)
//! (eval mode), [`ModuleMut`](dfdx::nn::ModuleMut) (training mode: batch statistics) and
//! [`TensorCollection`](dfdx::nn::TensorCollection) with torchvision's tensor names, so
//! `dev.build_module::<builders::X, f32>()`, `num_trainable_params`, `alloc_grads` and
//! friends work on them.

/// `Self::tensor(name, get, get_mut, options)` for the field `$field` inside a
/// `TensorCollection::iter_tensors`: the tensor's name is the field's name (torchvision's).
macro_rules! field_tensor {
    ($field:ident, $options:expr) => {
        Self::tensor(
            stringify!($field),
            |s| &s.$field,
            |s| &mut s.$field,
            $options,
        )
    };
}

/// `Self::module(name, get, get_mut)` for the field `$field`, named `$name`.
macro_rules! field_module {
    ($name:expr, $field:ident) => {
        Self::module($name, |s| &s.$field, |s| &mut s.$field)
    };
}

pub(crate) use field_module;

mod batch_norm;
mod conv;
mod linear;
mod pool;

pub use batch_norm::BatchNorm2d;
pub use conv::{Conv2d, ConvLayer, ConvWeightShape, PerGroup};
pub use linear::Linear;
pub use pool::{GlobalAvgPool, MaxPool2d};
