//! Grouped convolution with channels in the vector lanes, for groups of 16 to 64 channels
//! (ResNeXt-50's stages 3 and 4: 16 and 32 channels per group), at every instruction-set
//! level ([`super::simd`]).
//!
//! [`super::direct`]'s kernel puts output *positions* in the lanes: a grid of `rows × pitch`
//! positions padded to whole vectors. At 7×7 or 14×14 that grid wastes a fifth to a third of
//! every vector on padding columns and rounding, and every weight gradient ends in a
//! reduction across lanes. Here the lanes hold output channels of one group instead: a
//! register tile is a few positions of one output row × 16 or 32 channels, each step loads
//! one weight row (the tile's channels for one tap) and broadcasts one input value per
//! position, so positions cost nothing beyond the real ones and the weight gradient sums
//! positions along the loop, never across lanes. Tiles by level (`layout::lane_tile`): 14
//! positions × 32 channels (28 of AVX-512's 32 registers), 6 × 16 (12 of AVX2's 16; 24 of
//! NEON's 32, as 4-lane vectors).
//!
//! The input buffers are [`super::direct`]'s padded, stride-phase-split planes, so that a
//! tap of any stride reads position `j` of a row at a fixed offset plus `j`; only the
//! outputs (and, for the weight gradient, the output gradient) are transposed between the
//! channel-major tensors and the channel-in-lanes tiles: a product's tiles (forward and
//! input gradient) in registers, their positions being contiguous in every output plane;
//! the weight gradient's output gradient and sums, and the weights, by square block
//! transposes ([`Simd::transpose`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::layout::{
    images_by_group, lane_tile, transpose, zeroed, BwdLayout, FwdLayout, Prefetch, Prefetcher,
    NO_PREFETCH, WG_CHUNK_VALUES,
};
use super::{Conv2dGeom, Dest};
use crate::kernels::simd::{self, store_n, Kernel, Simd};
use crate::kernels::{as_uninit, assume_init, scratch};

/// Channels per group come in multiples of this: the narrowest register tile.
const UNIT: usize = super::LANE_CHANNELS;
/// Channels of one packed weight block (the widest register tile).
const BLOCK: usize = 2 * UNIT;

/// Whether the kernels here run `g`: a grouped convolution (kernel larger than 1) whose
/// groups have 16 to 64 channels on both sides, in multiples of 16. A subset of
/// [`super::direct::suits`]; any instruction-set level.
pub fn suits(g: &Conv2dGeom) -> bool {
    g.groups > 1 && g.kernel > 1 && g.lane_channels()
}

