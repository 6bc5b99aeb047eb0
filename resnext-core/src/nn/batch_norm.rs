//! [`BatchNorm2d`] with PyTorch's semantics.

use dfdx::prelude::*;

use crate::error::{Error, Result};
use crate::ops::{self, Act, BnConfig};

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
                Self::tensor(
                    "weight",
                    |s| &s.weight,
                    |s| &mut s.weight,
                    TensorOptions::reset_to_ones(),
                ),
                Self::tensor(
                    "bias",
                    |s| &s.bias,
                    |s| &mut s.bias,
                    TensorOptions::reset_to_zeros(),
                ),
                Self::tensor(
                    "running_mean",
                    |s| &s.running_mean,
                    |s| &mut s.running_mean,
                    TensorOptions::detached(|t| t.try_fill_with_zeros()),
                ),
                Self::tensor(
                    "running_var",
                    |s| &s.running_var,
                    |s| &mut s.running_var,
                    TensorOptions::detached(|t| t.try_fill_with_ones()),
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
    /// Eval-mode forward, with a fused ReLU when `relu`.
    pub fn forward_eval_act<T: Tape<f32, Cpu>>(
        &self,
        x: Act<C, T>,
        relu: bool,
    ) -> Result<Act<C, T>> {
        let cfg = BnConfig {
            relu,
            ..Default::default()
        };
        ops::batch_norm2d_eval(
            x,
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
            cfg,
        )
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
        let y = ops::batch_norm2d_train(
            x,
            &self.weight,
            &self.bias,
            &mut self.running_mean,
            &mut self.running_var,
            cfg,
        )?;
        self.num_batches_tracked += 1;
        Ok(y)
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
