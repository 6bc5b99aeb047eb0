//! Autograd ops on dfdx tensors that dfdx 0.13 lacks on stable Rust, one file per op.
//!
//! Each op copies its inputs out of the tensors, runs a kernel from [`crate::kernels`]
//! and hands the output values to [`record`], which builds the output tensor and, when
//! the input carries an [`OwnedTape`], registers the op's backward closure. That closure
//! gets the output's gradient and adds into the gradients of the input and of the
//! parameters (looked up by tensor, so they need not be traced).
//!
//! Activations are `(batch, channels, height, width)` tensors with the channel count in the
//! type: [`Act`]. Inputs must be contiguous (every tensor that these ops and dfdx's
//! non-view ops produce is; realise a permuted view before passing it).
//!
//! The output's gradient is *moved out* of the [`Gradients`] when an op's backward runs,
//! so gradients of intermediate activations are not kept; parameter and input gradients
//! are.

use dfdx::prelude::*;
use dfdx::tensor::CpuError;

use crate::error::Result;
use crate::profile::{self, Label};

mod batch_norm;
mod conv;
mod conv_bn;
mod elementwise;
mod fold_cache;
mod grad;
mod linear;
mod loss;
mod pool;

pub use batch_norm::{batch_norm2d_eval, batch_norm2d_train, BnConfig};
#[cfg(feature = "cuda")]
pub(crate) use conv::conv_geom;
pub use conv::{conv2d, ConvConfig};
pub(crate) use conv_bn::conv2d_bn_train_on;
#[cfg(feature = "cuda")]
pub(crate) use conv_bn::folded_weights;
pub use conv_bn::{conv2d_bn_eval, conv2d_bn_eval_raw, conv2d_bn_train, BnRef, BnTrainRef};
pub use elementwise::add_relu;
pub use fold_cache::{with_fold_cache, FoldCache};
pub use grad::GradSlot;
pub(crate) use grad::{without_grad_of, Grad, Held, Input, ParamGrad, Recompute};
pub use linear::{linear, linear_raw};
pub use loss::{cross_entropy, cross_entropy_mixed, Targets};
pub(crate) use pool::max_pool2d_on;
pub use pool::{global_avg_pool, global_avg_pool_raw, max_pool2d, max_pool2d_raw};

/// A `(batch, C, height, width)` activation on the CPU.
pub type Act<const C: usize, T = NoneTape> = Tensor<(usize, Const<C>, usize, usize), f32, Cpu, T>;

/// A `(batch, F)` feature or logit matrix whose second dim is `F`.
pub type Mat<F, T = NoneTape> = Tensor<(usize, F), f32, Cpu, T>;

/// Copies a contiguous tensor's values out.
pub fn read<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>) -> Vec<f32> {
    let mut v = vec![0.0f32; t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// The gradients an op's backward pass reads and accumulates into.
pub(crate) type Grads = Gradients<f32, Cpu>;

/// Records one op: wraps its output values `y` in a tensor of `shape` that carries `tape`
/// and, when the tape is owned, registers `backward` on it. `backward` receives the
/// output's gradient (moved out of the gradients) and the gradients to add into; its time
/// is profiled under `label`.
pub(crate) fn record<S: Shape, T: Tape<f32, Cpu>>(
    dev: &Cpu,
    y: Vec<f32>,
    shape: S,
    mut tape: T,
    label: Label,
    backward: impl FnOnce(Vec<f32>, &mut Grads) -> Result<(), CpuError> + 'static,
) -> Result<Tensor<S, f32, Cpu, T>> {
    let out = dev.try_tensor_from_vec(y, shape)?;
    if T::OWNS_TAPE {
        let og = out.ghost();
        tape.add_backward_op(move |grads| {
            let _t = profile::scope(label);
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            backward(dy, grads)
        });
    }
    Ok(out.put_tape(tape))
}
