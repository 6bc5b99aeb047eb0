//! Pooling layers: [`MaxPool2d`] and [`GlobalAvgPool`].

use dfdx::prelude::*;

use crate::error::{Error, Result};
use crate::ops::{self, Act, Mat};

/// 2-D max pooling with a `K × K` window, stride `S` and padding `P` (PyTorch's
/// `MaxPool2d(K, S, P)`, floor mode).
#[derive(Clone, Copy, Debug, Default)]
pub struct MaxPool2d<const K: usize, const S: usize, const P: usize>;

impl<const K: usize, const S: usize, const P: usize, D: Device<f32>> TensorCollection<f32, D>
    for MaxPool2d<K, S, P>
{
    type To<E2: Dtype, D2: Device<E2>> = Self;
    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self>, V::Err> {
        visitor.visit_fields((), |_| MaxPool2d)
    }
}

impl<const K: usize, const S: usize, const P: usize> NonMutableModule for MaxPool2d<K, S, P> {}

impl<const K: usize, const S: usize, const P: usize, const C: usize, T: Tape<f32, Cpu>>
    Module<Act<C, T>> for MaxPool2d<K, S, P>
{
    type Output = Act<C, T>;
    type Error = Error;
    fn try_forward(&self, x: Act<C, T>) -> Result<Act<C, T>> {
        ops::max_pool2d(x, K, S, P)
    }
}

impl<const K: usize, const S: usize, const P: usize, D: Device<f32>> BuildOnDevice<D, f32>
    for MaxPool2d<K, S, P>
{
    type Built = Self;
}

/// Global average pooling `(N, C, H, W) → (N, C)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalAvgPool;

impl<D: Device<f32>> TensorCollection<f32, D> for GlobalAvgPool {
    type To<E2: Dtype, D2: Device<E2>> = Self;
    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self>, V::Err> {
        visitor.visit_fields((), |_| GlobalAvgPool)
    }
}

impl NonMutableModule for GlobalAvgPool {}

impl<const C: usize, T: Tape<f32, Cpu>> Module<Act<C, T>> for GlobalAvgPool {
    type Output = Mat<Const<C>, T>;
    type Error = Error;
    fn try_forward(&self, x: Act<C, T>) -> Result<Self::Output> {
        ops::global_avg_pool(x)
    }
}

impl<D: Device<f32>> BuildOnDevice<D, f32> for GlobalAvgPool {
    type Built = Self;
}
