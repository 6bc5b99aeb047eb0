//! Element-wise kernels: the residual add fused with ReLU, its gradient, and the dense layer.

use rayon::prelude::*;

use super::gemm::{sgemm, MatRef};

const CHUNK: usize = 1 << 14;

/// `y = max(a + b, 0)`.
pub fn add_relu_forward(a: &[f32], b: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(yc, (ac, bc))| add_relu_chunk(ac, bc, yc));
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_relu_chunk(a: &[f32], b: &[f32], y: &mut [f32]) {
    for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
        *o = (u + v).max(0.0);
    }
}

/// Gradient through a ReLU given its output: `g = dy * (y > 0)`, in place.
pub fn relu_mask_inplace(y: &[f32], dy: &mut [f32]) {
    dy.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(dc, yc)| relu_mask_chunk(yc, dc));
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn relu_mask_chunk(y: &[f32], dy: &mut [f32]) {
    // a select, not a branch, so it vectorises
    for (d, &v) in dy.iter_mut().zip(y) {
        *d = if v <= 0.0 { 0.0 } else { *d };
    }
}

/// Adds `src` into `dst`.
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dc, sc)| add_chunk(dc, sc));
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_chunk(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
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
