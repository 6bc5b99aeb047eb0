//! Direct convolution for grouped convolutions with few channels per group (ResNeXt's 3×3
//! convolutions: 4 to 32 channels per group).
//!
//! A per-group GEMM on an im2col matrix is a poor fit there: the matrices are a few rows
//! tall and the column matrix is rebuilt for every group. Here each group's input is copied
//! once into a zero-padded buffer, split by stride phase, so that every kernel tap
//! `(channel, ky, kx)` becomes a fixed offset into that buffer and output position `q` of a
//! row-major grid reads input position `q + offset`. A convolution is then
//! `out[o][q] = Σ_t W[o][t] · in[q + off[t]]`: a matrix product whose right-hand matrix is
//! never materialised ("implicit GEMM"). The register-blocked kernel keeps up to 8 output
//! channels × 48 positions in AVX-512 registers and streams the taps; a portable loop
//! serves other CPUs.
//!
//! The input gradient is the same product on the padded output gradient (one product per
//! stride phase of the input), and the weight gradient is
//! `dW[o][t] = Σ_q dY[o][q] · in[q + off[t]]`.

use rayon::prelude::*;

use super::conv::Conv2dGeom;
use super::scratch;

/// Vector width in `f32` lanes of the AVX-512 kernels; grids are padded to a multiple.
const LANES: usize = 16;
/// Zeros after each packed buffer, so the last vector of a grid may read past its end.
const SLACK: usize = 4 * LANES;
/// Grid positions below which the weight gradient batches images into one product: with
/// grids this short (7×7 images) the per-weight reduction across lanes costs more than the
/// products. Batching pays for it with the padding rows between images, so longer grids
/// (14×14 and up) stay one image per product.
const WG_BATCH_BELOW: usize = 128;
/// At most this many input values per batched weight-gradient product (1 MB).
const WG_CHUNK_VALUES: usize = 1 << 18;

/// Whether [`conv2d_forward`]/[`conv2d_backward`] here are the better choice for `g`:
/// grouped convolutions with at most 64 channels per group, kernel larger than 1.
pub fn suits(g: &Conv2dGeom) -> bool {
    g.groups > 1 && g.kernel > 1 && g.in_per_group() <= 64 && g.out_per_group() <= 64
}

/// Whether the forward pass here beats im2col + GEMM for `g`: [`suits`], and also dense
/// convolutions with very few input channels and a large kernel (an RGB stem: 3 input
/// channels, 7×7), whose im2col matrix is ~50× the input. Their backward pass stays on
/// im2col + GEMM, which splits the weight gradient over the batch. The forward here runs
/// one task per image and group, so a dense convolution takes it only when the batch gives
/// every thread an image (a batch-1 stem stays on the GEMM, which splits one image).
pub fn suits_forward(g: &Conv2dGeom) -> bool {
    suits(g)
        || (g.groups == 1
            && g.kernel >= 5
            && g.in_channels <= 4
            && g.out_channels <= 64
            && g.batch >= rayon::current_num_threads())
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

static PORTABLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this module use its portable loops even where AVX-512 is present (and keeps
/// grouped convolutions off [`super::lanes`], which has no portable path), so tests can
/// check both paths on one machine. Results are equal up to rounding either way. The
/// setting is process-wide.
#[doc(hidden)]
pub fn force_portable(on: bool) {
    PORTABLE_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the AVX-512 kernels run: the CPU has AVX-512F and [`force_portable`] is off.
pub(super) fn has_avx512() -> bool {
    !PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed) && cpu_has_avx512()
}

/// Whether the CPU has AVX-512F: what the AVX-512 kernels need to be safe to call.
pub(super) fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Makes `buf` `len` zeros unless it already has that length (then it holds zero padding
/// from an earlier pack of the same layout, and the pack overwrites the rest).
pub(super) fn zeroed(buf: &mut Vec<f32>, len: usize) {
    if buf.len() != len {
        buf.clear();
        buf.resize(len, 0.0);
    }
}

/// `dst = src` for short rows, without a call into `memcpy`.
fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy: lengths");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; both slices hold `dst.len()` values.
        unsafe { avx512::copy(dst.as_mut_ptr(), src.as_ptr(), dst.len()) };
        return;
    }
    dst.copy_from_slice(src);
}

/// Row `r` of `src` (rows of `w` values) to `dst[r·pitch..][..w]`.
fn copy_rows(src: &[f32], w: usize, dst: &mut [f32], pitch: usize) {
    let rows = src.len() / w.max(1);
    if rows == 0 {
        return;
    }
    assert!(
        w <= pitch && (rows - 1) * pitch + w <= dst.len(),
        "copy_rows: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; reads `src[..rows·w]`, writes `dst[r·pitch..][..w]`
        // for `r < rows`, in bounds by the assert above.
        unsafe { avx512::copy_rows(src.as_ptr(), w, rows, dst.as_mut_ptr(), pitch) };
        return;
    }
    for (r, row) in src.chunks_exact(w).enumerate() {
        dst[r * pitch..r * pitch + w].copy_from_slice(row);
    }
}

/// `dst += src`.
pub(super) fn add(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add: lengths");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; both slices hold `dst.len()` values.
        unsafe { avx512::add(dst.as_mut_ptr(), src.as_ptr(), dst.len()) };
        return;
    }
    for (d, v) in dst.iter_mut().zip(src) {
        *d += v;
    }
}

