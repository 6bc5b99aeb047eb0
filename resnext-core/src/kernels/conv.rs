//! 2-D convolution (cross-correlation, as PyTorch defines it) with stride, zero padding and
//! groups, NCHW layout, weights `(out, in / groups, k, k)`.

use rayon::prelude::*;

pub use super::direct;
use super::gemm::{sgemm, MatRef};
pub use super::lanes;
pub use super::winograd;

/// The geometry of one convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    /// Batch size N.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Number of groups; divides both channel counts.
    pub groups: usize,
}

impl Conv2dGeom {
    /// Checks that the geometry describes a valid convolution, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel == 0 || self.stride == 0 || self.groups == 0 {
            return Err(format!(
                "kernel ({}), stride ({}) and groups ({}) must be positive",
                self.kernel, self.stride, self.groups
            ));
        }
        if !self.in_channels.is_multiple_of(self.groups)
            || !self.out_channels.is_multiple_of(self.groups)
        {
            return Err(format!(
                "groups {} must divide in_channels {} and out_channels {}",
                self.groups, self.in_channels, self.out_channels
            ));
        }
        if self.in_h + 2 * self.padding < self.kernel || self.in_w + 2 * self.padding < self.kernel
        {
            return Err(format!(
                "input {}x{} with padding {} is smaller than the {}x{} kernel",
                self.in_h, self.in_w, self.padding, self.kernel, self.kernel
            ));
        }
        Ok(())
    }
    /// Output height.
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Output width.
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Input channels per group.
    pub fn in_per_group(&self) -> usize {
        self.in_channels / self.groups
    }
    /// Output channels per group.
    pub fn out_per_group(&self) -> usize {
        self.out_channels / self.groups
    }
    /// Number of input elements.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_h * self.in_w
    }
    /// Number of output elements.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_h() * self.out_w()
    }
    /// Number of weight elements.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_per_group() * self.kernel * self.kernel
    }
    /// Multiply-accumulates of one forward pass.
    pub fn macs(&self) -> usize {
        self.output_len() * self.in_per_group() * self.kernel * self.kernel
    }
    /// Panics naming the buffer whose length does not fit a forward pass.
    pub fn check_forward(&self, x: &[f32], w: &[f32], y: &[f32]) {
        assert_eq!(x.len(), self.input_len(), "conv2d: input length");
        assert_eq!(w.len(), self.weight_len(), "conv2d: weight length");
        assert_eq!(y.len(), self.output_len(), "conv2d: output length");
    }
    /// Panics naming the buffer whose length does not fit a backward pass.
    pub fn check_backward(&self, x: &[f32], w: &[f32], dy: &[f32], dx: Option<&[f32]>, dw: &[f32]) {
        assert_eq!(x.len(), self.input_len(), "conv2d backward: input length");
        assert_eq!(w.len(), self.weight_len(), "conv2d backward: weight length");
        assert_eq!(
            dy.len(),
            self.output_len(),
            "conv2d backward: output-gradient length"
        );
        assert_eq!(
            dw.len(),
            self.weight_len(),
            "conv2d backward: weight-gradient length"
        );
        if let Some(dx) = dx {
            assert_eq!(
                dx.len(),
                self.input_len(),
                "conv2d backward: input-gradient length"
            );
        }
    }
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Reference forward: plain loops with `f64` accumulation.
pub fn conv2d_forward_ref(g: &Conv2dGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    for n in 0..g.batch {
        for oc in 0..g.out_channels {
            let grp = oc / opg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0f64;
                    for icg in 0..ipg {
                        let ic = grp * ipg + icg;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.in_h as isize
                                    || ix >= g.in_w as isize
                                {
                                    continue;
                                }
                                let xv = x[((n * g.in_channels + ic) * g.in_h + iy as usize)
                                    * g.in_w
                                    + ix as usize];
                                let wv = w[((oc * ipg + icg) * k + ky) * k + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((n * g.out_channels + oc) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
}

/// Reference backward: overwrites `dx` (input gradient) and `dw` (weight gradient).
pub fn conv2d_backward_ref(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let mut dx64 = vec![0.0f64; dx.len()];
    let mut dw64 = vec![0.0f64; dw.len()];
    for n in 0..g.batch {
        for oc in 0..g.out_channels {
            let grp = oc / opg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let d = dy[((n * g.out_channels + oc) * oh + oy) * ow + ox] as f64;
                    for icg in 0..ipg {
                        let ic = grp * ipg + icg;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.in_h as isize
                                    || ix >= g.in_w as isize
                                {
                                    continue;
                                }
                                let xi = ((n * g.in_channels + ic) * g.in_h + iy as usize) * g.in_w
                                    + ix as usize;
                                let wi = ((oc * ipg + icg) * k + ky) * k + kx;
                                dx64[xi] += d * w[wi] as f64;
                                dw64[wi] += d * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    for (o, v) in dx.iter_mut().zip(dx64) {
        *o = v as f32;
    }
    for (o, v) in dw.iter_mut().zip(dw64) {
        *o = v as f32;
    }
}

/// The range of output columns `ox` whose input column `ox * s + kx - p` lies inside `0..len`.
fn valid_range(out_len: usize, len: usize, s: usize, kx: usize, p: usize) -> (usize, usize) {
    // ox * s + kx >= p  and  ox * s + kx < p + len
    let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) };
    let hi = if p + len > kx {
        ((p + len - kx).div_ceil(s)).min(out_len)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Unfolds one group of one image (`ipg × h × w`) into `col` (`ipg·k·k × oh·ow`).
fn im2col(g: &Conv2dGeom, x: &[f32], col: &mut [f32]) {
    let (oh, ow, k, s, p) = (g.out_h(), g.out_w(), g.kernel, g.stride, g.padding);
    let (h, w) = (g.in_h, g.in_w);
    let ohw = oh * ow;
    for c in 0..g.in_per_group() {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            let (ylo, yhi) = valid_range(oh, h, s, ky, p);
            for kx in 0..k {
                let (xlo, xhi) = valid_range(ow, w, s, kx, p);
                let row = &mut col[((c * k + ky) * k + kx) * ohw..][..ohw];
                row[..ylo * ow].fill(0.0);
                row[yhi * ow..].fill(0.0);
                for oy in ylo..yhi {
                    let iy = oy * s + ky - p;
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    dst[..xlo].fill(0.0);
                    dst[xhi..].fill(0.0);
                    let src = &plane[iy * w..(iy + 1) * w];
                    if xlo >= xhi {
                        continue;
                    }
                    if s == 1 {
                        let ix0 = xlo + kx - p;
                        dst[xlo..xhi].copy_from_slice(&src[ix0..ix0 + (xhi - xlo)]);
                    } else {
                        for ox in xlo..xhi {
                            dst[ox] = src[ox * s + kx - p];
                        }
                    }
                }
            }
        }
    }
}

/// Folds `col` back onto one group of one image, adding into `dx`.
fn col2im_add(g: &Conv2dGeom, col: &[f32], dx: &mut [f32]) {
    let (oh, ow, k, s, p) = (g.out_h(), g.out_w(), g.kernel, g.stride, g.padding);
    let (h, w) = (g.in_h, g.in_w);
    let ohw = oh * ow;
    for c in 0..g.in_per_group() {
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            let (ylo, yhi) = valid_range(oh, h, s, ky, p);
            for kx in 0..k {
                let (xlo, xhi) = valid_range(ow, w, s, kx, p);
                let row = &col[((c * k + ky) * k + kx) * ohw..][..ohw];
                for oy in ylo..yhi {
                    let iy = oy * s + ky - p;
                    let src = &row[oy * ow..(oy + 1) * ow];
                    let dst = &mut plane[iy * w..(iy + 1) * w];
                    if xlo >= xhi {
                        continue;
                    }
                    if s == 1 {
                        let ix0 = xlo + kx - p;
                        for (d, v) in dst[ix0..ix0 + (xhi - xlo)].iter_mut().zip(&src[xlo..xhi]) {
                            *d += v;
                        }
                    } else {
                        for ox in xlo..xhi {
                            dst[ox * s + kx - p] += src[ox];
                        }
                    }
                }
            }
        }
    }
}

/// Fast forward: grouped convolutions with few channels per group go to the direct kernel
/// ([`direct`]); others to im2col (skipped for 1×1 stride-1 convolutions) and one GEMM per
/// group and image, images spread over the rayon pool. Overwrites `y`.
pub fn conv2d_forward(g: &Conv2dGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    conv2d_forward_with(g, x, w, y, |_, _, _| {});
}

/// [`conv2d_forward`] that also returns every output plane's
/// [`plane_stats`](super::batchnorm::plane_stats) (index `n * out_channels + c`),
/// computed while the image's output is still in cache: the batch statistics of a
/// following training-mode batch norm without two more passes over memory.
pub fn conv2d_forward_plane_stats(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) -> Vec<(f64, f64)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let ohw = g.out_h() * g.out_w();
    let cells: Vec<(AtomicU64, AtomicU64)> = (0..g.batch * g.out_channels)
        .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
        .collect();
    if ohw > 0 {
        conv2d_forward_with(g, x, w, y, |n, c0, yn| {
            for (c, plane) in yn.chunks(ohw).enumerate() {
                let (mean, m2) = super::batchnorm::plane_stats(plane);
                let cell = &cells[n * g.out_channels + c0 + c];
                cell.0.store(mean.to_bits(), Ordering::Relaxed);
                cell.1.store(m2.to_bits(), Ordering::Relaxed);
            }
        });
    } else {
        conv2d_forward(g, x, w, y);
    }
    cells
        .into_iter()
        .map(|(a, b)| {
            (
                f64::from_bits(a.into_inner()),
                f64::from_bits(b.into_inner()),
            )
        })
        .collect()
}

/// Convolution weights prepared once for repeated forward passes (inference): the plain
/// `(out, in / groups, k, k)` values and, for convolutions that take the direct grouped
/// kernel, their packed form.
#[derive(Clone, Debug)]
pub struct PreparedWeights {
    w: Vec<f32>,
    packed: Option<direct::ForwardWeights>,
}

impl PreparedWeights {
    /// Prepares `w` for convolutions with `g`'s channel counts, kernel and groups.
    pub fn new(g: &Conv2dGeom, w: Vec<f32>) -> Self {
        let packed = direct::suits_forward(g).then(|| direct::pack_forward_weights(g, &w));
        Self { w, packed }
    }
}

/// Forward fused with a per-channel epilogue, applied to each image's output while it is
/// still in cache: `y = relu?(y · scale[c] + shift[c] (+ residual))` (`scale` all ones when
/// `None`). With `scale`/`shift` from a batch norm's eval-mode statistics this is
/// convolution + batch norm (+ residual add) + ReLU in one pass.
pub fn conv2d_forward_fused(
    g: &Conv2dGeom,
    x: &[f32],
    w: &PreparedWeights,
    scale: Option<&[f32]>,
    shift: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let ohw = g.out_h() * g.out_w();
    let out_img = g.out_channels * ohw;
    assert_eq!(shift.len(), g.out_channels, "conv2d fused: shift length");
    if let Some(s) = scale {
        assert_eq!(s.len(), g.out_channels, "conv2d fused: scale length");
    }
    if let Some(r) = residual {
        assert_eq!(r.len(), g.output_len(), "conv2d fused: residual length");
    }
    let epilogue = |n: usize, c0: usize, yn: &mut [f32]| {
        let res = residual.map(|r| &r[n * out_img + c0 * ohw..][..yn.len()]);
        for (c, plane) in yn.chunks_mut(ohw.max(1)).enumerate() {
            let (a, b) = (scale.map_or(1.0, |s| s[c0 + c]), shift[c0 + c]);
            match (res, relu) {
                (Some(r), true) => plane
                    .iter_mut()
                    .zip(&r[c * ohw..(c + 1) * ohw])
                    .for_each(|(v, &r)| *v = super::relu(*v * a + b + r)),
                (Some(r), false) => plane
                    .iter_mut()
                    .zip(&r[c * ohw..(c + 1) * ohw])
                    .for_each(|(v, &r)| *v = *v * a + b + r),
                (None, true) => plane.iter_mut().for_each(|v| *v = super::relu(*v * a + b)),
                (None, false) => plane.iter_mut().for_each(|v| *v = *v * a + b),
            }
        }
    };
    match &w.packed {
        Some(p) if direct::suits_forward(g) => direct::conv2d_forward_packed(g, x, p, y, epilogue),
        _ => conv2d_forward_with(g, x, &w.w, y, epilogue),
    }
}

/// Whether a 1×1 convolution runs as one matrix product over the whole batch (channels ×
/// batch·pixels) instead of one per image: for small images, where per-image products are
/// too thin (ResNeXt-50's stage 4 at 7×7, the CIFAR networks' last stage at 8×8) and the weight gradient would be
/// re-read and re-written once per image.
fn batches_pointwise(g: &Conv2dGeom) -> bool {
    g.is_pointwise() && g.groups == 1 && g.batch > 1 && g.in_h * g.in_w <= 64
}

/// `[n][c][hw]` → `[c][n·hw]`.
fn to_channel_major(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut out = super::elementwise::zeroed(x.len());
    out.par_chunks_mut((n * hw).max(1))
        .enumerate()
        .for_each(|(ch, row)| {
            for (i, dst) in row.chunks_exact_mut(hw.max(1)).enumerate() {
                dst.copy_from_slice(&x[(i * c + ch) * hw..][..hw]);
            }
        });
    out
}

/// `[c][n·hw]` → `[n][c][hw]`, added into `y` when `add`, else written.
fn from_channel_major(t: &[f32], n: usize, c: usize, hw: usize, y: &mut [f32], add: bool) {
    y.par_chunks_mut((c * hw).max(1))
        .enumerate()
        .for_each(|(i, yn)| {
            for (ch, dst) in yn.chunks_exact_mut(hw.max(1)).enumerate() {
                let src = &t[(ch * n + i) * hw..][..hw];
                if add {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        });
}

fn pointwise_forward_batched(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    g.check_forward(x, w, y);
    let (n, hw) = (g.batch, g.in_h * g.in_w);
    let (ci, co) = (g.in_channels, g.out_channels);
    let xt = to_channel_major(x, n, ci, hw);
    let mut yt = vec![0.0f32; co * n * hw];
    sgemm(
        co,
        n * hw,
        ci,
        MatRef::row_major(w, ci),
        MatRef::row_major(&xt, n * hw),
        &mut yt,
        n * hw,
        false,
        true,
    );
    drop(xt);
    from_channel_major(&yt, n, co, hw, y, false);
    y.par_chunks_mut((co * hw).max(1))
        .enumerate()
        .for_each(|(i, yn)| epilogue(i, 0, yn));
}

fn pointwise_backward_batched(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
    g.check_backward(x, w, dy, dx.as_deref(), dw);
    let (n, hw) = (g.batch, g.in_h * g.in_w);
    let (ci, co) = (g.in_channels, g.out_channels);
    let dyt = to_channel_major(dy, n, co, hw);
    {
        // dW += dYᵗ · Xᵗᵀ over all images at once
        let xt = to_channel_major(x, n, ci, hw);
        sgemm(
            co,
            ci,
            n * hw,
            MatRef::row_major(&dyt, n * hw),
            MatRef::transposed(&xt, n * hw),
            dw,
            ci,
            true,
            true,
        );
    }
    if let Some(dx) = dx {
        let mut dxt = super::elementwise::zeroed(ci * n * hw);
        sgemm(
            ci,
            n * hw,
            co,
            MatRef::transposed(w, ci),
            MatRef::row_major(&dyt, n * hw),
            &mut dxt,
            n * hw,
            false,
            true,
        );
        from_channel_major(&dxt, n, ci, hw, dx, true);
    }
}

fn conv2d_forward_with(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if direct::suits_forward(g) {
        return direct::conv2d_forward(g, x, w, y, epilogue);
    }
    if batches_pointwise(g) {
        return pointwise_forward_batched(g, x, w, y, epilogue);
    }
    g.check_forward(x, w, y);
    let ohw = g.out_h() * g.out_w();
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let rows = ipg * g.kernel * g.kernel;
    let in_img = g.in_channels * g.in_h * g.in_w;
    let in_grp = ipg * g.in_h * g.in_w;
    let out_img = g.out_channels * ohw;
    if out_img == 0 {
        return;
    }
    let direct = g.is_pointwise();
    let inner_parallel = g.batch < rayon::current_num_threads();
    let col_len = if direct { 0 } else { rows * ohw };
    y.par_chunks_mut(out_img).enumerate().for_each_init(
        || vec![0.0f32; col_len],
        |col, (n, yn)| {
            let xn = &x[n * in_img..(n + 1) * in_img];
            for grp in 0..g.groups {
                let xg = &xn[grp * in_grp..(grp + 1) * in_grp];
                let b = if direct {
                    xg
                } else {
                    im2col(g, xg, col);
                    &col[..]
                };
                sgemm(
                    opg,
                    ohw,
                    rows,
                    MatRef::row_major(&w[grp * opg * rows..(grp + 1) * opg * rows], rows),
                    MatRef::row_major(b, ohw),
                    &mut yn[grp * opg * ohw..(grp + 1) * opg * ohw],
                    ohw,
                    false,
                    inner_parallel,
                );
            }
            epilogue(n, 0, yn);
        },
    );
}

/// Fast backward. Adds the input gradient into `dx` (when given) and the weight gradient
/// into `dw`.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
    if direct::suits(g) {
        return direct::conv2d_backward(g, x, w, dy, dx, dw);
    }
    if batches_pointwise(g) {
        return pointwise_backward_batched(g, x, w, dy, dx, dw);
    }
    g.check_backward(x, w, dy, dx.as_deref(), dw);
    let ohw = g.out_h() * g.out_w();
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let rows = ipg * g.kernel * g.kernel;
    let in_img = g.in_channels * g.in_h * g.in_w;
    let in_grp = ipg * g.in_h * g.in_w;
    let out_img = g.out_channels * ohw;
    if out_img == 0 || in_img == 0 {
        return;
    }
    let direct = g.is_pointwise();
    let inner_parallel = g.batch < rayon::current_num_threads();
    let col_len = if direct { 0 } else { rows * ohw };
    let dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => dx.chunks_mut(in_img).map(Some).collect(),
        None => (0..g.batch).map(|_| None).collect(),
    };
    // Images are split into a fixed number of contiguous chunks (one per thread), each with
    // its own weight-gradient accumulator, summed in chunk order: the result does not depend
    // on work stealing, so training is reproducible for a given thread count.
    let wlen = w.len();
    let chunks = rayon::current_num_threads().clamp(1, g.batch.max(1));
    let per = g.batch.div_ceil(chunks).max(1);
    let mut jobs: Vec<Vec<(usize, Option<&mut [f32]>)>> = Vec::new();
    for (n, dxn) in dx_chunks.into_iter().enumerate() {
        if n % per == 0 {
            jobs.push(Vec::new());
        }
        jobs.last_mut().expect("pushed").push((n, dxn));
    }
    let partials: Vec<Vec<f32>> = jobs
        .into_par_iter()
        .map(|job| {
            let (mut dw_acc, mut col, mut dcol) = (
                vec![0.0f32; wlen],
                vec![0.0f32; col_len],
                vec![0.0f32; col_len],
            );
            for (n, mut dxn) in job {
                let xn = &x[n * in_img..(n + 1) * in_img];
                let dyn_ = &dy[n * out_img..(n + 1) * out_img];
                for grp in 0..g.groups {
                    let xg = &xn[grp * in_grp..(grp + 1) * in_grp];
                    let dyg = &dyn_[grp * opg * ohw..(grp + 1) * opg * ohw];
                    let wg = &w[grp * opg * rows..(grp + 1) * opg * rows];
                    let b = if direct {
                        xg
                    } else {
                        im2col(g, xg, &mut col);
                        &col[..]
                    };
                    // dW_g += dY_g · col^T
                    sgemm(
                        opg,
                        rows,
                        ohw,
                        MatRef::row_major(dyg, ohw),
                        MatRef::transposed(b, ohw),
                        &mut dw_acc[grp * opg * rows..(grp + 1) * opg * rows],
                        rows,
                        true,
                        inner_parallel,
                    );
                    if let Some(dxn) = dxn.as_deref_mut() {
                        let dxg = &mut dxn[grp * in_grp..(grp + 1) * in_grp];
                        // dcol = W_g^T · dY_g
                        if direct {
                            sgemm(
                                rows,
                                ohw,
                                opg,
                                MatRef::transposed(wg, rows),
                                MatRef::row_major(dyg, ohw),
                                dxg,
                                ohw,
                                true,
                                inner_parallel,
                            );
                        } else {
                            sgemm(
                                rows,
                                ohw,
                                opg,
                                MatRef::transposed(wg, rows),
                                MatRef::row_major(dyg, ohw),
                                &mut dcol,
                                ohw,
                                false,
                                inner_parallel,
                            );
                            col2im_add(g, &dcol, dxg);
                        }
                    }
                }
            }
            dw_acc
        })
        .collect();
    let partial = partials.into_iter().reduce(|mut a, b| {
        for (x, y) in a.iter_mut().zip(&b) {
            *x += y;
        }
        a
    });
    if let Some(p) = partial {
        for (d, v) in dw.iter_mut().zip(&p) {
            *d += v;
        }
    }
}
