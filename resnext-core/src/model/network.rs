//! Whole networks: the ImageNet layout ([`ResNeXt`], as torchvision builds
//! `resnext50_32x4d` & co.) and the paper's CIFAR layout ([`ResNeXtCifar`], ResNeXt-29).

use dfdx::prelude::*;

use super::block::{Bottleneck, Stage};
use crate::error::{Error, Result};
use crate::nn::{BatchNorm2d, Conv2d, GlobalAvgPool, Linear, MaxPool2d};
use crate::ops::Act;
use crate::params::{walk, walk_mut, ParamKind, ParamVisitor, ParamVisitorMut, Params};

/// Static facts about a stage, for summaries.
pub trait StageMeta {
    /// Input channels.
    const IN: usize;
    /// Output channels.
    const OUT: usize;
    /// Output size and multiply-accumulates per image for an `h × w` input.
    fn cost(h: usize, w: usize) -> (usize, usize, usize);
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        const BLOCKS: usize,
        E: Dtype,
        D: Storage<E>,
    > StageMeta for Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, E, D>
{
    const IN: usize = IN;
    const OUT: usize = OUT;
    fn cost(h: usize, w: usize) -> (usize, usize, usize) {
        Stage::<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, E, D>::cost(h, w)
    }
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        E: Dtype,
        D: Storage<E>,
    > StageMeta for Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, E, D>
{
    const IN: usize = IN;
    const OUT: usize = OUT;
    fn cost(h: usize, w: usize) -> (usize, usize, usize) {
        Bottleneck::<IN, WIDTH, OUT, STRIDE, GROUPS, E, D>::cost(h, w)
    }
}

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

fn count<M: TensorCollection<f32, Cpu>>(m: &M) -> usize {
    struct C(usize);
    impl ParamVisitor for C {
        fn tensor<S: Shape>(
            &mut self,
            _: &str,
            t: &Tensor<S, f32, Cpu>,
            k: ParamKind,
        ) -> Result<()> {
            if k != ParamKind::Buffer {
                self.0 += t.shape().num_elements();
            }
            Ok(())
        }
    }
    let mut c = C(0);
    walk(m, "", &mut c).map(|_| c.0).unwrap_or(0)
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

macro_rules! network {
    (
        $(#[$doc:meta])* $name:ident <$(const $cp:ident : usize),*> stem = ($stem:expr, $k:literal, $s:literal, $p:literal), maxpool = $mp:literal,
        layers = [$($l:ident : $L:ident),+]
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name<const C: usize, $(const $cp: usize,)* $($L,)+ H, E: Dtype, D: Storage<E>> {
            /// Stem convolution.
            pub conv1: Conv2d<C, { $stem }, $k, $s, $p, 1, E, D>,
            /// Stem batch norm (followed by a ReLU).
            pub bn1: BatchNorm2d<{ $stem }, E, D>,
            $(
                #[doc = concat!("Stage `", stringify!($l), "`.")]
                pub $l: $L,
            )+
            /// Classifier over the globally average-pooled features.
            pub fc: H,
        }

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
            fn visit_params<V: ParamVisitor>(&self, prefix: &str, v: &mut V) -> Result<()> {
                walk(&self.conv1, &crate::params::join(prefix, "conv1"), v)?;
                walk(&self.bn1, &crate::params::join(prefix, "bn1"), v)?;
                $(walk(&self.$l, &crate::params::join(prefix, stringify!($l)), v)?;)+
                self.fc.visit_params(&crate::params::join(prefix, "fc"), v)
            }
            fn visit_params_mut<V: ParamVisitorMut>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
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
                    params: count(&self.conv1) + count(&self.bn1),
                    macs,
                });
                $(
                    let (oh, ow, m) = $L::cost(h, w);
                    (h, w) = (oh, ow);
                    rows.push(LayerSummary { name: stringify!($l).into(), out_shape: vec![$L::OUT, h, w], params: count(&self.$l), macs: m });
                )+
                let classes = self.fc.classes();
                let feats = *[$($L::OUT),+].last().expect("at least one stage");
                rows.push(LayerSummary { name: "head".into(), out_shape: vec![classes], params: self.fc.num_params(), macs: feats * classes });
                rows
            }
        }
    };
}

network! {
    /// ResNeXt in the ImageNet layout, exactly as torchvision's `ResNet` with
    /// `groups`/`width_per_group` builds it: 7×7 stride-2 stem conv (64 channels), BN, ReLU,
    /// 3×3 stride-2 max pool, four stages, global average pool, fully connected head.
    ///
    /// `C` is the number of input channels; the stages `L1..L4` and the head `H` are types
    /// (see the presets in [`crate::builders`]). Eval mode with `forward`, training mode with
    /// `forward_mut`.
    ResNeXt<> stem = (64, 7, 2, 3), maxpool = true, layers = [layer1: L1, layer2: L2, layer3: L3, layer4: L4]
}

network! {
    /// ResNeXt in the paper's CIFAR layout (ResNeXt-29): 3×3 stride-1 stem conv with
    /// `STEM` channels, BN, ReLU, no max pool, three stages, global average pool, fully
    /// connected head.
    ResNeXtCifar<const STEM: usize> stem = (STEM, 3, 1, 1), maxpool = false, layers = [layer1: L1, layer2: L2, layer3: L3]
}

fn stem_eval<
    const C: usize,
    const S: usize,
    const K: usize,
    const ST: usize,
    const P: usize,
    T: Tape<f32, Cpu>,
