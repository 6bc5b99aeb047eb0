//! The vector operations the kernels are written over, with one implementation per
//! [`isa::Level`](super::isa::Level): AVX-512F, AVX2 + FMA, NEON and a plain-Rust one.
//!
//! A kernel is written once, as a [`Kernel`] whose `run::<S: Simd>` is generic over the
//! level; [`dispatch`] calls it inside a `#[target_feature]` function per level (as
//! `pulp` does), so the operations, all `#[inline(always)]`, compile to that level's
//! instructions. Register tiles size themselves by [`Simd::LANES`] and [`Simd::REGS`].
//!
//! The operations are `unsafe`: they need the CPU feature of their level, which only
//! [`dispatch`] (checking [`super::isa::level`]) makes sure of, and the pointer ones read
//! or write [`Simd::LANES`] values.

/// One instruction set's `f32` vector and its operations.
pub trait Simd: Copy {
    /// `f32` lanes of [`Simd::V`].
    const LANES: usize;
    /// Vector registers of the level (16 or 32): what a register tile may hold.
    const REGS: usize;
    /// A vector of [`Simd::LANES`] values.
    type V: Copy;
    /// The level's vector of at most 8 lanes, with all of the level's registers: AVX-512's
    /// 256-bit one (32 registers with AVX-512VL), the level itself elsewhere. For products
    /// whose natural width is 8 channels (a group of 8 in a paired group of 16).
    type Narrow: Simd;

    /// All lanes 0.
    unsafe fn zero() -> Self::V;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self::V;
    /// [`Simd::LANES`] values from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// [`Simd::LANES`] values to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n < LANES` values from `p`, the other lanes 0 (nothing read past them).
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V;
    /// The first `n < LANES` lanes of `v` to `p` (nothing written past them).
    unsafe fn store_part(p: *mut f32, n: usize, v: Self::V);
    /// `a · b + c` (fused where the level has it).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a − b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// The lanes of `v` where `c > 0`, zero where not (NaN in `c` is not above 0): a ReLU's
    /// mask applied to a gradient.
    unsafe fn keep_positive(c: Self::V, v: Self::V) -> Self::V;
    /// The sum of the lanes.
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// Lanes `0, 2, 4, …` and `1, 3, 5, …` of the `2 · LANES` values `a ‖ b`.
    unsafe fn deinterleave(a: Self::V, b: Self::V) -> (Self::V, Self::V);
    /// The inverse of [`Simd::deinterleave`]: `e0 o0 e1 o1 …` as two vectors.
    unsafe fn interleave(e: Self::V, o: Self::V) -> (Self::V, Self::V);
    /// The `LANES × LANES` block `r[..LANES]` transposed in place: afterwards `r[j]` holds
    /// lane `j` of every former `r[i]` (`r[LANES..]` untouched). The array is 16 long at
    /// every level, AVX-512's `LANES`.
    unsafe fn transpose(r: &mut [Self::V; 16]);
}

/// A kernel written once over [`Simd`]: its arguments are the fields of `self`.
/// [`dispatch`] runs it at the level [`super::isa::level`] names.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The kernel at level `S`. Implementations are `#[inline(always)]`, so that they are
    /// compiled inside [`dispatch`]'s per-level function, for that level's instructions.
    ///
    /// # Safety
    /// Called only by [`dispatch`] (on a CPU that has `S`'s instructions); pointer
    /// preconditions are the kernel's own.
    unsafe fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `k` at the level [`super::isa::level`] names, in a function compiled for it.
///
/// # Safety
/// `k`'s own preconditions (the bounds of what it reads and writes).
#[inline]
pub(crate) unsafe fn dispatch<K: Kernel>(k: K) -> K::Output {
    // SAFETY: `level` never names a level the CPU lacks; the rest is the caller's.
    unsafe { run_at(super::isa::level(), k) }
}