/// `ev[j] = src[2j]`, `od[j] = src[2j + 1]`.
fn deinterleave2(src: &[f32], ev: &mut [f32], od: &mut [f32]) {
    assert!(
        ev.len() == src.len().div_ceil(2) && od.len() == src.len() / 2,
        "deinterleave2: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; lengths checked above.
        unsafe { avx512::deinterleave2(src, ev, od) };
        return;
    }
    for (e, &v) in ev.iter_mut().zip(src.iter().step_by(2)) {
        *e = v;
    }
    for (o, &v) in od.iter_mut().zip(src.iter().skip(1).step_by(2)) {
        *o = v;
    }
}

/// `dst[2j] += ev[j]`, `dst[2j + 1] += od[j]`.
fn interleave2_add(dst: &mut [f32], ev: &[f32], od: &[f32]) {
    assert!(
        ev.len() == dst.len().div_ceil(2) && od.len() == dst.len() / 2,
        "interleave2_add: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; lengths checked above.
        unsafe { avx512::interleave2_add(dst, ev, od) };
        return;
    }
    for (d, &v) in dst.iter_mut().step_by(2).zip(ev) {
        *d += v;
    }
    for (d, &v) in dst.iter_mut().skip(1).step_by(2).zip(od) {
        *d += v;
    }
}

/// Weights of a tap product, packed per block of output channels: block `(o0, ob, at)`
/// holds `taps × ob` values at `at`, row `t` being the block's weights for tap `t`.
#[derive(Clone, Debug, Default)]
pub struct PackedWeights {
    data: Vec<f32>,
    blocks: Vec<(usize, usize, usize)>,
    taps: usize,
    outs: usize,
}

impl PackedWeights {
    /// Packs `outs × taps` weights given by `w(o, t)`.
    pub fn new(outs: usize, taps: usize, w: impl Fn(usize, usize) -> f32) -> Self {
        let mut data = vec![0.0f32; outs * taps];
        let mut blocks = Vec::new();
        let mut o0 = 0;
        while o0 < outs {
            let ob = [8, 4, 2, 1]
                .into_iter()
                .find(|&b| b <= outs - o0)
                .expect("1 always fits");
            let at = o0 * taps;
            blocks.push((o0, ob, at));
            let block = &mut data[at..at + ob * taps];
            for o in 0..ob {
                for (t, d) in block.iter_mut().skip(o).step_by(ob).enumerate() {
                    *d = w(o0 + o, t);
                }
            }
            o0 += ob;
        }
        Self {
            data,
            blocks,
            taps,
            outs,
        }
    }
}

/// `out[o·qpad + q] = Σ_t W[o][t] · inp[q + offs[t]]` for every output channel `o` and
/// `q < qpad` (`qpad` a multiple of [`LANES`]). `inp` must hold `max(offs) + qpad` values.
fn taps_product(inp: &[f32], offs: &[usize], w: &PackedWeights, qpad: usize, out: &mut [f32]) {
    assert_eq!(offs.len(), w.taps, "taps_product: tap count");
    assert!(qpad.is_multiple_of(LANES), "taps_product: padded grid");
    assert!(out.len() >= w.outs * qpad, "taps_product: output buffer");
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(max_off + qpad <= inp.len(), "taps_product: input buffer");
    for &(o0, ob, at) in &w.blocks {
        let wb = &w.data[at..at + ob * w.taps];
        let ob_out = &mut out[o0 * qpad..(o0 + ob) * qpad];
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is present; the asserts above bound every read of `inp`
            // (`q + off < qpad + max_off`) and the kernels write `ob_out[o·qpad + q]` for
            // `o < ob`, `q < qpad` only.
            unsafe { avx512::product_block(inp, offs, wb, ob, qpad, ob_out) };
            continue;
        }
        for o in 0..ob {
            let row = &mut ob_out[o * qpad..(o + 1) * qpad];
            row.fill(0.0);
            for (t, &off) in offs.iter().enumerate() {
                let wv = wb[t * ob + o];
                for (r, &x) in row.iter_mut().zip(&inp[off..off + qpad]) {
                    *r += wv * x;
                }
            }
        }
    }
}

/// `dw[o·taps + t] += Σ_{q<qpad} dy[o·qpad + q] · inp[q + offs[t]]`.
fn taps_weight_grad(
    inp: &[f32],
    offs: &[usize],
    dy: &[f32],
    outs: usize,
    qpad: usize,
    dw: &mut [f32],
) {
    let taps = offs.len();
    assert!(qpad.is_multiple_of(LANES), "taps_weight_grad: padded grid");
    assert!(dy.len() >= outs * qpad, "taps_weight_grad: gradient buffer");
    assert!(dw.len() >= outs * taps, "taps_weight_grad: weight gradient");
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(
        max_off + qpad <= inp.len(),
        "taps_weight_grad: input buffer"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; reads stay below `max_off + qpad` in `inp` and
        // `outs · qpad` in `dy` (asserted above); writes stay in `dw[..outs · taps]`.
        unsafe { avx512::weight_grad(inp, offs, dy, outs, qpad, dw) };
        return;
    }
    for o in 0..outs {
        let d = &dy[o * qpad..(o + 1) * qpad];
        for (t, &off) in offs.iter().enumerate() {
            let s: f32 = d
                .iter()
                .zip(&inp[off..off + qpad])
                .map(|(a, b)| a * b)
                .sum();
            dw[o * taps + t] += s;
        }
    }
}

