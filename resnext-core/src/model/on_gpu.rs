//! [`GpuEval`] and [`GpuTrain`]: the eval-mode forward pass and the recorded training-mode
//! forward pass on a GPU for a network whose stage widths are not spelled out, what
//! [`Network`](super::Network) calls. With the `cuda` feature off the traits are empty and
//! every type has them, so the bounds cost a CPU-only build nothing.

#[cfg(feature = "cuda")]
pub use enabled::{GpuEval, GpuTrain};

#[cfg(not(feature = "cuda"))]
/// Without the `cuda` feature: nothing to run, every type has it.
pub trait GpuEval<const C: usize> {}

#[cfg(not(feature = "cuda"))]
impl<T, const C: usize> GpuEval<C> for T {}

#[cfg(not(feature = "cuda"))]
/// Without the `cuda` feature: nothing to run, every type has it.
pub trait GpuTrain<const C: usize> {}

#[cfg(not(feature = "cuda"))]
impl<T, const C: usize> GpuTrain<C> for T {}

#[cfg(feature = "cuda")]
mod enabled {
    use crate::backend::cuda::{CudaAct, CudaLogits, Gpu};
    use crate::error::Result;
    use crate::model::{Frozen, Layer, ResNeXt, ResNeXtCifar};
    use crate::nn::Linear;
    use dfdx::prelude::*;

    /// Eval-mode logits on `gpu` ([`ResNeXt::eval_on`] with the widths inferred).
    pub trait GpuEval<const C: usize> {
        /// Eval-mode logits `(batch, classes)` of `x`.
        fn eval_gpu(&self, gpu: &Gpu, x: CudaAct<C>) -> Result<CudaLogits<usize>>;
    }

    /// Training-mode logits on `gpu`, recorded for the backward pass
    /// ([`ResNeXt::train_with`] with the widths inferred): what
    /// [`Gpu::train_step_by`](crate::backend::cuda::Gpu::train_step_by) is given.
    pub trait GpuTrain<const C: usize> {
        /// Training-mode logits `(batch, classes)` of `x` with the parts in `frozen` held
        /// fixed.
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
        > GpuEval<C> for ResNeXt<C, L1, L2, L3, L4, Linear<F, usize, f32, Cpu>, f32, Cpu>
    where
        L1: Layer<Gpu, CudaAct<64>, Out = CudaAct<F1>>,
        L2: Layer<Gpu, CudaAct<F1>, Out = CudaAct<F2>>,
        L3: Layer<Gpu, CudaAct<F2>, Out = CudaAct<F3>>,
        L4: Layer<Gpu, CudaAct<F3>, Out = CudaAct<F>>,
    {
        fn eval_gpu(&self, gpu: &Gpu, x: CudaAct<C>) -> Result<CudaLogits<usize>> {
            self.eval_on(gpu, x)
        }
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
        > GpuTrain<C> for ResNeXt<C, L1, L2, L3, L4, Linear<F, usize, f32, Cpu>, f32, Cpu>
    where
        L1: Layer<Gpu, CudaAct<64>, Out = CudaAct<F1>>,
        L2: Layer<Gpu, CudaAct<F1>, Out = CudaAct<F2>>,
        L3: Layer<Gpu, CudaAct<F2>, Out = CudaAct<F3>>,
        L4: Layer<Gpu, CudaAct<F3>, Out = CudaAct<F>>,
    {
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
        > GpuEval<C> for ResNeXtCifar<C, STEM, L1, L2, L3, Linear<F, usize, f32, Cpu>, f32, Cpu>
    where
        L1: Layer<Gpu, CudaAct<STEM>, Out = CudaAct<F1>>,
        L2: Layer<Gpu, CudaAct<F1>, Out = CudaAct<F2>>,
        L3: Layer<Gpu, CudaAct<F2>, Out = CudaAct<F>>,
    {
        fn eval_gpu(&self, gpu: &Gpu, x: CudaAct<C>) -> Result<CudaLogits<usize>> {
            self.eval_on(gpu, x)
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
        > GpuTrain<C> for ResNeXtCifar<C, STEM, L1, L2, L3, Linear<F, usize, f32, Cpu>, f32, Cpu>
    where
        L1: Layer<Gpu, CudaAct<STEM>, Out = CudaAct<F1>>,
        L2: Layer<Gpu, CudaAct<F1>, Out = CudaAct<F2>>,
        L3: Layer<Gpu, CudaAct<F2>, Out = CudaAct<F>>,
    {
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
