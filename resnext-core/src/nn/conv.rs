//! [`Conv2d`]: the bias-free convolution of torchvision's ResNeXt, with the group count
//! checked at compile time ([`PerGroup`]), and its fused convolution + batch-norm forwards.

use dfdx::prelude::*;
use rand_distr::Normal;

use crate::error::{Error, Result};
use crate::ops::{self, Act, ConvConfig};

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

/// A bias-free convolution from `I` to `O` channels as ops and backends see it: its
/// hyper-parameters and its weight. Implemented by [`Conv2d`]; backends take any
/// `ConvLayer<I, O>`, so the channel counts stay in the types.
pub trait ConvLayer<const I: usize, const O: usize> {
    /// Kernel, stride, padding and groups.
    const CONFIG: ConvConfig;
    /// The weight's shape, `(O, I / groups, k, k)`.
    type WeightShape: Shape;
    /// The weight.
    fn weight(&self) -> &Tensor<Self::WeightShape, f32, Cpu>;

    /// Output size `(h, w)` and multiply-accumulates per image for an `h × w` input.
    fn cost(h: usize, w: usize) -> (usize, usize, usize) {
        let ConvConfig {
            kernel: k,
            stride: s,
            padding: p,
            groups: g,
        } = Self::CONFIG;
        let oh = (h + 2 * p).saturating_sub(k) / s + 1;
        let ow = (w + 2 * p).saturating_sub(k) / s + 1;
        (oh, ow, oh * ow * O * (I / g) * k * k)
    }
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
    > ConvLayer<I, O> for Conv2d<I, O, K, S, P, G, f32, Cpu>
{
    const CONFIG: ConvConfig = ConvConfig {
        kernel: K,
        stride: S,
        padding: P,
        groups: G,
    };
    type WeightShape = ConvWeightShape<I, O, K, G>;
    fn weight(&self) -> &Tensor<Self::WeightShape, f32, Cpu> {
        &self.weight
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
            field_tensor!(
                weight,
                TensorOptions::reset_with(|t| {
                    let std = (2.0 / (O * K * K) as f32).sqrt();
                    t.try_fill_with_distr(Normal::new(0.0f32, std).expect("finite std"))
                })
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
        ops::conv2d(x, &self.weight, <Self as ConvLayer<I, O>>::CONFIG)
    }
}
