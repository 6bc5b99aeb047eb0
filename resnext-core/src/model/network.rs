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

/// The parts of a network held fixed while it trains: the stem, each stage, the head.
/// A frozen part's batch norms run in eval mode (running statistics unchanged) and the
/// optimiser leaves its parameters alone ([`Frozen::prefixes`]); frozen parts at the start
/// of the network run as inference, without recording gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frozen {
    /// `conv1` and `bn1`.
    pub stem: bool,
    /// `layer1` … `layer4` (the CIFAR networks have three).
    pub stages: [bool; 4],
    /// The classifier `fc`.
    pub head: bool,
}

impl Frozen {
    /// Nothing frozen.
    pub const NONE: Frozen = Frozen {
        stem: false,
        stages: [false; 4],
        head: false,
    };

    /// Everything but the head (linear probing).
    pub const BACKBONE: Frozen = Frozen {
        stem: true,
        stages: [true; 4],
        head: false,
    };

    /// The part names `--freeze` accepts.
    pub const PARTS: [&'static str; 6] = ["stem", "layer1", "layer2", "layer3", "layer4", "head"];

    /// The frozen set named by `parts` (`stem`, `layer1` … `layer4`, `head`).
    pub fn parse<'a>(
        parts: impl IntoIterator<Item = &'a str>,
    ) -> std::result::Result<Self, String> {
        let mut f = Frozen::NONE;
        for p in parts {
            match p.trim() {
                "stem" => f.stem = true,
                "head" => f.head = true,
                "backbone" => {
                    f.stem = true;
                    f.stages = [true; 4];
                }
                s => match s
                    .strip_prefix("layer")
                    .and_then(|i| i.parse::<usize>().ok())
                {
                    Some(i @ 1..=4) => f.stages[i - 1] = true,
                    _ => {
                        return Err(format!(
                            "unknown part `{s}`; valid: {}, backbone",
                            Self::PARTS.join(", ")
                        ))
                    }
                },
            }
        }
        Ok(f)
    }

    /// Whether anything is frozen.
    pub fn any(&self) -> bool {
        *self != Frozen::NONE
    }

    /// The parameter-name prefixes of the frozen parts (`conv1.`, `bn1.`, `layer2.`,
    /// `fc.`): what the optimiser skips.
    pub fn prefixes(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.stem {
            p.extend(["conv1.".to_string(), "bn1.".to_string()]);
        }
        for (i, &s) in self.stages.iter().enumerate() {
            if s {
                p.push(format!("layer{}.", i + 1));
            }
        }
        if self.head {
            p.push("fc.".into());
        }
        p
    }

    /// How many parts from the start (stem, then the stages) are frozen: they run without
    /// recording gradients.
    fn prefix(&self, stages: usize) -> usize {
        if !self.stem {
            return 0;
        }
        1 + self.stages[..stages].iter().take_while(|&&s| s).count()
    }
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

impl<const C: usize, L1, L2, L3, L4, H> ResNeXt<C, L1, L2, L3, L4, H, f32, Cpu> {
    /// Eval-mode feature maps of `x` on backend `b`, as timm's `features_only` gives them:
    /// the stem's (after its ReLU, before the max pool; stride 2) and each stage's
    /// (strides 4, 8, 16 and 32). The head is not run. For ResNeXt-50 the maps have 64, 256,
    /// 512, 1024 and 2048 channels, in the types.
    pub fn features_on<
        B: Backend,
        const F1: usize,
        const F2: usize,
        const F3: usize,
        const F4: usize,
    >(
        &self,
        b: &B,
        x: B::Act<C>,
    ) -> Result<(B::Act<64>, B::Act<F1>, B::Act<F2>, B::Act<F3>, B::Act<F4>)>
    where
        L1: Layer<B, B::Act<64>, Out = B::Act<F1>>,
        L2: Layer<B, B::Act<F1>, Out = B::Act<F2>>,
        L3: Layer<B, B::Act<F2>, Out = B::Act<F3>>,
        L4: Layer<B, B::Act<F3>, Out = B::Act<F4>>,
    {
        let stem = b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?;
        let (stem, x) = b.fork(stem);
        let x = b.max_pool::<64, 3, 2, 1>(x)?;
        let (f1, x) = b.fork(self.layer1.eval_on(b, x)?);
        let (f2, x) = b.fork(self.layer2.eval_on(b, x)?);
        let (f3, x) = b.fork(self.layer3.eval_on(b, x)?);
        let f4 = self.layer4.eval_on(b, x)?;
        Ok((stem, f1, f2, f3, f4))
    }

