//! 1×1 stride-1 convolutions on small images (7×7, 8×8) as one matrix product over the
//! whole batch (channels × batch·pixels): per-image products would be too thin, and the
//! weight gradient would be re-read and re-written once per image.

use rayon::prelude::*;

use super::Conv2dGeom;
use crate::kernels::gemm::{sgemm, MatRef};

/// Whether `g` runs here: a dense 1×1 stride-1 convolution of at most 64 pixels per image
/// (ResNeXt-50's stage 4 at 7×7, the CIFAR networks' last stage at 8×8), batch above 1.
pub fn suits(g: &Conv2dGeom) -> bool {
    g.is_pointwise() && g.groups == 1 && g.batch > 1 && g.in_h * g.in_w <= 64
}

/// `[n][c][hw]` → `[c][n·hw]`.
fn to_channel_major(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut out = crate::kernels::elementwise::zeroed(x.len());
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

/// Forward as one product `W · X` over the batch (`X` channel-major), each image's output
/// passed to `epilogue(image, 0, values)`. Overwrites `y`.
pub fn conv2d_forward(
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

/// Backward as two products over the batch: adds the input gradient into `dx` (when
/// given) and the weight gradient into `dw`.
pub fn conv2d_backward(
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
        let mut dxt = crate::kernels::elementwise::zeroed(ci * n * hw);
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
