//! Element-wise kernels: the residual add fused with ReLU, its gradient, and the dense layer.

use rayon::prelude::*;

use super::gemm::{sgemm, MatRef};

const CHUNK: usize = 1 << 14;

/// A zero-filled buffer of `len` values, filled by all threads when it is large: `vec!`
/// zero-fills (or page-faults) on the calling thread alone while the others wait, and
/// the forward pass allocates hundreds of megabytes of activations per step.
pub fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_FILL {
        return vec![0.0; len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0.0f32, len));
    v
}

/// Buffers from this many values up are filled by all threads.
const PARALLEL_FILL: usize = 1 << 18;

/// `y` (new memory) zero-filled, as initialised values: by all threads when it is large,
/// as [`zeroed`].
pub(crate) fn zero_fill(y: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    let zero = std::mem::MaybeUninit::new(0.0);
    if y.len() < PARALLEL_FILL {
        y.fill(zero);
    } else {
        y.par_chunks_mut(1 << 16).for_each(|c| c.fill(zero));
    }
    // SAFETY: every value was just written.
    unsafe { super::assume_init(y) }
}

/// `y = max(a + b, 0)`.
pub fn add_relu_forward(a: &[f32], b: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(yc, (ac, bc))| add_relu_chunk(ac, bc, yc));
}

leveled! {
    fn add_relu_chunk(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
            *o = super::relu(u + v);
        }
    }
}

/// Bit `i % 64` of word `i / 64` set exactly when `y[i] > 0`.
pub fn positive_mask(y: &[f32]) -> Vec<u64> {
    let mut mask = vec![0u64; y.len().div_ceil(64)];
    mask.par_chunks_mut(CHUNK / 64)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(mc, yc)| mask_chunk(yc, mc));
    mask
}

leveled! {
    fn mask_chunk(y: &[f32], mask: &mut [u64]) {
        for (m, ys) in mask.iter_mut().zip(y.chunks(64)) {
            let mut bits = 0u64;
            for (k, &v) in ys.iter().enumerate() {
                bits |= ((v > 0.0) as u64) << k;
            }
            *m = bits;
        }
    }
}

/// Gradient through a ReLU given [`positive_mask`] of its output: zeroes `dy` where the
/// output was not positive, in place.
pub fn apply_positive_mask(mask: &[u64], dy: &mut [f32]) {
    assert_eq!(
        mask.len(),
        dy.len().div_ceil(64),
        "apply_positive_mask: mask length"
    );
    dy.par_chunks_mut(CHUNK)
        .zip(mask.par_chunks(CHUNK / 64))
        .for_each(|(dc, mc)| unmask_chunk(mc, dc));
}

leveled! {
    fn unmask_chunk(mask: &[u64], dy: &mut [f32]) {
        for (&m, ds) in mask.iter().zip(dy.chunks_mut(64)) {
            for (k, d) in ds.iter_mut().enumerate() {
                *d = if (m >> k) & 1 == 1 { *d } else { 0.0 };
            }
        }
    }
}

/// Adds `src` into `dst`.
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dc, sc)| add_chunk(dc, sc));
}

leveled! {
    fn add_chunk(dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// Dense layer forward: `y (n × out) = x (n × in) · wᵀ + b`, `w` stored `(out, in)`.
pub fn linear_forward(
    n: usize,
    inp: usize,
    out: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    for row in y.chunks_mut(out.max(1)) {
        row.copy_from_slice(&b[..out]);
    }
    sgemm(
        n,
        out,
        inp,
        MatRef::row_major(x, inp),
        MatRef::transposed(w, inp),
        y,
        out,
        true,
        true,
    );
}

/// Dense layer backward: adds into `dx`, `dw` and `db`.
pub fn linear_backward(
    n: usize,
    inp: usize,
    out: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    if let Some(dx) = dx {
        sgemm(
            n,
            inp,
            out,
            MatRef::row_major(dy, out),
            MatRef::row_major(w, inp),
            dx,
            inp,
            true,
            true,
        );
    }
    sgemm(
        out,
        inp,
        n,
        MatRef::transposed(dy, out),
        MatRef::row_major(x, inp),
        dw,
        inp,
        true,
        true,
    );
    for row in dy.chunks(out.max(1)) {
        for (d, &v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
}
