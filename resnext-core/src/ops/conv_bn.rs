//! Convolution fused with batch norm (and optionally a residual add and a ReLU): the ops
//! every ResNeXt block runs, [`conv2d_bn_eval`] for inference and [`conv2d_bn_train`] for
//! training.

use std::sync::Arc;

use dfdx::prelude::*;

use super::batch_norm::{check_batch_stats, update_running, BnConfig};
use super::conv::{conv_geom, ConvConfig, ConvKind};
use super::fold_cache;
use super::grad::{Input, Kept, Output, ParamGrad, Recompute};
use super::{read, Act};
use crate::error::{shape_err, Result};
use crate::kernels::{batchnorm as bn, conv, elementwise as ew};
use crate::profile::{self, Label};

/// Eval-mode batch norm as a per-channel `(scale, shift)`.
fn fold_bn<const C: usize>(bn: BnRef<'_, C>, eps: f64) -> (Vec<f32>, Vec<f32>) {
    bn::eval_affine(
        &read(bn.gamma),
        &read(bn.beta),
        &read(bn.mean),
        &read(bn.var),
        eps,
    )
}

/// `weight` `(O, …)` with the eval-mode batch norm `bn` folded in (each output channel's
/// row scaled by `γ / sqrt(var + eps)`), and the per-channel shift that goes with it.
pub(crate) fn folded_weights<const O: usize, WS: Shape>(
    weight: &Tensor<WS, f32, Cpu>,
    bn: BnRef<'_, O>,
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    let (scale, shift) = fold_bn(bn, eps);
    let mut ws = read(weight);
    let per = ws.len() / O;
    for (row, s) in ws.chunks_mut(per.max(1)).zip(&scale) {
        row.iter_mut().for_each(|v| *v *= s);
    }
    (ws, shift)
}

/// Borrowed batch-norm tensors (γ, β, running mean, running variance).
#[derive(Clone, Copy, Debug)]
pub struct BnRef<'a, const C: usize> {
    /// Scale γ.
    pub gamma: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Shift β.
    pub beta: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Running mean.
    pub mean: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Running variance.
    pub var: &'a Tensor<Rank1<C>, f32, Cpu>,
}

/// Inference only: convolution with an eval-mode batch norm folded into its weights, an
/// optional residual added, and an optional ReLU, in one pass over the output
/// (`relu?(bn(conv(x)) + residual)`). Equal to the composition of [`conv2d`],
/// [`batch_norm2d_eval`] and [`add_relu`] up to rounding.
pub fn conv2d_bn_eval<const I: usize, const O: usize, WS: Shape>(
    x: Act<I>,
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
    bn: BnRef<'_, O>,
    eps: f64,
    relu: bool,
    residual: Option<&Act<O>>,
) -> Result<Act<O>> {
    let &(n, _, h, w) = x.shape();
    let res = residual.map(read);
    let (y, oh, ow) = conv2d_bn_eval_raw::<I, O, WS>(
        &read(&x),
        [n, h, w],
        weight,
        cfg,
        bn,
        eps,
        relu,
        res.as_deref(),
    )?;
    Ok(x.device().try_tensor_from_vec(y, (n, Const::<O>, oh, ow))?)
}

/// [`conv2d_bn_eval`] on a plain `(n, I, h, w)` buffer: returns the output buffer and its
/// height and width. Lets a stage run its blocks without copying activations in and out
/// of tensors between convolutions.
pub fn conv2d_bn_eval_raw<const I: usize, const O: usize, WS: Shape>(
    x: &[f32],
    [n, h, w]: [usize; 3],
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
    bn: BnRef<'_, O>,
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
) -> Result<(Vec<f32>, usize, usize)> {
    let g = conv_geom::<I, O, WS>([n, h, w], weight, cfg)?;
    let _t = profile::scope(ConvKind::of(&g).fused_eval());
    let (oh, ow) = (g.out_h(), g.out_w());
    check_len("input", x.len(), g.input_len(), [n, I, h, w])?;
    if let Some(r) = residual {
        check_len("residual", r.len(), g.output_len(), [n, O, oh, ow])?;
    }
    let key = weight as *const Tensor<WS, f32, Cpu> as usize;
    let y = if let Some(folded) = fold_cache::lookup(key, || {
        let (ws, shift) = folded_weights(weight, bn, eps);
        fold_cache::Folded {
            w: conv::PreparedWeights::new(&g, ws),
            shift,
        }
    }) {
        conv::conv2d_forward_fused(&g, x, &folded.w, None, &folded.shift, residual, relu)
    } else {
        // No cache: scale in the epilogue rather than a pass over the weights.
        let (scale, shift) = fold_bn(bn, eps);
        let w = conv::PreparedWeights::new(&g, read(weight));
        conv::conv2d_forward_fused(&g, x, &w, Some(&scale), &shift, residual, relu)
    };
    Ok((y, oh, ow))
}

