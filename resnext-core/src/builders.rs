//! Zero-sized builder types, dfdx style: `dev.build_module::<builders::X, f32>()` returns
//! the corresponding module from [`crate::nn`] / [`crate::model`].
//!
//! ```
//! use dfdx::prelude::*;
//! use resnext_core::builders::Bottleneck;
//! use resnext_core::ops::Act;
//!
//! let dev = Cpu::default();
//! let block = dev.build_module::<Bottleneck<64, 128, 256, 1, 32>, f32>();
//! let x: Act<64> = dev.sample_normal_like(&(2, Const::<64>, 8, 8));
//! let y: Act<256> = block.forward(x);
//! assert_eq!(y.shape(), &(2, Const::<256>, 8, 8));
//! ```
//!
//! A network of your own is a type alias over the same blocks:
//!
//! ```
//! use dfdx::prelude::*;
//! use resnext_core::builders::{Linear, ResNeXtCifar, Stage};
//! use resnext_core::params::Params;
//!
//! /// One block per stage, 4 paths of width 8, 10 classes, grey-scale input.
//! type Mini = ResNeXtCifar<1, 16, Stage<16, 32, 64, 1, 4, 1>, Stage<64, 64, 128, 2, 4, 1>, Stage<128, 128, 256, 2, 4, 1>, Linear<256, 10>>;
//! let dev = Cpu::default();
//! let net = dev.build_module::<Mini, f32>();
//! let logits = net.forward(dev.sample_normal_like(&(3, Const::<1>, 8, 8)));
//! assert_eq!(logits.shape(), &(3, Const::<10>));
//! assert!(net.num_params() > 0);
//! ```

use dfdx::prelude::*;

use crate::{model, nn};

pub use crate::nn::{GlobalAvgPool, MaxPool2d};

/// Builds [`nn::Conv2d`].
#[derive(Clone, Copy, Debug)]
pub struct Conv2d<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize = 1,
    const P: usize = 0,
    const G: usize = 1,
>;
impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
        D: Device<f32>,
    > BuildOnDevice<D, f32> for Conv2d<I, O, K, S, P, G>
{
    type Built = nn::Conv2d<I, O, K, S, P, G, f32, D>;
}

/// Builds [`nn::BatchNorm2d`].
#[derive(Clone, Copy, Debug)]
pub struct BatchNorm2d<const C: usize>;
impl<const C: usize, D: Device<f32>> BuildOnDevice<D, f32> for BatchNorm2d<C> {
    type Built = nn::BatchNorm2d<C, f32, D>;
}

/// Builds [`nn::Linear`] with `N` outputs fixed in the type.
#[derive(Clone, Copy, Debug)]
pub struct Linear<const F: usize, const N: usize>;
impl<const F: usize, const N: usize, D: Device<f32>> BuildOnDevice<D, f32> for Linear<F, N> {
    type Built = nn::Linear<F, Const<N>, f32, D>;
}

/// Builds [`model::Bottleneck`]: the ResNeXt block `IN → OUT` with bottleneck width `WIDTH`
/// split into `GROUPS` paths, stride `STRIDE` on the 3×3 conv.
#[derive(Clone, Copy, Debug)]
pub struct Bottleneck<
    const IN: usize,
    const WIDTH: usize,
    const OUT: usize,
    const STRIDE: usize,
    const GROUPS: usize,
>;
impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        D: Device<f32>,
    > BuildOnDevice<D, f32> for Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS>
{
    type Built = model::Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, f32, D>;
}

/// Builds [`model::Stage`]: `BLOCKS` bottleneck blocks, the first `IN → OUT` with stride
/// `STRIDE`, the rest `OUT → OUT`.
#[derive(Clone, Copy, Debug)]
pub struct Stage<
    const IN: usize,
    const WIDTH: usize,
    const OUT: usize,
    const STRIDE: usize,
    const GROUPS: usize,
    const BLOCKS: usize,
>;
impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        const BLOCKS: usize,
        D: Device<f32>,
    > BuildOnDevice<D, f32> for Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS>
{
    type Built = model::Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, f32, D>;
}

/// Builds [`model::ResNeXt`] (ImageNet layout) from stage and head builders.
#[derive(Clone, Copy, Debug)]
pub struct ResNeXt<const C: usize, L1, L2, L3, L4, H>(
    std::marker::PhantomData<(L1, L2, L3, L4, H)>,
);
impl<const C: usize, L1, L2, L3, L4, H, D: Device<f32>> BuildOnDevice<D, f32>
    for ResNeXt<C, L1, L2, L3, L4, H>
where
    L1: BuildOnDevice<D, f32>,
    L2: BuildOnDevice<D, f32>,
    L3: BuildOnDevice<D, f32>,
    L4: BuildOnDevice<D, f32>,
    H: BuildOnDevice<D, f32>,
{
    type Built = model::ResNeXt<C, L1::Built, L2::Built, L3::Built, L4::Built, H::Built, f32, D>;
}

