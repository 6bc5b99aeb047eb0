//! Batch normalisation over (N, H, W) per channel, NCHW layout, with PyTorch's semantics,
//! optionally fused with a following ReLU.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::{dispatch, Kernel, Simd};

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

/// Lanes of the vectorised loops.
const LANES: usize = 16;

fn channel_planes(g: &BnGeom, c: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    (0..g.batch).map(move |n| {
        let start = (n * g.channels + c) * g.spatial;
        start..start + g.spatial
    })
}

leveled! {
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
}

leveled! {
    /// `Σ ((v − hi) − lo)²`, squared and summed in `f64` lanes: the variance sets `1/σ`, and
    /// the input gradient of a channel with few values is very sensitive to it.
    fn sum_sq_dev(x: &[f32], hi: f32, lo: f32) -> f64 {
        let mut lanes = [0.0f64; 8];
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for ch in chunks {
            for (l, &v) in lanes.iter_mut().zip(ch) {
                let d = ((v - hi) - lo) as f64;
                *l += d * d;
            }
        }
        lanes.iter().sum::<f64>()
            + rest
                .iter()
                .map(|&v| (((v - hi) - lo) as f64).powi(2))
                .sum::<f64>()
    }
}

/// One plane's `(mean, Σ (v − mean)²)`: two passes over the plane (the second from cache),
/// `f32` lane sums for the mean, the squared deviations summed in `f64`.
pub fn plane_stats(v: &[f32]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let mean = sum_f32(v) as f64 / v.len() as f64;
    // the f64 mean as an f32 pair, so deviations of nearly equal values keep their bits
    let hi = mean as f32;
    let lo = (mean - hi as f64) as f32;
    (mean, sum_sq_dev(v, hi, lo))
}

/// Batch statistics from per-plane [`plane_stats`] (`planes[n * channels + c]`), combined
/// across the batch with Chan et al.'s pairwise update, which stays exact where
/// `E[x²] − E[x]²` would cancel.
pub fn stats_from_planes(g: &BnGeom, planes: &[(f64, f64)], eps: f64) -> BnStats {
    assert_eq!(
        planes.len(),
        g.batch * g.channels,
        "batch norm: plane count"
    );
    let hw = g.spatial as f64;
    let m = g.per_channel().max(1) as f64;
    let (mut mean, mut var, mut inv_std) = (
        Vec::with_capacity(g.channels),
        Vec::with_capacity(g.channels),
        Vec::with_capacity(g.channels),
    );
    for c in 0..g.channels {
        let mu = (0..g.batch)
            .map(|n| planes[n * g.channels + c].0)
            .sum::<f64>()
            * hw
            / m;
        let m2: f64 = (0..g.batch)
            .map(|n| {
                let (pm, pm2) = planes[n * g.channels + c];
                pm2 + hw * (pm - mu) * (pm - mu)
            })
            .sum();
        let v = m2 / m;
        mean.push(mu as f32);
        var.push(v as f32);
        inv_std.push((1.0 / (v + eps).sqrt()) as f32);
    }
    BnStats { mean, var, inv_std }
}

/// Batch mean and biased variance per channel: [`plane_stats`] of every plane, in
/// parallel, then [`stats_synced`].
pub fn batch_stats(g: &BnGeom, x: &[f32], eps: f64) -> BnStats {
    assert_eq!(x.len(), g.len(), "batch norm: input length");
    let planes: Vec<(f64, f64)> = if g.spatial == 0 {
        vec![(0.0, 0.0); g.batch * g.channels]
    } else {
        x.par_chunks(g.spatial).map(plane_stats).collect()
    };
    stats_synced(g, planes, eps)
}