/// Taps of one weight-gradient tile of `width` channels at level `S` (each a register-held
/// row of the tile's channels): with 32 registers and 16 lanes 12 × 2 vectors, or 16 × 1 for
/// 16 channels (fewer would leave too few independent sums to cover the FMA latency), 6 × 2
/// (AVX2) or 6 × 4 (NEON).
#[inline(always)]
fn wg_taps<S: Simd>(width: usize) -> usize {
    match (S::LANES, width) {
        (16, 16) => 16,
        (16, _) => 12,
        _ => 6,
    }
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

    /// Blocks of [`BLOCK`] outputs, the last 16 where `outs` is an odd multiple of 16.
    fn blocks(outs: usize, taps: usize) -> Vec<(usize, usize, usize)> {
        assert!(outs.is_multiple_of(UNIT), "lane weights: outputs");
        (0..outs)
            .step_by(BLOCK)
            .map(|o0| (o0, (outs - o0).min(BLOCK), o0 * taps))
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

/// `out[o·rows·cols + r·cols + j] = Σ_t W[o][t] · inp[r·row + j·step + offs[t]]` for
/// `r < rows`, `j < cols` and every output `o` of `w`'s group `grp` (`step` 1, or 2 for a
/// stride-2 product on an unsplit input): a product with the outputs in the
/// lanes, written as channel planes straight from the registers. A tile is up to 14
/// positions of one row, or two whole rows of at most 7, so its positions are contiguous in
/// every plane and the transpose from channels-in-lanes happens in registers.
fn product_planes(
    inp: &[f32],
    (row, step): (usize, usize),
    rows: usize,
    cols: usize,
    offs: &[usize],
    w: &LaneWeights,
    grp: usize,
    out: &mut [MaybeUninit<f32>],
    prefetch: Prefetch,
) {
    assert_eq!(offs.len(), w.taps, "lanes product: tap count");
    let plane = rows * cols;
    assert!(out.len() >= plane * w.outs, "lanes product: output");
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(step == 1 || step == 2, "lanes product: column step {step}");
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(
        (rows - 1) * row + (cols - 1) * step + 1 + max_off <= inp.len(),
        "lanes product: input"
    );
    // partial sums of one block when its taps come in more than one chunk
    let chunked = w
        .blocks
        .iter()
        .any(|&(_, width, _)| w.taps > tap_chunk(width));
    // (each tile stores its first chunk's sums before it loads any)
    let mut part = scratch::take_stale(if chunked { plane * BLOCK } else { 0 });
    // SAFETY: the tiles stay inside the bounds asserted above (see `Planes::run`).
    unsafe {
        simd::dispatch(Planes {
            inp: inp.as_ptr(),
            row,
            step,
            rows,
            cols,
            offs,
            w,
            grp,
            out: out.as_mut_ptr().cast(),
            part: part.as_mut_ptr(),
            prefetch,
        })
    }
    scratch::give([part]);
}

/// Weight bytes of one chunk of taps: with the input rows they read, well inside a 32 KiB
/// L1 data cache, so that every tile of a block reuses them from there.
const TAP_CHUNK_BYTES: usize = 12 * 1024;

/// Taps per chunk for a block of `width` outputs.
fn tap_chunk(width: usize) -> usize {
    (TAP_CHUNK_BYTES / (width * std::mem::size_of::<f32>())).max(1)
}

/// Where a tile's sums start and end when a block's taps come in chunks: `load` from the
/// partial sums (else from zero), and `finish` as channel planes (else back to the partial
/// sums).
#[derive(Clone, Copy)]
struct Sums {
    load: bool,
    finish: bool,
}

/// A tile's partial sums: its first position's first channel, and the distance between
/// positions.
type Part = (*mut f32, usize);

/// [`product_planes`]'s arguments, checked.
struct Planes<'a> {
    inp: *const f32,
    row: usize,
    step: usize,
    rows: usize,
    cols: usize,
    offs: &'a [usize],
    w: &'a LaneWeights,
    grp: usize,
    out: *mut f32,
    part: *mut f32,
    prefetch: Prefetch,
}

impl Kernel for Planes<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let Planes {
            inp,
            row,
            step,
            rows,
            cols,
            offs,
            w,
            grp,
            out,
            part,
            prefetch,
        } = self;
        let plane = rows * cols;
        let (channels, pmax) = lane_tile::<S>();
        // Tiles: (first row, rows, first column, columns). With 16 lanes (14-position
        // tiles) two whole rows where they fit, else row chunks as even as possible (a
        // 28-wide row as 14 + 14). With fewer lanes (6-position tiles) runs of positions of
        // the plane as even as possible, across row ends (a 7×7 plane as 4 × 6 + 5 × 5
        // rather than 7 × (4 + 3), which leaves too few accumulators to cover the FMA
        // latency): columns then counts positions from `(r0, j0)` on.
        let flat = S::LANES != 16;
        let two_rows = !flat && 2 * cols <= pmax;
        let chunk = if two_rows {
            cols
        } else {
            cols.div_ceil(cols.div_ceil(pmax))
        };
        let n = rows * cols;
        let flat_count = n.div_ceil(pmax);
        let tiles = move || {
            let by_rows = (0..if flat { 0 } else { rows })
                .step_by(if two_rows { 2 } else { 1 })
                .flat_map(move |r0| {
                    let r = if two_rows { (rows - r0).min(2) } else { 1 };
                    (0..cols)
                        .step_by(chunk)
                        .map(move |j0| (r0, r, j0, chunk.min(cols - j0)))
                });
            // tile `i` of `flat_count` starts at position `i·n / flat_count`
            let runs = (0..if flat { flat_count } else { 0 }).map(move |i| {
                let (q0, q1) = (i * n / flat_count, (i + 1) * n / flat_count);
                (q0 / cols, 1, q0 % cols, q1 - q0)
            });
            by_rows.chain(runs)
        };
        let count = if flat {
            flat_count
        } else {
            rows.div_ceil(if two_rows { 2 } else { 1 }) * cols.div_ceil(chunk)
        };
        let chunks: usize = w
            .blocks
            .iter()
            .map(|&(_, width, _)| w.taps.div_ceil(tap_chunk(width)))
            .sum();
        let mut prefetch = Prefetcher::new(prefetch, chunks * count);
        for &(o0, width, at) in &w.blocks {
            let wb = &w.group(grp)[at..at + w.taps * width];
            // Taps in chunks whose weights stay in the L1 cache across the tiles, the sums
            // of all but the last chunk kept position-major in `part`.
            let kc = tap_chunk(width);
            for t0 in (0..w.taps).step_by(kc) {
                let t1 = (t0 + kc).min(w.taps);
                let sums = Sums {
                    load: t0 > 0,
                    finish: t1 == w.taps,
                };
                for (r0, r, j0, p) in tiles() {
                    for c0 in (0..width).step_by(channels) {
                        let wc = wb[t0 * width + c0..].as_ptr();
                        let ch = channels.min(width - c0);
                        let q0 = r0 * cols + j0;
                        let o = out.wrapping_add((o0 + c0) * plane + q0);
                        let part = (part.wrapping_add(q0 * width + c0), width);
                        // SAFETY: the tile reads `inp[(r0 + i)·row + (j0 + j)·step + off]`
                        // for `i < r`, `j0 + j < cols` (or, flat, the input of positions
                        // `r0·cols + j0 ..+ p`), below `inp.len()` (asserted by
                        // `product_planes`), and `wb` rows `t0..t1`, channels
                        // `c0..c0 + channels`; it writes `out[(o0 + c0 + c)·plane + r0·cols
                        // + j0 + k]` for `c < channels`, `k < r·p`, inside `plane · outs`
                        // (two rows only when `p = cols`), and reads and writes
                        // `part[(q0 + k)·width + c0 + c]`, inside `plane · BLOCK`.
                        unsafe {
                            let x = inp.add(r0 * row + j0 * step);
                            let offs = &offs[t0..t1];
                            macro_rules! tile {
                                ($f:ident, $shape:expr) => {
                                    $f::<S>(
                                        x,
                                        (row, step),
                                        offs,
                                        wc,
                                        width,
                                        $shape,
                                        o,
                                        plane,
                                        sums,
                                        part,
                                    )
                                };
                            }
                            if flat {
                                tile!(flat_planes, (cols, p, cols - j0))
                            } else {
                                tile!(tile_planes, (ch, p, r))
                            }
                        };
                    }
                    prefetch.step();
                }
            }
        }
    }
}