/// Runs `k` at level `l` (what the tests use to run every level without changing the
/// process-wide one).
///
/// # Safety
/// The CPU has `l` (one of [`super::isa::available`]), and `k`'s own preconditions.
pub(crate) unsafe fn run_at<K: Kernel>(l: super::isa::Level, k: K) -> K::Output {
    use super::isa::Level;
    match l {
        // SAFETY (each arm): the caller vouches for the level.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { at_avx512(k) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { at_avx2(k) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { at_neon(k) },
        // SAFETY: the plain level needs no CPU feature.
        _ => unsafe { k.run::<Scalar>() },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn at_avx512<K: Kernel>(k: K) -> K::Output {
    // SAFETY: compiled for, and called on, a CPU with AVX-512F and VL.
    unsafe { k.run::<Avx512>() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn at_avx2<K: Kernel>(k: K) -> K::Output {
    // SAFETY: compiled for, and called on, a CPU with AVX2 and FMA.
    unsafe { k.run::<Avx2>() }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn at_neon<K: Kernel>(k: K) -> K::Output {
    // SAFETY: compiled for, and called on, a CPU with NEON.
    unsafe { k.run::<Neon>() }
}

/// Plain Rust on arrays of 8: what the compiler makes of loops (SSE2 on any x86-64).
#[derive(Clone, Copy, Debug)]
pub struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 8;
    const REGS: usize = 16;
    type V = [f32; 8];
    type Narrow = Self;

    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> [f32; 8] {
        [v; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        unsafe { p.cast::<[f32; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        // SAFETY: the caller guarantees 8 writable values at `p`.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> [f32; 8] {
        let mut v = [0.0; 8];
        // SAFETY: the caller guarantees `n ≤ 8` readable values at `p`.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n.min(8)) };
        v
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, n: usize, v: [f32; 8]) {
        // SAFETY: the caller guarantees `n ≤ 8` writable values at `p`.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, n.min(8)) };
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn sub(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn keep_positive(c: [f32; 8], v: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if c[i] > 0.0 { v[i] } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn reduce_add(v: [f32; 8]) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn deinterleave(a: [f32; 8], b: [f32; 8]) -> ([f32; 8], [f32; 8]) {
        let at = |i: usize| if i < 8 { a[i] } else { b[i - 8] };
        (
            std::array::from_fn(|j| at(2 * j)),
            std::array::from_fn(|j| at(2 * j + 1)),
        )
    }
    #[inline(always)]
    unsafe fn transpose(r: &mut [[f32; 8]; 16]) {
        let a = *r;
        for (j, row) in r.iter_mut().take(8).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = a[i][j];
            }
        }
    }
    #[inline(always)]
    unsafe fn interleave(e: [f32; 8], o: [f32; 8]) -> ([f32; 8], [f32; 8]) {
        let at = |k: usize| {
            if k.is_multiple_of(2) {
                e[k / 2]
            } else {
                o[k / 2]
            }
        };
        (std::array::from_fn(at), std::array::from_fn(|k| at(k + 8)))
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Simd;

    /// AVX-512F: `__m512`.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx512;

    // SAFETY (every method): called only in code compiled for AVX-512F on a CPU that has
    // it (see `dispatch`); pointers as each method's contract says.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        const REGS: usize = 32;
        type V = __m512;
        type Narrow = Avx2<32>;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p) }
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, n: usize, v: __m512) {
            unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn keep_positive(c: __m512, v: __m512) -> __m512 {
            unsafe {
                let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(c, _mm512_setzero_ps());
                _mm512_maskz_mov_ps(above, v)
            }
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        unsafe fn deinterleave(a: __m512, b: __m512) -> (__m512, __m512) {
            unsafe {
                let ie =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let io =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                (
                    _mm512_permutex2var_ps(a, ie, b),
                    _mm512_permutex2var_ps(a, io, b),
                )
            }
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [__m512; 16]) {
            unsafe {
                // pairs of rows interleaved within 128-bit lanes: a0 b0 a1 b1 | a2 b2 a3 b3
                let mut t = [_mm512_setzero_pd(); 16];
                for i in 0..8 {
                    t[2 * i] = _mm512_castps_pd(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]));
                    t[2 * i + 1] = _mm512_castps_pd(_mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
                }
                // quads: u[4k + m] holds, in 128-bit lane l, column 4l + m of rows 4k..4k + 4
                let mut u = [_mm512_setzero_ps(); 16];
                for k in 0..4 {
                    let (a, b, c, d) = (t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
                    u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
                    u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
                    u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
                    u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
                }
                // lane l of u[m], u[4 + m], u[8 + m], u[12 + m] into row 4l + m
                for m in 0..4 {
                    let v1 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[m], u[4 + m]);
                    let v2 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[8 + m], u[12 + m]);
                    let w1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[m], u[4 + m]);
                    let w2 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[8 + m], u[12 + m]);
                    r[m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(v1, v2);
                    r[8 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(v1, v2);
                    r[4 + m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(w1, w2);
                    r[12 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(w1, w2);
                }
            }
        }
        #[inline(always)]
        unsafe fn interleave(e: __m512, o: __m512) -> (__m512, __m512) {
            unsafe {
                let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                let hi =
                    _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                (
                    _mm512_permutex2var_ps(e, lo, o),
                    _mm512_permutex2var_ps(e, hi, o),
                )
            }
        }
    }

    /// The mask of the first `n < 8` lanes (sign bits set) for AVX2's masked loads/stores.
    #[inline(always)]
    unsafe fn head(n: usize) -> __m256i {
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    /// AVX2 + FMA: `__m256`, with `R` registers: 16, or 32 inside AVX-512 code (AVX-512VL
    /// gives the 256-bit instructions registers 16–31; [`Avx512`]'s `Narrow`).
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2<const R: usize = 16>;

    // SAFETY (every method): called only in code compiled for AVX2 + FMA on a CPU that has
    // them (see `dispatch`); pointers as each method's contract says.
    impl<const R: usize> Simd for Avx2<R> {
        const LANES: usize = 8;
        const REGS: usize = R;
        type V = __m256;
        type Narrow = Self;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m256 {
            unsafe { _mm256_maskload_ps(p, head(n)) }
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, n: usize, v: __m256) {
            unsafe { _mm256_maskstore_ps(p, head(n), v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn keep_positive(c: __m256, v: __m256) -> __m256 {
            unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(c, _mm256_setzero_ps()), v) }
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn deinterleave(a: __m256, b: __m256) -> (__m256, __m256) {
            unsafe {
                // per 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6, then the middle quarters swapped
                let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
                let fix = |v: __m256| {
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
                };
                (fix(e), fix(o))
            }
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [__m256; 16]) {
            unsafe {
                // pairs: a0 b0 a1 b1 | a4 b4 a5 b5 and a2 b2 a3 b3 | a6 b6 a7 b7
                let mut t = [_mm256_setzero_ps(); 8];
                for i in 0..4 {
                    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // quads: s[4h + m] holds columns m and m + 4 of rows 4h..4h + 4
                let mut s = [_mm256_setzero_ps(); 8];
                for h in 0..2 {
                    let (a, b, c, d) = (t[4 * h], t[4 * h + 1], t[4 * h + 2], t[4 * h + 3]);
                    s[4 * h] = _mm256_shuffle_ps::<0b01_00_01_00>(a, c);
                    s[4 * h + 1] = _mm256_shuffle_ps::<0b11_10_11_10>(a, c);
                    s[4 * h + 2] = _mm256_shuffle_ps::<0b01_00_01_00>(b, d);
                    s[4 * h + 3] = _mm256_shuffle_ps::<0b11_10_11_10>(b, d);
                }
                for m in 0..4 {
                    r[m] = _mm256_permute2f128_ps::<0x20>(s[m], s[4 + m]);
                    r[4 + m] = _mm256_permute2f128_ps::<0x31>(s[m], s[4 + m]);
                }
            }
        }
        #[inline(always)]
        unsafe fn interleave(e: __m256, o: __m256) -> (__m256, __m256) {
            unsafe {
                let lo = _mm256_unpacklo_ps(e, o); // e0 o0 e1 o1 | e4 o4 e5 o5
                let hi = _mm256_unpackhi_ps(e, o); // e2 o2 e3 o3 | e6 o6 e7 o7
                (
                    _mm256_permute2f128_ps::<0x20>(lo, hi),
                    _mm256_permute2f128_ps::<0x31>(lo, hi),
                )
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::Simd;

    /// aarch64 Advanced SIMD: `float32x4_t`.
    #[derive(Clone, Copy, Debug)]
    pub struct Neon;

    // SAFETY (every method): NEON is part of every aarch64 target this builds for (and
    // checked by `dispatch`); pointers as each method's contract says.
    impl Simd for Neon {
        const LANES: usize = 4;
        const REGS: usize = 32;
        type V = float32x4_t;
        type Narrow = Self;

        #[inline(always)]
        unsafe fn zero() -> float32x4_t {
            unsafe { vdupq_n_f32(0.0) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> float32x4_t {
            unsafe { vdupq_n_f32(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> float32x4_t {
            unsafe { vld1q_f32(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: float32x4_t) {
            unsafe { vst1q_f32(p, v) }
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> float32x4_t {
            let mut v = [0.0f32; 4];
            unsafe {
                std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n.min(4));
                vld1q_f32(v.as_ptr())
            }
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, n: usize, v: float32x4_t) {
            let mut a = [0.0f32; 4];
            unsafe {
                vst1q_f32(a.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(a.as_ptr(), p, n.min(4));
            }
        }
        #[inline(always)]
        unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
            unsafe { vfmaq_f32(c, a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vsubq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vmulq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vaddq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn keep_positive(c: float32x4_t, v: float32x4_t) -> float32x4_t {
            unsafe { vreinterpretq_f32_u32(vandq_u32(vcgtzq_f32(c), vreinterpretq_u32_f32(v))) }
        }
        #[inline(always)]
        unsafe fn reduce_add(v: float32x4_t) -> f32 {
            unsafe { vaddvq_f32(v) }
        }
        #[inline(always)]
        unsafe fn deinterleave(a: float32x4_t, b: float32x4_t) -> (float32x4_t, float32x4_t) {
            unsafe { (vuzp1q_f32(a, b), vuzp2q_f32(a, b)) }
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [float32x4_t; 16]) {
            unsafe {
                let t0 = vtrn1q_f32(r[0], r[1]); // a0 b0 a2 b2
                let t1 = vtrn2q_f32(r[0], r[1]); // a1 b1 a3 b3
                let t2 = vtrn1q_f32(r[2], r[3]); // c0 d0 c2 d2
                let t3 = vtrn2q_f32(r[2], r[3]); // c1 d1 c3 d3
                let d = |v: float32x4_t| vreinterpretq_f64_f32(v);
                let f = |v: float64x2_t| vreinterpretq_f32_f64(v);
                r[0] = f(vtrn1q_f64(d(t0), d(t2)));
                r[1] = f(vtrn1q_f64(d(t1), d(t3)));
                r[2] = f(vtrn2q_f64(d(t0), d(t2)));
                r[3] = f(vtrn2q_f64(d(t1), d(t3)));
            }
        }
        #[inline(always)]
        unsafe fn interleave(e: float32x4_t, o: float32x4_t) -> (float32x4_t, float32x4_t) {
            unsafe { (vzip1q_f32(e, o), vzip2q_f32(e, o)) }
        }
    }
}

/// `n ≤ LANES` values from `p` (a whole vector, a part vector or zeros).
#[inline(always)]
pub(crate) unsafe fn load_n<S: Simd>(p: *const f32, n: usize) -> S::V {
    // SAFETY: `n` readable values at `p` (the caller's contract); none read when `n = 0`.
    unsafe {
        if n >= S::LANES {
            S::load(p)
        } else if n == 0 {
            S::zero()
        } else {
            S::load_part(p, n)
        }
    }
}

/// The first `n ≤ LANES` lanes of `v` to `p`.
#[inline(always)]
pub(crate) unsafe fn store_n<S: Simd>(p: *mut f32, n: usize, v: S::V) {
    // SAFETY: `n` writable values at `p` (the caller's contract); none written when `n = 0`.
    unsafe {
        if n >= S::LANES {
            S::store(p, v)
        } else if n > 0 {
            S::store_part(p, n, v)
        }
    }
}

/// `dst = src`, vector by vector (`dst` and `src` do not overlap).
///
/// A tail shorter than a vector is copied as the whole last vector, overlapping values
/// already copied, where `len` allows: AVX2's masked store (`vmaskmovps`) is slow on AMD
/// CPUs (it was a third of a stage-2 grouped convolution's time on Zen 4, in the copy of
/// each 28-wide output row).
#[inline(always)]
pub(crate) unsafe fn copy<S: Simd>(dst: *mut f32, src: *const f32, len: usize) {
    let mut i = 0;
    // SAFETY: `dst` and `src` hold `len` values (the caller's contract).
    unsafe {
        while i + S::LANES <= len {
            S::store(dst.add(i), S::load(src.add(i)));
            i += S::LANES;
        }
        if i < len {
            if len >= S::LANES {
                // (rewrites some values with what they already hold)
                let last = len - S::LANES;
                S::store(dst.add(last), S::load(src.add(last)));
            } else {
                S::store_part(dst.add(i), len - i, S::load_part(src.add(i), len - i));
            }
        }
    }
}

/// `dst += src`, vector by vector.
#[inline(always)]
pub(crate) unsafe fn add<S: Simd>(dst: *mut f32, src: *const f32, len: usize) {
    let mut i = 0;
    // SAFETY: `dst` and `src` hold `len` values (the caller's contract).
    unsafe {
        while i + S::LANES <= len {
            S::store(dst.add(i), S::add(S::load(dst.add(i)), S::load(src.add(i))));
            i += S::LANES;
        }
        if i < len {
            let n = len - i;
            let v = S::add(S::load_part(dst.add(i), n), S::load_part(src.add(i), n));
            S::store_part(dst.add(i), n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa;

    /// Every operation once: `y = [even, odd, 2·lo + hi, hi]` of `x`, then all but the last
    /// lane of `y`'s first vector overwritten by a part vector of `x[LANES..]`; returns
    /// `(LANES, Σ x[..LANES])`.
    struct Ops<'a>(&'a [f32], &'a mut [f32]);

    impl Kernel for Ops<'_> {
        type Output = (usize, f32);
        #[inline(always)]
        unsafe fn run<S: Simd>(self) -> (usize, f32) {
            let (x, y) = (self.0, self.1);
            assert!(x.len() >= 2 * S::LANES && y.len() >= 4 * S::LANES);
            // SAFETY: lengths asserted above
            unsafe {
                let (a, b) = (S::load(x.as_ptr()), S::load(x.as_ptr().add(S::LANES)));
                let (e, o) = S::deinterleave(a, b);
                S::store(y.as_mut_ptr(), e);
                S::store(y.as_mut_ptr().add(S::LANES), o);
                let (lo, hi) = S::interleave(e, o);
                // (2·lo − hi·1) + 2·hi = 2·lo + hi
                let sm = S::sub(S::mul(lo, S::splat(2.0)), S::mul(hi, S::splat(1.0)));
                let f = S::fma(hi, S::splat(2.0), S::add(sm, S::zero()));
                S::store(y.as_mut_ptr().add(2 * S::LANES), f);
                S::store(y.as_mut_ptr().add(3 * S::LANES), hi);
                // the last lane of y's first vector stays as it is
                let part = S::load_part(x.as_ptr().add(S::LANES), S::LANES - 1);
                S::store_part(y.as_mut_ptr(), S::LANES - 1, part);
                (S::LANES, S::reduce_add(a))
            }
        }
    }

    /// `LANES × LANES` values from `x`, transposed in registers, stored to `y`.
    struct Transpose<'a>(&'a [f32], &'a mut [f32]);

    impl Kernel for Transpose<'_> {
        type Output = usize;
        #[inline(always)]
        unsafe fn run<S: Simd>(self) -> usize {
            let (x, y, n) = (self.0, self.1, S::LANES);
            assert!(x.len() >= n * n && y.len() >= n * n);
            // SAFETY: lengths asserted above
            unsafe {
                let mut r = [S::splat(-1.0); 16];
                for (i, r) in r.iter_mut().take(n).enumerate() {
                    *r = S::load(x.as_ptr().add(i * n));
                }
                S::transpose(&mut r);
                for (j, r) in r.iter().take(n).enumerate() {
                    S::store(y.as_mut_ptr().add(j * n), *r);
                }
            }
            n
        }
    }

    /// [`copy`] of the first `len` values.
    struct Copy<'a>(&'a [f32], &'a mut [f32], usize);

    impl Kernel for Copy<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let Copy(src, dst, len) = self;
            assert!(src.len() >= len && dst.len() >= len);
            // SAFETY: lengths asserted above
            unsafe { copy::<S>(dst.as_mut_ptr(), src.as_ptr(), len) }
        }
    }

    /// [`Simd::keep_positive`] on one vector of conditions and values.
    struct KeepPositive<'a>(&'a [f32], &'a [f32], &'a mut [f32]);

    impl Kernel for KeepPositive<'_> {
        type Output = usize;
        #[inline(always)]
        unsafe fn run<S: Simd>(self) -> usize {
            let KeepPositive(c, v, out) = self;
            assert!(c.len() >= S::LANES && v.len() >= S::LANES && out.len() >= S::LANES);
            // SAFETY: lengths asserted above
            unsafe {
                let k = S::keep_positive(S::load(c.as_ptr()), S::load(v.as_ptr()));
                S::store(out.as_mut_ptr(), k);
            }
            S::LANES
        }
    }

    #[test]
    fn every_level_keeps_the_values_whose_condition_is_above_zero() {
        let conds = [1.0, -1.0, 0.0, -0.0, f32::NAN, 1e-30, -1e-30, f32::INFINITY];
        for l in isa::available() {
            let c: Vec<f32> = (0..16).map(|i| conds[i % conds.len()]).collect();
            let v: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
            let mut out = vec![f32::NAN; 16];
            // SAFETY: an available level; the kernel asserts its lengths
            let n = unsafe { run_at(l, KeepPositive(&c, &v, &mut out)) };
            for i in 0..n {
                let want = if c[i] > 0.0 { v[i] } else { 0.0 };
                assert_eq!(
                    out[i].to_bits(),
                    want.to_bits(),
                    "{l}: lane {i}, condition {}",
                    c[i]
                );
            }
        }
    }

    #[test]
    fn every_level_copies_any_length_and_nothing_past_it() {
        // shorter than a vector, whole vectors, and tails copied by an overlapping vector
        for l in isa::available() {
            for len in 0..=70 {
                let src: Vec<f32> = (0..len + 8).map(|i| i as f32 + 0.5).collect();
                let mut dst = vec![-1.0f32; len + 8];
                // SAFETY: an available level; the kernel asserts its lengths
                unsafe { run_at(l, Copy(&src, &mut dst, len)) };
                assert_eq!(&dst[..len], &src[..len], "{l}, {len} values");
                assert!(
                    dst[len..].iter().all(|&v| v == -1.0),
                    "{l}, {len}: past the end"
                );
            }
        }
    }

    #[test]
    fn every_level_transposes_a_square_block() {
        for l in isa::available() {
            let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
            let mut y = vec![0.0; 256];
            // SAFETY: an available level; the kernel asserts its lengths
            let n = unsafe { run_at(l, Transpose(&x, &mut y)) };
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(y[j * n + i], x[i * n + j], "{l}: ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn every_level_computes_the_same_lane_operations() {
        for l in isa::available() {
            let x: Vec<f32> = (0..32).map(|i| i as f32 + 1.0).collect();
            let mut y = vec![0.0; 64];
            // SAFETY: an available level; the kernel asserts its lengths
            let (n, s) = unsafe { run_at(l, Ops(&x, &mut y)) };
            let even: Vec<f32> = x[..2 * n].iter().step_by(2).copied().collect();
            let odd: Vec<f32> = x[..2 * n].iter().skip(1).step_by(2).copied().collect();
            let mut first = x[n..2 * n - 1].to_vec();
            first.push(even[n - 1]);
            assert_eq!(&y[..n], &first[..], "{l}: even lanes, then a part vector");
            assert_eq!(&y[n..2 * n], &odd[..], "{l}: odd lanes");
            let fused: Vec<f32> = (0..n).map(|i| 2.0 * x[i] + x[n + i]).collect();
            assert_eq!(&y[2 * n..3 * n], &fused[..], "{l}: interleave, fma");
            assert_eq!(&y[3 * n..4 * n], &x[n..2 * n], "{l}: interleave, high half");
            assert_eq!(s, x[..n].iter().sum::<f32>(), "{l}: reduce_add");
        }
    }
}
