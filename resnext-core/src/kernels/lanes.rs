//! Grouped convolution with channels in the vector lanes, for groups of 16 to 64 channels
//! (ResNeXt-50's stages 3 and 4: 16 and 32 channels per group) on AVX-512.
//!
//! [`super::direct`]'s kernel puts output *positions* in the lanes: a grid of `rows × pitch`
//! positions padded to whole vectors. At 7×7 or 14×14 that grid wastes a fifth to a third of
//! every vector on padding columns and rounding, and every weight gradient ends in a
//! reduction across lanes. Here the lanes hold 16 (or, as two vectors, 32) output channels
//! of one group instead: a register tile is up to 14 positions of one output row × 32
//! channels, each step loads one weight row (the tile's channels for one tap) and
//! broadcasts one input value per position, so positions cost nothing beyond the real ones
//! and the weight gradient sums positions along the loop, never across lanes.
//!
//! The input buffers are [`super::direct`]'s padded, stride-phase-split planes, so that a
//! tap of any stride reads position `j` of a row at a fixed offset plus `j`; only the
//! outputs (and, for the weight gradient, the output gradient) are transposed between the
//! channel-major tensors and the channel-in-lanes tiles.

use rayon::prelude::*;

use super::conv::Conv2dGeom;
use super::direct::{cpu_has_avx512, has_avx512, zeroed, BwdLayout, FwdLayout};

/// `f32` lanes of an AVX-512 vector.
const LANES: usize = 16;
/// Positions of one register tile: 14 positions × 2 vectors of channels is 28 accumulators,
/// leaving the two weight vectors and a broadcast their registers.
const PMAX: usize = 14;
/// Taps of one weight-gradient tile (each a register-held row of 16 or 32 channels).
const WG_TAPS: usize = 8;
/// At most this many packed input values per batch of images in the weight gradient (1 MB).
const WG_CHUNK_VALUES: usize = 1 << 18;

/// Whether the kernels here run `g`: a grouped convolution (kernel larger than 1) whose
/// groups have a multiple of 16 channels on both sides, at most 64, on a CPU with AVX-512
/// (and [`super::direct::force_portable`] off). A subset of [`super::direct::suits`].
pub fn suits(g: &Conv2dGeom) -> bool {
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    g.groups > 1
        && g.kernel > 1
        && ipg.is_multiple_of(LANES)
        && opg.is_multiple_of(LANES)
        && ipg <= 64
        && opg <= 64
        && has_avx512()
}

/// The weights of one product `out[q][o] = Σ_t W[o][t] · in[q + off[t]]`, in blocks of up
/// to 32 outputs (two vectors): block `(o0, width, at)` holds `taps × width` values at `at`,
/// row `t` being the block's weights for tap `t`.
#[derive(Clone, Debug)]
pub struct LaneWeights {
    data: Vec<f32>,
    blocks: Vec<(usize, usize, usize)>,
    taps: usize,
    outs: usize,
}

impl LaneWeights {
    /// Packs `outs × taps` weights given by `w(o, t)`; `outs` a multiple of 16.
    fn new(outs: usize, taps: usize, w: impl Fn(usize, usize) -> f32) -> Self {
        assert!(outs.is_multiple_of(LANES), "lane weights: outputs");
        let mut data = vec![0.0f32; outs * taps];
        let mut blocks = Vec::new();
        let mut o0 = 0;
        while o0 < outs {
            let width = (outs - o0).min(2 * LANES);
            let at = o0 * taps;
            for (t, row) in data[at..at + taps * width]
                .chunks_exact_mut(width)
                .enumerate()
            {
                for (o, d) in row.iter_mut().enumerate() {
                    *d = w(o0 + o, t);
                }
            }
            blocks.push((o0, width, at));
            o0 += width;
        }
        Self {
            data,
            blocks,
            taps,
            outs,
        }
    }
}

/// A grouped convolution's forward weights, one [`LaneWeights`] per group (tap `t` in
/// PyTorch's `(in channel, ky, kx)` order).
pub fn pack_forward_weights(g: &Conv2dGeom, w: &[f32]) -> Vec<LaneWeights> {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    let opg = g.out_per_group();
    let taps = g.in_per_group() * g.kernel * g.kernel;
    (0..g.groups)
        .into_par_iter()
        .map(|grp| {
            let wg = &w[grp * opg * taps..(grp + 1) * opg * taps];
            LaneWeights::new(opg, taps, |o, t| wg[o * taps + t])
        })
        .collect()
}

