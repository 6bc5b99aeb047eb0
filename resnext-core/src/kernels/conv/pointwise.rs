//! 1×1 stride-1 convolutions on small images (7×7, 8×8) as one matrix product over the
//! whole batch (channels × batch·pixels): per-image products would be too thin, and the
//! weight gradient would be re-read and re-written once per image.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{write, Conv2dGeom, Dest};
use crate::kernels::gemm::{sgemm, sgemm_new, MatRef};
use crate::kernels::{assume_init, written};

/// Whether `g` runs here: a dense 1×1 stride-1 convolution of at most 64 pixels per image
/// (ResNeXt-50's stage 4 at 7×7, the CIFAR networks' last stage at 8×8), batch above 1.
pub fn suits(g: &Conv2dGeom) -> bool {
    g.is_pointwise() && g.groups == 1 && g.batch > 1 && g.in_h * g.in_w <= 64
}

/// `[n][c][hw]` → `[c][n·hw]`.
fn to_channel_major(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    // SAFETY: the rows (`c` of `n·hw` values) tile the buffer and each row's `n` image
    // slices of `hw` values tile the row; every slice is written.
    unsafe {
        written(x.len(), |out| {
            out.par_chunks_mut((n * hw).max(1))
                .enumerate()
                .for_each(|(ch, row)| {
                    for (i, dst) in row.chunks_exact_mut(hw.max(1)).enumerate() {
                        write(dst, &x[(i * c + ch) * hw..][..hw]);
                    }
                })
        })
    }
}

/// `[c][n·hw]` → `[n][c][hw]`, added into `y` or written.
fn from_channel_major(t: &[f32], n: usize, c: usize, hw: usize, y: Dest<'_>) {
    let per_image = (c * hw).max(1);
    y.chunks(per_image)
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut yn)| {
            for ch in 0..c {
                let src = &t[(ch * n + i) * hw..][..hw];
                yn.part(ch * hw..(ch + 1) * hw).put(src);
            }
        });
}

/// Forward as one product `W · X` over the batch (`X` channel-major), each image's output
/// passed to `epilogue(image, 0, values)`. Writes every value of `y` without reading it.
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [MaybeUninit<f32>],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    g.check_forward(x, w, y);
    let (n, hw) = (g.batch, g.in_h * g.in_w);
    let (ci, co) = (g.in_channels, g.out_channels);
    let xt = to_channel_major(x, n, ci, hw);
    let (w, xm) = (MatRef::row_major(w, ci), MatRef::row_major(&xt, n * hw));
    let yt = sgemm_new(co, n * hw, ci, w, xm, true);
    drop(xt);
    y.par_chunks_mut((co * hw).max(1))
        .enumerate()
        .for_each(|(i, yn)| {
            for (ch, dst) in yn.chunks_exact_mut(hw.max(1)).enumerate() {
                write(dst, &yt[(ch * n + i) * hw..][..hw]);
            }
            // SAFETY: the image's `co` planes of `hw` values tile `yn` and were all
            // written just above.
            epilogue(i, 0, unsafe { assume_init(yn) });
        });
}

/// Backward as two products over the batch: puts the input gradient into `dx` (when
/// given; [`Dest::Write`] writes every value) and adds the weight gradient into `dw`.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<Dest<'_>>,
    dw: &mut [f32],
) {
    g.check_backward_into(x, w, dy, dx.as_ref(), dw);
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
        let (wt, dym) = (MatRef::transposed(w, ci), MatRef::row_major(&dyt, n * hw));
        let dxt = sgemm_new(ci, n * hw, co, wt, dym, true);
        from_channel_major(&dxt, n, ci, hw, dx);
    }
}
