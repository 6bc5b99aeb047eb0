//! Typed layers: channel counts, kernel, stride, padding and groups are const generics,
//! spatial sizes are runtime dims. Each layer implements dfdx's [`Module`] (eval mode),
//! [`ModuleMut`] (training mode: batch statistics) and [`TensorCollection`] with
//! torchvision's tensor names, so `dev.build_module::<builders::X, f32>()`,
//! `num_trainable_params`, `alloc_grads` and friends work on them.

use dfdx::prelude::*;
use rand_distr::{Normal, Uniform};

use crate::error::{Error, Result};
use crate::ops::{self, Act, BnConfig, ConvConfig, Mat};

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

/// Fully connected layer `F → O` (`y = x Wᵀ + b`, weight `(O, F)` as torchvision stores
/// it). `O` is `Const<N>` for a class count fixed in the type, or `usize` for one known
/// only at run time (build those with [`Linear::new_runtime`]). PyTorch's default
/// initialisation: uniform in ±1/√F.
#[derive(Clone, Debug)]
pub struct Linear<const F: usize, O: Dim, E: Dtype, D: Storage<E>> {
    /// `(O, F)`.
    pub weight: Tensor<(O, Const<F>), E, D>,
    /// `(O,)`.
    pub bias: Tensor<(O,), E, D>,
}

impl<const F: usize> Linear<F, usize, f32, Cpu> {
    /// A classifier with `classes` outputs chosen at run time.
    pub fn new_runtime(dev: &Cpu, classes: usize) -> Result<Self> {
        let b = 1.0 / (F as f32).sqrt();
        let mut weight = dev.try_zeros_like(&(classes, Const::<F>))?;
        weight.try_fill_with_distr(Uniform::new(-b, b))?;
        let mut bias = dev.try_zeros_like(&(classes,))?;
        bias.try_fill_with_distr(Uniform::new(-b, b))?;
        Ok(Self { weight, bias })
    }
}

impl<const F: usize, const N: usize, D: Device<f32>> TensorCollection<f32, D>
    for Linear<F, Const<N>, f32, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Linear<F, Const<N>, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::tensor(
                    "weight",
                    |s| &s.weight,
                    |s| &mut s.weight,
                    TensorOptions::reset_with(|t| {
                        let b = 1.0 / (F as f32).sqrt();
                        t.try_fill_with_distr(Uniform::new(-b, b))
                    }),
                ),
                Self::tensor(
                    "bias",
                    |s| &s.bias,
                    |s| &mut s.bias,
                    TensorOptions::reset_with(|t| {
                        let b = 1.0 / (F as f32).sqrt();
                        t.try_fill_with_distr(Uniform::new(-b, b))
                    }),
                ),
            ),
            |(weight, bias)| Linear { weight, bias },
        )
    }
}

impl<const F: usize, O: Dim, E: Dtype, D: Storage<E>> NonMutableModule for Linear<F, O, E, D> {}

impl<const F: usize, O: Dim, T: Tape<f32, Cpu>> Module<Mat<Const<F>, T>>
    for Linear<F, O, f32, Cpu>
{
    type Output = Mat<O, T>;
    type Error = Error;
    fn try_forward(&self, x: Mat<Const<F>, T>) -> Result<Mat<O, T>> {
        ops::linear(x, &self.weight, &self.bias)
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