/// The AVX-512 kernels. Every function requires AVX-512F (checked by the callers) and
/// in-bounds pointers (asserted by the safe wrappers above).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// The mask of the first `n ≤ 16` lanes.
    #[inline]
    fn head(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy(dst: *mut f32, src: *const f32, len: usize) {
        let mut i = 0;
        while i + LANES <= len {
            _mm512_storeu_ps(dst.add(i), _mm512_loadu_ps(src.add(i)));
            i += LANES;
        }
        if i < len {
            let m = head(len - i);
            _mm512_mask_storeu_ps(dst.add(i), m, _mm512_maskz_loadu_ps(m, src.add(i)));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy_rows(
        src: *const f32,
        w: usize,
        rows: usize,
        dst: *mut f32,
        pitch: usize,
    ) {
        let tail = head(w % LANES);
        for r in 0..rows {
            let (s, d) = (src.add(r * w), dst.add(r * pitch));
            let mut i = 0;
            while i + LANES <= w {
                _mm512_storeu_ps(d.add(i), _mm512_loadu_ps(s.add(i)));
                i += LANES;
            }
            if i < w {
                _mm512_mask_storeu_ps(d.add(i), tail, _mm512_maskz_loadu_ps(tail, s.add(i)));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add(dst: *mut f32, src: *const f32, len: usize) {
        let mut i = 0;
        while i + LANES <= len {
            let v = _mm512_add_ps(_mm512_loadu_ps(dst.add(i)), _mm512_loadu_ps(src.add(i)));
            _mm512_storeu_ps(dst.add(i), v);
            i += LANES;
        }
        if i < len {
            let m = head(len - i);
            let v = _mm512_add_ps(
                _mm512_maskz_loadu_ps(m, dst.add(i)),
                _mm512_maskz_loadu_ps(m, src.add(i)),
            );
            _mm512_mask_storeu_ps(dst.add(i), m, v);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave2(src: &[f32], ev: &mut [f32], od: &mut [f32]) {
        let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let mut i = 0;
        while i + 2 * LANES <= src.len() {
            let a = _mm512_loadu_ps(src.as_ptr().add(i));
            let b = _mm512_loadu_ps(src.as_ptr().add(i + LANES));
            _mm512_storeu_ps(ev.as_mut_ptr().add(i / 2), _mm512_permutex2var_ps(a, ie, b));
            _mm512_storeu_ps(od.as_mut_ptr().add(i / 2), _mm512_permutex2var_ps(a, io, b));
            i += 2 * LANES;
        }
        if i < src.len() {
            // the last up to 31 values, with masks
            let n = src.len() - i;
            let (m0, m1) = (head(n.min(LANES)), head(n.saturating_sub(LANES)));
            let a = _mm512_maskz_loadu_ps(m0, src.as_ptr().add(i));
            // (no load at all past the end: a fully masked load can still be slow)
            let b = if n > LANES {
                _mm512_maskz_loadu_ps(m1, src.as_ptr().add(i + LANES))
            } else {
                _mm512_setzero_ps()
            };
            let (me, mo) = (head(n.div_ceil(2)), head(n / 2));
            _mm512_mask_storeu_ps(
                ev.as_mut_ptr().add(i / 2),
                me,
                _mm512_permutex2var_ps(a, ie, b),
            );
            _mm512_mask_storeu_ps(
                od.as_mut_ptr().add(i / 2),
                mo,
                _mm512_permutex2var_ps(a, io, b),
            );
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave2_add(dst: &mut [f32], ev: &[f32], od: &[f32]) {
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let mut j = 0;
        while j + LANES <= od.len() {
            let e = _mm512_loadu_ps(ev.as_ptr().add(j));
            let o = _mm512_loadu_ps(od.as_ptr().add(j));
            let d = dst.as_mut_ptr().add(2 * j);
            _mm512_storeu_ps(
                d,
                _mm512_add_ps(_mm512_loadu_ps(d), _mm512_permutex2var_ps(e, lo, o)),
            );
            let d = d.add(LANES);
            _mm512_storeu_ps(
                d,
                _mm512_add_ps(_mm512_loadu_ps(d), _mm512_permutex2var_ps(e, hi, o)),
            );
            j += LANES;
        }
        for k in 2 * j..dst.len() {
            dst[k] += if k % 2 == 0 { ev[k / 2] } else { od[k / 2] };
        }
    }

    /// One block of `ob ∈ {1, 2, 4, 8}` output channels over the whole grid.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product_block(
        inp: &[f32],
        offs: &[usize],
        w: &[f32],
        ob: usize,
        qpad: usize,
        out: &mut [f32],
    ) {
        match ob {
            8 => run::<8, 3>(inp, offs, w, qpad, out),
            4 => run::<4, 5>(inp, offs, w, qpad, out),
            2 => run::<2, 8>(inp, offs, w, qpad, out),
            _ => run::<1, 8>(inp, offs, w, qpad, out),
        }
    }

    /// Tiles of `NT` vectors; the last few vectors in tiles as even as possible (4 left
    /// over as 2 + 2, not 3 + 1: a one-vector tile is load-bound).
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const OB: usize, const NT: usize>(
        inp: &[f32],
        offs: &[usize],
        w: &[f32],
        qpad: usize,
        out: &mut [f32],
    ) {
        let (i, o, wp) = (inp.as_ptr(), out.as_mut_ptr(), w.as_ptr());
        let mut q = 0;
        while q < qpad {
            let left = (qpad - q) / LANES;
            let nt = if left >= NT + 2 || left == NT {
                NT
            } else if left > NT {
                left.div_ceil(2)
            } else {
                left
            };
            match nt.min(NT) {
                8 => tile::<OB, 8>(i, offs, wp, q, qpad, o),
                7 => tile::<OB, 7>(i, offs, wp, q, qpad, o),
                6 => tile::<OB, 6>(i, offs, wp, q, qpad, o),
                5 => tile::<OB, 5>(i, offs, wp, q, qpad, o),
                4 => tile::<OB, 4>(i, offs, wp, q, qpad, o),
                3 => tile::<OB, 3>(i, offs, wp, q, qpad, o),
                2 => tile::<OB, 2>(i, offs, wp, q, qpad, o),
                _ => tile::<OB, 1>(i, offs, wp, q, qpad, o),
            }
            q += nt.min(NT) * LANES;
        }
    }

    /// `OB` channels × `NT` vectors of positions starting at `q`, accumulated in registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const OB: usize, const NT: usize>(
        inp: *const f32,
        offs: &[usize],
        w: *const f32,
        q: usize,
        qpad: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NT]; OB];
        for (t, &off) in offs.iter().enumerate() {
            let p = inp.add(q + off);
            let mut xv = [_mm512_setzero_ps(); NT];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(p.add(j * LANES));
            }
            let wt = w.add(t * OB);
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wt.add(o));
                for (a, &x) in acc_o.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, x, *a);
                }
            }
        }
        for (o, acc_o) in acc.iter().enumerate() {
            for (j, &a) in acc_o.iter().enumerate() {
                _mm512_storeu_ps(out.add(o * qpad + q + j * LANES), a);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_grad(
        inp: &[f32],
        offs: &[usize],
        dy: &[f32],
        outs: usize,
        qpad: usize,
        dw: &mut [f32],
    ) {
        let taps = offs.len();
        let mut o = 0;
        while o < outs {
            let ob = if outs - o >= 4 {
                4
            } else if outs - o >= 2 {
                2
            } else {
                1
            };
            let mut t = 0;
            while t < taps {
                let tb = (taps - t).min(6);
                match (ob, tb) {
                    (4, 6) => wg_tile::<4, 6>(inp, offs, dy, o, t, qpad, taps, dw),
                    (2, 6) => wg_tile::<2, 6>(inp, offs, dy, o, t, qpad, taps, dw),
                    (1, 6) => wg_tile::<1, 6>(inp, offs, dy, o, t, qpad, taps, dw),
                    (4, _) => wg_tile::<4, 1>(inp, offs, dy, o, t, qpad, taps, dw),
                    (2, _) => wg_tile::<2, 1>(inp, offs, dy, o, t, qpad, taps, dw),
                    _ => wg_tile::<1, 1>(inp, offs, dy, o, t, qpad, taps, dw),
                }
                t += if tb == 6 { 6 } else { 1 };
            }
            o += ob;
        }
    }

    /// `OB` channels × `TB` taps of the weight gradient, reduced over the whole grid.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn wg_tile<const OB: usize, const TB: usize>(
        inp: &[f32],
        offs: &[usize],
        dy: &[f32],
        o0: usize,
        t0: usize,
        qpad: usize,
        taps: usize,
        dw: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); TB]; OB];
        let mut ptrs = [inp.as_ptr(); TB];
        for (j, p) in ptrs.iter_mut().enumerate() {
            *p = inp.as_ptr().add(offs[t0 + j]);
        }
        let d = dy.as_ptr().add(o0 * qpad);
        let mut q = 0;
        while q < qpad {
            let mut xv = [_mm512_setzero_ps(); TB];
            for (v, p) in xv.iter_mut().zip(&ptrs) {
                *v = _mm512_loadu_ps(p.add(q));
            }
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let dv = _mm512_loadu_ps(d.add(o * qpad + q));
                for (a, &x) in acc_o.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(dv, x, *a);
                }
            }
            q += LANES;
        }
        for (o, acc_o) in acc.iter().enumerate() {
            for (j, &a) in acc_o.iter().enumerate() {
                dw[(o0 + o) * taps + t0 + j] += _mm512_reduce_add_ps(a);
            }
        }
    }
}

