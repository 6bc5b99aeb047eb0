//! Batch normalisation with PyTorch's semantics: [`batch_norm2d_train`] (batch
//! statistics, running statistics updated) and [`batch_norm2d_eval`].

use dfdx::prelude::*;

use super::{read, record, Act, ParamGrad};
use crate::error::{shape_err, Result};
use crate::kernels::{batchnorm as bn, elementwise as ew};
use crate::profile::{self, Label};

/// Batch-norm constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnConfig {
    /// Added to the variance, PyTorch's default 1e-5.
    pub eps: f64,
    /// Running-statistics momentum, PyTorch's default 0.1.
    pub momentum: f64,
    /// Apply a ReLU after the affine transform (fused).
    pub relu: bool,
}

impl Default for BnConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
            relu: false,
        }
    }
}

fn bn_geom<const C: usize, T>(x: &Act<C, T>) -> bn::BnGeom {
    let &(n, _, h, w) = x.shape();
    bn::BnGeom {
        batch: n,
        channels: C,
        spatial: h * w,
    }
}

fn bn_finish<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    y: Vec<f32>,
    gamma: &Tensor<Rank1<C>, f32, Cpu>,
    beta: &Tensor<Rank1<C>, f32, Cpu>,
    saved: (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
    relu: bool,
    train: bool,
) -> Result<Act<C, T>> {
    let g = bn_geom(&x);
    let shape = *x.shape();
    let dev = x.device().clone();
    let (x, tape) = x.split_tape();
    let (xs, gs, bs, mean, inv_std) = saved;
    let xg = x.ghost();
    let (gg, bg) = (ParamGrad::of(gamma), ParamGrad::of(beta));
    record(
        &dev,
        y,
        shape,
        tape,
        Label::BatchNormBwd,
        move |dy, grads| {
            let (mut dgamma, mut dbeta) = (vec![0.0f32; C], vec![0.0f32; C]);
            let ch = bn::BnChannels {
                gamma: &gs,
                beta: &bs,
                mean: &mean,
                inv_std: &inv_std,
                relu,
            };
            bn::bn_backward(
                &g,
                &xs,
                &ch,
                train,
                &dy,
                Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
                &mut dgamma,
                &mut dbeta,
            );
            gg.add(grads, &dgamma)?;
            bg.add(grads, &dbeta)
        },
    )
}

/// Batch statistics need more than one value per channel.
pub(super) fn check_batch_stats(
    g: &bn::BnGeom,
    what: &str,
    shape: &impl std::fmt::Debug,
) -> Result<()> {
    if g.per_channel() < 2 {
        return Err(shape_err(
            "batch_norm2d",
            format!("training needs more than one value per channel, got {what} {shape:?}"),
        ));
    }
    Ok(())
}

/// Folds a training batch's statistics into the running-statistics tensors.
pub(super) fn update_running<const C: usize>(
    g: &bn::BnGeom,
    stats: &bn::BnStats,
    momentum: f64,
    running_mean: &mut Tensor<Rank1<C>, f32, Cpu>,
    running_var: &mut Tensor<Rank1<C>, f32, Cpu>,
) {
    let (mut rm, mut rv) = (read(running_mean), read(running_var));
    bn::update_running(g, stats, momentum, &mut rm, &mut rv);
    running_mean.copy_from(&rm);
    running_var.copy_from(&rv);
}

/// Training-mode batch norm (PyTorch semantics): normalises with the batch mean and biased
/// variance, and updates the running statistics in place with the unbiased variance.
pub fn batch_norm2d_train<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    gamma: &Tensor<Rank1<C>, f32, Cpu>,
    beta: &Tensor<Rank1<C>, f32, Cpu>,
    running_mean: &mut Tensor<Rank1<C>, f32, Cpu>,
    running_var: &mut Tensor<Rank1<C>, f32, Cpu>,
    cfg: BnConfig,
) -> Result<Act<C, T>> {
    let _t = profile::scope(Label::BatchNormTrainFwd);
    let g = bn_geom(&x);
    check_batch_stats(&g, "input", x.shape())?;
    let xs = read(&x);
    let (gs, bs) = (read(gamma), read(beta));
    let mut y = ew::zeroed(g.len());
    let stats = bn::bn_train_forward(&g, &xs, &gs, &bs, cfg.eps, cfg.relu, &mut y);
    update_running(&g, &stats, cfg.momentum, running_mean, running_var);
    bn_finish(
        x,
        y,
        gamma,
        beta,
        (xs, gs, bs, stats.mean, stats.inv_std),
        cfg.relu,
        true,
    )
}

/// Eval-mode batch norm: normalises with the running statistics (differentiable in `x`,
/// `gamma` and `beta`).
pub fn batch_norm2d_eval<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    gamma: &Tensor<Rank1<C>, f32, Cpu>,
    beta: &Tensor<Rank1<C>, f32, Cpu>,
    running_mean: &Tensor<Rank1<C>, f32, Cpu>,
    running_var: &Tensor<Rank1<C>, f32, Cpu>,
    cfg: BnConfig,
) -> Result<Act<C, T>> {
    let _t = profile::scope(Label::BatchNormEvalFwd);
    let g = bn_geom(&x);
    let xs = read(&x);
    let (gs, bs, rm, rv) = (
        read(gamma),
        read(beta),
        read(running_mean),
        read(running_var),
    );
    let (scale, _) = bn::eval_affine(&gs, &bs, &rm, &rv, cfg.eps);
    let mut y = ew::zeroed(g.len());
    bn::affine_forward(&g, &xs, &rm, &scale, &bs, cfg.relu, &mut y);
    let inv_std: Vec<f32> = rv
        .iter()
        .map(|&v| (1.0 / (v as f64 + cfg.eps).sqrt()) as f32)
        .collect();
    bn_finish(
        x,
        y,
        gamma,
        beta,
        (xs, gs, bs, rm, inv_std),
        cfg.relu,
        false,
    )
}
