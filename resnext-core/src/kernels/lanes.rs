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
//! channel-major tensors and the channel-in-lanes tiles: a product's tiles (forward and
//! input gradient) in registers, their positions being contiguous in every output plane;
//! the weight gradient's output gradient and sums, and the weights, by 16×16 block
//! transposes.

// The kernels here are AVX-512 only: elsewhere nothing calls them, and the parts that
// only the x86-64 build uses are unused.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(unused_variables, unused_mut, dead_code)
)]

use rayon::prelude::*;

use super::conv::Conv2dGeom;
use super::direct::{
    add, cpu_has_avx512, has_avx512, images_by_group, zeroed, BwdLayout, FwdLayout,
};
use super::scratch;

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
/// (and [`super::isa::level`] not set lower). A subset of [`super::direct::suits`].
pub fn suits(g: &Conv2dGeom) -> bool {
    suits_shape(g) && has_avx512()
}

/// The shape half of [`suits`]: grouped, kernel larger than 1, 16 to 64 channels per group
/// on both sides in multiples of 16.
pub fn suits_shape(g: &Conv2dGeom) -> bool {
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    g.groups > 1
        && g.kernel > 1
        && ipg.is_multiple_of(LANES)
        && opg.is_multiple_of(LANES)
        && ipg <= 64
        && opg <= 64
}

/// Whether this CPU can run the kernels here at all (AVX-512F), whatever
/// [`super::isa::level`] says. Calling them without it panics.
pub fn available() -> bool {
    cpu_has_avx512()
}

/// The weights of one product `out[q][o] = Σ_t W[o][t] · in[q + off[t]]` per group, in
/// blocks of up to 32 outputs (two vectors): in each group's `outs × taps` values, block
/// `(o0, width, at)` holds `taps × width` values at `at`, row `t` being the block's weights
/// for tap `t`.
#[derive(Clone, Debug)]
pub struct LaneWeights {
    data: Vec<f32>,
    blocks: Vec<(usize, usize, usize)>,
    taps: usize,
    outs: usize,
    groups: usize,
}

impl LaneWeights {
    /// Packs one group's `outs × taps` weights whose tap `t` has the values `row(t)` (`outs`
    /// of them). Its values go in `data` (cleared first; a buffer to reuse).
    fn from_tap_rows<'a>(
        mut data: Vec<f32>,
        outs: usize,
        taps: usize,
        row: impl Fn(usize) -> &'a [f32],
    ) -> Self {
        data.clear();
        data.reserve(outs * taps);
        let blocks = Self::blocks(outs, taps);
        for &(o0, width, _) in &blocks {
            for t in 0..taps {
                data.extend_from_slice(&row(t)[o0..o0 + width]);
            }
        }
        Self {
            data,
            blocks,
            taps,
            outs,
            groups: 1,
        }
    }

    /// Packs `groups` row-major `outs × taps` matrices `w` (`w[(grp·outs + o)·taps + t]`)
    /// into `data`, which must hold as many values (any: all are overwritten).
    fn from_rows(mut data: Vec<f32>, groups: usize, outs: usize, taps: usize, w: &[f32]) -> Self {
        let len = outs * taps;
        assert!(
            w.len() == groups * len && data.len() == w.len(),
            "lane weights: length"
        );
        let blocks = Self::blocks(outs, taps);
        if len > 0 {
            data.par_chunks_exact_mut(len)
                .zip(w.par_chunks_exact(len))
                .for_each(|(dst, src)| {
                    for &(o0, width, at) in &blocks {
                        let (s, d) = (
                            &src[o0 * taps..][..width * taps],
                            &mut dst[at..][..width * taps],
                        );
                        transpose(s, taps, width, taps, d, width, false);
                    }
                });
        }
        Self {
            data,
            blocks,
            taps,
            outs,
            groups,
        }
    }

    /// Group `grp`'s values.
    fn group(&self, grp: usize) -> &[f32] {
        &self.data[grp * self.outs * self.taps..][..self.outs * self.taps]
    }

    /// The buffer the values are in, to reuse.
    pub fn into_buffer(self) -> Vec<f32> {
        self.data
    }

    /// Blocks of 32 outputs, the last 16 where `outs` is an odd multiple of 16.
    fn blocks(outs: usize, taps: usize) -> Vec<(usize, usize, usize)> {
        assert!(outs.is_multiple_of(LANES), "lane weights: outputs");
        (0..outs)
            .step_by(2 * LANES)
            .map(|o0| (o0, (outs - o0).min(2 * LANES), o0 * taps))
            .collect()
    }
}

