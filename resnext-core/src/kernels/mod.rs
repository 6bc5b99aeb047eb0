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

use std::mem::MaybeUninit;

/// `y` as a slice of possibly uninitialised values, for kernels that only write to it.
pub(crate) fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the kernels given this slice write only initialised values, so
    // `y` holds valid `f32`s when the borrow ends.
    unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `y` as initialised values.
///
/// # Safety
/// Every value of `y` has been written.
pub(crate) unsafe fn assume_init(y: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller guarantees every value is initialised.
    unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A new buffer of `len` values, written by `fill` instead of zero-filled first: the
/// activations are hundreds of megabytes per step, and a fill is one more pass over them.
///
/// # Safety
/// `fill` writes every one of the `len` values it is given.
pub(crate) unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut y = Vec::with_capacity(len);
    fill(&mut y.spare_capacity_mut()[..len]);
    // SAFETY: the caller guarantees `fill` wrote all `len` values.
    unsafe { y.set_len(len) };
    y
}

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