/// [`stats_from_planes`] over the whole group's batch when batch norm is synchronised
/// ([`crate::dist`]): every process's planes are gathered in rank order, so the group
/// computes exactly the statistics one process would on the concatenated batch. The
/// local statistics otherwise.
pub fn stats_synced(g: &BnGeom, planes: Vec<(f64, f64)>, eps: f64) -> BnStats {
    let Some(comm) = crate::dist::bn_group() else {
        return stats_from_planes(g, &planes, eps);
    };
    let flat: Vec<f64> = planes.iter().flat_map(|&(m, m2)| [m, m2]).collect();
    let all = comm.all_gather_f64(&flat);
    let planes: Vec<(f64, f64)> = all.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    let global = BnGeom {
        batch: g.batch * comm.world(),
        ..*g
    };
    stats_from_planes(&global, &planes, eps)
}

/// How many processes' batches a training-mode batch norm spans: the group's size when
/// batch norm is synchronised, else 1.
fn sync_world() -> usize {
    crate::dist::bn_group().map_or(1, |c| c.world())
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
    let ch = Affine {
        center,
        scale,
        shift,
    };
    affine_into(g, x, ch, None, relu, super::as_uninit(y));
}

/// `y = max((x - center[c]) * scale[c] + shift[c] + r, 0)`: [`affine_forward`] with a
/// residual `r` added before the ReLU (the end of a bottleneck block). Overwrites `y`.
pub fn affine_add_relu_forward(
    g: &BnGeom,
    x: &[f32],
    center: &[f32],
    scale: &[f32],
    shift: &[f32],
    r: &[f32],
    y: &mut [f32],
) {
    let ch = Affine {
        center,
        scale,
        shift,
    };
    affine_into(g, x, ch, Some(r), true, super::as_uninit(y));
}

/// Per-channel constants of `(x - center) * scale + shift`.
#[derive(Clone, Copy, Debug)]
pub struct Affine<'a> {
    /// Subtracted first.
    pub center: &'a [f32],
    /// Then multiplied.
    pub scale: &'a [f32],
    /// Then added.
    pub shift: &'a [f32],
}

/// [`affine_forward`] (with a `residual` added before the ReLU, when given) into a new
/// buffer, written once instead of zero-filled first.
pub fn affine_forward_new(
    g: &BnGeom,
    x: &[f32],
    ch: Affine<'_>,
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    // SAFETY: `affine_into` writes every value (each plane of each image; the length is 0
    // when the planes are empty).
    unsafe { super::written(g.len(), |y| affine_into(g, x, ch, residual, relu, y)) }
}

/// Writes every value of `y`: `relu?((x - center) * scale + shift (+ residual))`.
fn affine_into(
    g: &BnGeom,
    x: &[f32],
    ch: Affine<'_>,
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [MaybeUninit<f32>],
) {
    assert_eq!(x.len(), g.len(), "batch norm: input length");
    assert_eq!(y.len(), g.len(), "batch norm: output length");
    if let Some(r) = residual {
        assert_eq!(r.len(), g.len(), "batch norm: residual length");
    }
    if g.spatial == 0 {
        return;
    }
    y.par_chunks_mut(g.spatial)
        .zip(x.par_chunks(g.spatial))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let c = plane % g.channels;
            let (m, a, b) = (ch.center[c], ch.scale[c], ch.shift[c]);
            match residual {
                Some(r) => {
                    let rp = &r[plane * g.spatial..][..g.spatial];
                    affine_add_plane(xp, m, a, b, rp, relu, yp)
                }
                None => affine_plane(xp, m, a, b, relu, yp),
            }
        });
}

leveled! {
    fn affine_plane(x: &[f32], m: f32, a: f32, b: f32, relu: bool, y: &mut [MaybeUninit<f32>]) {
        if relu {
            for (o, &v) in y.iter_mut().zip(x) {
                o.write(super::relu((v - m) * a + b));
            }
        } else {
            for (o, &v) in y.iter_mut().zip(x) {
                o.write((v - m) * a + b);
            }
        }
    }
}