/// How one group's input is laid out for the forward product: zero-padded, split into
/// `stride × stride` phase planes of `rows × pitch`, one set per channel.
#[derive(Clone, Debug)]
pub(super) struct FwdLayout {
    pub(super) pitch: usize,
    pub(super) rows: usize,
    /// Values of the packed input, slack included.
    pub(super) len: usize,
    /// Offset of each tap `(c, ky, kx)`, in PyTorch's weight order.
    pub(super) offs: Vec<usize>,
    /// Output grid: `oh` rows of `pitch` positions, padded to [`LANES`].
    qpad: usize,
}

impl FwdLayout {
    pub(super) fn new(g: &Conv2dGeom) -> Self {
        let (s, k, p) = (g.stride, g.kernel, g.padding);
        let (oh, ow) = (g.out_h(), g.out_w());
        let pitch = (g.in_w + 2 * p).div_ceil(s).max(ow + (k - 1) / s);
        let rows = (g.in_h + 2 * p).div_ceil(s).max(oh + (k - 1) / s) + 1;
        let plane = rows * pitch;
        let ipg = g.in_per_group();
        let mut offs = Vec::with_capacity(ipg * k * k);
        for c in 0..ipg {
            for ky in 0..k {
                for kx in 0..k {
                    offs.push(((c * s + ky % s) * s + kx % s) * plane + (ky / s) * pitch + kx / s);
                }
            }
        }
        Self {
            pitch,
            rows,
            len: ipg * s * s * plane + SLACK,
            offs,
            qpad: round_up(oh * pitch, LANES),
        }
    }