/// `out[(r·cols + j)·outs + o] = Σ_t W[o][t] · inp[r·pitch + j + offs[t]]` for `r < rows`,
/// `j < cols` and every output `o` of `w`.
fn product(
    inp: &[f32],
    pitch: usize,
    rows: usize,
    cols: usize,
    offs: &[usize],
    w: &LaneWeights,
    out: &mut [f32],
) {
    assert_eq!(offs.len(), w.taps, "lanes product: tap count");
    assert!(out.len() >= rows * cols * w.outs, "lanes product: output");
    if rows == 0 || cols == 0 {
        return;
    }
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(
        (rows - 1) * pitch + cols + max_off <= inp.len(),
        "lanes product: input"
    );
    assert!(cpu_has_avx512(), "lanes product: needs AVX-512");
    // Row chunks as even as possible (a 28-wide row as 14 + 14, not 14 + 14 + 0).
    let chunk = cols.div_ceil(cols.div_ceil(PMAX));
    for &(o0, width, at) in &w.blocks {
        let wb = &w.data[at..at + w.taps * width];
        for r in 0..rows {
            let mut j = 0;
            while j < cols {
                let p = chunk.min(cols - j);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F is present (asserted); the tile reads
                // `inp[r·pitch + j + i + off]` for `i < p ≤ cols − j`, below `inp.len()` by
                // the assert above, `wb` in full, and writes `p` rows of `width` values of
                // `out` from `(r·cols + j)·outs + o0`, inside the asserted length.
                unsafe {
                    avx512::tile(
                        inp.as_ptr().add(r * pitch + j),
                        offs,
                        wb.as_ptr(),
                        width,
                        p,
                        out.as_mut_ptr().add((r * cols + j) * w.outs + o0),
                        w.outs,
                    )
                };
                j += p;
            }
        }
    }
}

/// `dst[c·n + q] = src[q·channels + c]`: position-major tiles back to channel planes.
fn to_planes(src: &[f32], channels: usize, dst: &mut [f32]) {
    let n = dst.len() / channels;
    for (c, plane) in dst.chunks_exact_mut(n).enumerate() {
        for (d, s) in plane.iter_mut().zip(src[c..].iter().step_by(channels)) {
            *d = *s;
        }
    }
}

/// Forward, one task per (image, group), each group's output passed to
/// `epilogue(image, first channel, values)` while still in cache. Overwrites `y`.
pub fn conv2d_forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    packed: &[LaneWeights],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(x.len(), g.input_len(), "conv2d: input length");
    assert_eq!(y.len(), g.output_len(), "conv2d: output length");
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let taps = ipg * g.kernel * g.kernel;
    assert!(
        packed.len() == g.groups && packed.iter().all(|p| p.outs == opg && p.taps == taps),
        "conv2d: packed weights do not match the geometry"
    );
    let (oh, ow) = (g.out_h(), g.out_w());
    let in_grp = ipg * g.in_h * g.in_w;
    let out_grp = opg * oh * ow;
    if out_grp == 0 {
        return;
    }
    let layout = FwdLayout::new(g);
    y.par_chunks_mut(out_grp).enumerate().for_each_init(
        || (Vec::new(), vec![0.0f32; out_grp]),
        |(buf, tiles), (i, yg)| {
            let (n, grp) = (i / g.groups, i % g.groups);
            let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
            layout.pack(g, xg, buf);
            product(buf, layout.pitch, oh, ow, &layout.offs, &packed[grp], tiles);
            to_planes(tiles, opg, yg);
            epilogue(n, grp * opg, yg);
        },
    );
}