/// The layout the forward and the weight gradient read the input in, and the scratch tag
/// of its buffers: at stride 2 one padded copy read at every second column (a row copy
/// rather than a split into phases, which took a fifth of the stage-4 stride-2 forward).
fn input_layout(g: &Conv2dGeom) -> (FwdLayout, usize) {
    if g.stride == 2 {
        (FwdLayout::unsplit(g), scratch::tag::FWD_INPUT_UNSPLIT)
    } else {
        (FwdLayout::new(g), scratch::tag::FWD_INPUT)
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
    conv2d_forward_packed_into(g, x, packed, as_uninit(y), epilogue);
}

/// [`conv2d_forward_packed`] into `y`, whose every value it writes without reading any
/// (new memory needs no zero-filling first).
pub(super) fn conv2d_forward_packed_into(
    g: &Conv2dGeom,
    x: &[f32],
    packed: &LaneWeights,
    y: &mut [MaybeUninit<f32>],
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
    let (layout, tag) = input_layout(g);
    // (an address only: prefetched, never read through)
    let y_at = y.as_ptr() as usize;
    y.par_chunks_mut(out_grp).enumerate().for_each(|(i, yg)| {
        let (n, grp) = (i / g.groups, i % g.groups);
        let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
        // keyed by the layout, so its zero padding is written once per thread
        let key = layout.key(tag, g, 1);
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
        let at = (layout.row(), layout.step);
        product_planes(&buf, at, oh, ow, offs, w, grp, yg, next);
        scratch::give_keyed(key, buf);
        // SAFETY: the product wrote every value of the group's `opg` planes of `oh × ow`,
        // which are `yg`.
        epilogue(n, grp * opg, unsafe { assume_init(yg) });
    });
}

/// Backward: adds the input gradient into `dx` (or writes it, every value, when new
/// memory) when given, and the weight gradient into `dw`. One task per group, images in order inside it, so the weight gradient's summation
/// order does not depend on the thread count.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<Dest<'_>>,
    dw: &mut [f32],
) {
    g.check_backward_into(x, w, dy, dx.as_ref(), dw);
    let (oh, ow) = (g.out_h(), g.out_w());
    let (ipg, opg, k) = (g.in_per_group(), g.out_per_group(), g.kernel);
    let taps = ipg * k * k;
    let in_grp = ipg * g.in_h * g.in_w;
    let out_grp = opg * oh * ow;
    if out_grp == 0 || in_grp == 0 {
        return;
    }
    let (fwd, xtag) = input_layout(g);
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
            let xkey = fwd.key(xtag, g, chunk);
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
            for (n, dxn) in std::mem::take(&mut dxg).into_iter().enumerate() {
                let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                bwd.pack(oh, ow, dyn_, &mut dypad);
                for (idx, (ph, pw)) in bwd.phases.iter().zip(&phase_w).enumerate() {
                    if !ph.taps.is_empty() {
                        let plane = as_uninit(&mut planes[at[idx]..at[idx + 1]]);
                        let (rows, cols) = (ph.hi, ph.wj);
                        product_planes(
                            &dypad,
                            (bwd.pitch, 1),
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
                    dxn.put(&planes);
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
/// xbuf[j·len + r·row + c·step + offs[t]]` (`row` and `step` the layout's).
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
    assert!(outs.is_multiple_of(UNIT), "lanes weight grad: outputs");
    if b == 0 || oh == 0 || ow == 0 {
        return;
    }
    let max_off = fwd.offs.iter().copied().max().unwrap_or(0);
    let last = (b - 1) * fwd.len + (oh - 1) * fwd.row() + (ow - 1) * fwd.step;
    assert!(last + 1 + max_off <= xbuf.len(), "lanes weight grad: input");
    let dims = (b, fwd.len, oh, (fwd.row(), fwd.step), ow);
    // SAFETY: reads of `xbuf` stay below `(b−1)·len + (oh−1)·row + (ow−1)·step + 1 + max_off` and of
    // `dyt` below `b·oh·ow·outs` (both asserted), writes in `sums[..taps·outs]`.
    unsafe {
        simd::dispatch(WeightGrad {
            x: xbuf.as_ptr(),
            offs: &fwd.offs,
            dims,
            dy: dyt.as_ptr(),
            outs,
            sums: sums.as_mut_ptr(),
        })
    }
}

/// [`weight_grad`]'s arguments, checked.
struct WeightGrad<'a> {
    x: *const f32,
    offs: &'a [usize],
    dims: (usize, usize, usize, (usize, usize), usize),
    dy: *const f32,
    outs: usize,
    sums: *mut f32,
}

impl Kernel for WeightGrad<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let WeightGrad {
            x,
            offs,
            dims,
            dy,
            outs,
            sums,
        } = self;
        let (channels, _) = lane_tile::<S>();
        let taps = offs.len();
        for o0 in (0..outs).step_by(channels) {
            let width = (outs - o0).min(channels);
            let tb_max = wg_taps::<S>(width);
            for t0 in (0..taps).step_by(tb_max) {
                let tb = (taps - t0).min(tb_max);
                // SAFETY: `weight_grad`'s bounds; channels `o0..o0 + width` of `dy`'s rows
                // and of `sums`' taps `t0..t0 + tb`.
                unsafe {
                    wg_tile::<S>(
                        x,
                        &offs[t0..t0 + tb],
                        dims,
                        dy.add(o0),
                        outs,
                        width,
                        sums.add(t0 * outs + o0),
                    )
                };
            }
        }
    }
}

/// `R ≤ 2` output rows of `P` positions (`R·P ≤ 14`) × `OV` vectors of channels (see
/// [`product_planes`]), transposed in registers and stored as channel planes:
/// `out[c·plane + r·P + j]` (two rows only when they are whole rows, so contiguous). Row
/// `t` of the weights is at `w + t·wstride`; the input of position `(r, j)` at
/// `x + r·row + j·CS` (`CS` 2 for a stride-2 product on an unsplit input).
#[inline(always)]
unsafe fn run_planes<S: Simd, const P: usize, const R: usize, const OV: usize, const CS: usize>(
    x: *const f32,
    row: usize,
    offs: &[usize],
    w: *const f32,
    wstride: usize,
    out: *mut f32,
    plane: usize,
    sums: Sums,
    part: Part,
) {
    // SAFETY: the caller's bounds (see `Planes::run`).
    unsafe {
        let mut acc = [[S::zero(); OV]; 14];
        if sums.load {
            load_part::<S, OV>(&mut acc[..R * P], part);
        }
        for (t, &off) in offs.iter().enumerate() {
            let xp = x.add(off);
            let wt = w.add(t * wstride);
            let mut wv = [S::zero(); OV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = S::load(wt.add(v * S::LANES));
            }
            for r in 0..R {
                let xr = xp.add(r * row);
                for j in 0..P {
                    let xv = S::splat(*xr.add(j * CS));
                    for (a, &wv) in acc[r * P + j].iter_mut().zip(&wv) {
                        *a = S::fma(wv, xv, *a);
                    }
                }
            }
        }
        if sums.finish {
            store_planes::<S, OV>(&acc[..R * P], out, plane);
        } else {
            store_part::<S, OV>(&acc[..R * P], part);
        }
    }
}

/// Loads consecutive positions' accumulators from partial sums.
#[inline(always)]
unsafe fn load_part<S: Simd, const OV: usize>(acc: &mut [[S::V; OV]], (at, stride): Part) {
    for (q, a) in acc.iter_mut().enumerate() {
        for (v, a) in a.iter_mut().enumerate() {
            // SAFETY: the caller's partial sums hold `acc.len()` positions `stride` apart.
            *a = unsafe { S::load(at.add(q * stride + v * S::LANES)) };
        }
    }
}

/// Stores consecutive positions' accumulators as partial sums.
#[inline(always)]
unsafe fn store_part<S: Simd, const OV: usize>(acc: &[[S::V; OV]], (at, stride): Part) {
    for (q, a) in acc.iter().enumerate() {
        for (v, &a) in a.iter().enumerate() {
            // SAFETY: as in `load_part`.
            unsafe { S::store(at.add(q * stride + v * S::LANES), a) };
        }
    }
}

/// The accumulators of consecutive positions (`acc[q][v]`: vector `v` of the channels of
/// position `q`) as channel planes `out[c·plane + q]`: in chunks of the level's lanes of
/// positions, each transposed in registers to one row per channel.
#[inline(always)]
unsafe fn store_planes<S: Simd, const OV: usize>(acc: &[[S::V; OV]], out: *mut f32, plane: usize) {
    let n = acc.len();
    // SAFETY: the caller's `out` holds the planes of `OV · LANES` channels, `n` positions.
    unsafe {
        // (`v` picks the same vector out of every position's accumulators)
        #[allow(clippy::needless_range_loop)]
        for v in 0..OV {
            for q0 in (0..n).step_by(S::LANES) {
                let mut rows = [S::zero(); 16];
                for i in 0..S::LANES {
                    if q0 + i < n {
                        rows[i] = acc[q0 + i][v];
                    }
                }
                S::transpose(&mut rows);
                let m = (n - q0).min(S::LANES);
                for (c, &pv) in rows.iter().take(S::LANES).enumerate() {
                    store_n::<S>(out.add((v * S::LANES + c) * plane + q0), m, pv);
                }
            }
        }
    }
}

/// `r ∈ {1, 2}` rows of `p` positions × `channels` (16 or, on AVX-512, 32) channels of
/// weights whose rows are `wstride` apart; see [`product_planes`] and `layout::lane_tile`.
#[inline(always)]
unsafe fn tile_planes<S: Simd>(
    x: *const f32,
    (row, step): (usize, usize),
    offs: &[usize],
    w: *const f32,
    wstride: usize,
    (channels, p, r): (usize, usize, usize),
    out: *mut f32,
    plane: usize,
    sums: Sums,
    part: Part,
) {
    macro_rules! run {
        ($p:literal, $r:literal, $ov:literal) => {
            if step == 1 {
                run_planes::<S, $p, $r, $ov, 1>(x, row, offs, w, wstride, out, plane, sums, part)
            } else {
                run_planes::<S, $p, $r, $ov, 2>(x, row, offs, w, wstride, out, plane, sums, part)
            }
        };
    }
    // Up to 14 positions (7 in each of two rows) with 16 lanes, 6 (3) with fewer.
    macro_rules! wide {
        ($ov:literal) => {
            match (r, p) {
                (2, 7) => run!(7, 2, $ov),
                (2, 6) => run!(6, 2, $ov),
                (2, 5) => run!(5, 2, $ov),
                (2, 4) => run!(4, 2, $ov),
                (2, 3) => run!(3, 2, $ov),
                (2, 2) => run!(2, 2, $ov),
                (2, _) => run!(1, 2, $ov),
                (_, 14) => run!(14, 1, $ov),
                (_, 13) => run!(13, 1, $ov),
                (_, 12) => run!(12, 1, $ov),
                (_, 11) => run!(11, 1, $ov),
                (_, 10) => run!(10, 1, $ov),
                (_, 9) => run!(9, 1, $ov),
                (_, 8) => run!(8, 1, $ov),
                (_, 7) => run!(7, 1, $ov),
                (_, 6) => run!(6, 1, $ov),
                (_, 5) => run!(5, 1, $ov),
                (_, 4) => run!(4, 1, $ov),
                (_, 3) => run!(3, 1, $ov),
                (_, 2) => run!(2, 1, $ov),
                _ => run!(1, 1, $ov),
            }
        };
    }
    // SAFETY: the caller's bounds; `channels / LANES` vectors per row.
    unsafe {
        if channels == 32 {
            wide!(2)
        } else {
            wide!(1)
        }
    }
}

/// `P` consecutive positions of a plane `cols` wide × `OV` vectors of channels, the first
/// `first ≤ cols` of them in the row `x` starts, the others on the rows below (input rows
/// `row` apart, positions `step` apart in a row), transposed in registers and stored as channel planes `out[c·plane + k]`
/// for `k < P`. Row `t` of the weights is at `w + t·wstride`.
#[inline(always)]
unsafe fn run_flat<S: Simd, const P: usize, const OV: usize>(
    x: *const f32,
    (row, step): (usize, usize),
    (first, cols): (usize, usize),
    offs: &[usize],
    w: *const f32,
    wstride: usize,
    out: *mut f32,
    plane: usize,
    sums: Sums,
    part: Part,
) {
    // SAFETY: the caller's bounds (see `Planes::run`).
    unsafe {
        // each position's input offset from `x`
        let mut rel = [0usize; P];
        for (k, rel) in rel.iter_mut().enumerate() {
            *rel = if k < first {
                k * step
            } else {
                // `row ≥ cols · step`, so the first difference is not negative
                let q = k - first;
                ((q / cols + 1) * row - (cols - first) * step) + (q % cols) * step
            };
        }
        let mut acc = [[S::zero(); OV]; P];
        if sums.load {
            load_part::<S, OV>(&mut acc, part);
        }
        for (t, &off) in offs.iter().enumerate() {
            let xp = x.add(off);
            let wt = w.add(t * wstride);
            let mut wv = [S::zero(); OV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = S::load(wt.add(v * S::LANES));
            }
            for (a, &rel) in acc.iter_mut().zip(&rel) {
                let xv = S::splat(*xp.add(rel));
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = S::fma(wv, xv, *a);
                }
            }
        }
        if sums.finish {
            store_planes::<S, OV>(&acc, out, plane);
        } else {
            store_part::<S, OV>(&acc, part);
        }
    }
}

