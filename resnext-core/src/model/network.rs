//! Whole networks: the ImageNet layout ([`ResNeXt`], as torchvision builds
//! `resnext50_32x4d` & co.) and the paper's CIFAR layout ([`ResNeXtCifar`], ResNeXt-29).

use dfdx::prelude::*;

use super::block::StageMeta;
use super::layer::Layer;
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::{Backend, TrainBackend};
use crate::error::{Error, Result};
use crate::nn::{BatchNorm2d, Conv2d, ConvLayer, Linear};
use crate::ops::{Act, Mat};
use crate::params::{walk, walk_mut, ParamVisitor, ParamVisitorMut, Params};

/// One row of a network summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSummary {
    /// `stem`, `layer1`, …, `head`.
    pub name: String,
    /// Output shape per image: `[C, H, W]`, or `[classes]` for the head.
    pub out_shape: Vec<usize>,
    /// Trainable parameters.
    pub params: usize,
    /// Multiply-accumulates per image.
    pub macs: usize,
}

/// The head of a network: a [`Linear`] classifier with a const or runtime class count.
pub trait Head: Params {
    /// Number of classes.
    fn classes(&self) -> usize;
}

impl<const F: usize, O: Dim> Head for Linear<F, O, f32, Cpu> {
    fn classes(&self) -> usize {
        self.weight.shape().0.size()
    }
}

/// The stem: convolution, batch norm and ReLU, optionally max pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StemSpec {
    /// Output channels.
    pub channels: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub padding: usize,
    /// Whether a 3×3 stride-2 max pool follows.
    pub maxpool: bool,
}

/// ResNeXt in the ImageNet layout, exactly as torchvision's `ResNet` with
/// `groups`/`width_per_group` builds it: 7×7 stride-2 stem conv (64 channels), BN, ReLU,
/// 3×3 stride-2 max pool, four stages, global average pool, fully connected head.
///
/// `C` is the number of input channels; the stages `L1..L4` and the head `H` are types
/// (see the presets in [`crate::builders`]). Eval mode with `forward`, training mode with
/// `forward_mut`; on any [`Backend`] with [`ResNeXt::eval_on`] / [`ResNeXt::train_on`].
#[derive(Clone, Debug)]
pub struct ResNeXt<const C: usize, L1, L2, L3, L4, H, E: Dtype, D: Storage<E>> {
    /// Stem convolution: 7×7, stride 2, 64 channels.
    pub conv1: Conv2d<C, 64, 7, 2, 3, 1, E, D>,
    /// Stem batch norm (followed by a ReLU and the max pool).
    pub bn1: BatchNorm2d<64, E, D>,
    /// Stage `layer1`.
    pub layer1: L1,
    /// Stage `layer2`.
    pub layer2: L2,
    /// Stage `layer3`.
    pub layer3: L3,
    /// Stage `layer4`.
    pub layer4: L4,
    /// Classifier over the globally average-pooled features.
    pub fc: H,
}

/// ResNeXt in the paper's CIFAR layout (ResNeXt-29): 3×3 stride-1 stem conv with `STEM`
/// channels, BN, ReLU, no max pool, three stages, global average pool, fully connected
/// head.
#[derive(Clone, Debug)]
pub struct ResNeXtCifar<const C: usize, const STEM: usize, L1, L2, L3, H, E: Dtype, D: Storage<E>> {
    /// Stem convolution: 3×3, stride 1, `STEM` channels.
    pub conv1: Conv2d<C, STEM, 3, 1, 1, 1, E, D>,
    /// Stem batch norm (followed by a ReLU).
    pub bn1: BatchNorm2d<STEM, E, D>,
    /// Stage `layer1`.
    pub layer1: L1,
    /// Stage `layer2`.
    pub layer2: L2,
    /// Stage `layer3`.
    pub layer3: L3,
    /// Classifier over the globally average-pooled features.
    pub fc: H,
}

