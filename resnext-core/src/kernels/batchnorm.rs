//! Batch normalisation over (N, H, W) per channel, NCHW layout, with PyTorch's semantics,
//! optionally fused with a following ReLU.

use rayon::prelude::*;

/// The layout of one batch-norm call: `batch × channels × spatial` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnGeom {
    /// Batch size N.
    pub batch: usize,
    /// Channels C.
    pub channels: usize,
    /// H × W.
    pub spatial: usize,
}

impl BnGeom {
    /// Elements in the tensor.
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }
    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements per channel (N × H × W).
    pub fn per_channel(&self) -> usize {
        self.batch * self.spatial
    }
}

/// Per-channel statistics that the training forward pass computes and its backward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct BnStats {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Biased batch variance per channel.
    pub var: Vec<f32>,
    /// `1 / sqrt(var + eps)` per channel.
    pub inv_std: Vec<f32>,
}

fn channel_planes(g: &BnGeom, c: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    (0..g.batch).map(move |n| {
        let start = (n * g.channels + c) * g.spatial;
        start..start + g.spatial
    })
}

fn sum_f32(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (l, x) in lanes.iter_mut().zip(ch) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Batch mean and biased variance per channel (two passes; `f32` sums within a plane,
/// `f64` across planes).
pub fn batch_stats(g: &BnGeom, x: &[f32], eps: f64) -> BnStats {
    let m = g.per_channel().max(1) as f64;
    // f32 sums within a plane (vectorisable), f64 across planes
    let per: Vec<(f32, f32, f32)> = (0..g.channels)
        .into_par_iter()
        .map(|c| {
            let mut sum = 0.0f64;
            for r in channel_planes(g, c) {
                sum += sum_f32(&x[r]) as f64;
            }
            let mean = sum / m;
            // the f64 mean as an f32 pair, so deviations of nearly equal values keep their bits
            let hi = mean as f32;
            let lo = (mean - hi as f64) as f32;
            let mut sq = 0.0f64;
            for r in channel_planes(g, c) {
                sq += x[r]
                    .chunks(8)
                    .map(|ch| {
                        ch.iter()
                            .map(|&v| ((v - hi) - lo) * ((v - hi) - lo))
                            .sum::<f32>()
                    })
                    .sum::<f32>() as f64;
            }
            let var = sq / m;
            (mean as f32, var as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect();
    BnStats {
        mean: per.iter().map(|p| p.0).collect(),
        var: per.iter().map(|p| p.1).collect(),
        inv_std: per.iter().map(|p| p.2).collect(),
    }
}

/// `y = (x - center[c]) * scale[c] + shift[c]`, then `max(y, 0)` when `relu`. Overwrites
/// `y`. Centring before scaling keeps precision when the variance is tiny (the scale is
/// then huge and `x * scale - mean * scale` would cancel).
pub fn affine_forward(
    g: &BnGeom,
    x: &[f32],
    center: &[f32],
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    y: &mut [f32],
) {
    assert_eq!(x.len(), g.len(), "batch norm: input length");
    assert_eq!(y.len(), g.len(), "batch norm: output length");
    if g.spatial == 0 {
        return;
    }
    y.par_chunks_mut(g.spatial)
        .zip(x.par_chunks(g.spatial))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let c = plane % g.channels;
            let (m, a, b) = (center[c], scale[c], shift[c]);
            if relu {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = ((v - m) * a + b).max(0.0);
                }
            } else {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = (v - m) * a + b;
                }
            }
        });
}

/// Training-mode forward: normalises with batch statistics and returns them.
pub fn bn_train_forward(
    g: &BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    relu: bool,
    y: &mut [f32],
) -> BnStats {
    let stats = batch_stats(g, x, eps);
    let scale: Vec<f32> = (0..g.channels)
        .map(|c| gamma[c] * stats.inv_std[c])
        .collect();
    affine_forward(g, x, &stats.mean, &scale, beta, relu, y);
    stats
}

/// Updates running statistics as PyTorch does: `r = (1 - m) r + m s`, with the unbiased
/// variance for `running_var`.
pub fn update_running(
    g: &BnGeom,
    stats: &BnStats,
    momentum: f64,
    running_mean: &mut [f32],
    running_var: &mut [f32],
) {
    let m = g.per_channel() as f64;
    let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
    for c in 0..g.channels {
        running_mean[c] =
            ((1.0 - momentum) * running_mean[c] as f64 + momentum * stats.mean[c] as f64) as f32;
        running_var[c] = ((1.0 - momentum) * running_var[c] as f64
            + momentum * stats.var[c] as f64 * unbias) as f32;
    }
}

/// Eval-mode scale and shift from running statistics.
pub fn eval_affine(
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(running_var)
        .map(|(&w, &v)| (w as f64 / (v as f64 + eps).sqrt()) as f32)
        .collect();
    let shift: Vec<f32> = beta
        .iter()
        .zip(running_mean)
        .zip(&scale)
        .map(|((&b, &m), &s)| b - m * s)
        .collect();
    (scale, shift)
}

/// Backward of `y = relu?(x * scale + shift)` where `xhat = (x - mean) * inv_std` is the
/// normalised input and `scale = gamma * inv_std`.
///
/// `train` selects whether `mean`/`inv_std` are batch statistics (their dependence on `x`
/// is differentiated through) or constants (eval mode). Adds into `dx`, `dgamma`, `dbeta`.
pub fn bn_backward(
    g: &BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    relu: bool,
    train: bool,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let m = g.per_channel() as f64;
    // The ReLU mask is recomputed from x: y > 0 exactly when xhat * gamma + beta > 0.
    let masked = |c: usize, xv: f32, d: f32| -> f32 {
        if relu && (xv - mean[c]) * inv_std[c] * gamma[c] + beta[c] <= 0.0 {
            0.0
        } else {
            d
        }
    };
    let sums: Vec<(f64, f64)> = (0..g.channels)
        .into_par_iter()
        .map(|c| {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            let (mu, is, ga, be) = (mean[c], inv_std[c], gamma[c], beta[c]);
            for r in channel_planes(g, c) {
                let (mut pg, mut pgx) = ([0.0f32; 8], [0.0f32; 8]);
                for (xc, dc) in x[r.clone()].chunks(8).zip(dy[r].chunks(8)) {
                    for (k, (&xv, &d)) in xc.iter().zip(dc).enumerate() {
                        let xhat = (xv - mu) * is;
                        let d = if relu && xhat * ga + be <= 0.0 {
                            0.0
                        } else {
                            d
                        };
                        pg[k] += d;
                        pgx[k] += d * xhat;
                    }
                }
                sg += pg.iter().sum::<f32>() as f64;
                sgx += pgx.iter().sum::<f32>() as f64;
            }
            (sg, sgx)
        })
        .collect();
    for c in 0..g.channels {
        dbeta[c] += sums[c].0 as f32;
        dgamma[c] += sums[c].1 as f32;
    }
    let Some(dx) = dx else { return };
    if g.spatial == 0 {
        return;
    }
    dx.par_chunks_mut(g.spatial)
        .zip(x.par_chunks(g.spatial))
        .zip(dy.par_chunks(g.spatial))
        .enumerate()
        .for_each(|(plane, ((dxp, xp), dyp))| {
            let c = plane % g.channels;
            let k = gamma[c] * inv_std[c];
            if train {
                let mean_g = (sums[c].0 / m) as f32;
                let mean_gx = (sums[c].1 / m) as f32;
                for ((o, &xv), &d) in dxp.iter_mut().zip(xp).zip(dyp) {
                    let xhat = (xv - mean[c]) * inv_std[c];
                    *o += k * (masked(c, xv, d) - mean_g - xhat * mean_gx);
                }
            } else {
                for ((o, &xv), &d) in dxp.iter_mut().zip(xp).zip(dyp) {
                    *o += k * masked(c, xv, d);
                }
            }
        });
}

/// Reference training forward in `f64`: returns `(y, mean, biased var)`.
pub fn bn_train_forward_ref(
    g: &BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let m = g.per_channel() as f64;
    let mut mean = vec![0.0f64; g.channels];
    let mut var = vec![0.0f64; g.channels];
    for c in 0..g.channels {
        for n in 0..g.batch {
            for i in 0..g.spatial {
                mean[c] += x[(n * g.channels + c) * g.spatial + i] as f64;
            }
        }
        mean[c] /= m;
        for n in 0..g.batch {
            for i in 0..g.spatial {
                var[c] += (x[(n * g.channels + c) * g.spatial + i] as f64 - mean[c]).powi(2);
            }
        }
        var[c] /= m;
    }
    let mut y = vec![0.0f32; x.len()];
    for n in 0..g.batch {
        for c in 0..g.channels {
            for i in 0..g.spatial {
                let idx = (n * g.channels + c) * g.spatial + i;
                let v = (x[idx] as f64 - mean[c]) / (var[c] + eps).sqrt() * gamma[c] as f64
                    + beta[c] as f64;
                y[idx] = if relu { v.max(0.0) } else { v } as f32;
            }
        }
    }
    (y, mean, var)
}