/// `p ≤ 6` consecutive positions of a plane `cols` wide, `first` of them in the first row,
/// × 16 channels of weights whose rows are `wstride` apart; see [`product_planes`] and
/// `layout::lane_tile` (the levels with fewer than 16 lanes).
#[inline(always)]
unsafe fn flat_planes<S: Simd>(
    x: *const f32,
    at: (usize, usize),
    offs: &[usize],
    w: *const f32,
    wstride: usize,
    (cols, p, first): (usize, usize, usize),
    out: *mut f32,
    plane: usize,
    sums: Sums,
    part: Part,
) {
    let shape = (first, cols);
    macro_rules! run {
        ($p:literal, $ov:literal) => {
            run_flat::<S, $p, $ov>(x, at, shape, offs, w, wstride, out, plane, sums, part)
        };
    }
    macro_rules! by_p {
        ($ov:literal) => {
            match p {
                6 => run!(6, $ov),
                5 => run!(5, $ov),
                4 => run!(4, $ov),
                3 => run!(3, $ov),
                2 => run!(2, $ov),
                _ => run!(1, $ov),
            }
        };
    }
    // SAFETY: the caller's bounds; 16 channels as `16 / LANES` vectors.
    unsafe {
        if S::LANES == 8 {
            by_p!(2)
        } else {
            by_p!(4)
        }
    }
}