leveled! {
    fn affine_add_plane(
        x: &[f32],
        m: f32,
        a: f32,
        b: f32,
        r: &[f32],
        relu: bool,
        y: &mut [MaybeUninit<f32>]
    ) {
        if relu {
            for ((o, &v), &u) in y.iter_mut().zip(x).zip(r) {
                o.write(super::relu((v - m) * a + b + u));
            }
        } else {
            for ((o, &v), &u) in y.iter_mut().zip(x).zip(r) {
                o.write((v - m) * a + b + u);
            }
        }
    }
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
    let m = (g.per_channel() * sync_world()) as f64;
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

/// What a batch norm's backward pass needs from its forward, per channel: γ, β, the mean
/// and `1 / sqrt(var + eps)` it normalised with, and whether a ReLU followed.
#[derive(Clone, Copy, Debug)]
pub struct BnChannels<'a> {
    /// Scale γ.
    pub gamma: &'a [f32],
    /// Shift β.
    pub beta: &'a [f32],
    /// Mean subtracted (batch or running).
    pub mean: &'a [f32],
    /// `1 / sqrt(var + eps)` (batch or running variance).
    pub inv_std: &'a [f32],
    /// Whether the output went through a fused ReLU.
    pub relu: bool,
}

impl BnChannels<'_> {
    fn plane(&self, c: usize) -> PlaneBn {
        PlaneBn {
            mu: self.mean[c],
            is: self.inv_std[c],
            ga: self.gamma[c],
            be: self.beta[c],
            relu: self.relu,
        }
    }
}

/// Backward of `y = relu?(x * scale + shift)` where `xhat = (x - mean) * inv_std` is the
/// normalised input and `scale = gamma * inv_std`.
///
/// `train` selects whether `mean`/`inv_std` are batch statistics (their dependence on `x`
/// is differentiated through) or constants (eval mode). Adds into `dx`, `dgamma`, `dbeta`.
pub fn bn_backward(
    g: &BnGeom,
    x: &[f32],
    ch: &BnChannels<'_>,
    train: bool,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert_eq!(x.len(), g.len(), "batch norm backward: input length");
    assert_eq!(dy.len(), g.len(), "batch norm backward: gradient length");
    let sums = grad_sums(g, x, ch, dy, dgamma, dbeta, train);
    let Some(dx) = dx else { return };
    if g.spatial == 0 {
        return;
    }
    assert_eq!(
        dx.len(),
        g.len(),
        "batch norm backward: input-gradient length"
    );
    // batch statistics over the whole group's batch when batch norm is synchronised
    let m = (g.per_channel() * sync_world()) as f64;
    input_grad_planes(g, x, ch, train.then_some((&sums[..], m)), Some(dy), dx);
}

/// Per channel `(Σ d, Σ d · xhat)`, `d` the output gradient masked by the fused ReLU;
/// adds them into `dbeta` and `dgamma`, which they are. With `sync` and synchronised batch
/// norm, the returned sums are the whole group's (`dbeta`/`dgamma` keep this process's:
/// they are averaged with the other gradients).
fn grad_sums(
    g: &BnGeom,
    x: &[f32],
    ch: &BnChannels<'_>,
    dy: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    sync: bool,
) -> Vec<(f64, f64)> {
    // The ReLU mask is recomputed from x: y > 0 exactly when xhat * gamma + beta > 0.
    // Per-plane constants are hoisted and the loops run on fixed-width lanes so they
    // vectorise (the ReLU test becomes a select).
    let sums: Vec<(f64, f64)> = (0..g.channels)
        .into_par_iter()
        .map(|c| channel_grad_sums(&ch.plane(c), g, c, x, dy))
        .collect();
    for (c, &(sg, sgx)) in sums.iter().enumerate() {
        dbeta[c] += sg as f32;
        dgamma[c] += sgx as f32;
    }
    match crate::dist::bn_group().filter(|_| sync) {
        Some(comm) => {
            let mut flat: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
            comm.all_reduce_f64(&mut flat);
            flat.chunks_exact(2).map(|p| (p[0], p[1])).collect()
        }
        None => sums,
    }
}