    /// The last stage's eval-mode output.
    fn trunk_on<B: Backend, const F: usize>(&self, b: &B, x: B::Act<C>) -> Result<B::Act<F>>
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
        self.layer4.eval_on(b, x)
    }

    /// The pooled embedding of `x` on backend `b` (eval mode): the globally averaged last
    /// stage, `(batch, F)`, what the head classifies.
    pub fn embed_on<B: Backend, const F: usize>(
        &self,
        b: &B,
        x: B::Act<C>,
    ) -> Result<B::Logits<Const<F>>>
    where
        L1: Layer<B, B::Act<64>>,
        L2: Layer<B, Out<B, L1, B::Act<64>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<64>>>>,
        L4: Layer<B, Out<B, L3, Out<B, L2, Out<B, L1, B::Act<64>>>>, Out = B::Act<F>>,
    {
        b.avg_pool(self.trunk_on(b, x)?)
    }
}

/// A stage in training mode, or in eval mode when frozen.
fn stage<B: TrainBackend, L: Layer<B, In>, In>(
    b: &B,
    l: &mut L,
    x: In,
    frozen: bool,
) -> Result<L::Out> {
    if frozen {
        l.eval_on(b, x)
    } else {
        l.train_on(b, x)
    }
}

/// `x` with gradient recording resumed when `now` (the end of a frozen start).
fn resume_after<B: TrainBackend, const K: usize>(
    b: &B,
    x: B::Act<K>,
    now: bool,
) -> Result<B::Act<K>> {
    if now {
        b.resume_grad(x)
    } else {
        Ok(x)
    }
}

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
        b.classify(self.trunk_on(b, x)?, &self.fc)
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

    /// [`ResNeXt::train_on`] with the parts in `frozen` held fixed (eval-mode batch norm;
    /// a frozen start of the network records no gradients).
    pub fn train_with<B: TrainBackend, const F1: usize, const F2: usize, const F3: usize>(
        &mut self,
        b: &B,
        x: B::Act<C>,
        frozen: Frozen,
    ) -> Result<B::Logits<O>>
    where
        L1: Layer<B, B::Act<64>, Out = B::Act<F1>>,
        L2: Layer<B, B::Act<F1>, Out = B::Act<F2>>,
        L3: Layer<B, B::Act<F2>, Out = B::Act<F3>>,
        L4: Layer<B, B::Act<F3>, Out = B::Act<F>>,
    {
        let prefix = frozen.prefix(4);
        let x = if prefix > 0 { b.stop_grad(x)? } else { x };
        let x = if frozen.stem {
            b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?
        } else {
            b.conv_bn_train(x, &self.conv1, &mut self.bn1, true, None)?
        };
        let x = b.max_pool::<64, 3, 2, 1>(x)?;
        let x = resume_after(b, x, prefix == 1)?;
        let x = stage(b, &mut self.layer1, x, frozen.stages[0])?;
        let x = resume_after(b, x, prefix == 2)?;
        let x = stage(b, &mut self.layer2, x, frozen.stages[1])?;
        let x = resume_after(b, x, prefix == 3)?;
        let x = stage(b, &mut self.layer3, x, frozen.stages[2])?;
        let x = resume_after(b, x, prefix == 4)?;
        let x = stage(b, &mut self.layer4, x, frozen.stages[3])?;
        let x = resume_after(b, x, prefix == 5)?;
        b.classify(x, &self.fc)
    }
}