/// Up to [`wg_taps`] taps × `width` channels (16, or 32 on AVX-512) of the weight gradient,
/// summed over every position of `b` images (`dims = (b, len, oh, (row, step), ow)`); see
/// [`weight_grad`].
#[inline(always)]
unsafe fn wg_tile<S: Simd>(
    x: *const f32,
    offs: &[usize],
    dims: (usize, usize, usize, (usize, usize), usize),
    dy: *const f32,
    dstride: usize,
    width: usize,
    sums: *mut f32,
) {
    macro_rules! run {
        ($tb:literal, $ov:literal) => {{
            debug_assert_eq!($tb, wg_taps::<S>(width), "wg_tile: taps per tile");
            if offs.len() == $tb {
                wg_run::<S, $tb, $ov>(x, offs, dims, dy, dstride, sums)
            } else {
                for (t, off) in offs.iter().enumerate() {
                    let s = sums.add(t * dstride);
                    wg_run::<S, 1, $ov>(x, std::slice::from_ref(off), dims, dy, dstride, s);
                }
            }
        }};
    }
    // SAFETY: the caller's bounds.
    unsafe {
        match (S::LANES, width) {
            (16, 32) => run!(12, 2),
            (16, _) => run!(16, 1),
            (8, _) => run!(6, 2),
            _ => run!(6, 4),
        }
    }
}

