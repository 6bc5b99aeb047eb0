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
//! channels × 3 vectors of positions in registers (4 × 3 where there are 16 registers)
//! and streams the taps; it is written once over [`super::simd`] and runs as AVX-512,
//! AVX2 + FMA, NEON or plain code, as [`super::isa::level`] says.
//!
//! The input gradient is the same product on the padded output gradient (one product per
//! stride phase of the input), and the weight gradient is
//! `dW[o][t] = Σ_q dY[o][q] · in[q + off[t]]`.

use rayon::prelude::*;

use super::conv::Conv2dGeom;

use super::scratch;
use super::simd::{self, dispatch, Kernel, Simd};

/// Grids are padded to a multiple of this many positions: the widest vector (AVX-512's
/// 16 lanes), so that every level's vectors tile them.
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

/// Makes `buf` `len` zeros unless it already has that length (then it holds zero padding
/// from an earlier pack of the same layout, and the pack overwrites the rest).
pub(super) fn zeroed(buf: &mut Vec<f32>, len: usize) {
    if buf.len() != len {
        buf.clear();
        buf.resize(len, 0.0);
    }
}

/// `dst = src` for short rows, without a call into `memcpy`: one row of [`copy_rows`].
fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy: lengths");
    copy_rows(src, src.len(), dst, dst.len());
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
    struct K<'a>(&'a [f32], usize, usize, &'a mut [f32], usize);
    impl Kernel for K<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let K(src, w, rows, dst, pitch) = self;
            for r in 0..rows {
                // SAFETY: reads `src[r·w..][..w]`, writes `dst[r·pitch..][..w]`, in
                // bounds by the assert above.
                unsafe {
                    simd::copy::<S>(dst.as_mut_ptr().add(r * pitch), src.as_ptr().add(r * w), w)
                }
            }
        }
    }
    // SAFETY: as in the kernel.
    unsafe { dispatch(K(src, w, rows, dst, pitch)) }
}

/// `dst += src`.
pub(super) fn add(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add: lengths");
    struct K<'a>(&'a mut [f32], &'a [f32]);
    impl Kernel for K<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            // SAFETY: both slices hold `self.0.len()` values (asserted above).
            unsafe { simd::add::<S>(self.0.as_mut_ptr(), self.1.as_ptr(), self.0.len()) }
        }
    }
    // SAFETY: the kernel reads and writes within the two slices.
    unsafe { dispatch(K(dst, src)) }
}

/// `ev[j] = src[2j]`, `od[j] = src[2j + 1]`.
fn deinterleave2(src: &[f32], ev: &mut [f32], od: &mut [f32]) {
    assert!(
        ev.len() == src.len().div_ceil(2) && od.len() == src.len() / 2,
        "deinterleave2: lengths"
    );
    struct K<'a>(&'a [f32], &'a mut [f32], &'a mut [f32]);
    impl Kernel for K<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let K(src, ev, od) = self;
            let n = S::LANES;
            let mut i = 0;
            while i + 2 * n <= src.len() {
                // SAFETY: reads `src[i..i + 2n]`, writes `ev`/`od` at `i/2..i/2 + n`, both
                // in bounds (`ev` and `od` hold half of `src`, rounded).
                unsafe {
                    let p = src.as_ptr().add(i);
                    let (e, o) = S::deinterleave(S::load(p), S::load(p.add(n)));
                    S::store(ev.as_mut_ptr().add(i / 2), e);
                    S::store(od.as_mut_ptr().add(i / 2), o);
                }
                i += 2 * n;
            }
            let n = src.len() - i;
            if n > 0 {
                // the last `n < 2·LANES` values, as part vectors
                // SAFETY: reads `src[i..]`, writes `ev[i/2..]` (⌈n/2⌉ values) and
                // `od[i/2..]` (⌊n/2⌋), all in bounds.
                unsafe {
                    let p = src.as_ptr().add(i);
                    let a = simd::load_n::<S>(p, n.min(S::LANES));
                    let b = simd::load_n::<S>(p.add(n.min(S::LANES)), n.saturating_sub(S::LANES));
                    let (e, o) = S::deinterleave(a, b);
                    simd::store_n::<S>(ev.as_mut_ptr().add(i / 2), n.div_ceil(2), e);
                    simd::store_n::<S>(od.as_mut_ptr().add(i / 2), n / 2, o);
                }
            }
        }
    }
    // SAFETY: as in the kernel.
    unsafe { dispatch(K(src, ev, od)) }
}

