//! The ResNeXt bottleneck block and the stage that stacks it.

use dfdx::prelude::*;

use super::layer::{layer_modules, Layer};
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::{Backend, TrainBackend};
use crate::error::Result;
use crate::nn::{field_module, BatchNorm2d, Conv2d, ConvLayer};
use crate::ops::Act;

/// Projection shortcut: 1×1 convolution with stride `S`, then batch norm (torchvision's
/// `downsample.0` / `downsample.1`).
#[derive(Clone, Debug)]
pub struct Downsample<const IN: usize, const OUT: usize, const S: usize, E: Dtype, D: Storage<E>> {
    /// `downsample.0`.
    pub conv: Conv2d<IN, OUT, 1, S, 0, 1, E, D>,
    /// `downsample.1`.
    pub bn: BatchNorm2d<OUT, E, D>,
}

impl<const IN: usize, const OUT: usize, const S: usize, D: Device<f32>> TensorCollection<f32, D>
    for Downsample<IN, OUT, S, f32, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Downsample<IN, OUT, S, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (field_module!("0", conv), field_module!("1", bn)),
            |(conv, bn)| Downsample { conv, bn },
        )
    }
}

/// The ResNeXt block (Xie et al. 2017, Fig. 3c): 1×1 conv `IN → WIDTH`, BN, ReLU; 3×3
/// grouped conv `WIDTH → WIDTH` with stride `STRIDE` and `GROUPS` groups (cardinality),
/// BN, ReLU; 1×1 conv `WIDTH → OUT`, BN; add the shortcut; ReLU.
///
/// The shortcut is the identity when `STRIDE == 1 && IN == OUT`, else a [`Downsample`]
/// projection (as torchvision builds it: the stride sits on the 3×3 conv, "ResNet v1.5").
/// Field names are torchvision's, so weights load by name.
///
/// `forward` is eval mode (running BN statistics); `forward_mut` is training mode.
#[derive(Clone, Debug)]
pub struct Bottleneck<
    const IN: usize,
    const WIDTH: usize,
    const OUT: usize,
    const STRIDE: usize,
    const GROUPS: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// 1×1 reduce.
    pub conv1: Conv2d<IN, WIDTH, 1, 1, 0, 1, E, D>,
    /// BN after `conv1`.
    pub bn1: BatchNorm2d<WIDTH, E, D>,
    /// 3×3 grouped convolution: the `GROUPS` parallel paths.
    pub conv2: Conv2d<WIDTH, WIDTH, 3, STRIDE, 1, GROUPS, E, D>,
    /// BN after `conv2`.
    pub bn2: BatchNorm2d<WIDTH, E, D>,
    /// 1×1 expand.
    pub conv3: Conv2d<WIDTH, OUT, 1, 1, 0, 1, E, D>,
    /// BN after `conv3`.
    pub bn3: BatchNorm2d<OUT, E, D>,
    /// The projection shortcut, present exactly when `STRIDE != 1 || IN != OUT`.
    pub downsample: Option<Downsample<IN, OUT, STRIDE, E, D>>,
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        E: Dtype,
        D: Storage<E>,
    > Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, E, D>
{
    /// Whether this block has a projection shortcut.
    pub const HAS_DOWNSAMPLE: bool = STRIDE != 1 || IN != OUT;
    /// Compile-time checks of the block's wiring.
    const VALID: () = {
        assert!(
            GROUPS > 0 && WIDTH.is_multiple_of(GROUPS),
            "Bottleneck: GROUPS must divide WIDTH"
        );
        assert!(STRIDE > 0, "Bottleneck: STRIDE must be positive");
    };
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        D: Device<f32>,
    > TensorCollection<f32, D> for Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, f32, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        #[allow(clippy::let_unit_value)]
        let () = Self::VALID;
        let main = (
            field_module!("conv1", conv1),
            field_module!("bn1", bn1),
            field_module!("conv2", conv2),
            field_module!("bn2", bn2),
            field_module!("conv3", conv3),
            field_module!("bn3", bn3),
        );
        if Self::HAS_DOWNSAMPLE {
            visitor.visit_fields(
                (
                    main,
                    Self::module(
                        "downsample",
                        |s| {
                            s.downsample
                                .as_ref()
                                .expect("block with a projection shortcut")
                        },
                        |s| {
                            s.downsample
                                .as_mut()
                                .expect("block with a projection shortcut")
                        },
                    ),
                ),
                |((conv1, bn1, conv2, bn2, conv3, bn3), ds)| Bottleneck {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    conv3,
                    bn3,
                    downsample: Some(ds),
                },
            )
        } else {
            visitor.visit_fields(main, |(conv1, bn1, conv2, bn2, conv3, bn3)| Bottleneck {
                conv1,
                bn1,
                conv2,
                bn2,
                conv3,
                bn3,
                downsample: None,
            })
        }
    }
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
    > Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, f32, Cpu>
{
    /// The residual branch only (without shortcut and final ReLU), eval mode.
    pub fn residual<T: Tape<f32, Cpu> + Merge<T>>(&self, x: Act<IN, T>) -> Result<Act<OUT, T>> {
        let (x, back) = CpuAct::train_input(x);
        back.act(self.branch_on(&CpuBackend::new(), x, None)?)
    }

    /// The residual branch on `b`, eval mode; with the block's input `shortcut` also the
    /// shortcut, the add and the last ReLU (fused into conv3 where the backend can).
    fn branch_on<B: Backend>(
        &self,
        b: &B,
        x: B::Act<IN>,
        shortcut: Option<B::Act<IN>>,
    ) -> Result<B::Act<OUT>> {
        #[allow(clippy::let_unit_value)]
        let () = Self::VALID;
        let y = b.conv_bn_eval(x, &self.conv1, &self.bn1, true, None)?;
        let y = b.conv_bn_eval(y, &self.conv2, &self.bn2, true, None)?;
        let s = match (shortcut, &self.downsample) {
            (Some(sc), Some(ds)) => Some(b.conv_bn_eval(sc, &ds.conv, &ds.bn, false, None)?),
            (Some(sc), None) => Some(b.identity(sc)?),
            (None, _) => None,
        };
        b.conv_bn_eval(y, &self.conv3, &self.bn3, s.is_some(), s)
    }
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        B: Backend,
    > Layer<B, B::Act<IN>> for Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, f32, Cpu>
{
    type Out = B::Act<OUT>;

    fn eval_on(&self, b: &B, x: B::Act<IN>) -> Result<B::Act<OUT>> {
        let (x, sc) = b.fork(x);
        self.branch_on(b, x, Some(sc))
    }

    fn train_on(&mut self, b: &B, x: B::Act<IN>) -> Result<B::Act<OUT>>
    where
        B: TrainBackend,
    {
        #[allow(clippy::let_unit_value)]
        let () = Self::VALID;
        let (x, sc) = b.fork(x);
        let y = b.conv_bn_train(x, &self.conv1, &mut self.bn1, true, None)?;
        let y = b.conv_bn_train(y, &self.conv2, &mut self.bn2, true, None)?;
        let s = match &mut self.downsample {
            Some(ds) => b.conv_bn_train(sc, &ds.conv, &mut ds.bn, false, None)?,
            None => b.identity(sc)?,
        };
        b.conv_bn_train(y, &self.conv3, &mut self.bn3, true, Some(s))
    }
}

/// One stage (`layerN` in torchvision): a first block `IN → OUT` with stride `STRIDE`
/// (and a projection shortcut when needed), then `BLOCKS - 1` identity-shortcut blocks
/// `OUT → OUT`. Blocks are named `0`, `1`, …
#[derive(Clone, Debug)]
pub struct Stage<
    const IN: usize,
    const WIDTH: usize,
    const OUT: usize,
    const STRIDE: usize,
    const GROUPS: usize,
    const BLOCKS: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// Block `0`.
    pub first: Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, E, D>,
    /// Blocks `1..BLOCKS`.
    pub rest: Vec<Bottleneck<OUT, WIDTH, OUT, 1, GROUPS, E, D>>,
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        const BLOCKS: usize,
        D: Device<f32>,
    > TensorCollection<f32, D> for Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, f32, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        const { assert!(BLOCKS >= 1, "Stage: BLOCKS must be at least 1") };
        let names: Vec<String> = (1..BLOCKS).map(|i| i.to_string()).collect();
        visitor.visit_fields(
            (
                field_module!("0", first),
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        Self::module(name, move |s| &s.rest[i], move |s| &mut s.rest[i])
                    })
                    .collect::<Vec<_>>(),
            ),
            |(first, rest)| Stage { first, rest },
        )
    }
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        const BLOCKS: usize,
        B: Backend,
    > Layer<B, B::Act<IN>> for Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, f32, Cpu>
{
    type Out = B::Act<OUT>;

    fn eval_on(&self, b: &B, x: B::Act<IN>) -> Result<B::Act<OUT>> {
        let mut y = self.first.eval_on(b, x)?;
        for blk in &self.rest {
            y = blk.eval_on(b, y)?;
        }
        Ok(y)
    }

    fn train_on(&mut self, b: &B, x: B::Act<IN>) -> Result<B::Act<OUT>>
    where
        B: TrainBackend,
    {
        let mut y = self.first.train_on(b, x)?;
        for blk in &mut self.rest {
            y = blk.train_on(b, y)?;
        }
        Ok(y)
    }
}