impl<const C: usize, const STEM: usize, L1, L2, L3, H>
    ResNeXtCifar<C, STEM, L1, L2, L3, H, f32, Cpu>
{
    /// Eval-mode feature maps of `x` on backend `b`: the stem's (after its ReLU) and each
    /// stage's (strides 1, 1, 2 and 4). The head is not run.
    pub fn features_on<B: Backend, const F1: usize, const F2: usize, const F3: usize>(
        &self,
        b: &B,
        x: B::Act<C>,
    ) -> Result<(B::Act<STEM>, B::Act<F1>, B::Act<F2>, B::Act<F3>)>
    where
        L1: Layer<B, B::Act<STEM>, Out = B::Act<F1>>,
        L2: Layer<B, B::Act<F1>, Out = B::Act<F2>>,
        L3: Layer<B, B::Act<F2>, Out = B::Act<F3>>,
    {
        let (stem, x) = b.fork(b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?);
        let (f1, x) = b.fork(self.layer1.eval_on(b, x)?);
        let (f2, x) = b.fork(self.layer2.eval_on(b, x)?);
        let f3 = self.layer3.eval_on(b, x)?;
        Ok((stem, f1, f2, f3))
    }

    /// The last stage's eval-mode output.
    fn trunk_on<B: Backend, const F: usize>(&self, b: &B, x: B::Act<C>) -> Result<B::Act<F>>
    where
        L1: Layer<B, B::Act<STEM>>,
        L2: Layer<B, Out<B, L1, B::Act<STEM>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<STEM>>>, Out = B::Act<F>>,
    {
        let x = b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?;
        let x = self.layer1.eval_on(b, x)?;
        let x = self.layer2.eval_on(b, x)?;
        self.layer3.eval_on(b, x)
    }

    /// The pooled embedding of `x` on backend `b` (eval mode): the globally averaged last
    /// stage, `(batch, F)`, what the head classifies.
    pub fn embed_on<B: Backend, const F: usize>(
        &self,
        b: &B,
        x: B::Act<C>,
    ) -> Result<B::Logits<Const<F>>>
    where
        L1: Layer<B, B::Act<STEM>>,
        L2: Layer<B, Out<B, L1, B::Act<STEM>>>,
        L3: Layer<B, Out<B, L2, Out<B, L1, B::Act<STEM>>>, Out = B::Act<F>>,
    {
        b.avg_pool(self.trunk_on(b, x)?)
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
        b.classify(self.trunk_on(b, x)?, &self.fc)
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

    /// [`ResNeXtCifar::train_on`] with the parts in `frozen` held fixed (eval-mode batch
    /// norm; a frozen start of the network records no gradients). `frozen.stages[3]` is
    /// ignored: this layout has three stages.
    pub fn train_with<B: TrainBackend, const F1: usize, const F2: usize>(
        &mut self,
        b: &B,
        x: B::Act<C>,
        frozen: Frozen,
    ) -> Result<B::Logits<O>>
    where
        L1: Layer<B, B::Act<STEM>, Out = B::Act<F1>>,
        L2: Layer<B, B::Act<F1>, Out = B::Act<F2>>,
        L3: Layer<B, B::Act<F2>, Out = B::Act<F>>,
    {
        let prefix = frozen.prefix(3);
        let x = if prefix > 0 { b.stop_grad(x)? } else { x };
        let x = if frozen.stem {
            b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?
        } else {
            b.conv_bn_train(x, &self.conv1, &mut self.bn1, true, None)?
        };
        let x = resume_after(b, x, prefix == 1)?;
        let x = stage(b, &mut self.layer1, x, frozen.stages[0])?;
        let x = resume_after(b, x, prefix == 2)?;
        let x = stage(b, &mut self.layer2, x, frozen.stages[1])?;
        let x = resume_after(b, x, prefix == 3)?;
        let x = stage(b, &mut self.layer3, x, frozen.stages[2])?;
        let x = resume_after(b, x, prefix == 4)?;
        b.classify(x, &self.fc)
    }
}

/// One feature map on the CPU, named as its part of the network: what
/// [`Features::feature_maps`] returns for a network whatever its stage widths.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    /// `stem`, `layer1`, …
    pub name: &'static str,
    /// `[n, c, h, w]`.
    pub shape: [usize; 4],
    /// The values, row-major.
    pub data: Vec<f32>,
}

