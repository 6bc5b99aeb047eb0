//! [`Conv2d`]: the bias-free convolution of torchvision's ResNeXt, with the group count
//! checked at compile time ([`PerGroup`]), and its fused convolution + batch-norm forwards.

use dfdx::prelude::*;
use rand_distr::Normal;

use super::BatchNorm2d;
use crate::error::{Error, Result};
use crate::ops::{self, Act, BnConfig, ConvConfig};

/// A compile-time dim of size `C / G`: the input channels per group of a grouped
/// convolution's weight. Naming a `G` that does not divide `C` fails to compile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerGroup<const C: usize, const G: usize>;

impl<const C: usize, const G: usize> PerGroup<C, G> {
    /// `C / G`, checked at compile time.
    pub const SIZE: usize = {
        assert!(
            G > 0 && C.is_multiple_of(G),
            "the number of groups must divide the channel count"
        );
        C / G
    };
}

impl<const C: usize, const G: usize> Dim for PerGroup<C, G> {
    fn size(&self) -> usize {
        Self::SIZE
    }
    fn from_size(size: usize) -> Option<Self> {
        (size == Self::SIZE).then_some(Self)
    }
}

impl<const C: usize, const G: usize> ConstDim for PerGroup<C, G> {
    const SIZE: usize = PerGroup::<C, G>::SIZE;
}

/// Shape of a convolution weight in torchvision's layout `(O, I / G, K, K)`.
pub type ConvWeightShape<const I: usize, const O: usize, const K: usize, const G: usize> =
    (Const<O>, PerGroup<I, G>, Const<K>, Const<K>);

/// Bias-free 2-D convolution `I → O` channels, square kernel `K`, stride `S`, padding `P`,
/// `G` groups (as the convolutions of torchvision's ResNeXt). Kaiming-normal (fan-out)
/// initialisation.
#[derive(Clone, Debug)]
pub struct Conv2d<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const G: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// `(O, I / G, K, K)`.
    pub weight: Tensor<ConvWeightShape<I, O, K, G>, E, D>,
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
        E: Dtype,
        D: Storage<E>,
    > Conv2d<I, O, K, S, P, G, E, D>
{
    /// The op configuration of this layer.
    pub const CONFIG: ConvConfig = ConvConfig {
        kernel: K,
        stride: S,
        padding: P,
        groups: G,
    };

    /// Output size `(h, w)` and multiply-accumulates per image for an `h × w` input.
    pub fn cost(h: usize, w: usize) -> (usize, usize, usize) {
        let oh = (h + 2 * P).saturating_sub(K) / S + 1;
        let ow = (w + 2 * P).saturating_sub(K) / S + 1;
        (oh, ow, oh * ow * O * (I / G) * K * K)
    }
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
        D: Device<f32>,
    > TensorCollection<f32, D> for Conv2d<I, O, K, S, P, G, f32, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Conv2d<I, O, K, S, P, G, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            Self::tensor(
                "weight",
                |s| &s.weight,
                |s| &mut s.weight,
                TensorOptions::reset_with(|t| {
                    let std = (2.0 / (O * K * K) as f32).sqrt();
                    t.try_fill_with_distr(Normal::new(0.0f32, std).expect("finite std"))
                }),
            ),
            |weight| Conv2d { weight },
        )
    }
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
        E: Dtype,
        D: Storage<E>,
    > NonMutableModule for Conv2d<I, O, K, S, P, G, E, D>
{
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
        T: Tape<f32, Cpu>,
    > Module<Act<I, T>> for Conv2d<I, O, K, S, P, G, f32, Cpu>
{
    type Output = Act<O, T>;
    type Error = Error;
    fn try_forward(&self, x: Act<I, T>) -> Result<Act<O, T>> {
        ops::conv2d(x, &self.weight, Self::CONFIG)
    }
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
    > Conv2d<I, O, K, S, P, G, f32, Cpu>
{
    /// Inference: this convolution followed by `bn` in eval mode, an optional residual add
    /// and an optional ReLU, fused into one pass ([`ops::conv2d_bn_eval`]).
    pub fn forward_bn_eval(
        &self,
        x: Act<I>,
        bn: &BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<&Act<O>>,
    ) -> Result<Act<O>> {
        let bnr = ops::BnRef {
            gamma: &bn.weight,
            beta: &bn.bias,
            mean: &bn.running_mean,
            var: &bn.running_var,
        };
        ops::conv2d_bn_eval(
            x,
            &self.weight,
            Self::CONFIG,
            bnr,
            BnConfig::default().eps,
            relu,
            residual,
        )
    }

    /// Training: this convolution followed by `bn` with batch statistics (updating its
    /// running statistics), an optional residual add and an optional ReLU, as one fused
    /// differentiable op ([`ops::conv2d_bn_train`]).
    pub fn forward_bn_train<T: Tape<f32, Cpu> + Merge<T>>(
        &self,
        x: Act<I, T>,
        bn: &mut BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<Act<O, T>>,
    ) -> Result<Act<O, T>> {
        let bnr = ops::BnTrainRef {
            gamma: &bn.weight,
            beta: &bn.bias,
            mean: &mut bn.running_mean,
            var: &mut bn.running_var,
        };
        let cfg = BnConfig {
            relu,
            ..Default::default()
        };
        let y = ops::conv2d_bn_train(x, &self.weight, Self::CONFIG, bnr, cfg, residual)?;
        bn.num_batches_tracked += 1;
        Ok(y)
    }

    /// [`Conv2d::forward_bn_eval`] on a plain `(n, I, h, w)` buffer `x` with `dims = [n, h, w]`;
    /// returns the output buffer and its height and width.
    pub fn forward_bn_eval_raw(
        &self,
        x: &[f32],
        dims: [usize; 3],
        bn: &BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<&[f32]>,
    ) -> Result<(Vec<f32>, usize, usize)> {
        let bnr = ops::BnRef {
            gamma: &bn.weight,
            beta: &bn.bias,
            mean: &bn.running_mean,
            var: &bn.running_var,
        };
        ops::conv2d_bn_eval_raw::<I, O, _>(
            x,
            dims,
            &self.weight,
            Self::CONFIG,
            bnr,
            BnConfig::default().eps,
            relu,
            residual,
        )
    }
}