/// `dst[2j] += ev[j]`, `dst[2j + 1] += od[j]`.
fn interleave2_add(dst: &mut [f32], ev: &[f32], od: &[f32]) {
    assert!(
        ev.len() == dst.len().div_ceil(2) && od.len() == dst.len() / 2,
        "interleave2_add: lengths"
    );
    struct K<'a>(&'a mut [f32], &'a [f32], &'a [f32]);
    impl Kernel for K<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let K(dst, ev, od) = self;
            let n = S::LANES;
            let mut j = 0;
            while j + n <= od.len() {
                // SAFETY: reads `ev`/`od[j..j + n]` (`od` is the shorter), reads and
                // writes `dst[2j..2j + 2n]`, within `2·od.len() ≤ dst.len()`.
                unsafe {
                    let (lo, hi) =
                        S::interleave(S::load(ev.as_ptr().add(j)), S::load(od.as_ptr().add(j)));
                    let d = dst.as_mut_ptr().add(2 * j);
                    S::store(d, S::add(S::load(d), lo));
                    S::store(d.add(n), S::add(S::load(d.add(n)), hi));
                }
                j += n;
            }
            let k = dst.len() - 2 * j;
            if k > 0 {
                // the last `k < 2·LANES` values, as part vectors
                // SAFETY: reads `ev[j..]`, `od[j..]`, reads and writes `dst[2j..]`, each
                // to its end only.
                unsafe {
                    let (lo, hi) = S::interleave(
                        simd::load_n::<S>(ev.as_ptr().add(j), ev.len() - j),
                        simd::load_n::<S>(od.as_ptr().add(j), od.len() - j),
                    );
                    let d = dst.as_mut_ptr().add(2 * j);
                    let (k0, k1) = (k.min(S::LANES), k.saturating_sub(S::LANES));
                    simd::store_n::<S>(d, k0, S::add(simd::load_n::<S>(d, k0), lo));
                    let d = d.add(k0);
                    simd::store_n::<S>(d, k1, S::add(simd::load_n::<S>(d, k1), hi));
                }
            }
        }
    }
    // SAFETY: as in the kernel.
    unsafe { dispatch(K(dst, ev, od)) }
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
        // SAFETY: the asserts above bound every read of `inp` (`q + off < qpad + max_off`);
        // the kernel reads `wb[t·ob + o]` and writes `ob_out[o·qpad + q]` for `o < ob`,
        // `q < qpad` only.
        unsafe {
            dispatch(tiles::ProductBlock {
                inp,
                offs,
                w: wb,
                ob,
                qpad,
                out: ob_out,
            })
        };
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
    // SAFETY: reads stay below `max_off + qpad` in `inp` and `outs · qpad` in `dy`
    // (asserted above); writes stay in `dw[..outs · taps]`.
    unsafe {
        dispatch(tiles::WeightGrad {
            inp,
            offs,
            dy,
            outs,
            qpad,
            dw,
        })
    };
}

/// The register tiles of the two products, written once over [`Simd`]: the tile shapes
/// follow the level's vector width and register count.
mod tiles {
    use super::super::simd::{Kernel, Simd};