/// Training-mode [`bn_backward`] that turns the output gradient `d` into the input
/// gradient in place (instead of adding it into a separate buffer): for a fused
/// convolution + batch norm whose input gradient feeds the convolution's backward pass
/// directly. Adds into `dgamma` and `dbeta`.
pub fn bn_backward_in_place(
    g: &BnGeom,
    x: &[f32],
    ch: &BnChannels<'_>,
    d: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert_eq!(x.len(), g.len(), "batch norm backward: input length");
    assert_eq!(d.len(), g.len(), "batch norm backward: gradient length");
    let m = (g.per_channel() * sync_world()) as f64;
    let sums = grad_sums(g, x, ch, d, dgamma, dbeta, true);
    input_grad_planes(g, x, ch, Some((&sums, m)), None, d);
}

/// The input gradient plane by plane ([`PlaneInputGrad`]): from the channels'
/// `(Σ d, Σ d · xhat)` over `m` values in training, `None` in eval mode (the statistics
/// are constants there); added into `out` from `dy`, or, without `dy`, written over `out`
/// from its own values.
fn input_grad_planes(
    g: &BnGeom,
    x: &[f32],
    ch: &BnChannels<'_>,
    sums: Option<(&[(f64, f64)], f64)>,
    dy: Option<&[f32]>,
    out: &mut [f32],
) {
    if g.spatial == 0 {
        return;
    }
    out.par_chunks_mut(g.spatial)
        .zip(x.par_chunks(g.spatial))
        .enumerate()
        .for_each(|(plane, (op, xp))| {
            let c = plane % g.channels;
            // train: k (d − mean(d) − xhat · mean(d · xhat)); eval: k d
            let (mg, mgx) = sums.map_or((0.0, 0.0), |(s, m)| {
                ((s[c].0 / m) as f32, (s[c].1 / m) as f32)
            });
            let k = PlaneInputGrad {
                p: &ch.plane(c),
                mg,
                mgx,
                x: xp,
                dy: dy.map(|d| &d[plane * g.spatial..][..g.spatial]),
                out: op,
            };
            // SAFETY: the kernel checks its slices' lengths.
            unsafe { dispatch(k) }
        });
}

/// A batch norm's input gradient over one plane, `k · (relu_mask(d) − mg − xhat · mgx)`
/// with `k = gamma · inv_std` and `xhat = (x − mean) · inv_std`: added into `out` with
/// `d = dy`, or, without `dy`, written over `out` with `d` its old value.
struct PlaneInputGrad<'a> {
    p: &'a PlaneBn,
    mg: f32,
    mgx: f32,
    x: &'a [f32],
    dy: Option<&'a [f32]>,
    out: &'a mut [f32],
}

impl Kernel for PlaneInputGrad<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let PlaneInputGrad {
            p,
            mg,
            mgx,
            x,
            dy,
            out,
        } = self;
        let n = x.len();
        assert_eq!(out.len(), n, "batch norm backward: plane length");
        if let Some(dy) = dy {
            assert_eq!(dy.len(), n, "batch norm backward: plane length");
        }
        let whole = n - n % S::LANES;
        // SAFETY: every vector lies in `0..whole`, inside the three slices (asserted).
        unsafe {
            let c = PlaneVectors::<S> {
                mu: S::splat(p.mu),
                is: S::splat(p.is),
                ga: S::splat(p.ga),
                be: S::splat(p.be),
                k: S::splat(p.ga * p.is),
                mg: S::splat(mg),
                neg_mgx: S::splat(-mgx),
                relu: p.relu,
            };
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
            let mut i = 0;
            while i < whole {
                let xv = S::load(xp.add(i));
                let v = match dy {
                    Some(dy) => S::add(
                        S::load(op.add(i)),
                        c.input_grad(xv, S::load(dy.as_ptr().add(i))),
                    ),
                    None => c.input_grad(xv, S::load(op.add(i))),
                };
                S::store(op.add(i), v);
                i += S::LANES;
            }
        }
        // the tail, shorter than a vector (AVX2's masked store is slow on AMD CPUs)
        let k = p.ga * p.is;
        let f = |xv: f32, d: f32| {
            let xhat = (xv - p.mu) * p.is;
            k * (relu_mask(p, xhat, d) - mg - xhat * mgx)
        };
        for j in whole..n {
            out[j] = match dy {
                Some(dy) => out[j] + f(x[j], dy[j]),
                None => f(x[j], out[j]),
            };
        }
    }
}

