//! [`Layer`]: a block or a stage wired once over a [`Backend`], and the bridge from it to
//! dfdx's `Module` / `ModuleMut` on the CPU.

use crate::backend::{Backend, TrainBackend};
use crate::error::Result;

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

/// dfdx's `Module` (eval mode) and `ModuleMut` (training mode) for a [`Layer`] from `IN`
/// to `OUT` channels whose const parameters are listed: its `eval_on` / `train_on` on
/// [`CpuBackend`](crate::backend::cpu::CpuBackend), on plain buffers when no tape is
/// attached (every convolution fused with its batch norm, one copy in and one tensor
/// out), on tensors otherwise.
macro_rules! layer_modules {
    ($name:ident <$($c:ident),+>) => {
        impl<$(const $c: usize,)+ T: Tape<f32, Cpu> + Merge<T>> Module<Act<IN, T>>
            for $name<$($c,)+ f32, Cpu>
        {
            type Output = Act<OUT, T>;
            type Error = crate::error::Error;
            fn try_forward(&self, x: Act<IN, T>) -> Result<Act<OUT, T>> {
                let (x, back) = CpuAct::eval_input(x);
                back.act(self.eval_on(&CpuBackend::new(), x)?)
            }
        }

        impl<$(const $c: usize,)+ T: Tape<f32, Cpu> + Merge<T>> ModuleMut<Act<IN, T>>
            for $name<$($c,)+ f32, Cpu>
        {
            type Output = Act<OUT, T>;
            type Error = crate::error::Error;
            fn try_forward_mut(&mut self, x: Act<IN, T>) -> Result<Act<OUT, T>> {
                let (x, back) = CpuAct::train_input(x);
                back.act(self.train_on(&CpuBackend::new(), x)?)
            }
        }
    };
}
pub(crate) use layer_modules;
