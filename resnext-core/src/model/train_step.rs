//! One training step: training-mode forward, loss, backward, optimiser update.

use dfdx::prelude::*;

use crate::error::{Error, Result};
use crate::ops::{self, Act, Mat, Targets};
use crate::optim::Optimizer;
use crate::params::Params;

/// What one training step produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutput {
    /// Mean loss over the batch (before the update).
    pub loss: f32,
    /// Training-mode logits `(n, classes)`, row-major.
    pub logits: Vec<f32>,
    /// The gradients' global L2 norm before clipping, when the optimiser clips.
    pub grad_norm: Option<f32>,
}

/// One training step of `net` on the batch `x`: training-mode forward (batch statistics,
/// running statistics updated), cross-entropy against `targets` (with label smoothing, and
/// mixed as mixup and cutmix mix them),
/// backward, and an update by `opt`. A non-finite loss is an error and leaves the weights
/// as they were (the running statistics have seen the batch).
pub fn train_step<const C: usize, O: Dim, M>(
    net: &mut M,
    x: Act<C>,
    targets: Targets<'_>,
    opt: &mut Optimizer,
) -> Result<TrainOutput>
where
    M: ModuleMut<Act<C, OwnedTape<f32, Cpu>>, Output = Mat<O, OwnedTape<f32, Cpu>>, Error = Error>
        + Params,
{
    train_step_by(net, x, targets, opt, |net, x| net.try_forward_mut(x))
}

/// [`train_step`] with the training-mode forward pass given: e.g. one with frozen parts
/// ([`super::TrainFrozen`]).
pub fn train_step_by<const C: usize, O: Dim, M: Params>(
    net: &mut M,
    x: Act<C>,
    targets: Targets<'_>,
    opt: &mut Optimizer,
    forward: impl FnOnce(&mut M, Act<C, OwnedTape<f32, Cpu>>) -> Result<Mat<O, OwnedTape<f32, Cpu>>>,
) -> Result<TrainOutput> {
    // the input's gradient is not used: the ops compute none
    let logits = ops::without_grad_of(x.trace(Gradients::leaky()), |x| forward(net, x))??;
    let values = logits.as_vec();
    let loss = ops::cross_entropy_mixed(logits, targets)?;
    let value = loss.array();
    if !value.is_finite() {
        return Err(Error::NonFinite(format!("loss is {value}")));
    }
    // with a process group: gradients summed in buckets while the backward pass runs
    crate::dist::begin_backward();
    let mut grads = loss.backward();
    crate::dist::average_gradients(net, &mut grads, &opt.cfg)?;
    let grad_norm = opt.step(net, &mut grads)?;
    Ok(TrainOutput {
        loss: value,
        logits: values,
        grad_norm,
    })
}
