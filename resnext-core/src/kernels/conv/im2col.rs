//! im2col + GEMM: any convolution (kernel, stride, padding, groups), one matrix product
//! per image and group on the unfolded input. What runs where no specialised kernel
//! suits: dense convolutions (the stem's backward, the downsampling 1×1 at stride 2) and
//! 1×1 convolutions on images too large for [`super::pointwise`].

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{Conv2dGeom, Dest};
use crate::kernels::assume_init;
use crate::kernels::gemm::{sgemm, sgemm_write, MatRef};

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

/// Forward, one GEMM per image and group on its im2col matrix (none for 1×1 stride-1
/// convolutions, whose input is that matrix), images spread over the rayon pool; each
/// image's output passed to `epilogue(image, 0, values)`. Writes every value of `y`
/// without reading it, so `y` may be new memory ([`crate::kernels::as_uninit`] views an
/// initialised buffer this way).
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [MaybeUninit<f32>],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
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
    if inner_parallel && g.groups == 1 {
        return forward_channels_split(g, x, w, y, epilogue);
    }
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
                sgemm_write(
                    opg,
                    ohw,
                    rows,
                    MatRef::row_major(&w[grp * opg * rows..(grp + 1) * opg * rows], rows),
                    MatRef::row_major(b, ohw),
                    &mut yn[grp * opg * ohw..(grp + 1) * opg * ohw],
                    ohw,
                    inner_parallel,
                );
            }
            // SAFETY: the groups' products wrote all `opg * ohw` values of each of the
            // `groups` slices, which tile `yn`.
            epilogue(n, 0, unsafe { assume_init(yn) });
        },
    );
}

/// [`conv2d_forward`] of a dense convolution with fewer images than threads: image by
/// image, its output channels split over the threads, each part one product (packing only
/// its own rows of weights) followed by the epilogue on that part, while it is in cache.
/// (One product over all channels, split inside `gemm`, leaves the epilogue of a whole
/// image to one thread: ResNeXt-50's batch-1 eval ran 6–9% slower that way.)
fn forward_channels_split(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [MaybeUninit<f32>],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let ohw = g.out_h() * g.out_w();
    let rows = g.in_channels * g.kernel * g.kernel;
    let in_img = g.in_channels * g.in_h * g.in_w;
    let out_img = g.out_channels * ohw;
    // (whole vectors of rows: 16)
    let per = g
        .out_channels
        .div_ceil(rayon::current_num_threads())
        .next_multiple_of(16);
    let mut col = if g.is_pointwise() {
        Vec::new()
    } else {
        vec![0.0f32; rows * ohw]
    };
    for (n, yn) in y.chunks_mut(out_img).enumerate() {
        let xn = &x[n * in_img..(n + 1) * in_img];
        let b = if g.is_pointwise() {
            xn
        } else {
            im2col(g, xn, &mut col);
            &col[..]
        };
        yn.par_chunks_mut(per * ohw)
            .enumerate()
            .for_each(|(part, yp)| {
                let (o0, count) = (part * per, yp.len() / ohw);
                sgemm_write(
                    count,
                    ohw,
                    rows,
                    MatRef::row_major(&w[o0 * rows..(o0 + count) * rows], rows),
                    MatRef::row_major(b, ohw),
                    yp,
                    ohw,
                    false,
                );
                // SAFETY: the product wrote all `count * ohw` values of `yp`.
                epilogue(n, o0, unsafe { assume_init(yp) });
            });
    }
}

/// Backward on im2col matrices, one GEMM per image and group for each gradient: puts the
/// input gradient into `dx` (when given; [`Dest::Write`] writes every value) and adds
/// the weight gradient into `dw`.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<Dest<'_>>,
    dw: &mut [f32],
) {
    g.check_backward_into(x, w, dy, dx.as_ref(), dw);
    let ohw = g.out_h() * g.out_w();
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let rows = ipg * g.kernel * g.kernel;
    let in_img = g.in_channels * g.in_h * g.in_w;
    let in_grp = ipg * g.in_h * g.in_w;
    let out_img = g.out_channels * ohw;
    if out_img == 0 || in_img == 0 {
        // nothing flows back: zeros where the input gradient is written
        if let Some(d) = dx {
            d.init();
        }
        return;
    }
    let direct = g.is_pointwise();
    let inner_parallel = g.batch < rayon::current_num_threads();
    let col_len = if direct { 0 } else { rows * ohw };
    let dx_chunks: Vec<Option<Dest<'_>>> = match dx {
        Some(dx) => dx.chunks(in_img).into_iter().map(Some).collect(),
        None => (0..g.batch).map(|_| None).collect(),
    };
    // Images are split into a fixed number of contiguous chunks (one per thread), each with
    // its own weight-gradient accumulator, summed in chunk order: the result does not depend
    // on work stealing, so training is reproducible for a given thread count.
    let wlen = w.len();
    let chunks = rayon::current_num_threads().clamp(1, g.batch.max(1));
    let per = g.batch.div_ceil(chunks).max(1);
    let mut jobs: Vec<Vec<(usize, Option<Dest<'_>>)>> = Vec::new();
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
                    if let Some(dxn) = dxn.as_mut() {
                        let (wt, dym) = (MatRef::transposed(wg, rows), MatRef::row_major(dyg, ohw));
                        // dcol = W_g^T · dY_g
                        match dxn.part(grp * in_grp..(grp + 1) * in_grp) {
                            Dest::Add(dxg) if direct => {
                                sgemm(rows, ohw, opg, wt, dym, dxg, ohw, true, inner_parallel)
                            }
                            Dest::Write(dxg) if direct => {
                                sgemm_write(rows, ohw, opg, wt, dym, dxg, ohw, inner_parallel)
                            }
                            dxg => {
                                sgemm(
                                    rows,
                                    ohw,
                                    opg,
                                    wt,
                                    dym,
                                    &mut dcol,
                                    ohw,
                                    false,
                                    inner_parallel,
                                );
                                col2im_add(g, &dcol, dxg.init());
                            }
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
