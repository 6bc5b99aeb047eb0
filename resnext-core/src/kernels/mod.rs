//! Numeric kernels on plain slices: no dfdx types, shapes as small structs.
//!
//! Every op has a *reference* kernel (simple loops, `f64` accumulation) and a
//! *fast* kernel (im2col + GEMM, rayon over the batch or channels). The tests
//! compare the two with `proptest`; the autograd layer in [`crate::ops`] only
//! ever calls the fast ones, so a faster kernel can replace them without
//! touching the tape code.

pub mod batchnorm;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod isa;
pub mod pool;
pub mod scratch;
pub(crate) mod simd;

/// `max(v, 0)` that keeps NaN, as PyTorch's ReLU does, so a broken activation stays
/// visible instead of turning into a confident zero. Written as `v < 0 ? 0 : v`, which
/// compiles to a single `maxps` (where `f32::max` needs extra NaN handling).
#[inline(always)]
pub fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}