/// A grouped convolution's forward weights (tap `t` in PyTorch's `(in channel, ky, kx)`
/// order), packed into `buf` (resized; its old contents do not matter).
pub fn pack_forward_weights(g: &Conv2dGeom, w: &[f32], mut buf: Vec<f32>) -> LaneWeights {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    let taps = g.in_per_group() * g.kernel * g.kernel;
    buf.resize(w.len(), 0.0);
    LaneWeights::from_rows(buf, g.groups, g.out_per_group(), taps, w)
}

/// `f32` values per cache line.
const CACHE_LINE: usize = 16;

/// A hint to bring `v`'s cache line into the L2 cache.
#[inline]
fn prefetch_l2(v: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint, not an access: it has no architectural effect and
    // cannot fault, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(v.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Memory to pull into cache while a product runs: `(first value, values)` ranges.
type Prefetch = [(*const f32, usize); 2];

/// No prefetching.
const NO_PREFETCH: Prefetch = [(std::ptr::null(), 0); 2];

/// `dst[j·dstride + i] = src[i·sstride + j]` (or `+=` with `add`) for `i < rows`, `j < cols`.
pub(super) fn transpose(
    src: &[f32],
    sstride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dstride: usize,
    add: bool,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        cols <= sstride && (rows - 1) * sstride + cols <= src.len(),
        "transpose: source"
    );
    assert!(
        rows <= dstride && (cols - 1) * dstride + rows <= dst.len(),
        "transpose: destination"
    );
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx512() {
        for i0 in (0..rows).step_by(LANES) {
            for j0 in (0..cols).step_by(LANES) {
                // SAFETY: AVX-512F is present; the block reads `src[i·sstride + j]` and
                // writes `dst[j·dstride + i]` for `i < rows`, `j < cols` only, in bounds by
                // the asserts above.
                unsafe {
                    avx512::transpose16(
                        src.as_ptr().add(i0 * sstride + j0),
                        sstride,
                        (rows - i0).min(LANES),
                        (cols - j0).min(LANES),
                        dst.as_mut_ptr().add(j0 * dstride + i0),
                        dstride,
                        add,
                    )
                };
            }
        }
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            let d = &mut dst[j * dstride + i];
            *d = if add { *d } else { 0.0 } + src[i * sstride + j];
        }
    }
}

/// `out[o·rows·cols + r·cols + j] = Σ_t W[o][t] · inp[r·pitch + j + offs[t]]` for `r < rows`,
/// `j < cols` and every output `o` of `w`'s group `grp`: a product with the outputs in the
/// lanes, written as channel planes straight from the registers. A tile is up to 14
/// positions of one row, or two whole rows of at most 7, so its positions are contiguous in
/// every plane and the transpose from channels-in-lanes happens in registers.
fn product_planes(
    inp: &[f32],
    pitch: usize,
    rows: usize,
    cols: usize,
    offs: &[usize],
    w: &LaneWeights,
    grp: usize,
    out: &mut [f32],
    prefetch: Prefetch,
) {
    assert_eq!(offs.len(), w.taps, "lanes product: tap count");
    let plane = rows * cols;
    assert!(out.len() >= plane * w.outs, "lanes product: output");
    if rows == 0 || cols == 0 {
        return;
    }
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(
        (rows - 1) * pitch + cols + max_off <= inp.len(),
        "lanes product: input"
    );
    assert!(cpu_has_avx512(), "lanes product: needs AVX-512");
    // Tiles: (first row, rows, first column, columns); two whole rows where they fit.
    let tiles: Vec<(usize, usize, usize, usize)> = if 2 * cols <= PMAX {
        (0..rows)
            .step_by(2)
            .map(|r0| (r0, (rows - r0).min(2), 0, cols))
            .collect()
    } else {
        // row chunks as even as possible (a 28-wide row as 14 + 14)
        let chunk = cols.div_ceil(cols.div_ceil(PMAX));
        (0..rows)
            .flat_map(|r| {
                (0..cols)
                    .step_by(chunk)
                    .map(move |j| (r, 1, j, chunk.min(cols - j)))
            })
            .collect()
    };
    let lines = prefetch[0].1.div_ceil(CACHE_LINE) + prefetch[1].1.div_ceil(CACHE_LINE);
    let per_tile = lines.div_ceil(w.blocks.len() * tiles.len());
    let mut next_line = 0;
    for &(o0, width, at) in &w.blocks {
        let wb = &w.group(grp)[at..at + w.taps * width];
        for &(r0, r, j0, p) in &tiles {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted); the tile reads
            // `inp[(r0 + i)·pitch + j0 + j + off]` for `i < r`, `j0 + j < cols`, below
            // `inp.len()` by the assert above, and `wb` in full; it writes
            // `out[(o0 + c)·plane + r0·cols + j0 + k]` for `c < width`, `k < r·p`, inside
            // `plane · outs` (two rows only when `p = cols`, whole rows).
            unsafe {
                avx512::tile_planes(
                    inp.as_ptr().add(r0 * pitch + j0),
                    pitch,
                    offs,
                    wb.as_ptr(),
                    width,
                    (p, r),
                    out.as_mut_ptr().add(o0 * plane + r0 * cols + j0),
                    plane,
                )
            };
            for line in next_line..(next_line + per_tile).min(lines) {
                prefetch_l2(prefetch_line(&prefetch, line));
            }
            next_line += per_tile;
        }
    }
}