/// The parts every network layout shares, from its name, the generics after `C`, the stem
/// (channels, kernel, stride, padding, max pool) and its stages: the tensor names
/// (`TensorCollection`, [`Params`]) and the summary.
macro_rules! network_parts {
    (
        $name:ident <$(const $cp:ident),*> stem = ($stem:expr, $k:literal, $s:literal, $p:literal), maxpool = $mp:literal,
        layers = [$($l:ident : $L:ident),+]
    ) => {
        impl<const C: usize, $(const $cp: usize,)* $($L: TensorCollection<f32, D>,)+ H: TensorCollection<f32, D>, D: Device<f32>> TensorCollection<f32, D>
            for $name<C, $($cp,)* $($L,)+ H, f32, D>
        {
            type To<E2: Dtype, D2: Device<E2>> = $name<C, $($cp,)* $($L::To<E2, D2>,)+ H::To<E2, D2>, E2, D2>;

            fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(visitor: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
                visitor.visit_fields(
                    (
                        Self::module("conv1", |s| &s.conv1, |s| &mut s.conv1),
                        Self::module("bn1", |s| &s.bn1, |s| &mut s.bn1),
                        ($(Self::module(stringify!($l), |s| &s.$l, |s| &mut s.$l),)+),
                        Self::module("fc", |s| &s.fc, |s| &mut s.fc),
                    ),
                    |(conv1, bn1, ($($l,)+), fc)| $name { conv1, bn1, $($l,)+ fc },
                )
            }
        }

        impl<const C: usize, $(const $cp: usize,)* $($L: TensorCollection<f32, Cpu>,)+ H: Params> Params for $name<C, $($cp,)* $($L,)+ H, f32, Cpu> {
            fn visit_params<V: ParamVisitor>(&self, prefix: &str, v: &mut V) -> Result<(), V::Error> {
                walk(&self.conv1, &crate::params::join(prefix, "conv1"), v)?;
                walk(&self.bn1, &crate::params::join(prefix, "bn1"), v)?;
                $(walk(&self.$l, &crate::params::join(prefix, stringify!($l)), v)?;)+
                self.fc.visit_params(&crate::params::join(prefix, "fc"), v)
            }
            fn visit_params_mut<V: ParamVisitorMut>(&mut self, prefix: &str, v: &mut V) -> Result<(), V::Error> {
                walk_mut(&mut self.conv1, &crate::params::join(prefix, "conv1"), v)?;
                walk_mut(&mut self.bn1, &crate::params::join(prefix, "bn1"), v)?;
                $(walk_mut(&mut self.$l, &crate::params::join(prefix, stringify!($l)), v)?;)+
                self.fc.visit_params_mut(&crate::params::join(prefix, "fc"), v)
            }
        }

        impl<const C: usize, $(const $cp: usize,)* $($L: TensorCollection<f32, Cpu> + StageMeta,)+ H: Head> $name<C, $($cp,)* $($L,)+ H, f32, Cpu> {
            /// The stem's layout.
            pub const STEM: StemSpec = StemSpec { channels: $stem, kernel: $k, stride: $s, padding: $p, maxpool: $mp };

            /// Per-part summary (stem, each stage, head) for an `h × w` input.
            pub fn summary(&self, h: usize, w: usize) -> Vec<LayerSummary> {
                let (mut h, mut w) = (h, w);
                let mut rows = Vec::new();
                let (oh, ow, macs) = Conv2d::<C, { $stem }, $k, $s, $p, 1, f32, Cpu>::cost(h, w);
                (h, w) = (oh, ow);
                if $mp {
                    h = (h + 2).saturating_sub(3) / 2 + 1;
                    w = (w + 2).saturating_sub(3) / 2 + 1;
                }
                rows.push(LayerSummary {
                    name: "stem".into(),
                    out_shape: vec![$stem, h, w],
                    params: self.conv1.num_trainable_params() + self.bn1.num_trainable_params(),
                    macs,
                });
                $(
                    let (oh, ow, m) = $L::cost(h, w);
                    (h, w) = (oh, ow);
                    rows.push(LayerSummary { name: stringify!($l).into(), out_shape: vec![$L::OUT, h, w], params: self.$l.num_trainable_params(), macs: m });
                )+
                let classes = self.fc.classes();
                let feats = *[$($L::OUT),+].last().expect("at least one stage");
                rows.push(LayerSummary { name: "head".into(), out_shape: vec![classes], params: self.fc.num_params(), macs: feats * classes });
                rows
            }
        }
    };
}

network_parts! {
    ResNeXt<> stem = (64, 7, 2, 3), maxpool = true, layers = [layer1: L1, layer2: L2, layer3: L3, layer4: L4]
}

network_parts! {
    ResNeXtCifar<const STEM> stem = (STEM, 3, 1, 1), maxpool = false, layers = [layer1: L1, layer2: L2, layer3: L3]
}

/// The output of stage `L` on backend `B` for input `In`.
type Out<B, L, In> = <L as Layer<B, In>>::Out;

impl<const C: usize, L1, L2, L3, L4, const F: usize, O: Dim>
    ResNeXt<C, L1, L2, L3, L4, Linear<F, O, f32, Cpu>, f32, Cpu>
{
    /// Eval-mode logits of `x` on backend `b`.
    pub fn eval_on<B: Backend>(&self, b: &B, x: B::Act<C>) -> Result<B::Logits<O>>
    where
        L1: Layer<B, B::Act<64>>,
        L2: Layer<B, Out<B, L1, B::Act<64>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<64>>>>,
        L4: Layer<B, Out<B, L3, Out<B, L2, Out<B, L1, B::Act<64>>>>, Out = B::Act<F>>,
    {
        let x = b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?;
        let x = b.max_pool::<64, 3, 2, 1>(x)?;
        let x = self.layer1.eval_on(b, x)?;
        let x = self.layer2.eval_on(b, x)?;
        let x = self.layer3.eval_on(b, x)?;
        let x = self.layer4.eval_on(b, x)?;
        b.classify(x, &self.fc)
    }

    /// Training-mode logits of `x` on backend `b` (batch statistics, running statistics
    /// updated).
    pub fn train_on<B: TrainBackend>(&mut self, b: &B, x: B::Act<C>) -> Result<B::Logits<O>>
    where
        L1: Layer<B, B::Act<64>>,
        L2: Layer<B, Out<B, L1, B::Act<64>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<64>>>>,
        L4: Layer<B, Out<B, L3, Out<B, L2, Out<B, L1, B::Act<64>>>>, Out = B::Act<F>>,
    {
        let x = b.conv_bn_train(x, &self.conv1, &mut self.bn1, true, None)?;
        let x = b.max_pool::<64, 3, 2, 1>(x)?;
        let x = self.layer1.train_on(b, x)?;
        let x = self.layer2.train_on(b, x)?;
        let x = self.layer3.train_on(b, x)?;
        let x = self.layer4.train_on(b, x)?;
        b.classify(x, &self.fc)
    }
}