impl FeatureMap {
    fn of<const K: usize>(name: &'static str, x: Act<K>) -> Self {
        let &(n, _, h, w) = x.shape();
        FeatureMap {
            name,
            shape: [n, K, h, w],
            data: x.as_vec(),
        }
    }
}

/// Feature extraction on the CPU (eval mode, no tape) for a network whose stage widths are
/// not spelled out: what [`Network`](super::Network) and the programs use. The typed
/// equivalents are the networks' `features` and `embed`.
pub trait Features<const C: usize> {
    /// Width of the pooled embedding (the head's input).
    fn embed_dim(&self) -> usize;
    /// The stem's and each stage's feature map of `x`.
    fn feature_maps(&self, x: Act<C>) -> Result<Vec<FeatureMap>>;
    /// The pooled embeddings of `x`, `(batch, embed_dim)` row-major.
    fn embed_rows(&self, x: Act<C>) -> Result<Vec<f32>>;
}

/// A training-mode forward pass with frozen parts on the CPU, for a network whose stage
/// widths are not spelled out ([`ResNeXt::train_with`] / [`ResNeXtCifar::train_with`] on
/// [`CpuBackend`] with a tape): what [`Network`](super::Network) trains with.
pub trait TrainFrozen<const C: usize, O: Dim> {
    /// Training-mode logits of `x`, the parts in `frozen` held fixed.
    fn forward_frozen(&mut self, x: Act<C, Taped>, frozen: Frozen) -> Result<Mat<O, Taped>>;
}

/// The tape of a training step.
type Taped = OwnedTape<f32, Cpu>;
/// An activation of the CPU backend with a tape.
type TapedAct<const K: usize> = CpuAct<K, Taped>;

impl<
        const C: usize,
        L1,
        L2,
        L3,
        L4,
        const F: usize,
        O: Dim,
        const F1: usize,
        const F2: usize,
        const F3: usize,
    > TrainFrozen<C, O> for ResNeXt<C, L1, L2, L3, L4, Linear<F, O, f32, Cpu>, f32, Cpu>
where
    L1: Layer<CpuBackend<Taped>, TapedAct<64>, Out = TapedAct<F1>>,
    L2: Layer<CpuBackend<Taped>, TapedAct<F1>, Out = TapedAct<F2>>,
    L3: Layer<CpuBackend<Taped>, TapedAct<F2>, Out = TapedAct<F3>>,
    L4: Layer<CpuBackend<Taped>, TapedAct<F3>, Out = TapedAct<F>>,
{
    fn forward_frozen(&mut self, x: Act<C, Taped>, frozen: Frozen) -> Result<Mat<O, Taped>> {
        let (x, back) = CpuAct::train_input(x);
        back.logits(self.train_with(&CpuBackend::new(), x, frozen)?)
    }
}

impl<
        const C: usize,
        const STEM: usize,
        L1,
        L2,
        L3,
        const F: usize,
        O: Dim,
        const F1: usize,
        const F2: usize,
    > TrainFrozen<C, O> for ResNeXtCifar<C, STEM, L1, L2, L3, Linear<F, O, f32, Cpu>, f32, Cpu>
