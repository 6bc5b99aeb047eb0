//! [`Layer`]: a block, a stage or a network wired once over a [`Backend`], and the bridge
//! from it to dfdx's `Module` / `ModuleMut` on the CPU.

use dfdx::prelude::*;

use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::{Backend, TrainBackend};
use crate::error::Result;
use crate::ops::Act;

/// A part of a network that maps an activation `In` of backend `B` to another: the wiring,
/// written once for every backend. The channel counts are in `In` and [`Layer::Out`], so a
/// mis-wired network does not compile, on any backend.
pub trait Layer<B: Backend, In> {
    /// The output activation.
    type Out;

    /// Eval mode: batch norm with the running statistics.
    fn eval_on(&self, b: &B, x: In) -> Result<Self::Out>;

    /// Training mode: batch norm with the batch's statistics, running statistics updated.
    fn train_on(&mut self, b: &B, x: In) -> Result<Self::Out>
    where
        B: TrainBackend;
}

/// dfdx's eval-mode forward of `layer` on the CPU: without a tape on plain buffers (every
/// convolution fused with its batch norm, one copy in and one tensor out), with a tape on
/// tensors so gradients flow.
pub(crate) fn forward_eval<L, const I: usize, const O: usize, T>(
    layer: &L,
    x: Act<I, T>,
) -> Result<Act<O, T>>
where
    T: Tape<f32, Cpu> + Merge<T>,
    L: Layer<CpuBackend<T>, CpuAct<I, T>, Out = CpuAct<O, T>>,
{
    let dev = x.device().clone();
    let (x, tape) = CpuAct::eval_input(x);
    layer
        .eval_on(&CpuBackend::new(), x)?
        .into_tensor(&dev, tape)
}

/// dfdx's training-mode forward of `layer` on the CPU, on tensors.
pub(crate) fn forward_train<L, const I: usize, const O: usize, T>(
    layer: &mut L,
    x: Act<I, T>,
) -> Result<Act<O, T>>
where
    T: Tape<f32, Cpu> + Merge<T>,
    L: Layer<CpuBackend<T>, CpuAct<I, T>, Out = CpuAct<O, T>>,
{
    let dev = x.device().clone();
    layer
        .train_on(&CpuBackend::new(), CpuAct::Tensor(x))?
        .into_tensor(&dev, None)
}

/// dfdx's `Module` (eval mode, [`forward_eval`]) and `ModuleMut` (training mode,
/// [`forward_train`]) for a [`Layer`] from `IN` to `OUT` channels whose const parameters are
/// listed.
macro_rules! layer_modules {
    ($name:ident <$($c:ident),+>) => {
        impl<$(const $c: usize,)+ T: Tape<f32, Cpu> + Merge<T>> Module<Act<IN, T>>
            for $name<$($c,)+ f32, Cpu>
        {
            type Output = Act<OUT, T>;
            type Error = crate::error::Error;
            fn try_forward(&self, x: Act<IN, T>) -> Result<Act<OUT, T>> {
                crate::model::layer::forward_eval(self, x)
            }
        }

        impl<$(const $c: usize,)+ T: Tape<f32, Cpu> + Merge<T>> ModuleMut<Act<IN, T>>
            for $name<$($c,)+ f32, Cpu>
        {
            type Output = Act<OUT, T>;
            type Error = crate::error::Error;
            fn try_forward_mut(&mut self, x: Act<IN, T>) -> Result<Act<OUT, T>> {
                crate::model::layer::forward_train(self, x)
            }
        }
    };
}
pub(crate) use layer_modules;
