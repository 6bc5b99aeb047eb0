//! Convolution: [`conv2d`] and the geometry check the fused ops share.

use dfdx::prelude::*;

use super::{read, record, Act, ParamGrad};
use crate::error::{shape_err, Result};
use crate::kernels::conv;
use crate::profile::{self, Label};

/// Convolution hyper-parameters (square kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Groups.
    pub groups: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            kernel: 1,
            stride: 1,
            padding: 0,
            groups: 1,
        }
    }
}

/// 2-D convolution `x ⋆ weight` (no bias), weight `(O, I / groups, k, k)` in any shape
/// type with that many elements.
pub fn conv2d<const I: usize, const O: usize, WS: Shape, T: Tape<f32, Cpu>>(
    x: Act<I, T>,
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
) -> Result<Act<O, T>> {
    let &(n, _, h, w) = x.shape();
    let g = conv_geom::<I, O, WS>([n, h, w], weight, cfg)?;
    let kind = ConvKind::of(&g);
    let _t = profile::scope(kind.forward());
    let xs = read(&x);
    let ws = read(weight);
    let y = conv::conv2d_forward_new(&g, &xs, &ws);
    let dev = x.device().clone();
    let (x, tape) = x.split_tape();
    let (xg, wg) = (x.ghost(), ParamGrad::of(weight));
    let shape = (n, Const::<O>, g.out_h(), g.out_w());
    record(&dev, y, shape, tape, kind.backward(), move |dy, grads| {
        // the weight gradient accumulates straight into its slot, moved out meanwhile
        let mut dw = wg.take(grads)?;
        conv::conv2d_backward(
            &g,
            &xs,
            &ws,
            &dy,
            Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
            &mut dw,
        );
        wg.put(grads, dw)
    })
}

/// Which family a convolution belongs to, for the profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConvKind {
    Pointwise,
    Grouped,
    Dense,
}

impl ConvKind {
    pub(super) fn of(g: &conv::Conv2dGeom) -> Self {
        if g.groups > 1 {
            ConvKind::Grouped
        } else if g.kernel == 1 {
            ConvKind::Pointwise
        } else {
            ConvKind::Dense
        }
    }
    pub(super) fn forward(self) -> Label {
        match self {
            ConvKind::Pointwise => Label::Conv1x1Fwd,
            ConvKind::Grouped => Label::ConvGroupedFwd,
            ConvKind::Dense => Label::ConvKxkFwd,
        }
    }
    pub(super) fn backward(self) -> Label {
        match self {
            ConvKind::Pointwise => Label::Conv1x1Bwd,
            ConvKind::Grouped => Label::ConvGroupedBwd,
            ConvKind::Dense => Label::ConvKxkBwd,
        }
    }
    pub(super) fn fused_eval(self) -> Label {
        match self {
            ConvKind::Pointwise => Label::Conv1x1BnEval,
            ConvKind::Grouped => Label::ConvGroupedBnEval,
            ConvKind::Dense => Label::ConvKxkBnEval,
        }
    }
}

/// The checked geometry of an `I → O` convolution of an `(n, I, h, w)` input.
pub(crate) fn conv_geom<const I: usize, const O: usize, WS: Shape>(
    [n, h, w]: [usize; 3],
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
) -> Result<conv::Conv2dGeom> {
    let g = conv::Conv2dGeom {
        batch: n,
        in_channels: I,
        out_channels: O,
        in_h: h,
        in_w: w,
        kernel: cfg.kernel,
        stride: cfg.stride,
        padding: cfg.padding,
        groups: cfg.groups,
    };
    g.validate().map_err(|m| shape_err("conv2d", m))?;
    if weight.shape().num_elements() != g.weight_len() {
        return Err(shape_err(
            "conv2d",
            format!(
                "weight has {} elements, expected {O}x{}x{}x{}",
                weight.shape().num_elements(),
                g.in_per_group(),
                cfg.kernel,
                cfg.kernel
            ),
        ));
    }
    Ok(g)
}