/// Builds [`model::ResNeXtCifar`] (CIFAR layout) from stage and head builders.
#[derive(Clone, Copy, Debug)]
pub struct ResNeXtCifar<const C: usize, const STEM: usize, L1, L2, L3, H>(
    std::marker::PhantomData<(L1, L2, L3, H)>,
);
impl<const C: usize, const STEM: usize, L1, L2, L3, H, D: Device<f32>> BuildOnDevice<D, f32>
    for ResNeXtCifar<C, STEM, L1, L2, L3, H>
where
    L1: BuildOnDevice<D, f32>,
    L2: BuildOnDevice<D, f32>,
    L3: BuildOnDevice<D, f32>,
    H: BuildOnDevice<D, f32>,
{
    type Built = model::ResNeXtCifar<C, STEM, L1::Built, L2::Built, L3::Built, H::Built, f32, D>;
}

macro_rules! imagenet_preset {
    ($(#[$doc:meta])* $name:ident, groups = $g:literal, widths = [$w1:literal, $w2:literal, $w3:literal, $w4:literal], blocks = [$b1:literal, $b2:literal, $b3:literal, $b4:literal]) => {
        $(#[$doc])*
        pub type $name<const N: usize, const C: usize = 3> = ResNeXt<
            C,
            Stage<64, $w1, 256, 1, $g, $b1>,
            Stage<256, $w2, 512, 2, $g, $b2>,
            Stage<512, $w3, 1024, 2, $g, $b3>,
            Stage<1024, $w4, 2048, 2, $g, $b4>,
            Linear<2048, N>,
        >;
    };
}

macro_rules! cifar_preset {
    ($(#[$doc:meta])* $name:ident, stem = $s:literal, groups = $g:literal, widths = [$w1:literal, $w2:literal, $w3:literal], outs = [$o1:literal, $o2:literal, $o3:literal], blocks = $b:literal) => {
        $(#[$doc])*
        pub type $name<const N: usize, const C: usize = 3> = ResNeXtCifar<
            C,
            $s,
            Stage<$s, $w1, $o1, 1, $g, $b>,
            Stage<$o1, $w2, $o2, 2, $g, $b>,
            Stage<$o2, $w3, $o3, 2, $g, $b>,
            Linear<$o3, N>,
        >;
    };
}

imagenet_preset! {
    /// torchvision's `resnext50_32x4d`: blocks [3, 4, 6, 3], cardinality 32, width 4 per path
    /// (25,028,904 parameters at 1000 classes).
    ResNeXt50_32x4d, groups = 32, widths = [128, 256, 512, 1024], blocks = [3, 4, 6, 3]
}
imagenet_preset! {
    /// torchvision's `resnext101_32x8d`: blocks [3, 4, 23, 3], cardinality 32, width 8 per
    /// path (88,791,336 parameters at 1000 classes).
    ResNeXt101_32x8d, groups = 32, widths = [256, 512, 1024, 2048], blocks = [3, 4, 23, 3]
}
imagenet_preset! {
    /// torchvision's `resnext101_64x4d`: blocks [3, 4, 23, 3], cardinality 64, width 4 per
    /// path (83,455,272 parameters at 1000 classes).
    ResNeXt101_64x4d, groups = 64, widths = [256, 512, 1024, 2048], blocks = [3, 4, 23, 3]
}
imagenet_preset! {
    /// ResNet-50 from the same blocks (one group, width 64 per stage base): the equal-FLOPs
    /// baseline the paper compares against (25,557,032 parameters at 1000 classes).
    ResNet50, groups = 1, widths = [64, 128, 256, 512], blocks = [3, 4, 6, 3]
}
cifar_preset! {
    /// The paper's ResNeXt-29, 8×64d for CIFAR: 3 stages of 3 blocks, cardinality 8, path
    /// width 64 doubling per stage.
    ResNeXt29_8x64d, stem = 64, groups = 8, widths = [512, 1024, 2048], outs = [256, 512, 1024], blocks = 3
}
cifar_preset! {
    /// The paper's ResNeXt-29, 16×64d for CIFAR.
    ResNeXt29_16x64d, stem = 64, groups = 16, widths = [1024, 2048, 4096], outs = [256, 512, 1024], blocks = 3
}
cifar_preset! {
    /// ResNeXt-29, 2×64d (CIFAR layout).
    ResNeXt29_2x64d, stem = 64, groups = 2, widths = [128, 256, 512], outs = [256, 512, 1024], blocks = 3
}
cifar_preset! {
    /// ResNeXt-29, 4×64d (CIFAR layout).
    ResNeXt29_4x64d, stem = 64, groups = 4, widths = [256, 512, 1024], outs = [256, 512, 1024], blocks = 3
}
cifar_preset! {
    /// ResNeXt-29, 32×4d (CIFAR layout).
    ResNeXt29_32x4d, stem = 64, groups = 32, widths = [128, 256, 512], outs = [256, 512, 1024], blocks = 3
}
cifar_preset! {
    /// A small CIFAR-layout ResNeXt for small images (the default training run on 8×8
    /// digits): one block per stage, cardinality 8, path width 8 doubling per stage.
    ResNeXt11_8x8d, stem = 32, groups = 8, widths = [64, 128, 256], outs = [128, 256, 512], blocks = 1
}
