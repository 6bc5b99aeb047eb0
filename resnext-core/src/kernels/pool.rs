//! Max pooling (with PyTorch's implicit -inf padding, floor mode) and global average pooling.

use rayon::prelude::*;

/// The geometry of a 2-D pooling call over `planes` independent `h × w` planes (N × C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// N × C.
    pub planes: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Square window size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on every side.
    pub padding: usize,
}

impl PoolGeom {
    /// Checks the geometry the way PyTorch does, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel == 0 || self.stride == 0 {
            return Err(format!(
                "kernel ({}) and stride ({}) must be positive",
                self.kernel, self.stride
            ));
        }
        if 2 * self.padding > self.kernel {
            return Err(format!(
                "padding {} must be at most half the kernel {}",
                self.padding, self.kernel
            ));
        }
        if self.in_h + 2 * self.padding < self.kernel || self.in_w + 2 * self.padding < self.kernel
        {
            return Err(format!(
                "input {}x{} with padding {} is smaller than the {}x{} window",
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
}

/// Max pooling forward. Writes `y` and, per output, the index of the chosen input within
/// its plane (for the backward pass). Ties go to the first maximum in scan order, as in
/// PyTorch; NaN propagates (the first NaN in scan order is chosen).
pub fn max_pool_forward(g: &PoolGeom, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (h, w) = (g.in_h, g.in_w);
    if oh * ow == 0 || h * w == 0 {
        return;
    }
    y.par_chunks_mut(oh * ow)
        .zip(argmax.par_chunks_mut(oh * ow))
        .zip(x.par_chunks(h * w))
        .for_each_init(
            || (vec![0.0f32; w], vec![0u32; w]),
            |(col_max, col_row), ((yp, ap), xp)| max_pool_plane(g, xp, yp, ap, col_max, col_row),
        );
}

leveled! {
    /// One plane of [`max_pool_forward`]. Per output row, each input column's first
    /// maximum over the window's rows and the row it is in (`col_max`, `col_row`: whole
    /// rows at a time, vectorised), then per output the winner among its window's
    /// columns. Scan order is row by row, so among equal maxima (or NaNs) the one in the
    /// lowest row wins, then the leftmost column: the first in scan order.
    fn max_pool_plane(
        g: &PoolGeom,
        xp: &[f32],
        yp: &mut [f32],
        ap: &mut [u32],
        col_max: &mut [f32],
        col_row: &mut [u32],
    ) {
        let (h, w, ow) = (g.in_h, g.in_w, g.out_w());
        for (oy, (yrow, arow)) in yp.chunks_exact_mut(ow).zip(ap.chunks_exact_mut(ow)).enumerate() {
            let y0 = (oy * g.stride) as isize - g.padding as isize;
            let ys = y0.max(0) as usize..((y0 + g.kernel as isize).min(h as isize)) as usize;
            col_max.copy_from_slice(&xp[ys.start * w..(ys.start + 1) * w]);
            col_row.fill(ys.start as u32);
            for iy in ys.start + 1..ys.end {
                for ((m, r), &v) in col_max
                    .iter_mut()
                    .zip(col_row.iter_mut())
                    .zip(&xp[iy * w..(iy + 1) * w])
                {
                    // selects, not branches: which value wins is data-dependent
                    let take = (v > *m) | (v.is_nan() & !m.is_nan());
                    *m = if take { v } else { *m };
                    *r = if take { iy as u32 } else { *r };
                }
            }
            for (ox, (out, at)) in yrow.iter_mut().zip(arow.iter_mut()).enumerate() {
                let x0 = (ox * g.stride) as isize - g.padding as isize;
                let xs = x0.max(0) as usize..((x0 + g.kernel as isize).min(w as isize)) as usize;
                let (mut best, mut row, mut col) = (col_max[xs.start], col_row[xs.start], xs.start);
                for ix in xs.start + 1..xs.end {
                    let (v, r) = (col_max[ix], col_row[ix]);
                    let take = if v.is_nan() {
                        !best.is_nan() | (r < row)
                    } else {
                        (v > best) | ((v == best) & (r < row))
                    };
                    best = if take { v } else { best };
                    row = if take { r } else { row };
                    col = if take { ix } else { col };
                }
                *out = best;
                *at = row * w as u32 + col as u32;
            }
        }
    }
}

/// `a` if it is larger or NaN, else `b`: a maximum that propagates NaN and vectorises.
#[inline(always)]
fn nan_max(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// Max pooling forward without the argmax (inference): the window's rows are reduced
/// first over whole rows (vectorised), then along each row. Equal to the values of
/// [`max_pool_forward`], NaN included.
pub fn max_pool_forward_values(g: &PoolGeom, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (h, w) = (g.in_h, g.in_w);
    if oh * ow == 0 || h * w == 0 {
        return;
    }
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each_init(
            || vec![0.0f32; w],
            |rowmax, (yp, xp)| {
                for (oy, yrow) in yp.chunks_exact_mut(ow).enumerate() {
                    let y0 = (oy * g.stride) as isize - g.padding as isize;
                    let ys =
                        y0.max(0) as usize..((y0 + g.kernel as isize).min(h as isize)) as usize;
                    rowmax.copy_from_slice(&xp[ys.start * w..(ys.start + 1) * w]);
                    for iy in ys.start + 1..ys.end {
                        for (m, &v) in rowmax.iter_mut().zip(&xp[iy * w..(iy + 1) * w]) {
                            *m = nan_max(v, *m);
                        }
                    }
                    for (ox, out) in yrow.iter_mut().enumerate() {
                        let x0 = (ox * g.stride) as isize - g.padding as isize;
                        let xs =
                            x0.max(0) as usize..((x0 + g.kernel as isize).min(w as isize)) as usize;
                        *out = rowmax[xs.clone()]
                            .iter()
                            .fold(f32::NEG_INFINITY, |m, &v| nan_max(v, m));
                    }
                }
            },
        );
}

/// Max pooling backward: adds each output gradient into the input it came from.
pub fn max_pool_backward(g: &PoolGeom, argmax: &[u32], dy: &[f32], dx: &mut [f32]) {
    let (ohw, hw) = (g.out_h() * g.out_w(), g.in_h * g.in_w);
    if ohw == 0 || hw == 0 {
        return;
    }
    dx.par_chunks_mut(hw)
        .zip(argmax.par_chunks(ohw))
        .zip(dy.par_chunks(ohw))
        .for_each(|((dxp, ap), dyp)| {
            for (&a, &d) in ap.iter().zip(dyp) {
                dxp[a as usize] += d;
            }
        });
}

/// Reference max pooling forward (plain loops).
pub fn max_pool_forward_ref(g: &PoolGeom, x: &[f32]) -> Vec<f32> {
    let (oh, ow) = (g.out_h(), g.out_w());
    let mut y = vec![0.0f32; g.planes * oh * ow];
    for p in 0..g.planes {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = f32::NEG_INFINITY;
                for ky in 0..g.kernel {
                    for kx in 0..g.kernel {
                        let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                        let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.in_h && (ix as usize) < g.in_w {
                            best = best.max(x[(p * g.in_h + iy as usize) * g.in_w + ix as usize]);
                        }
                    }
                }
                y[(p * oh + oy) * ow + ox] = best;
            }
        }
    }
    y
}

/// Global average pooling: the mean of each `spatial`-long plane.
pub fn global_avg_pool_forward(spatial: usize, x: &[f32], y: &mut [f32]) {
    if spatial == 0 {
        y.fill(0.0);
        return;
    }
    y.par_iter_mut()
        .zip(x.par_chunks(spatial))
        .for_each(|(o, p)| {
            *o = (p.iter().map(|&v| v as f64).sum::<f64>() / spatial as f64) as f32;
        });
}

/// Global average pooling backward: spreads each gradient evenly over its plane (adds).
pub fn global_avg_pool_backward(spatial: usize, dy: &[f32], dx: &mut [f32]) {
    if spatial == 0 {
        return;
    }
    let inv = 1.0 / spatial as f32;
    dx.par_chunks_mut(spatial)
        .zip(dy.par_iter())
        .for_each(|(p, &d)| {
            for v in p {
                *v += d * inv;
            }
        });
}