impl<const C: usize, const STEM: usize, L1, L2, L3, const F: usize, O: Dim>
    ResNeXtCifar<C, STEM, L1, L2, L3, Linear<F, O, f32, Cpu>, f32, Cpu>
{
    /// Eval-mode logits of `x` on backend `b`.
    pub fn eval_on<B: Backend>(&self, b: &B, x: B::Act<C>) -> Result<B::Logits<O>>
    where
        L1: Layer<B, B::Act<STEM>>,
        L2: Layer<B, Out<B, L1, B::Act<STEM>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<STEM>>>, Out = B::Act<F>>,
    {
        let x = b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?;
        let x = self.layer1.eval_on(b, x)?;
        let x = self.layer2.eval_on(b, x)?;
        let x = self.layer3.eval_on(b, x)?;
        b.classify(x, &self.fc)
    }

    /// Training-mode logits of `x` on backend `b` (batch statistics, running statistics
    /// updated).
    pub fn train_on<B: TrainBackend>(&mut self, b: &B, x: B::Act<C>) -> Result<B::Logits<O>>
    where
        L1: Layer<B, B::Act<STEM>>,
        L2: Layer<B, Out<B, L1, B::Act<STEM>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<STEM>>>, Out = B::Act<F>>,
    {
        let x = b.conv_bn_train(x, &self.conv1, &mut self.bn1, true, None)?;
        let x = self.layer1.train_on(b, x)?;
        let x = self.layer2.train_on(b, x)?;
        let x = self.layer3.train_on(b, x)?;
        b.classify(x, &self.fc)
    }
}

/// dfdx's `Module` (eval mode) and `ModuleMut` (training mode) for a network on the CPU:
/// its `eval_on` / `train_on` on [`CpuBackend`], plain buffers when no tape is attached.
macro_rules! network_modules {
    ($name:ident <$(const $cp:ident),*> [$($L:ident),+] where $($bound:tt)+) => {
        impl<const C: usize, $(const $cp: usize,)* $($L,)+ const F: usize, O: Dim, T: Tape<f32, Cpu> + Merge<T>>
            Module<Act<C, T>> for $name<C, $($cp,)* $($L,)+ Linear<F, O, f32, Cpu>, f32, Cpu>
        where
            $($bound)+
        {
            type Output = Mat<O, T>;
            type Error = Error;
            fn try_forward(&self, x: Act<C, T>) -> Result<Mat<O, T>> {
                let (x, back) = CpuAct::eval_input(x);
                back.logits(self.eval_on(&CpuBackend::new(), x)?)
            }
        }

        impl<const C: usize, $(const $cp: usize,)* $($L,)+ const F: usize, O: Dim, T: Tape<f32, Cpu> + Merge<T>>
            ModuleMut<Act<C, T>> for $name<C, $($cp,)* $($L,)+ Linear<F, O, f32, Cpu>, f32, Cpu>
        where
            $($bound)+
        {
            type Output = Mat<O, T>;
            type Error = Error;
            fn try_forward_mut(&mut self, x: Act<C, T>) -> Result<Mat<O, T>> {
                let (x, back) = CpuAct::train_input(x);
                back.logits(self.train_on(&CpuBackend::new(), x)?)
            }
        }
    };
}

/// The CPU backend for tape `T`.
type Be<T> = CpuBackend<T>;

network_modules!(ResNeXt<> [L1, L2, L3, L4] where
    L1: Layer<Be<T>, CpuAct<64, T>>,
    L2: Layer<Be<T>, Out<Be<T>, L1, CpuAct<64, T>>>,
    L3: Layer<Be<T>, Out<Be<T>, L2, Out<Be<T>, L1, CpuAct<64, T>>>>,
    L4: Layer<Be<T>, Out<Be<T>, L3, Out<Be<T>, L2, Out<Be<T>, L1, CpuAct<64, T>>>>, Out = CpuAct<F, T>>,
);

network_modules!(ResNeXtCifar<const STEM> [L1, L2, L3] where
    L1: Layer<Be<T>, CpuAct<STEM, T>>,
    L2: Layer<Be<T>, Out<Be<T>, L1, CpuAct<STEM, T>>>,
    L3: Layer<Be<T>, Out<Be<T>, L2, Out<Be<T>, L1, CpuAct<STEM, T>>>, Out = CpuAct<F, T>>,
);
