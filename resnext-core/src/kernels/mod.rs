//! Numeric kernels on plain slices: no dfdx types, shapes as small structs.
//!
//! Every op has a *reference* kernel (simple loops, `f64` accumulation) and a
//! *fast* kernel (im2col + GEMM, rayon over the batch or channels). The tests
//! compare the two with `proptest`; the autograd layer in [`crate::ops`] only
//! ever calls the fast ones, so a faster kernel can replace them without
//! touching the tape code.

/// Defines a function of plain loops that the compiler vectorises for the level
/// [`isa::level`] names (`RESNEXT_ISA`): the body is compiled once per x86 level inside a
/// `#[target_feature]` function, as [`simd`]'s `dispatch` does for hand-tiled kernels, and
/// each call runs the one for the current level (on aarch64 the plain body, NEON being
/// its baseline). For the element-wise and reduction loops of batch norm and the residual
/// add, which need no hand-written register tile.
macro_rules! leveled {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match $crate::kernels::isa::level() {
                // SAFETY: `level` names only levels this CPU has.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::isa::Level::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::isa::Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

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