    /// What identifies this layout's packed buffers of kind `tag` (a [`scratch::tag`]) for
    /// [`scratch::take_keyed`], with `images` packed side by side.
    pub(super) fn key(&self, tag: usize, g: &Conv2dGeom, images: usize) -> scratch::Key {
        let (s, p) = (g.stride, g.padding);
        [
            tag,
            self.pitch,
            self.rows,
            self.len,
            s,
            p,
            g.in_h,
            g.in_w,
            g.in_per_group(),
            images,
        ]
    }

    /// Copies one group of one image (`ipg × h × w`) into `buf`. Writes the same positions
    /// every time, so a buffer reused for one layout keeps its zero padding.
    pub(super) fn pack(&self, g: &Conv2dGeom, x: &[f32], buf: &mut Vec<f32>) {
        zeroed(buf, self.len);
        self.pack_strided(g, x, buf, 0, self.rows * self.pitch);
    }

    /// [`FwdLayout::pack`] into `buf` from `start`, with consecutive (channel, phase)
    /// planes `plane` apart (one layout plane, or with `plane = B · rows · pitch` and
    /// `start = b · rows · pitch`, images `0..B` interleaved plane by plane).
    pub(super) fn pack_strided(
        &self,
        g: &Conv2dGeom,
        x: &[f32],
        buf: &mut [f32],
        start: usize,
        plane: usize,
    ) {
        let (s, p, h, w) = (g.stride, g.padding, g.in_h, g.in_w);
        if s == 1 {
            // every row of every channel shifted by the padding: one call per channel
            for (c, xc) in x.chunks_exact(h * w).enumerate() {
                let at = start + c * plane + p * self.pitch + p;
                copy_rows(xc, w, &mut buf[at..], self.pitch);
            }
            return;
        }
        for (c, xc) in x.chunks_exact(h * w).enumerate() {
            for (iy, src) in xc.chunks_exact(w).enumerate() {
                let py = iy + p;
                let base = start + (c * s + py % s) * s * plane + (py / s) * self.pitch;
                if s == 1 {
                    copy(&mut buf[base + p..base + p + w], src);
                    continue;
                }
                if s == 2 {
                    // Even input columns go to phase p % 2 from column p / 2, odd ones to
                    // the other phase from column (p + 1) / 2.
                    let (e0, o0) = (
                        base + (p % 2) * plane + p / 2,
                        base + ((p + 1) % 2) * plane + p.div_ceil(2),
                    );
                    let (ev, od) = if e0 < o0 {
                        let (lo, hi) = buf.split_at_mut(o0);
                        (&mut lo[e0..e0 + w.div_ceil(2)], &mut hi[..w / 2])
                    } else {
                        let (lo, hi) = buf.split_at_mut(e0);
                        (&mut hi[..w.div_ceil(2)], &mut lo[o0..o0 + w / 2])
                    };
                    deinterleave2(src, ev, od);
                    continue;
                }
                // Column phase r holds padded columns r, r + s, …: input columns from the
                // first ix with (ix + p) % s == r, every s-th.
                for r in 0..s {
                    let ix0 = (r + s - p % s) % s;
                    if ix0 >= w {
                        continue;
                    }
                    let dst = &mut buf[base + r * plane + (ix0 + p) / s..];
                    for (d, &v) in dst.iter_mut().zip(src[ix0..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// The weights of a convolution packed for [`conv2d_forward_packed`]: transformed for the
/// Winograd kernel ([`super::winograd`]) where it [suits](super::winograd::suits), else for
/// the channel-in-lanes kernel ([`super::lanes`]) where that [suits](super::lanes::suits),
/// else one [`PackedWeights`] per group. Depends on the weights, the channel counts, kernel
/// and stride only, so an inference session can pack once and reuse it for any batch and
/// image size.
#[derive(Clone, Debug)]
pub enum ForwardWeights {
    /// Output positions in the lanes (this module).
    Taps(Vec<PackedWeights>),
    /// Output channels in the lanes ([`super::lanes`]).
    Lanes(super::lanes::LaneWeights),
    /// Winograd-transformed, output channels in the lanes ([`super::winograd`]).
    Winograd(super::winograd::WinogradWeights),
}

/// Packs `w` for [`conv2d_forward_packed`] with `g`'s channel counts, kernel and groups.
pub fn pack_forward_weights(g: &Conv2dGeom, w: &[f32]) -> ForwardWeights {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    if super::winograd::suits(g) {
        return ForwardWeights::Winograd(super::winograd::pack_forward_weights(g, w));
    }
    if super::lanes::suits(g) {
        return ForwardWeights::Lanes(super::lanes::pack_forward_weights(g, w, Vec::new()));
    }
    let opg = g.out_per_group();
    let taps = g.in_per_group() * g.kernel * g.kernel;
    ForwardWeights::Taps(
        (0..g.groups)
            .into_par_iter()
            .map(|grp| {
                let wg = &w[grp * opg * taps..(grp + 1) * opg * taps];
                PackedWeights::new(opg, taps, |o, t| wg[o * taps + t])
            })
            .collect(),
    )
}

/// Forward of a grouped convolution, each (image, group)'s output passed to
/// `epilogue(image, first channel, values)` while still in cache. Overwrites `y`. Runs on
/// [`super::winograd`] where that [pays](super::winograd::pays_per_call), else on
/// [`super::lanes`] where that suits, else here (one task per (image, group)).
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if super::winograd::pays_per_call(g) {
        // (each task transforms its own group's weights)
        return super::winograd::conv2d_forward(g, x, w, y, epilogue);
    }
    if super::lanes::suits(g) {
        // packed for this call only: in a buffer from this thread's pool, returned after
        let buf = scratch::take_stale(w.len());
        let packed = super::lanes::pack_forward_weights(g, w, buf);
        super::lanes::conv2d_forward_packed(g, x, &packed, y, epilogue);
        scratch::give([packed.into_buffer()]);
        return;
    }
    let packed = pack_forward_weights(g, w);
    conv2d_forward_packed(g, x, &packed, y, epilogue);
}

/// [`conv2d_forward`] with weights from [`pack_forward_weights`].
pub fn conv2d_forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    packed: &ForwardWeights,
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let packed = match packed {
        ForwardWeights::Lanes(p) => {
            return super::lanes::conv2d_forward_packed(g, x, p, y, epilogue)
        }
        ForwardWeights::Winograd(p) => {
            return super::winograd::conv2d_forward_packed(g, x, p, y, epilogue)
        }
        ForwardWeights::Taps(p) => p,
    };
    assert_eq!(x.len(), g.input_len(), "conv2d: input length");
    assert_eq!(y.len(), g.output_len(), "conv2d: output length");
    let (oh, ow) = (g.out_h(), g.out_w());
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let taps = ipg * g.kernel * g.kernel;
    assert!(
        packed.len() == g.groups && packed.iter().all(|p| p.outs == opg && p.taps == taps),
        "conv2d: packed weights do not match the geometry"
    );
    let in_grp = ipg * g.in_h * g.in_w;
    let out_grp = opg * oh * ow;
    if out_grp == 0 {
        return;
    }
    let layout = FwdLayout::new(g);
    let key = layout.key(scratch::tag::FWD_INPUT, g, 1);
    y.par_chunks_mut(out_grp).enumerate().for_each(|(i, yg)| {
        let (n, grp) = (i / g.groups, i % g.groups);
        let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
        // pooled per thread (see `scratch`); the packed input keyed by its layout
        let mut buf = scratch::take_keyed(&key);
        let [mut grid] = scratch::take();
        grid.resize(opg * layout.qpad, 0.0);
        layout.pack(g, xg, &mut buf);
        taps_product(&buf, &layout.offs, &packed[grp], layout.qpad, &mut grid);
        for (o, yo) in yg.chunks_exact_mut(oh * ow).enumerate() {
            let src = &grid[o * layout.qpad..];
            for (oy, dst) in yo.chunks_exact_mut(ow).enumerate() {
                copy(dst, &src[oy * layout.pitch..oy * layout.pitch + ow]);
            }
        }
        scratch::give_keyed(key, buf);
        scratch::give([grid]);
        epilogue(n, grp * opg, yg);
    });
}

/// One stride phase `(a, b)` of the input gradient (input rows `s·i + a`, columns
/// `s·j + b`), stored at index `a · min(s, w) + b`.
#[derive(Clone, Debug)]
pub(super) struct Phase {
    /// Rows of the phase grid.
    pub(super) hi: usize,
    /// Columns of the phase grid.
    pub(super) wj: usize,
    /// The forward taps `(o, ky, kx)` that reach this phase, and their offsets into the
    /// padded output gradient.
    pub(super) taps: Vec<(usize, usize, usize)>,
    pub(super) offs: Vec<usize>,
    qpad: usize,
}

/// How one group's output gradient is laid out for the input-gradient products.
#[derive(Clone, Debug)]
pub(super) struct BwdLayout {
    top: usize,
    left: usize,
    pub(super) pitch: usize,
    rows: usize,
    len: usize,
    pub(super) phases: Vec<Phase>,
}

impl BwdLayout {
    pub(super) fn new(g: &Conv2dGeom) -> Self {
        let (s, k, p) = (g.stride as isize, g.kernel, g.padding as isize);
        let (oh, ow) = (g.out_h(), g.out_w());
        // Input row s·i + a receives output row i + (a + p − ky)/s through tap ky when
        // s divides a + p − ky.
        let shift = |a: usize, kk: usize| -> Option<isize> {
            let d = a as isize + p - kk as isize;
            (d.rem_euclid(s) == 0).then(|| d.div_euclid(s))
        };
        let mut raw = Vec::new();
        let (mut lo_r, mut lo_c, mut hi_r, mut hi_c) = (0isize, 0isize, 0isize, 0isize);
        for a in 0..g.stride.min(g.in_h) {
            for b in 0..g.stride.min(g.in_w) {
                let hi = (g.in_h - a).div_ceil(g.stride);
                let wj = (g.in_w - b).div_ceil(g.stride);
                let mut taps = Vec::new();
                for ky in 0..k {
                    let Some(dr) = shift(a, ky) else { continue };
                    for kx in 0..k {
                        let Some(dc) = shift(b, kx) else { continue };
                        lo_r = lo_r.min(dr);
                        lo_c = lo_c.min(dc);
                        hi_r = hi_r.max(hi as isize + dr);
                        hi_c = hi_c.max(wj as isize + dc);
                        taps.push((ky, kx, dr, dc));
                    }
                }
                raw.push((hi, wj, taps));
            }
        }
        let (top, left) = ((-lo_r) as usize, (-lo_c) as usize);
        let pitch = left + ow.max(hi_c.max(0) as usize);
        let rows = top + oh.max(hi_r.max(0) as usize) + 1;
        let plane = rows * pitch;
        let opg = g.out_per_group();
        let phases = raw
            .into_iter()
            .map(|(hi, wj, taps)| {
                let mut ptaps = Vec::new();
                let mut offs = Vec::new();
                for o in 0..opg {
                    for &(ky, kx, dr, dc) in &taps {
                        ptaps.push((o, ky, kx));
                        offs.push(
                            o * plane
                                + (dr + top as isize) as usize * pitch
                                + (dc + left as isize) as usize,
                        );
                    }
                }
                Phase {
                    hi,
                    wj,
                    taps: ptaps,
                    offs,
                    qpad: round_up(hi * pitch, LANES),
                }
            })
            .collect();
        Self {
            top,
            left,
            pitch,
            rows,
            len: opg * plane + SLACK,
            phases,
        }
    }

    /// What identifies this layout's packed buffers for [`scratch::take_keyed`].
    pub(super) fn key(&self, oh: usize, ow: usize) -> scratch::Key {
        let planes = (self.len - SLACK) / (self.rows * self.pitch);
        [
            scratch::tag::BWD_PADDED,
            self.top,
            self.left,
            self.pitch,
            self.rows,
            self.len,
            oh,
            ow,
            planes,
            0,
        ]
    }

    /// Copies one group of one image's output gradient (`opg × oh × ow`) into `buf`.
    pub(super) fn pack(&self, oh: usize, ow: usize, dy: &[f32], buf: &mut Vec<f32>) {
        let plane = self.rows * self.pitch;
        zeroed(buf, self.len);
        for (o, d) in dy.chunks_exact(oh * ow).enumerate() {
            for (oy, src) in d.chunks_exact(ow).enumerate() {
                let at = o * plane + (oy + self.top) * self.pitch + self.left;
                copy(&mut buf[at..at + ow], src);
            }
        }
    }
}

/// `dx` (when given) split per group: for each group, its slice of every image in order.
pub(super) fn images_by_group<'a>(
    g: &Conv2dGeom,
    dx: Option<&'a mut [f32]>,
) -> Vec<Vec<&'a mut [f32]>> {
    let mut groups: Vec<Vec<&mut [f32]>> = (0..g.groups).map(|_| Vec::new()).collect();
    let in_grp = g.in_per_group() * g.in_h * g.in_w;
    if let (Some(dx), true) = (dx, in_grp > 0) {
        for (i, part) in dx.chunks_exact_mut(in_grp).enumerate() {
            groups[i % g.groups].push(part);
        }
    }
    groups
}

impl BwdLayout {
    /// Adds one image's input gradient for one group, computed per stride phase, into
    /// `dxn` (channel planes of `in_h × in_w`): `row(c, phase, i)` is row `i` of phase
    /// `phase`'s grid for channel `c`, `wj` values, whose entry `j` belongs at input row
    /// `s·i + a`, column `s·j + b` (phase index `a · min(s, w) + b`). Phases that no tap
    /// reaches are skipped.
    pub(super) fn add_phases<'a>(
        &self,
        g: &Conv2dGeom,
        dxn: &mut [f32],
        row: impl Fn(usize, usize, usize) -> &'a [f32],
    ) {
        let (s, hw, sw) = (g.stride, g.in_h * g.in_w, g.stride.min(g.in_w));
        for (c, dxc) in dxn.chunks_exact_mut(hw).enumerate() {
            for (iy, dst) in dxc.chunks_exact_mut(g.in_w).enumerate() {
                let (a, i) = (iy % s, iy / s);
                let row = |b: usize| {
                    let idx = a * sw + b;
                    (!self.phases[idx].taps.is_empty()).then(|| row(c, idx, i))
                };
                if s == 1 {
                    if let Some(r) = row(0) {
                        add(dst, r);
                    }
                } else if s == 2 && g.in_w >= 2 {
                    match (row(0), row(1)) {
                        (Some(e), Some(o)) => interleave2_add(dst, e, o),
                        (e, o) => {
                            for (b, r) in [(0, e), (1, o)] {
                                let Some(r) = r else { continue };
                                for (d, v) in dst.iter_mut().skip(b).step_by(2).zip(r) {
                                    *d += v;
                                }
                            }
                        }
                    }
                } else {
                    for b in 0..sw {
                        let Some(r) = row(b) else { continue };
                        for (d, v) in dst.iter_mut().skip(b).step_by(s).zip(r) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// Backward of a grouped convolution: adds the input gradient into `dx` (when given) and
/// the weight gradient into `dw`. One task per group, images in order inside it, so the
/// weight gradient's summation order does not depend on the thread count.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
    if super::lanes::suits(g) {
        return super::lanes::conv2d_backward(g, x, w, dy, dx, dw);
    }
    g.check_backward(x, w, dy, dx.as_deref(), dw);
    let (oh, ow) = (g.out_h(), g.out_w());
    let (ipg, opg, k) = (g.in_per_group(), g.out_per_group(), g.kernel);
    let taps = ipg * k * k;
    let in_grp = ipg * g.in_h * g.in_w;
    let out_grp = opg * oh * ow;
    if out_grp == 0 || in_grp == 0 {
        return;
    }
    let fwd = FwdLayout::new(g);
    let bwd = BwdLayout::new(g);
    // Per group: its weight gradient and, per image, its slice of the input gradient.
    let dx_groups = images_by_group(g, dx);
    dw.par_chunks_exact_mut(opg * taps)
        .zip(dx_groups.into_par_iter())
        .enumerate()
        .for_each(|(grp, (dwg, mut dxg))| {
            let wg = &w[grp * opg * taps..(grp + 1) * opg * taps];
            let phase_w: Vec<PackedWeights> = bwd
                .phases
                .iter()
                .map(|ph| {
                    PackedWeights::new(ipg, ph.taps.len(), |c, t| {
                        let (o, ky, kx) = ph.taps[t];
                        wg[((o * ipg + c) * k + ky) * k + kx]
                    })
                })
                .collect();
            // pooled per thread (see `scratch`); zero-padded ones keyed by their layout
            // Weight gradient, several images per product: their planes interleave (plane
            // stride B · plane), so one grid runs over all of them and each weight's sum is
            // reduced across lanes once per chunk rather than once per small image.
            let plane = fwd.rows * fwd.pitch;
            let per_image = ipg * g.stride * g.stride * plane;
            let chunk = if fwd.qpad >= WG_BATCH_BELOW {
                1
            } else {
                (WG_CHUNK_VALUES / per_image.max(1)).clamp(1, g.batch)
            };
            let (xkey, dykey, padkey) = (
                fwd.key(scratch::tag::WG_INPUT, g, chunk),
                fwd.key(scratch::tag::WG_OUTPUT_GRAD, g, chunk),
                bwd.key(oh, ow),
            );
            let (mut xbuf, mut dybuf) = (scratch::take_keyed(&xkey), scratch::take_keyed(&dykey));
            let mut dypad = scratch::take_keyed(&padkey);
            let mut grids: Vec<Vec<f32>> = (0..bwd.phases.len())
                .map(|_| {
                    let [grid] = scratch::take();
                    grid
                })
                .collect();
            for n0 in (0..g.batch).step_by(chunk) {
                let b = chunk.min(g.batch - n0);
                let stride = b * plane;
                // one image: its own grid only; several: every plane but the last's tail
                let qtot = if b == 1 {
                    fwd.qpad
                } else {
                    round_up(stride, LANES)
                };
                let offs: Vec<usize> = fwd
                    .offs
                    .iter()
                    .map(|&o| (o / plane) * stride + o % plane)
                    .collect();
                zeroed(&mut xbuf, per_image * b + plane + SLACK);
                zeroed(&mut dybuf, opg * qtot);
                for j in 0..b {
                    let n = n0 + j;
                    let xn = &x[(n * g.groups + grp) * in_grp..][..in_grp];
                    fwd.pack_strided(g, xn, &mut xbuf, j * plane, stride);
                    let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                    // output gradient on the forward grid, zeros elsewhere
                    for (o, d) in dyn_.chunks_exact(oh * ow).enumerate() {
                        for (oy, src) in d.chunks_exact(ow).enumerate() {
                            let at = o * qtot + j * plane + oy * fwd.pitch;
                            copy(&mut dybuf[at..at + ow], src);
                        }
                    }
                }
                taps_weight_grad(&xbuf, &offs, &dybuf, opg, qtot, dwg);
            }
            for n in 0..g.batch {
                let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                // Input gradient, one stride phase at a time.
                let Some(dxn) = dxg.get_mut(n) else { continue };
                bwd.pack(oh, ow, dyn_, &mut dypad);
                for ((ph, pw), grid) in bwd.phases.iter().zip(&phase_w).zip(grids.iter_mut()) {
                    if !ph.taps.is_empty() {
                        zeroed(grid, ipg * ph.qpad);
                        taps_product(&dypad, &ph.offs, pw, ph.qpad, grid);
                    }
                }
                bwd.add_phases(g, dxn, |c, idx, i| {
                    let ph = &bwd.phases[idx];
                    &grids[idx][c * ph.qpad + i * bwd.pitch..][..ph.wj]
                });
            }
            scratch::give_keyed(xkey, xbuf);
            scratch::give_keyed(dykey, dybuf);
            scratch::give_keyed(padkey, dypad);
            for grid in grids {
                scratch::give([grid]);
            }
        });
}