    /// One block of `ob ∈ {1, 2, 4, 8}` output channels over the whole grid: see
    /// [`super::taps_product`].
    pub(super) struct ProductBlock<'a> {
        pub inp: &'a [f32],
        pub offs: &'a [usize],
        pub w: &'a [f32],
        pub ob: usize,
        pub qpad: usize,
        pub out: &'a mut [f32],
    }

    impl Kernel for ProductBlock<'_> {
        type Output = ();

        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let (i, o, wp) = (self.inp.as_ptr(), self.out.as_mut_ptr(), self.w.as_ptr());
            let (offs, qpad) = (self.offs, self.qpad);
            // OB × NT accumulators, NT input vectors and a broadcast in registers: 24 + 4
            // of 32, or 12 + 4 of 16; eight channels on 16 registers as two halves.
            // SAFETY (every arm): the caller's bounds; each half-block reads its own
            // weights (`w[t·8 + o0 + o]`) and writes its own rows of `out`.
            unsafe {
                if S::REGS >= 32 {
                    match self.ob {
                        8 => run::<S, 8, 8, 3>(i, offs, wp, qpad, o),
                        4 => run::<S, 4, 4, 5>(i, offs, wp, qpad, o),
                        2 => run::<S, 2, 2, 8>(i, offs, wp, qpad, o),
                        _ => run::<S, 1, 1, 8>(i, offs, wp, qpad, o),
                    }
                } else {
                    match self.ob {
                        8 => {
                            run::<S, 8, 4, 3>(i, offs, wp, qpad, o);
                            run::<S, 8, 4, 3>(i, offs, wp.add(4), qpad, o.add(4 * qpad));
                        }
                        4 => run::<S, 4, 4, 3>(i, offs, wp, qpad, o),
                        2 => run::<S, 2, 2, 5>(i, offs, wp, qpad, o),
                        _ => run::<S, 1, 1, 8>(i, offs, wp, qpad, o),
                    }
                }
            }
        }
    }

    /// Tiles of `NT` vectors over the grid; the last few vectors in tiles as even as
    /// possible (4 left over as 2 + 2, not 3 + 1: a one-vector tile is load-bound). `WS`
    /// is the row stride of the packed weights, `OB ≤ WS` the channels of this pass.
    #[inline(always)]
    unsafe fn run<S: Simd, const WS: usize, const OB: usize, const NT: usize>(
        i: *const f32,
        offs: &[usize],
        w: *const f32,
        qpad: usize,
        o: *mut f32,
    ) {
        let mut q = 0;
        while q < qpad {
            let left = (qpad - q) / S::LANES;
            let nt = if left >= NT + 2 || left == NT {
                NT
            } else if left > NT {
                left.div_ceil(2)
            } else {
                left
            };
            // SAFETY: `q + nt·LANES ≤ qpad`; the rest is the caller's.
            unsafe {
                match nt.min(NT) {
                    8 => tile::<S, WS, OB, 8>(i, offs, w, q, qpad, o),
                    7 => tile::<S, WS, OB, 7>(i, offs, w, q, qpad, o),
                    6 => tile::<S, WS, OB, 6>(i, offs, w, q, qpad, o),
                    5 => tile::<S, WS, OB, 5>(i, offs, w, q, qpad, o),
                    4 => tile::<S, WS, OB, 4>(i, offs, w, q, qpad, o),
                    3 => tile::<S, WS, OB, 3>(i, offs, w, q, qpad, o),
                    2 => tile::<S, WS, OB, 2>(i, offs, w, q, qpad, o),
                    _ => tile::<S, WS, OB, 1>(i, offs, w, q, qpad, o),
                }
            }
            q += nt.min(NT) * S::LANES;
        }
    }

    /// `OB` channels × `NT` vectors of positions starting at `q`, accumulated in registers.
    #[inline(always)]
    unsafe fn tile<S: Simd, const WS: usize, const OB: usize, const NT: usize>(
        inp: *const f32,
        offs: &[usize],
        w: *const f32,
        q: usize,
        qpad: usize,
        out: *mut f32,
    ) {
        // SAFETY: the caller's bounds (see `ProductBlock`).
        unsafe {
            let mut acc = [[S::zero(); NT]; OB];
            for (t, &off) in offs.iter().enumerate() {
                let p = inp.add(q + off);
                let mut xv = [S::zero(); NT];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = S::load(p.add(j * S::LANES));
                }
                let wt = w.add(t * WS);
                for (o, acc_o) in acc.iter_mut().enumerate() {
                    let wv = S::splat(*wt.add(o));
                    for (a, &x) in acc_o.iter_mut().zip(&xv) {
                        *a = S::fma(wv, x, *a);
                    }
                }
            }
            for (o, acc_o) in acc.iter().enumerate() {
                for (j, &a) in acc_o.iter().enumerate() {
                    S::store(out.add(o * qpad + q + j * S::LANES), a);
                }
            }
        }
    }

    /// `dw[o·taps + t] += Σ_q dy[o·qpad + q] · inp[q + offs[t]]`: see
    /// [`super::taps_weight_grad`].
    pub(super) struct WeightGrad<'a> {
        pub inp: &'a [f32],
        pub offs: &'a [usize],
        pub dy: &'a [f32],
        pub outs: usize,
        pub qpad: usize,
        pub dw: &'a mut [f32],
    }

    impl Kernel for WeightGrad<'_> {
        type Output = ();

        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let WeightGrad {
                inp,
                offs,
                dy,
                outs,
                qpad,
                dw,
            } = self;
            // OB × TB accumulators, TB input vectors and one gradient vector: 24 + 7 of
            // 32, or 8 + 5 of 16.
            let (ob_max, tb_max) = if S::REGS >= 32 { (4, 6) } else { (2, 4) };
            let taps = offs.len();
            let mut o = 0;
            while o < outs {
                let ob = if outs - o >= ob_max {
                    ob_max
                } else if outs - o >= 2 {
                    2
                } else {
                    1
                };
                let mut t = 0;
                while t < taps {
                    let tb = if taps - t >= tb_max { tb_max } else { 1 };
                    let at = (inp, offs, dy, o, t, qpad, taps);
                    // SAFETY: `o + ob ≤ outs`, `t + tb ≤ taps`; the rest is the caller's.
                    unsafe {
                        match (ob, tb) {
                            (4, 6) => wg_tile::<S, 4, 6>(at, dw),
                            (2, 6) => wg_tile::<S, 2, 6>(at, dw),
                            (1, 6) => wg_tile::<S, 1, 6>(at, dw),
                            (2, 4) => wg_tile::<S, 2, 4>(at, dw),
                            (1, 4) => wg_tile::<S, 1, 4>(at, dw),
                            (4, _) => wg_tile::<S, 4, 1>(at, dw),
                            (2, _) => wg_tile::<S, 2, 1>(at, dw),
                            _ => wg_tile::<S, 1, 1>(at, dw),
                        }
                    }
                    t += tb;
                }
                o += ob;
            }
        }
    }

    /// `OB` channels × `TB` taps of the weight gradient, reduced over the whole grid.
    #[inline(always)]
    unsafe fn wg_tile<S: Simd, const OB: usize, const TB: usize>(
        (inp, offs, dy, o0, t0, qpad, taps): (&[f32], &[usize], &[f32], usize, usize, usize, usize),
        dw: &mut [f32],
    ) {
        // SAFETY: the caller's bounds (see `WeightGrad`).
        unsafe {
            let mut acc = [[S::zero(); TB]; OB];
            let mut ptrs = [inp.as_ptr(); TB];
            for (j, p) in ptrs.iter_mut().enumerate() {
                *p = inp.as_ptr().add(offs[t0 + j]);
            }
            let d = dy.as_ptr().add(o0 * qpad);
            let mut q = 0;
            while q < qpad {
                let mut xv = [S::zero(); TB];
                for (v, p) in xv.iter_mut().zip(&ptrs) {
                    *v = S::load(p.add(q));
                }
                for (o, acc_o) in acc.iter_mut().enumerate() {
                    let dv = S::load(d.add(o * qpad + q));
                    for (a, &x) in acc_o.iter_mut().zip(&xv) {
                        *a = S::fma(dv, x, *a);
                    }
                }
                q += S::LANES;
            }
            for (o, acc_o) in acc.iter().enumerate() {
                for (j, &a) in acc_o.iter().enumerate() {
                    dw[(o0 + o) * taps + t0 + j] += S::reduce_add(a);
                }
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