/// [`PlaneInputGrad`]'s constants as vectors.
struct PlaneVectors<S: Simd> {
    mu: S::V,
    is: S::V,
    ga: S::V,
    be: S::V,
    k: S::V,
    mg: S::V,
    neg_mgx: S::V,
    relu: bool,
}

impl<S: Simd> PlaneVectors<S> {
    /// `k · (relu_mask(d) − mg − xhat · mgx)` for one vector.
    #[inline(always)]
    unsafe fn input_grad(&self, x: S::V, d: S::V) -> S::V {
        // SAFETY: run inside `dispatch` at level `S` (the caller's contract).
        unsafe {
            let xhat = S::mul(S::sub(x, self.mu), self.is);
            let d = if self.relu {
                S::keep_positive(S::fma(xhat, self.ga, self.be), d)
            } else {
                d
            };
            S::mul(self.k, S::fma(xhat, self.neg_mgx, S::sub(d, self.mg)))
        }
    }
}

/// One plane's batch-norm constants.
struct PlaneBn {
    mu: f32,
    is: f32,
    ga: f32,
    be: f32,
    relu: bool,
}

/// `d` masked by the ReLU that followed the batch norm (`y > 0` exactly when
/// `xhat · gamma + beta > 0`). A select, so the loops around it vectorise.
#[inline(always)]
fn relu_mask(p: &PlaneBn, xhat: f32, d: f32) -> f32 {
    let keep = !p.relu | (xhat * p.ga + p.be > 0.0);
    if keep {
        d
    } else {
        0.0
    }
}

leveled! {
    /// `(Σ d, Σ d · xhat)` over channel `c`'s planes, `d` the ReLU-masked output gradient,
    /// accumulated in `f64` lanes (summed across lanes once per channel): the input
    /// gradient subtracts these means from `d`, where their rounding error would be
    /// amplified.
    fn channel_grad_sums(p: &PlaneBn, g: &BnGeom, c: usize, x: &[f32], dy: &[f32]) -> (f64, f64) {
        let (mut pg, mut pgx) = ([0.0f64; LANES], [0.0f64; LANES]);
        for r in channel_planes(g, c) {
            let (x, dy) = (&x[r.clone()], &dy[r]);
            let (xc, dc) = (x.chunks_exact(LANES), dy.chunks_exact(LANES));
            let (xr, dr) = (xc.remainder(), dc.remainder());
            for (xs, ds) in xc.zip(dc) {
                for k in 0..LANES {
                    let xhat = (xs[k] - p.mu) * p.is;
                    let d = relu_mask(p, xhat, ds[k]);
                    pg[k] += d as f64;
                    pgx[k] += d as f64 * xhat as f64;
                }
            }
            for (k, (&xv, &dv)) in xr.iter().zip(dr).enumerate() {
                let xhat = (xv - p.mu) * p.is;
                let d = relu_mask(p, xhat, dv);
                pg[k] += d as f64;
                pgx[k] += d as f64 * xhat as f64;
            }
        }
        (pg.iter().sum(), pgx.iter().sum())
    }
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
                y[idx] = if relu && v < 0.0 { 0.0 } else { v } as f32;
            }
        }
    }
    (y, mean, var)
}