where
    L1: Layer<CpuBackend<Taped>, TapedAct<STEM>, Out = TapedAct<F1>>,
    L2: Layer<CpuBackend<Taped>, TapedAct<F1>, Out = TapedAct<F2>>,
    L3: Layer<CpuBackend<Taped>, TapedAct<F2>, Out = TapedAct<F>>,
{
    fn forward_frozen(&mut self, x: Act<C, Taped>, frozen: Frozen) -> Result<Mat<O, Taped>> {
        let (x, back) = CpuAct::train_input(x);
        back.logits(self.train_with(&CpuBackend::new(), x, frozen)?)
    }
}

/// The CPU backend without a tape: inference on plain buffers.
type Infer = CpuBackend<NoneTape>;
/// An activation of [`Infer`].
type InferAct<const K: usize> = CpuAct<K, NoneTape>;

impl<const C: usize, L1, L2, L3, L4, H> ResNeXt<C, L1, L2, L3, L4, H, f32, Cpu> {
    /// Eval-mode feature maps of `x` on the CPU ([`ResNeXt::features_on`]): stem and four
    /// stages, typed.
    ///
    /// ```
    /// use dfdx::prelude::*;
    /// use resnext_core::builders::ResNeXt50_32x4d;
    /// let dev = Cpu::default();
    /// let net = dev.build_module::<ResNeXt50_32x4d<10>, f32>();
    /// let x: Tensor<(usize, Const<3>, usize, usize), f32, Cpu> = dev.zeros_like(&(1, Const, 64, 64));
    /// let (stem, c2, c3, c4, c5) = net.features(x)?;
    /// assert_eq!(stem.shape().1, Const::<64>);
    /// assert_eq!((c2.shape().2, c5.shape().2), (16, 2));
    /// let _: Tensor<(usize, Const<2048>, usize, usize), f32, Cpu> = c5;
    /// let _ = (c3, c4);
    /// # Ok::<(), resnext_core::Error>(())
    /// ```
    pub fn features<const F1: usize, const F2: usize, const F3: usize, const F4: usize>(
        &self,
        x: Act<C>,
    ) -> Result<(Act<64>, Act<F1>, Act<F2>, Act<F3>, Act<F4>)>
    where
        L1: Layer<Infer, InferAct<64>, Out = InferAct<F1>>,
        L2: Layer<Infer, InferAct<F1>, Out = InferAct<F2>>,
        L3: Layer<Infer, InferAct<F2>, Out = InferAct<F3>>,
        L4: Layer<Infer, InferAct<F3>, Out = InferAct<F4>>,
    {
        let (x, back) = CpuAct::eval_input(x);
        let (f0, f1, f2, f3, f4) = self.features_on(&Infer::new(), x)?;
        Ok((
            back.clone().act(f0)?,
            back.clone().act(f1)?,
            back.clone().act(f2)?,
            back.clone().act(f3)?,
            back.act(f4)?,
        ))
    }

    /// The pooled embedding of `x` on the CPU (eval mode), `(batch, F)`: the head's input.
    pub fn embed<const F: usize>(&self, x: Act<C>) -> Result<Mat<Const<F>>>
    where
        L1: Layer<Infer, InferAct<64>>,
        L2: Layer<Infer, Out<Infer, L1, InferAct<64>>>,
        L3: Layer<Infer, Out<Infer, L2, Out<Infer, L1, InferAct<64>>>>,
        L4: Layer<
            Infer,
            Out<Infer, L3, Out<Infer, L2, Out<Infer, L1, InferAct<64>>>>,
            Out = InferAct<F>,
        >,
    {
        let (x, back) = CpuAct::eval_input(x);
        back.logits(self.embed_on(&Infer::new(), x)?)
    }
}

impl<
        const C: usize,
        L1,
        L2,
        L3,
        L4,
        H,
        const F1: usize,
        const F2: usize,
        const F3: usize,
        const F4: usize,
    > Features<C> for ResNeXt<C, L1, L2, L3, L4, H, f32, Cpu>
