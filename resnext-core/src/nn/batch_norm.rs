//! [`BatchNorm2d`] with PyTorch's semantics.

use dfdx::prelude::*;

use crate::error::{Error, Result};
use crate::ops::{self, Act, BnConfig, BnRef, BnTrainRef};

/// Batch normalisation over `C` channels with PyTorch's semantics (eps 1e-5, momentum
/// 0.1, unbiased running variance). `forward` uses the running statistics, `forward_mut`
/// the batch statistics (and updates the running ones).
#[derive(Clone, Debug)]
pub struct BatchNorm2d<const C: usize, E: Dtype, D: Storage<E>> {
    /// Scale γ, initialised to 1.
    pub weight: Tensor<Rank1<C>, E, D>,
    /// Shift β, initialised to 0.
    pub bias: Tensor<Rank1<C>, E, D>,
    /// Running mean, initialised to 0.
    pub running_mean: Tensor<Rank1<C>, E, D>,
    /// Running (unbiased) variance, initialised to 1.
    pub running_var: Tensor<Rank1<C>, E, D>,
    /// Training batches seen (torchvision's `num_batches_tracked`).
    pub num_batches_tracked: usize,
}

impl<const C: usize, D: Device<f32>> TensorCollection<f32, D> for BatchNorm2d<C, f32, D> {
    type To<E2: Dtype, D2: Device<E2>> = BatchNorm2d<C, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                field_tensor!(weight, TensorOptions::reset_to_ones()),
                field_tensor!(bias, TensorOptions::reset_to_zeros()),
                field_tensor!(
                    running_mean,
                    TensorOptions::detached(|t| t.try_fill_with_zeros())
                ),
                field_tensor!(
                    running_var,
                    TensorOptions::detached(|t| t.try_fill_with_ones())
                ),
                Self::scalar(
                    "num_batches_tracked",
                    |s| &s.num_batches_tracked,
                    |s| &mut s.num_batches_tracked,
                    ScalarOptions::from_default(0),
                ),
            ),
            |(weight, bias, running_mean, running_var, num_batches_tracked)| BatchNorm2d {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            },
        )
    }
}

impl<const C: usize> BatchNorm2d<C, f32, Cpu> {
    /// The tensors an eval-mode op reads (γ, β, running mean and variance).
    pub fn eval_ref(&self) -> BnRef<'_, C> {
        BnRef {
            gamma: &self.weight,
            beta: &self.bias,
            mean: &self.running_mean,
            var: &self.running_var,
        }
    }

    /// Runs the training-mode op `f` on this layer's tensors (it reads γ and β and updates
    /// the running statistics) and counts the batch in `num_batches_tracked` when `f`
    /// succeeds.
    pub fn train_with<R>(&mut self, f: impl FnOnce(BnTrainRef<'_, C>) -> Result<R>) -> Result<R> {
        let y = f(BnTrainRef {
            gamma: &self.weight,
            beta: &self.bias,
            mean: &mut self.running_mean,
            var: &mut self.running_var,
        })?;
        self.num_batches_tracked += 1;
        Ok(y)
    }

    /// Eval-mode forward, with a fused ReLU when `relu`.
    pub fn forward_eval_act<T: Tape<f32, Cpu>>(
        &self,
        x: Act<C, T>,
        relu: bool,
    ) -> Result<Act<C, T>> {
        let bn = self.eval_ref();
        let cfg = BnConfig {
            relu,
            ..Default::default()
        };
        ops::batch_norm2d_eval(x, bn.gamma, bn.beta, bn.mean, bn.var, cfg)
    }

    /// Training-mode forward, with a fused ReLU when `relu`.
    pub fn forward_train_act<T: Tape<f32, Cpu>>(
        &mut self,
        x: Act<C, T>,
        relu: bool,
    ) -> Result<Act<C, T>> {
        let cfg = BnConfig {
            relu,
            ..Default::default()
        };
        self.train_with(|bn| ops::batch_norm2d_train(x, bn.gamma, bn.beta, bn.mean, bn.var, cfg))
    }
}

impl<const C: usize, T: Tape<f32, Cpu>> Module<Act<C, T>> for BatchNorm2d<C, f32, Cpu> {
    type Output = Act<C, T>;
    type Error = Error;
    fn try_forward(&self, x: Act<C, T>) -> Result<Act<C, T>> {
        self.forward_eval_act(x, false)
    }
}

impl<const C: usize, T: Tape<f32, Cpu>> ModuleMut<Act<C, T>> for BatchNorm2d<C, f32, Cpu> {
    type Output = Act<C, T>;
    type Error = Error;
    fn try_forward_mut(&mut self, x: Act<C, T>) -> Result<Act<C, T>> {
        self.forward_train_act(x, false)
    }
}