/// Line `l` of the ranges in `prefetch`, counted through both.
fn prefetch_line(prefetch: &Prefetch, l: usize) -> *const f32 {
    let first = prefetch[0].1.div_ceil(CACHE_LINE);
    if l < first {
        prefetch[0].0.wrapping_add(l * CACHE_LINE)
    } else {
        prefetch[1]
            .0
            .wrapping_add(((l - first) * CACHE_LINE).min(prefetch[1].1))
    }
}

/// Forward, one task per (image, group), each group's output passed to
/// `epilogue(image, first channel, values)` while still in cache. Overwrites `y`.
pub fn conv2d_forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    packed: &LaneWeights,
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(x.len(), g.input_len(), "conv2d: input length");
    assert_eq!(y.len(), g.output_len(), "conv2d: output length");
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let taps = ipg * g.kernel * g.kernel;
    assert!(
        packed.groups == g.groups && packed.outs == opg && packed.taps == taps,
        "conv2d: packed weights do not match the geometry"
    );
    let (oh, ow) = (g.out_h(), g.out_w());
    let in_grp = ipg * g.in_h * g.in_w;
    let out_grp = opg * oh * ow;
    if out_grp == 0 {
        return;
    }
    let layout = FwdLayout::new(g);
    // (an address only: prefetched, never read through)
    let y_at = y.as_ptr() as usize;
    y.par_chunks_mut(out_grp).enumerate().for_each(|(i, yg)| {
        let (n, grp) = (i / g.groups, i % g.groups);
        let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
        // keyed by the layout, so its zero padding is written once per thread
        let key = layout.key(scratch::tag::FWD_INPUT, g, 1);
        let mut buf = scratch::take_keyed(&key);
        layout.pack(g, xg, &mut buf);
        // the next (image, group)'s input follows this one's
        let next = if i + 1 < g.batch * g.groups {
            // the next task's output too: it is written after the product, and its
            // first write would otherwise wait for its cache lines
            let y_next = (y_at as *const f32).wrapping_add((i + 1) * out_grp);
            [(x[(i + 1) * in_grp..].as_ptr(), in_grp), (y_next, out_grp)]
        } else {
            NO_PREFETCH
        };
        let (offs, w) = (&layout.offs, packed);
        product_planes(&buf, layout.pitch, oh, ow, offs, w, grp, yg, next);
        scratch::give_keyed(key, buf);
        epilogue(n, grp * opg, yg);
    });
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
    let dx_groups = images_by_group(g, dx);
    let chunk = (WG_CHUNK_VALUES / fwd.len).clamp(1, g.batch);
    dw.par_chunks_exact_mut(opg * taps)
        .zip(dx_groups.into_par_iter())
        .enumerate()
        .for_each(|(grp, (dwg, mut dxg))| {
            let wg = &w[grp * opg * taps..(grp + 1) * opg * taps];
            // Weight gradient over chunks of images: their packed inputs side by side, the
            // output gradient position-major.
            let xkey = fwd.key(scratch::tag::FWD_INPUT, g, chunk);
            let dykey = bwd.key(oh, ow);
            let (mut xbuf, mut dypad) = (scratch::take_keyed(&xkey), scratch::take_keyed(&dykey));
            let [mut dyt, mut sums, mut wk, mut planes] = scratch::take();
            sums.resize(opg * taps, 0.0);
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
                    transpose(dyn_, oh * ow, opg, oh * ow, dst, opg, false);
                }
                weight_grad(&xbuf, &fwd, b, oh, ow, &dyt, opg, &mut sums);
            }
            transpose(&sums, opg, taps, opg, dwg, taps, true);
            let give_back = |xbuf, dypad, bufs| {
                scratch::give_keyed(xkey, xbuf);
                scratch::give_keyed(dykey, dypad);
                scratch::give(bufs);
            };
            if dxg.is_empty() {
                give_back(xbuf, dypad, [dyt, sums, wk, planes]);
                return;
            }
            // Input gradient, one stride phase at a time: outputs are this group's input
            // channels, taps the (output channel, ky, kx) that reach the phase.
            // wk[(o·k² + kk)·ipg + c] = wg[(o·ipg + c)·k² + kk]: each tap's row of lanes
            // contiguous.
            let kk = k * k;
            wk.resize(opg * kk * ipg, 0.0);
            for (src, dst) in wg.chunks_exact(ipg * kk).zip(wk.chunks_exact_mut(kk * ipg)) {
                transpose(src, kk, ipg, kk, dst, ipg, false);
            }
            let phase_w: Vec<LaneWeights> = bwd
                .phases
                .iter()
                .map(|ph| {
                    let [buf] = scratch::take();
                    LaneWeights::from_tap_rows(buf, ipg, ph.taps.len(), |t| {
                        let (o, ky, kx) = ph.taps[t];
                        &wk[(o * kk + ky * k + kx) * ipg..][..ipg]
                    })
                })
                .collect();
            // where each phase's planes start in `planes`
            let mut at = vec![0];
            for ph in &bwd.phases {
                at.push(at[at.len() - 1] + ph.hi * ph.wj * ipg);
            }
            planes.resize(at[bwd.phases.len()], 0.0);
            for (n, dxn) in dxg.iter_mut().enumerate() {
                let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                bwd.pack(oh, ow, dyn_, &mut dypad);
                for (idx, (ph, pw)) in bwd.phases.iter().zip(&phase_w).enumerate() {
                    if !ph.taps.is_empty() {
                        let plane = &mut planes[at[idx]..at[idx + 1]];
                        let (rows, cols) = (ph.hi, ph.wj);
                        product_planes(
                            &dypad,
                            bwd.pitch,
                            rows,
                            cols,
                            &ph.offs,
                            pw,
                            0,
                            plane,
                            NO_PREFETCH,
                        );
                    }
                }
                if g.stride == 1 {
                    // one phase, whose planes are laid out as dx's: one pass
                    add(dxn, &planes);
                    continue;
                }
                bwd.add_phases(g, dxn, |c, idx, i| {
                    let ph = &bwd.phases[idx];
                    &planes[at[idx] + (c * ph.hi + i) * ph.wj..][..ph.wj]
                });
            }
            for pw in phase_w {
                scratch::give([pw.data]);
            }
            give_back(xbuf, dypad, [dyt, sums, wk, planes]);
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

    /// The mask of the first `n ≤ 16` lanes.
    #[inline]
    fn head(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// The transpose of the 16×16 matrix whose rows are `r`: row `j` of the result holds
    /// lane `j` of every `r[i]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose_regs(r: &[__m512; 16]) -> [__m512; 16] {
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
        // gather lane l of u[m], u[4 + m], u[8 + m], u[12 + m] into output row 4l + m
        let mut out = [_mm512_setzero_ps(); 16];
        for m in 0..4 {
            let v1 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[m], u[4 + m]);
            let v2 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[8 + m], u[12 + m]);
            let w1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[m], u[4 + m]);
            let w2 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[8 + m], u[12 + m]);
            out[m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(v1, v2);
            out[8 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(v1, v2);
            out[4 + m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(w1, w2);
            out[12 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(w1, w2);
        }
        out
    }

    /// `R ≤ 2` output rows of `P` positions (`R·P ≤ 14`) × `OV` vectors of channels (see
    /// [`super::product_planes`]), transposed in registers and stored as channel planes:
    /// `out[c·plane + r·P + j]` (two rows only when they are whole rows, so contiguous).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run_planes<const P: usize, const R: usize, const OV: usize>(
        x: *const f32,
        pitch: usize,
        offs: &[usize],
        w: *const f32,
        out: *mut f32,
        plane: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); OV]; 14];
        for (t, &off) in offs.iter().enumerate() {
            let xp = x.add(off);
            let wt = w.add(t * OV * LANES);
            let mut wv = [_mm512_setzero_ps(); OV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(wt.add(v * LANES));
            }
            for r in 0..R {
                let xr = xp.add(r * pitch);
                for j in 0..P {
                    let xv = _mm512_set1_ps(*xr.add(j));
                    for (a, &wv) in acc[r * P + j].iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(wv, xv, *a);
                    }
                }
            }
        }
        let m = head(R * P);
        // (`v` picks the same vector out of every position's accumulators)
        #[allow(clippy::needless_range_loop)]
        for v in 0..OV {
            let mut rows = [_mm512_setzero_ps(); 16];
            for i in 0..R * P {
                rows[i] = acc[i][v];
            }
            let planes = transpose_regs(&rows);
            for (c, &pv) in planes.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add((v * LANES + c) * plane), m, pv);
            }
        }
    }

    /// `r ∈ {1, 2}` rows of `p` positions (`p ≤ 14`, `p ≤ 7` for two rows) × `width ∈
    /// {16, 32}` channels; see [`super::product_planes`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_planes(
        x: *const f32,
        pitch: usize,
        offs: &[usize],
        w: *const f32,
        width: usize,
        (p, r): (usize, usize),
        out: *mut f32,
        plane: usize,
    ) {
        macro_rules! by_p {
            (1, $ov:literal) => {
                match p {
                    14 => run_planes::<14, 1, $ov>(x, pitch, offs, w, out, plane),
                    13 => run_planes::<13, 1, $ov>(x, pitch, offs, w, out, plane),
                    12 => run_planes::<12, 1, $ov>(x, pitch, offs, w, out, plane),
                    11 => run_planes::<11, 1, $ov>(x, pitch, offs, w, out, plane),
                    10 => run_planes::<10, 1, $ov>(x, pitch, offs, w, out, plane),
                    9 => run_planes::<9, 1, $ov>(x, pitch, offs, w, out, plane),
                    8 => run_planes::<8, 1, $ov>(x, pitch, offs, w, out, plane),
                    7 => run_planes::<7, 1, $ov>(x, pitch, offs, w, out, plane),
                    6 => run_planes::<6, 1, $ov>(x, pitch, offs, w, out, plane),
                    5 => run_planes::<5, 1, $ov>(x, pitch, offs, w, out, plane),
                    4 => run_planes::<4, 1, $ov>(x, pitch, offs, w, out, plane),
                    3 => run_planes::<3, 1, $ov>(x, pitch, offs, w, out, plane),
                    2 => run_planes::<2, 1, $ov>(x, pitch, offs, w, out, plane),
                    _ => run_planes::<1, 1, $ov>(x, pitch, offs, w, out, plane),
                }
            };
            ($r:literal, $ov:literal) => {
                match p {
                    7 => run_planes::<7, $r, $ov>(x, pitch, offs, w, out, plane),
                    6 => run_planes::<6, $r, $ov>(x, pitch, offs, w, out, plane),
                    5 => run_planes::<5, $r, $ov>(x, pitch, offs, w, out, plane),
                    4 => run_planes::<4, $r, $ov>(x, pitch, offs, w, out, plane),
                    3 => run_planes::<3, $r, $ov>(x, pitch, offs, w, out, plane),
                    2 => run_planes::<2, $r, $ov>(x, pitch, offs, w, out, plane),
                    _ => run_planes::<1, $r, $ov>(x, pitch, offs, w, out, plane),
                }
            };
        }
        match (r, width == 2 * LANES) {
            (2, true) => by_p!(2, 2),
            (2, false) => by_p!(2, 1),
            (_, true) => by_p!(1, 2),
            (_, false) => by_p!(1, 1),
        }
    }

    /// `dst[j·dstride + i] (+)= src[i·sstride + j]` for `i < rows ≤ 16`, `j < cols ≤ 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(
        src: *const f32,
        sstride: usize,
        rows: usize,
        cols: usize,
        dst: *mut f32,
        dstride: usize,
        add: bool,
    ) {
        let (cm, rm) = (head(cols), head(rows));
        // Constant trip counts and indices throughout, so that the compiler unrolls every
        // loop and keeps the arrays in registers.
        let mut r = [_mm512_setzero_ps(); 16];
        #[allow(clippy::needless_range_loop)]
        for i in 0..16 {
            if i < rows {
                r[i] = if cols == 16 {
                    _mm512_loadu_ps(src.add(i * sstride))
                } else {
                    _mm512_maskz_loadu_ps(cm, src.add(i * sstride))
                };
            }
        }
        let out = transpose_regs(&r);
        #[allow(clippy::needless_range_loop)]
        for j in 0..16 {
            if j < cols {
                let p = dst.add(j * dstride);
                // plain stores for whole rows: masked ones cost more on some CPUs (Zen 4)
                if rows == 16 {
                    let v = if add {
                        _mm512_add_ps(_mm512_loadu_ps(p), out[j])
                    } else {
                        out[j]
                    };
                    _mm512_storeu_ps(p, v);
                } else {
                    let v = if add {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(rm, p), out[j])
                    } else {
                        out[j]
                    };
                    _mm512_mask_storeu_ps(p, rm, v);
                }
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