/// Backward: adds the input gradient into `dx` (when given) and the weight gradient into
/// `dw`. One task per group, images in order inside it, so the weight gradient's summation
/// order does not depend on the thread count.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
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
    let mut dx_groups: Vec<Vec<&mut [f32]>> = (0..g.groups).map(|_| Vec::new()).collect();
    if let Some(dx) = dx {
        for (i, part) in dx.chunks_exact_mut(in_grp).enumerate() {
            dx_groups[i % g.groups].push(part);
        }
    }
    let chunk = (WG_CHUNK_VALUES / fwd.len).clamp(1, g.batch);
    dw.par_chunks_exact_mut(opg * taps)
        .zip(dx_groups.into_par_iter())
        .enumerate()
        .for_each(|(grp, (dwg, mut dxg))| {
            let wg = &w[grp * opg * taps..(grp + 1) * opg * taps];
            // Weight gradient over chunks of images: their packed inputs side by side, the
            // output gradient position-major.
            let (mut xbuf, mut dyt) = (Vec::new(), Vec::new());
            let mut sums = vec![0.0f32; opg * taps];
            for n0 in (0..g.batch).step_by(chunk) {
                let b = chunk.min(g.batch - n0);
                zeroed(&mut xbuf, b * fwd.len);
                dyt.resize(b * out_grp, 0.0);
                for j in 0..b {
                    let n = n0 + j;
                    let xn = &x[(n * g.groups + grp) * in_grp..][..in_grp];
                    fwd.pack_strided(g, xn, &mut xbuf[j * fwd.len..], 0, fwd.rows * fwd.pitch);
                    let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                    let dst = &mut dyt[j * out_grp..(j + 1) * out_grp];
                    for (o, plane) in dyn_.chunks_exact(oh * ow).enumerate() {
                        for (d, &v) in dst[o..].iter_mut().step_by(opg).zip(plane) {
                            *d = v;
                        }
                    }
                }
                weight_grad(&xbuf, &fwd, b, oh, ow, &dyt, opg, &mut sums);
            }
            for (o, row) in dwg.chunks_exact_mut(taps).enumerate() {
                for (t, d) in row.iter_mut().enumerate() {
                    *d += sums[t * opg + o];
                }
            }
            if dxg.is_empty() {
                return;
            }
            // Input gradient, one stride phase at a time: outputs are this group's input
            // channels, taps the (output channel, ky, kx) that reach the phase.
            let phase_w: Vec<LaneWeights> = bwd
                .phases
                .iter()
                .map(|ph| {
                    LaneWeights::new(ipg, ph.taps.len(), |c, t| {
                        let (o, ky, kx) = ph.taps[t];
                        wg[((o * ipg + c) * k + ky) * k + kx]
                    })
                })
                .collect();
            let (mut dypad, mut tiles) = (Vec::new(), Vec::new());
            let (s, iw) = (g.stride, g.in_w);
            for (n, dxn) in dxg.iter_mut().enumerate() {
                let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                bwd.pack(oh, ow, dyn_, &mut dypad);
                for (idx, (ph, pw)) in bwd.phases.iter().zip(&phase_w).enumerate() {
                    if ph.taps.is_empty() {
                        continue;
                    }
                    let (a, bcol) = (idx / s.min(iw), idx % s.min(iw));
                    tiles.resize(ph.hi * ph.wj * ipg, 0.0);
                    product(&dypad, bwd.pitch, ph.hi, ph.wj, &ph.offs, pw, &mut tiles);
                    let hw = g.in_h * iw;
                    for (i, trow) in tiles.chunks_exact(ph.wj * ipg).enumerate() {
                        let row0 = (s * i + a) * iw + bcol;
                        for (j, v) in trow.chunks_exact(ipg).enumerate() {
                            let at = row0 + s * j;
                            for (c, &v) in v.iter().enumerate() {
                                dxn[c * hw + at] += v;
                            }
                        }
                    }
                }
            }
        });
}

