//! [`OnGpu`]: the eval-mode forward pass and the recorded training-mode forward pass on a
//! GPU for a network whose stage widths are not spelled out, what
//! [`Network`](super::Network) calls. With the `cuda` feature off the trait is empty and
//! every type has it, so the bound costs a CPU-only build nothing.

#[cfg(feature = "cuda")]
pub use enabled::OnGpu;

#[cfg(not(feature = "cuda"))]
/// Without the `cuda` feature: nothing to run, every type has it.
pub trait OnGpu<const C: usize> {}

#[cfg(not(feature = "cuda"))]
impl<T, const C: usize> OnGpu<C> for T {}

#[cfg(feature = "cuda")]
mod enabled {
    use crate::backend::cuda::{CudaAct, CudaLogits, Gpu};
    use crate::error::Result;
    use crate::model::{Frozen, Layer, ResNeXt, ResNeXtCifar};
    use crate::nn::Linear;
    use dfdx::prelude::*;

    /// A network's forward passes on `gpu` ([`ResNeXt::eval_on`] and
    /// [`ResNeXt::train_with`] with the widths inferred).
    pub trait OnGpu<const C: usize> {
        /// Eval-mode logits `(batch, classes)` of `x`.
        fn eval_gpu(&self, gpu: &Gpu, x: CudaAct<C>) -> Result<CudaLogits<usize>>;

        /// Training-mode logits `(batch, classes)` of `x` with the parts in `frozen` held
        /// fixed, recorded for the backward pass: what
        /// [`Gpu::train_step_by`](crate::backend::cuda::Gpu::train_step_by) is given.
        fn train_gpu(
            &mut self,
            gpu: &Gpu,
            x: CudaAct<C>,
            frozen: Frozen,
        ) -> Result<CudaLogits<usize>>;
    }

    impl<
            const C: usize,
            L1,
            L2,
            L3,
            L4,
            const F: usize,
            const F1: usize,
            const F2: usize,
            const F3: usize,
        > OnGpu<C> for ResNeXt<C, L1, L2, L3, L4, Linear<F, usize, f32, Cpu>, f32, Cpu>
    where
        L1: Layer<Gpu, CudaAct<64>, Out = CudaAct<F1>>,
        L2: Layer<Gpu, CudaAct<F1>, Out = CudaAct<F2>>,
        L3: Layer<Gpu, CudaAct<F2>, Out = CudaAct<F3>>,
        L4: Layer<Gpu, CudaAct<F3>, Out = CudaAct<F>>,
    {
        fn eval_gpu(&self, gpu: &Gpu, x: CudaAct<C>) -> Result<CudaLogits<usize>> {
            self.eval_on(gpu, x)
        }

        fn train_gpu(
            &mut self,
            gpu: &Gpu,
            x: CudaAct<C>,
            frozen: Frozen,
        ) -> Result<CudaLogits<usize>> {
            self.train_with(gpu, x, frozen)
        }
    }

    impl<
            const C: usize,
            const STEM: usize,
            L1,
            L2,
            L3,
            const F: usize,
            const F1: usize,
            const F2: usize,
        > OnGpu<C> for ResNeXtCifar<C, STEM, L1, L2, L3, Linear<F, usize, f32, Cpu>, f32, Cpu>
    where
        L1: Layer<Gpu, CudaAct<STEM>, Out = CudaAct<F1>>,
        L2: Layer<Gpu, CudaAct<F1>, Out = CudaAct<F2>>,
        L3: Layer<Gpu, CudaAct<F2>, Out = CudaAct<F>>,
    {
        fn eval_gpu(&self, gpu: &Gpu, x: CudaAct<C>) -> Result<CudaLogits<usize>> {
            self.eval_on(gpu, x)
        }

        fn train_gpu(
            &mut self,
            gpu: &Gpu,
            x: CudaAct<C>,
            frozen: Frozen,
        ) -> Result<CudaLogits<usize>> {
            self.train_with(gpu, x, frozen)
        }
    }
}