/// Static facts about a block or stage, for summaries.
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
    > StageMeta for Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS, f32, Cpu>
{
    const IN: usize = IN;
    const OUT: usize = OUT;
    fn cost(h: usize, w: usize) -> (usize, usize, usize) {
        let (_, _, m1) = Conv2d::<IN, WIDTH, 1, 1, 0, 1, f32, Cpu>::cost(h, w);
        let (oh, ow, m2) = Conv2d::<WIDTH, WIDTH, 3, STRIDE, 1, GROUPS, f32, Cpu>::cost(h, w);
        let (_, _, m3) = Conv2d::<WIDTH, OUT, 1, 1, 0, 1, f32, Cpu>::cost(oh, ow);
        let md = if Self::HAS_DOWNSAMPLE {
            Conv2d::<IN, OUT, 1, STRIDE, 0, 1, f32, Cpu>::cost(h, w).2
        } else {
            0
        };
        (oh, ow, m1 + m2 + m3 + md)
    }
}

impl<
        const IN: usize,
        const WIDTH: usize,
        const OUT: usize,
        const STRIDE: usize,
        const GROUPS: usize,
        const BLOCKS: usize,
    > StageMeta for Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS, f32, Cpu>
{
    const IN: usize = IN;
    const OUT: usize = OUT;
    fn cost(h: usize, w: usize) -> (usize, usize, usize) {
        let (oh, ow, m0) = Bottleneck::<IN, WIDTH, OUT, STRIDE, GROUPS, f32, Cpu>::cost(h, w);
        let (_, _, m) = Bottleneck::<OUT, WIDTH, OUT, 1, GROUPS, f32, Cpu>::cost(oh, ow);
        (oh, ow, m0 + (BLOCKS - 1) * m)
    }
}

layer_modules!(Bottleneck<IN, WIDTH, OUT, STRIDE, GROUPS>);
layer_modules!(Stage<IN, WIDTH, OUT, STRIDE, GROUPS, BLOCKS>);