where
    L1: Layer<Infer, InferAct<64>, Out = InferAct<F1>>,
    L2: Layer<Infer, InferAct<F1>, Out = InferAct<F2>>,
    L3: Layer<Infer, InferAct<F2>, Out = InferAct<F3>>,
    L4: Layer<Infer, InferAct<F3>, Out = InferAct<F4>>,
{
    fn embed_dim(&self) -> usize {
        F4
    }
    fn feature_maps(&self, x: Act<C>) -> Result<Vec<FeatureMap>> {
        let (f0, f1, f2, f3, f4) = self.features(x)?;
        Ok(vec![
            FeatureMap::of("stem", f0),
            FeatureMap::of("layer1", f1),
            FeatureMap::of("layer2", f2),
            FeatureMap::of("layer3", f3),
            FeatureMap::of("layer4", f4),
        ])
    }
    fn embed_rows(&self, x: Act<C>) -> Result<Vec<f32>> {
        Ok(self.embed::<F4>(x)?.as_vec())
    }
}

impl<const C: usize, const STEM: usize, L1, L2, L3, H>
    ResNeXtCifar<C, STEM, L1, L2, L3, H, f32, Cpu>
{
    /// Eval-mode feature maps of `x` on the CPU ([`ResNeXtCifar::features_on`]): stem and
    /// three stages, typed.
    pub fn features<const F1: usize, const F2: usize, const F3: usize>(
        &self,
        x: Act<C>,
    ) -> Result<(Act<STEM>, Act<F1>, Act<F2>, Act<F3>)>
    where
        L1: Layer<Infer, InferAct<STEM>, Out = InferAct<F1>>,
        L2: Layer<Infer, InferAct<F1>, Out = InferAct<F2>>,
        L3: Layer<Infer, InferAct<F2>, Out = InferAct<F3>>,
    {
        let (x, back) = CpuAct::eval_input(x);
        let (f0, f1, f2, f3) = self.features_on(&Infer::new(), x)?;
        Ok((
            back.clone().act(f0)?,
            back.clone().act(f1)?,
            back.clone().act(f2)?,
            back.act(f3)?,
        ))
    }

    /// The pooled embedding of `x` on the CPU (eval mode), `(batch, F)`: the head's input.
    pub fn embed<const F: usize>(&self, x: Act<C>) -> Result<Mat<Const<F>>>
    where
        L1: Layer<Infer, InferAct<STEM>>,
        L2: Layer<Infer, Out<Infer, L1, InferAct<STEM>>>,
        L3: Layer<Infer, Out<Infer, L2, Out<Infer, L1, InferAct<STEM>>>, Out = InferAct<F>>,
    {
        let (x, back) = CpuAct::eval_input(x);
        back.logits(self.embed_on(&Infer::new(), x)?)
    }
}

impl<
        const C: usize,
        const STEM: usize,
        L1,
        L2,
        L3,
        H,
        const F1: usize,
        const F2: usize,
        const F3: usize,
    > Features<C> for ResNeXtCifar<C, STEM, L1, L2, L3, H, f32, Cpu>
where
    L1: Layer<Infer, InferAct<STEM>, Out = InferAct<F1>>,
    L2: Layer<Infer, InferAct<F1>, Out = InferAct<F2>>,
    L3: Layer<Infer, InferAct<F2>, Out = InferAct<F3>>,
{
    fn embed_dim(&self) -> usize {
        F3
    }
    fn feature_maps(&self, x: Act<C>) -> Result<Vec<FeatureMap>> {
        let (f0, f1, f2, f3) = self.features(x)?;
        Ok(vec![
            FeatureMap::of("stem", f0),
            FeatureMap::of("layer1", f1),
            FeatureMap::of("layer2", f2),
            FeatureMap::of("layer3", f3),
        ])
    }
    fn embed_rows(&self, x: Act<C>) -> Result<Vec<f32>> {
        Ok(self.embed::<F3>(x)?.as_vec())
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