/// An error unless a buffer of `len` values fills `shape`.
fn check_len(what: &str, len: usize, want: usize, [n, c, h, w]: [usize; 4]) -> Result<()> {
    if len == want {
        return Ok(());
    }
    Err(shape_err(
        "conv2d_bn_eval",
        format!("{what} has {len} values, shape ({n}, {c}, {h}, {w}) needs {want}"),
    ))
}

/// Batch-norm tensors for a training-mode call: γ and β, and the running statistics it
/// updates.
#[derive(Debug)]
pub struct BnTrainRef<'a, const C: usize> {
    /// Scale γ.
    pub gamma: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Shift β.
    pub beta: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Running mean, updated in place.
    pub mean: &'a mut Tensor<Rank1<C>, f32, Cpu>,
    /// Running variance, updated in place.
    pub var: &'a mut Tensor<Rank1<C>, f32, Cpu>,
}

/// Training: convolution, batch norm with batch statistics, an optional residual add and
/// the ReLU of `cfg` (`relu?(bn(conv(x)) + residual)`), as one differentiable op. Equal to
/// [`conv2d`], then [`batch_norm2d_train`], then [`add_relu`] (or the fused ReLU), up to
/// rounding, and updates the running statistics the same way.
///
/// Faster than the composition because the convolution's output never becomes a tensor:
/// the batch norm reads it where the convolution wrote it, and its input gradient is
/// computed in place in the output gradient's buffer and handed straight to the
/// convolution's backward pass (no copy, no zero-filled gradient buffer, no second pass).
/// With a residual, `cfg.relu` applies after the add and the add costs no extra pass.
pub fn conv2d_bn_train<const I: usize, const O: usize, WS: Shape, T: Tape<f32, Cpu> + Merge<T>>(
    x: Act<I, T>,
    weight: &Tensor<WS, f32, Cpu>,
    conv_cfg: ConvConfig,
    bn: BnTrainRef<'_, O>,
    cfg: BnConfig,
    residual: Option<Act<O, T>>,
) -> Result<Act<O, T>> {
    let (x, tape, dev) = Input::split(x);
    let (residual, tape) = match residual {
        Some(r) => {
            let (r, tr, _) = Input::split(r);
            (Some(r), tape.merge(tr))
        }
        None => (None, tape),
    };
    let (y, tape): (Act<O>, T) =
        conv2d_bn_train_on(&dev, x, weight, conv_cfg, bn, cfg, residual, tape)?;
    Ok(y.put_tape(tape))
}

/// [`conv2d_bn_train`] on inputs that may be held outside dfdx tensors ([`Input`]): the
/// output is an `Out` (a tensor, or values with a gradient slot) and the backward pass is
/// recorded on `tape`, returned with it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_bn_train_on<
    const I: usize,
    const O: usize,
    WS: Shape,
    T: Tape<f32, Cpu>,
    Out: Output<O>,