>(
    conv: &Conv2d<C, S, K, ST, P, 1, f32, Cpu>,
    bn: &BatchNorm2d<S, f32, Cpu>,
    x: Act<C, T>,
) -> Result<Act<S, T>> {
    if !T::OWNS_TAPE {
        let (x, tape) = x.split_tape();
        return Ok(conv.forward_bn_eval(x, bn, true, None)?.put_tape(tape));
    }
    bn.forward_eval_act(conv.try_forward(x)?, true)
}

fn stem_train<
    const C: usize,
    const S: usize,
    const K: usize,
    const ST: usize,
    const P: usize,
    T: Tape<f32, Cpu> + Merge<T>,
>(
    conv: &Conv2d<C, S, K, ST, P, 1, f32, Cpu>,
    bn: &mut BatchNorm2d<S, f32, Cpu>,
    x: Act<C, T>,
) -> Result<Act<S, T>> {
    conv.forward_bn_train(x, bn, true, None)
}

impl<const C: usize, L1, L2, L3, L4, H, T: Tape<f32, Cpu> + Merge<T>> Module<Act<C, T>>
    for ResNeXt<C, L1, L2, L3, L4, H, f32, Cpu>
where
    L1: Module<Act<64, T>, Error = Error>,
    L2: Module<L1::Output, Error = Error>,
    L3: Module<L2::Output, Error = Error>,
    L4: Module<L3::Output, Error = Error>,
    GlobalAvgPool: Module<L4::Output, Error = Error>,
    H: Module<<GlobalAvgPool as Module<L4::Output>>::Output, Error = Error>,
{
    type Output = H::Output;
    type Error = Error;
    fn try_forward(&self, x: Act<C, T>) -> Result<H::Output> {
        let x = stem_eval(&self.conv1, &self.bn1, x)?;
        let x = MaxPool2d::<3, 2, 1>.try_forward(x)?;
        let x = self.layer4.try_forward(
            self.layer3
                .try_forward(self.layer2.try_forward(self.layer1.try_forward(x)?)?)?,
        )?;
        self.fc.try_forward(GlobalAvgPool.try_forward(x)?)
    }
}

impl<const C: usize, L1, L2, L3, L4, H, T: Tape<f32, Cpu> + Merge<T>> ModuleMut<Act<C, T>>
    for ResNeXt<C, L1, L2, L3, L4, H, f32, Cpu>
where
    L1: ModuleMut<Act<64, T>, Error = Error>,
    L2: ModuleMut<L1::Output, Error = Error>,
    L3: ModuleMut<L2::Output, Error = Error>,
    L4: ModuleMut<L3::Output, Error = Error>,
    GlobalAvgPool: Module<L4::Output, Error = Error>,
    H: Module<<GlobalAvgPool as Module<L4::Output>>::Output, Error = Error>,
{
    type Output = H::Output;
    type Error = Error;
    fn try_forward_mut(&mut self, x: Act<C, T>) -> Result<H::Output> {
        let x = stem_train(&self.conv1, &mut self.bn1, x)?;
        let x = MaxPool2d::<3, 2, 1>.try_forward(x)?;
        let x = self.layer1.try_forward_mut(x)?;
        let x = self.layer2.try_forward_mut(x)?;
        let x = self.layer3.try_forward_mut(x)?;
        let x = self.layer4.try_forward_mut(x)?;
        self.fc.try_forward(GlobalAvgPool.try_forward(x)?)
    }
}

impl<const C: usize, const STEM: usize, L1, L2, L3, H, T: Tape<f32, Cpu> + Merge<T>>
    Module<Act<C, T>> for ResNeXtCifar<C, STEM, L1, L2, L3, H, f32, Cpu>
where
    L1: Module<Act<STEM, T>, Error = Error>,
    L2: Module<L1::Output, Error = Error>,
    L3: Module<L2::Output, Error = Error>,
    GlobalAvgPool: Module<L3::Output, Error = Error>,
    H: Module<<GlobalAvgPool as Module<L3::Output>>::Output, Error = Error>,
{
    type Output = H::Output;
    type Error = Error;
    fn try_forward(&self, x: Act<C, T>) -> Result<H::Output> {
        let x = stem_eval(&self.conv1, &self.bn1, x)?;
        let x = self
            .layer3
            .try_forward(self.layer2.try_forward(self.layer1.try_forward(x)?)?)?;
        self.fc.try_forward(GlobalAvgPool.try_forward(x)?)
    }
}

impl<const C: usize, const STEM: usize, L1, L2, L3, H, T: Tape<f32, Cpu> + Merge<T>>
    ModuleMut<Act<C, T>> for ResNeXtCifar<C, STEM, L1, L2, L3, H, f32, Cpu>
where
    L1: ModuleMut<Act<STEM, T>, Error = Error>,
    L2: ModuleMut<L1::Output, Error = Error>,
    L3: ModuleMut<L2::Output, Error = Error>,
    GlobalAvgPool: Module<L3::Output, Error = Error>,
    H: Module<<GlobalAvgPool as Module<L3::Output>>::Output, Error = Error>,
{
    type Output = H::Output;
    type Error = Error;
    fn try_forward_mut(&mut self, x: Act<C, T>) -> Result<H::Output> {
        let x = stem_train(&self.conv1, &mut self.bn1, x)?;
        let x = self.layer1.try_forward_mut(x)?;
        let x = self.layer2.try_forward_mut(x)?;
        let x = self.layer3.try_forward_mut(x)?;
        self.fc.try_forward(GlobalAvgPool.try_forward(x)?)
    }
}