/// `sums[t·outs + o] += Σ_{j<b, r<oh, c<ow} dyt[((j·oh + r)·ow + c)·outs + o] ·
/// xbuf[j·len + r·pitch + c + offs[t]]`.
fn weight_grad(
    xbuf: &[f32],
    fwd: &FwdLayout,
    b: usize,
    oh: usize,
    ow: usize,
    dyt: &[f32],
    outs: usize,
    sums: &mut [f32],
) {
    let taps = fwd.offs.len();
    assert!(
        dyt.len() >= b * oh * ow * outs,
        "lanes weight grad: gradient"
    );
    assert!(sums.len() >= taps * outs, "lanes weight grad: sums");
    assert!(outs.is_multiple_of(LANES), "lanes weight grad: outputs");
    if b == 0 || oh == 0 || ow == 0 {
        return;
    }
    let max_off = fwd.offs.iter().copied().max().unwrap_or(0);
    assert!(
        (b - 1) * fwd.len + (oh - 1) * fwd.pitch + ow + max_off <= xbuf.len(),
        "lanes weight grad: input"
    );
    assert!(cpu_has_avx512(), "lanes weight grad: needs AVX-512");
    let mut o0 = 0;
    while o0 < outs {
        let width = (outs - o0).min(2 * LANES);
        let mut t0 = 0;
        while t0 < taps {
            let tb = (taps - t0).min(WG_TAPS);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted); reads of `xbuf` stay below
            // `(b−1)·len + (oh−1)·pitch + ow + max_off` and of `dyt` below
            // `b·oh·ow·outs` (both asserted), writes in `sums[..taps·outs]`.
            unsafe {
                avx512::wg_tile(
                    xbuf.as_ptr(),
                    &fwd.offs[t0..t0 + tb],
                    (b, fwd.len, oh, fwd.pitch, ow),
                    dyt.as_ptr().add(o0),
                    outs,
                    width,
                    sums.as_mut_ptr().add(t0 * outs + o0),
                )
            };
            t0 += tb;
        }
        o0 += width;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{LANES, WG_TAPS};

    /// `p ≤ 14` positions × `width ∈ {16, 32}` channels; see [`super::product`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        x: *const f32,
        offs: &[usize],
        w: *const f32,
        width: usize,
        p: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        macro_rules! by_p {
            ($ov:literal) => {
                match p {
                    14 => run::<14, $ov>(x, offs, w, out, ostride),
                    13 => run::<13, $ov>(x, offs, w, out, ostride),
                    12 => run::<12, $ov>(x, offs, w, out, ostride),
                    11 => run::<11, $ov>(x, offs, w, out, ostride),
                    10 => run::<10, $ov>(x, offs, w, out, ostride),
                    9 => run::<9, $ov>(x, offs, w, out, ostride),
                    8 => run::<8, $ov>(x, offs, w, out, ostride),
                    7 => run::<7, $ov>(x, offs, w, out, ostride),
                    6 => run::<6, $ov>(x, offs, w, out, ostride),
                    5 => run::<5, $ov>(x, offs, w, out, ostride),
                    4 => run::<4, $ov>(x, offs, w, out, ostride),
                    3 => run::<3, $ov>(x, offs, w, out, ostride),
                    2 => run::<2, $ov>(x, offs, w, out, ostride),
                    _ => run::<1, $ov>(x, offs, w, out, ostride),
                }
            };
        }
        if width == 2 * LANES {
            by_p!(2)
        } else {
            by_p!(1)
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const P: usize, const OV: usize>(
        x: *const f32,
        offs: &[usize],
        w: *const f32,
        out: *mut f32,
        ostride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); OV]; P];
        for (t, &off) in offs.iter().enumerate() {
            let xp = x.add(off);
            let wt = w.add(t * OV * LANES);
            let mut wv = [_mm512_setzero_ps(); OV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(wt.add(v * LANES));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(i));
                for (a, &wv) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (v, &a) in acc_i.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * ostride + v * LANES), a);
            }
        }
    }

    /// Up to [`WG_TAPS`] taps × `width ∈ {16, 32}` channels of the weight gradient, summed
    /// over every position of `b` images (`dims = (b, len, oh, pitch, ow)`); see
    /// [`super::weight_grad`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn wg_tile(
        x: *const f32,
        offs: &[usize],
        dims: (usize, usize, usize, usize, usize),
        dy: *const f32,
        dstride: usize,
        width: usize,
        sums: *mut f32,
    ) {
        match (offs.len(), width == 2 * LANES) {
            (WG_TAPS, true) => wg_run::<WG_TAPS, 2>(x, offs, dims, dy, dstride, sums),
            (WG_TAPS, false) => wg_run::<WG_TAPS, 1>(x, offs, dims, dy, dstride, sums),
            (_, true) => {
                for (t, off) in offs.iter().enumerate() {
                    let s = sums.add(t * dstride);
                    wg_run::<1, 2>(x, std::slice::from_ref(off), dims, dy, dstride, s);
                }
            }
            (_, false) => {
                for (t, off) in offs.iter().enumerate() {
                    let s = sums.add(t * dstride);
                    wg_run::<1, 1>(x, std::slice::from_ref(off), dims, dy, dstride, s);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn wg_run<const TB: usize, const OV: usize>(
        x: *const f32,
        offs: &[usize],
        (b, len, oh, pitch, ow): (usize, usize, usize, usize, usize),
        dy: *const f32,
        dstride: usize,
        sums: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); OV]; TB];
        let mut ptrs = [x; TB];
        for (p, &off) in ptrs.iter_mut().zip(offs) {
            *p = x.add(off);
        }
        let mut d = dy;
        for j in 0..b {
            for r in 0..oh {
                let row = j * len + r * pitch;
                for c in row..row + ow {
                    let mut dv = [_mm512_setzero_ps(); OV];
                    for (v, dv) in dv.iter_mut().enumerate() {
                        *dv = _mm512_loadu_ps(d.add(v * LANES));
                    }
                    d = d.add(dstride);
                    for (acc_t, p) in acc.iter_mut().zip(&ptrs) {
                        let xv = _mm512_set1_ps(*p.add(c));
                        for (a, &dv) in acc_t.iter_mut().zip(&dv) {
                            *a = _mm512_fmadd_ps(dv, xv, *a);
                        }
                    }
                }
            }
        }
        for (t, acc_t) in acc.iter().enumerate() {
            for (v, &a) in acc_t.iter().enumerate() {
                let s = sums.add(t * dstride + v * LANES);
                _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), a));
            }
        }
    }
}