>(
    dev: &Cpu,
    x: Input<I>,
    weight: &Tensor<WS, f32, Cpu>,
    conv_cfg: ConvConfig,
    bn: BnTrainRef<'_, O>,
    cfg: BnConfig,
    residual: Option<Input<O>>,
    mut tape: T,
) -> Result<(Out, T)> {
    let [n, h, w] = x.dims;
    let g = conv_geom::<I, O, WS>([n, h, w], weight, conv_cfg)?;
    let out_shape = (n, Const::<O>, g.out_h(), g.out_w());
    if let Some(r) = &residual {
        if r.shape() != out_shape {
            return Err(shape_err(
                "conv2d_bn_train",
                format!(
                    "residual has shape {:?}, the output has {out_shape:?}",
                    r.shape()
                ),
            ));
        }
    }
    let bg = bn::BnGeom {
        batch: n,
        channels: O,
        spatial: g.out_h() * g.out_w(),
    };
    check_batch_stats(&bg, "output", &out_shape)?;
    let kind = ConvKind::of(&g);
    let Input {
        data: xs,
        grad: x_grad,
        recompute,
        ..
    } = x;
    let (ws, yc, planes) = {
        let _t = profile::scope(kind.forward());
        let ws = read(weight);
        let (yc, planes) = conv::conv2d_forward_plane_stats(&g, &xs, &ws);
        (ws, Arc::new(yc), planes)
    };
    // the backward pass keeps the recipe of its input rather than the values, where the
    // producer left one; the values are then freed when this op's caller drops them
    let xs = Kept::new(xs, recompute);
    let _t = profile::scope(Label::BatchNormTrainFwd);
    let (gs, bs) = (read(bn.gamma), read(bn.beta));
    let stats = bn::stats_synced(&bg, planes, cfg.eps);
    let scale: Vec<f32> = gs.iter().zip(&stats.inv_std).map(|(a, b)| a * b).collect();
    let ch = bn::Affine {
        center: &stats.mean,
        scale: &scale,
        shift: &bs,
    };
    let y = bn::affine_forward_new(
        &bg,
        &yc,
        ch,
        residual.as_ref().map(|r| &r.data[..]),
        cfg.relu,
    );
    let res_grad = residual.map(|r| r.grad);
    update_running(&bg, &stats, cfg.momentum, bn.mean, bn.var);
    // With a residual the ReLU's mask cannot be recomputed from the batch norm's input:
    // keep one bit per output value.
    let mask = if T::OWNS_TAPE && cfg.relu && res_grad.is_some() {
        ew::positive_mask(&y)
    } else {
        Vec::new()
    };
    let bn_relu = cfg.relu && res_grad.is_none();
    // a batch norm + ReLU output can be made again from `yc`, which the backward pass
    // below keeps anyway
    let recompute = (T::OWNS_TAPE && bn_relu).then(|| Recompute {
        x: yc.clone(),
        geom: bg,
        center: stats.mean.clone(),
        scale: scale.clone(),
        shift: bs.clone(),
    });
    let (out, out_grad) = Out::wrap(y, out_shape, dev, recompute)?;
    if T::OWNS_TAPE {
        let wg = ParamGrad::of(weight);
        let (gg, bgh) = (ParamGrad::of(bn.gamma), ParamGrad::of(bn.beta));
        tape.add_backward_op(move |grads| {
            let mut d = out_grad.take(grads, g.output_len())?;
            {
                let _t = profile::scope(Label::BatchNormBwd);
                if let Some(rg) = &res_grad {
                    if !mask.is_empty() {
                        ew::apply_positive_mask(&mask, &mut d);
                    }
                    rg.add(grads, &d)?;
                }
                let (mut dgamma, mut dbeta) = (vec![0.0f32; O], vec![0.0f32; O]);
                let ch = bn::BnChannels {
                    gamma: &gs,
                    beta: &bs,
                    mean: &stats.mean,
                    inv_std: &stats.inv_std,
                    relu: bn_relu,
                };
                bn::bn_backward_in_place(&bg, &yc, &ch, &mut d, &mut dgamma, &mut dbeta);
                gg.add(grads, &dgamma)?;
                bgh.add(grads, &dbeta)?;
            }
            drop(yc);
            let _t = profile::scope(kind.backward());
            // the weight gradient accumulates straight into its slot, moved out meanwhile
            let mut dw = wg.take(grads)?;
            let xs = xs.values();
            if x_grad.wanted() {
                x_grad.add_or_put(grads, |dx| match dx {
                    Some(dx) => {
                        conv::conv2d_backward(&g, &xs, &ws, &d, Some(dx), &mut dw);
                        Vec::new()
                    }
                    None => conv::conv2d_backward_new(&g, &xs, &ws, &d, &mut dw),
                })?;
            } else {
                conv::conv2d_backward(&g, &xs, &ws, &d, None, &mut dw);
            }
            wg.put(grads, dw)
        });
    }
    Ok((out, tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::grad::{Grad, GradSlot, Held};

    /// A training step's input, marked as needing no gradient: the fused op computes none
    /// for it, and every other gradient (weight, batch norm, residual) is bitwise the same
    /// as without the mark; after the marked forward pass the same tensor's gradient is
    /// computed again.
    #[test]
    fn an_unwanted_input_gets_no_gradient_and_every_other_gradient_stays() {
        let dev = Cpu::seed_from_u64(9);
        let w: Tensor<Rank4<4, 3, 3, 3>, f32, Cpu> = dev.sample_normal();
        let (gamma, beta): (Tensor<Rank1<4>, f32, Cpu>, _) =
            (dev.sample_normal(), dev.sample_normal());
        let x: Act<3> = dev.sample_normal_like(&(2, Const, 6, 6));
        let r: Act<4> = dev.sample_normal_like(&(2, Const, 6, 6));
        let probe: Act<4> = dev.sample_normal_like(&(2, Const, 6, 6));
        let conv = ConvConfig {
            kernel: 3,
            padding: 1,
            ..Default::default()
        };
        let run = |mark: bool| {
            let (mut mean, mut var): (Tensor<Rank1<4>, f32, Cpu>, _) = (dev.zeros(), dev.ones());
            let mut forward = |xt: Act<3, OwnedTape<f32, Cpu>>| {
                let bn = BnTrainRef {
                    gamma: &gamma,
                    beta: &beta,
                    mean: &mut mean,
                    var: &mut var,
                };
                let res = r.clone().trace(Gradients::leaky());
                conv2d_bn_train(xt, &w, conv, bn, BnConfig::default(), Some(res)).unwrap()
            };
            let xt = x.clone().trace(Gradients::leaky());
            let y = if mark {
                crate::ops::without_grad_of(xt, forward).unwrap()
            } else {
                forward(xt)
            };
            let mut grads = (y * probe.clone()).sum().backward();
            let dx = grads.get_or_alloc_mut(&x).unwrap().to_vec();
            let rest = [grads.get(&w).as_vec(), grads.get(&gamma).as_vec()];
            (dx, rest, grads.get(&beta).as_vec(), grads.get(&r).as_vec())
        };
        let (dx_marked, rest_marked, dbeta_marked, dr_marked) = run(true);
        let (dx, rest, dbeta, dr) = run(false);
        assert!(
            dx_marked.iter().all(|&v| v == 0.0),
            "a gradient was computed for the marked input"
        );
        assert!(
            dx.iter().any(|&v| v != 0.0),
            "no gradient for the input after the marked pass ended"
        );
        assert_eq!(rest_marked, rest, "weight or gamma gradient changed");
        assert_eq!(dbeta_marked, dbeta);
        assert_eq!(dr_marked, dr, "the residual's gradient changed");
    }

    /// Two fused ops in a row on held values, as the CPU backend runs a block in training:
    /// the first's batch norm + ReLU output is freed once the second has read it, and
    /// every gradient equals the one computed when the second keeps the values.
    #[test]
    fn a_batch_norm_relu_output_is_freed_after_its_reader_and_made_again_exactly() {
        let dev = Cpu::seed_from_u64(5);
        let w1: Tensor<Rank4<4, 3, 3, 3>, f32, Cpu> = dev.sample_normal();
        let w2: Tensor<Rank4<6, 4, 1, 1>, f32, Cpu> = dev.sample_normal();
        let (g1, b1): (Tensor<Rank1<4>, f32, Cpu>, _) = (dev.sample_normal(), dev.sample_normal());
        let (g2, b2): (Tensor<Rank1<6>, f32, Cpu>, _) = (dev.sample_normal(), dev.sample_normal());
        let x: Tensor<Rank1<216>, f32, Cpu> = dev.sample_normal();
        let r: Tensor<(usize, Const<6>, usize, usize), f32, Cpu> =
            dev.sample_normal_like(&(2, Const, 6, 6));
        let conv1 = ConvConfig {
            kernel: 3,
            padding: 1,
            ..Default::default()
        };
        let relu = BnConfig {
            relu: true,
            ..Default::default()
        };
        let run = |keep_values: bool| {
            let (mut m1, mut v1): (Tensor<Rank1<4>, f32, Cpu>, _) = (dev.zeros(), dev.ones());
            let (mut m2, mut v2): (Tensor<Rank1<6>, f32, Cpu>, _) = (dev.zeros(), dev.ones());
            let seed: Tensor<Rank1<1>, f32, Cpu> = dev.zeros();
            let (_, tape) = seed.trace(Gradients::leaky()).split_tape();
            let input = Input::<3> {
                data: Arc::new(x.as_vec()),
                dims: [2, 6, 6],
                grad: Grad::Slot(GradSlot::default()),
                recompute: None,
            };
            let bn1 = BnTrainRef {
                gamma: &g1,
                beta: &b1,
                mean: &mut m1,
                var: &mut v1,
            };
            let (h, tape): (Held, _) =
                conv2d_bn_train_on(&dev, input, &w1, conv1, bn1, relu, None, tape).unwrap();
            assert!(
                h.recompute.is_some(),
                "a batch norm + ReLU output has a recipe"
            );
            let held = Arc::downgrade(&h.data);
            let input = Input::<4> {
                data: h.data,
                dims: h.dims,
                grad: Grad::Slot(h.grad),
                recompute: if keep_values { None } else { h.recompute },
            };
            let bn2 = BnTrainRef {
                gamma: &g2,
                beta: &b2,
                mean: &mut m2,
                var: &mut v2,
            };
            let (y, tape): (Act<6>, _) = conv2d_bn_train_on(
                &dev,
                input,
                &w2,
                ConvConfig::default(),
                bn2,
                relu,
                None,
                tape,
            )
            .unwrap();
            let freed = held.upgrade().is_none();
            let grads = (y.put_tape(tape) * r.clone()).sum().backward();
            let all = [grads.get(&w1).as_vec(), grads.get(&w2).as_vec()];
            (
                freed,
                all,
                [grads.get(&g1).as_vec(), grads.get(&b1).as_vec()],
            )
        };
        let (freed, dw, dbn) = run(false);
        let (kept, dw_kept, dbn_kept) = run(true);
        assert!(
            freed,
            "the output was still held after its reader's forward pass"
        );
        assert!(!kept, "with the values kept the output stays");
        assert_eq!(dw, dw_kept);
        assert_eq!(dbn, dbn_kept);
    }
}