#[inline(always)]
unsafe fn wg_run<S: Simd, const TB: usize, const OV: usize>(
    x: *const f32,
    offs: &[usize],
    (b, len, oh, (rstep, step), ow): (usize, usize, usize, (usize, usize), usize),
    dy: *const f32,
    dstride: usize,
    sums: *mut f32,
) {
    // SAFETY: the caller's bounds.
    unsafe {
        let mut acc = [[S::zero(); OV]; TB];
        let mut ptrs = [x; TB];
        for (p, &off) in ptrs.iter_mut().zip(offs) {
            *p = x.add(off);
        }
        let mut d = dy;
        for j in 0..b {
            for r in 0..oh {
                let row = j * len + r * rstep;
                for c in (row..row + ow * step).step_by(step) {
                    let mut dv = [S::zero(); OV];
                    for (v, dv) in dv.iter_mut().enumerate() {
                        *dv = S::load(d.add(v * S::LANES));
                    }
                    d = d.add(dstride);
                    for (acc_t, p) in acc.iter_mut().zip(&ptrs) {
                        let xv = S::splat(*p.add(c));
                        for (a, &dv) in acc_t.iter_mut().zip(&dv) {
                            *a = S::fma(dv, xv, *a);
                        }
                    }
                }
            }
        }
        for (t, acc_t) in acc.iter().enumerate() {
            for (v, &a) in acc_t.iter().enumerate() {
                let s = sums.add(t * dstride + v * S::LANES);
                S::store(s, S::add(S::load(s), a));
            }
        }
    }
}
