//! Grouped 3×3 stride-1 convolution forward by Winograd's minimal filtering, F(2×2, 3×3)
//! (Lavin & Gray 2016), with channels in the AVX-512 lanes: for groups of 16 to 64
//! channels (ResNeXt-50's stages 3 and 4, ResNeXt-29's groups of 64).
//!
//! Each 2×2 block of outputs ("tile") comes from a 4×4 patch of input `d` as
//! `Y = Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`: 16 products per input channel instead of the
//! direct convolution's 36, so the multiplications (which are the time) drop 2.25× at
//! image sizes the tiles cover exactly (14×14) and 1.7× at 7×7 (whose 4×4 tiles cover 8×8).
//! The element-wise products summed over channels are, for each of the 16 transform points
//! `ξ`, one matrix product `M[ξ] = V[ξ] · U[ξ]` (tiles × input channels times input ×
//! output channels), run with the same register tile as [`super::lanes`]: up to 14 tiles ×
//! 32 output channels, one row of `U` and one broadcast per tile per step.
//!
//! Data flow of one task (one group, a few images):
//! 1. the group's weights to `U[ξ][c][o]` (`G g Gᵀ`, output channels in the lanes), unless
//!    prepared once ([`pack_forward_weights`], for inference);
//! 2. the images' input planes transposed to padded rows of positions × channels;
//! 3. per chunk of tiles: each tile's `Bᵀ d B` (16 vectors per 16 channels) into `V`, the 16
//!    products into `M`, and each tile's `Aᵀ M A` into position × channel rows;
//! 4. those rows transposed into the output planes, and the caller's epilogue on them.
//!
//! Forward only: the backward passes stay on [`super::lanes`].

// The kernels here are AVX-512 only: elsewhere nothing calls them, and the parts that
// only the x86-64 build uses are unused.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(unused_variables, unused_mut, dead_code)
)]

use rayon::prelude::*;

use super::conv::Conv2dGeom;
use super::direct::{cpu_has_avx512, has_avx512};
use super::lanes::{self, transpose};
use super::scratch;

/// `f32` lanes of an AVX-512 vector.
const LANES: usize = 16;
/// Transform points of F(2×2, 3×3): a 4×4 input patch per 2×2 output tile.
const POINTS: usize = 16;
/// Tiles of one register block (14 tiles × 2 vectors of output channels = 28 accumulators).
const PMAX: usize = 14;
/// Tiles per pass of transform, products and inverse transform, so that its `V` and `M`
/// (16 points × tiles × channels each) stay in the L2 cache.
const CHUNK_TILES: usize = 56;
/// Values of transposed input and output one task aims for (256 KB), which sets how many
/// images it takes.
const TASK_VALUES: usize = 1 << 16;

/// Whether [`conv2d_forward`] runs `g`: a 3×3 stride-1 grouped convolution that
/// [`lanes::suits`] (16 to 64 channels per group), on a CPU with AVX-512 (and
/// [`super::isa::level`] not set lower).
pub fn suits(g: &Conv2dGeom) -> bool {
    suits_shape(g) && has_avx512()
}

/// Whether this CPU can run the kernels here at all (AVX-512F), whatever
/// [`super::isa::level`] says. Calling them without it panics.
pub fn available() -> bool {
    cpu_has_avx512()
}

/// Whether [`conv2d_forward`], which transforms the weights in every task, pays off over
/// [`lanes`] for `g`: it [`suits`] and the batch has at least two register blocks of tiles
/// (at batch 1 a 7×7 image has 16, over which one group's weight transform does not pay).
/// Weights transformed once ([`pack_forward_weights`]) pay wherever it suits.
pub fn pays_per_call(g: &Conv2dGeom) -> bool {
    suits(g) && g.batch * g.out_h().div_ceil(2) * g.out_w().div_ceil(2) >= 2 * PMAX
}

/// The shape half of [`suits`].
pub fn suits_shape(g: &Conv2dGeom) -> bool {
    g.kernel == 3 && g.stride == 1 && lanes::suits(g)
}

/// A grouped 3×3 convolution's weights transformed for [`conv2d_forward_packed`]: per
/// group, `U[ξ][c][o] = (G g_{o,c} Gᵀ)[ξ]` at `((ξ·ins + c)·outs + o)`.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    data: Vec<f32>,
    groups: usize,
    ins: usize,
    outs: usize,
}

impl WinogradWeights {
    /// Group `grp`'s values.
    fn group(&self, grp: usize) -> &[f32] {
        let len = POINTS * self.ins * self.outs;
        &self.data[grp * len..][..len]
    }
}

/// Transforms `w` (PyTorch's `(out, in / groups, 3, 3)` layout) once for
/// [`conv2d_forward_packed`]. ([`conv2d_forward`] transforms each group in its task instead.)
pub fn pack_forward_weights(g: &Conv2dGeom, w: &[f32]) -> WinogradWeights {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    assert!(suits_shape(g), "winograd: unsuitable convolution");
    let (ins, outs) = (g.in_per_group(), g.out_per_group());
    let mut buf = vec![0.0; g.groups * POINTS * ins * outs];
    buf.par_chunks_exact_mut(POINTS * ins * outs)
        .zip(w.par_chunks_exact(outs * ins * 9))
        .for_each(|(u, wg)| transform_weights(wg, ins, outs, u));
    WinogradWeights {
        data: buf,
        groups: g.groups,
        ins,
        outs,
    }
}

/// `u = U` of one group's weights `wg[o][c][ky][kx]`.
fn transform_weights(wg: &[f32], ins: usize, outs: usize, u: &mut [f32]) {
    let taps = ins * 9;
    assert!(
        wg.len() == outs * taps && u.len() == POINTS * ins * outs,
        "winograd weights: length"
    );
    assert!(cpu_has_avx512(), "winograd: needs AVX-512");
    // taps × outputs, so that 16 outputs of one tap are one vector
    let mut t = scratch::take_stale(taps * outs);
    transpose(wg, taps, outs, taps, &mut t, outs, false);
    for c in 0..ins {
        for o0 in (0..outs).step_by(LANES) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted); reads `t[(9c + k)·outs + o0 + l]` for
            // `k < 9`, `l < 16` (`o0 + 16 ≤ outs`, outs a multiple of 16, `c < ins`), writes
            // `u[(ξ·ins + c)·outs + o0 + l]` for `ξ < 16`: inside both lengths above.
            unsafe {
                avx512::weights(
                    t.as_ptr().add(9 * c * outs + o0),
                    outs,
                    u.as_mut_ptr().add(c * outs + o0),
                    ins * outs,
                )
            };
        }
    }
    scratch::give([t]);
}

/// Where a task's weights come from.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// PyTorch's layout, transformed by each task for its group.
    Plain(&'a [f32]),
    /// Transformed once.
    Packed(&'a WinogradWeights),
}

/// Forward of a 3×3 stride-1 grouped convolution that [`suits`], with PyTorch-layout
/// weights; each (image, group)'s output is passed to `epilogue(image, first channel,
/// values)` while still in cache. Overwrites `y`.
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    forward(g, x, Weights::Plain(w), y, epilogue);
}

/// [`conv2d_forward`] with weights from [`pack_forward_weights`].
pub fn conv2d_forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    w: &WinogradWeights,
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(
        w.groups == g.groups && w.ins == g.in_per_group() && w.outs == g.out_per_group(),
        "conv2d: packed weights do not match the geometry"
    );
    forward(g, x, Weights::Packed(w), y, epilogue);
}

/// The sizes one task works with.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// Channels per group, in and out.
    ins: usize,
    outs: usize,
    /// Input rows, columns and padding.
    h: usize,
    w: usize,
    pad: usize,
    /// Output rows and columns.
    oh: usize,
    ow: usize,
    /// Tile rows and columns (2×2 outputs each).
    th: usize,
    tw: usize,
    /// Rows and columns of the padded, transposed input: whole tiles' patches.
    hp: usize,
    wp: usize,
}

impl Shape {
    fn new(g: &Conv2dGeom) -> Self {
        let (oh, ow) = (g.out_h(), g.out_w());
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        Self {
            ins: g.in_per_group(),
            outs: g.out_per_group(),
            h: g.in_h,
            w: g.in_w,
            pad: g.padding,
            oh,
            ow,
            th,
            tw,
            hp: 2 * th + 2,
            wp: 2 * tw + 2,
        }
    }

    /// Values of one image's transposed input.
    fn in_len(&self) -> usize {
        self.hp * self.wp * self.ins
    }

    /// Values of one image's output.
    fn out_len(&self) -> usize {
        self.oh * self.ow * self.outs
    }

    /// Image, tile row and tile column of a task's tile `t`.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per_image = self.th * self.tw;
        let (k, r) = (t / per_image, t % per_image);
        (k, r / self.tw, r % self.tw)
    }
}

fn forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: Weights,
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(suits_shape(g), "winograd: unsuitable convolution");
    assert!(cpu_has_avx512(), "winograd: needs AVX-512");
    assert_eq!(x.len(), g.input_len(), "conv2d: input length");
    assert_eq!(y.len(), g.output_len(), "conv2d: output length");
    let s = Shape::new(g);
    let out_grp = s.out_len();
    if out_grp == 0 || g.batch == 0 {
        return;
    }
    // Tasks: one group × a run of images, enough of them to keep every thread busy.
    let min_tasks = 2 * rayon::current_num_threads();
    let per_task = (TASK_VALUES / (s.in_len() + s.out_len()))
        .clamp(1, g.batch)
        .min((g.batch / min_tasks.div_ceil(g.groups)).max(1));
    let runs = g.batch.div_ceil(per_task);
    let mut tasks: Vec<Vec<(usize, &mut [f32])>> = (0..g.groups * runs).map(|_| vec![]).collect();
    for (i, yg) in y.chunks_mut(out_grp).enumerate() {
        let (n, grp) = (i / g.groups, i % g.groups);
        tasks[grp * runs + n / per_task].push((n, yg));
    }
    tasks.into_par_iter().enumerate().for_each(|(task, outs)| {
        let grp = task / runs;
        // this group's transform, in a pooled buffer given back after the task
        let mut own = None;
        let u = match w {
            Weights::Packed(p) => p.group(grp),
            Weights::Plain(w) => {
                let len = s.outs * s.ins * 9;
                let u = own.insert(scratch::take_stale(POINTS * s.ins * s.outs));
                transform_weights(&w[grp * len..][..len], s.ins, s.outs, u);
                &u[..]
            }
        };
        run_task(g, &s, x, grp, u, outs, &epilogue);
        if let Some(u) = own {
            scratch::give([u]);
        }
    });
}

/// One group's output for the images in `outs` (`(image, output)` pairs).
fn run_task(
    g: &Conv2dGeom,
    s: &Shape,
    x: &[f32],
    grp: usize,
    u: &[f32],
    mut outs: Vec<(usize, &mut [f32])>,
    epilogue: &(impl Fn(usize, usize, &mut [f32]) + Sync),
) {
    let images = outs.len();
    let (ins, outs_c) = (s.ins, s.outs);
    let in_grp = ins * s.h * s.w;
    // inputs as padded rows of positions × channels; keyed, so the padding stays zero
    let key = [
        scratch::tag::WINOGRAD_INPUT,
        s.hp,
        s.wp,
        ins,
        s.pad,
        s.h,
        s.w,
        images,
        0,
        0,
    ];
    let mut xin = scratch::take_keyed(&key);
    if xin.len() != images * s.in_len() {
        xin.clear();
        xin.resize(images * s.in_len(), 0.0);
    }
    // (whole planes at a time: fewer, fuller 16×16 blocks than row by row)
    let mut rows = scratch::take_stale(in_grp);
    for (k, (n, _)) in outs.iter().enumerate() {
        let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
        transpose(xg, s.h * s.w, ins, s.h * s.w, &mut rows, ins, false);
        let dst = &mut xin[k * s.in_len()..][..s.in_len()];
        for (r, src) in rows.chunks_exact(s.w * ins).enumerate() {
            let at = ((r + s.pad) * s.wp + s.pad) * ins;
            dst[at..at + s.w * ins].copy_from_slice(src);
        }
    }
    let tiles = images * s.th * s.tw;
    let chunk = tiles.div_ceil(tiles.div_ceil(CHUNK_TILES));
    // (all overwritten before they are read)
    let mut v = scratch::take_stale(POINTS * chunk * ins);
    let mut m = scratch::take_stale(POINTS * chunk * outs_c);
    let mut yt = scratch::take_stale(images * s.out_len());
    for t0 in (0..tiles).step_by(chunk) {
        let count = chunk.min(tiles - t0);
        chunk_product(s, &xin, u, (t0, count), (&mut v, &mut m, &mut yt));
    }
    let plane = s.oh * s.ow;
    for (k, (n, yg)) in outs.iter_mut().enumerate() {
        let src = &yt[k * s.out_len()..][..s.out_len()];
        transpose(src, outs_c, plane, outs_c, yg, plane, false);
        epilogue(*n, grp * outs_c, yg);
    }
    scratch::give([v, m, yt, rows]);
    scratch::give_keyed(key, xin);
}

/// Blocks of at most [`PMAX`] tiles splitting `tiles` as evenly as possible: `(first, count)`.
fn blocks(tiles: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = tiles.div_ceil(PMAX);
    (0..nb).map(move |b| (b * tiles / nb, (b + 1) * tiles / nb - b * tiles / nb))
}

/// Tiles `t0..t0 + count` of a task: input transform into `v`, the 16 products into `m`,
/// output transform into the position × channel rows `yt`.
///
/// `v` holds, for point `ξ`, the chunk's tiles block by block; a block of `p` tiles
/// starting at `tb` keeps its `ins × p` values at `(ξ·count + tb)·ins` as runs of 16
/// channels: channel `16q + l` of the block's tile `j` at `q·16p + 16j + l`, so that the
/// product steps through one contiguous run of broadcasts per 16 channels.
fn chunk_product(
    s: &Shape,
    xin: &[f32],
    u: &[f32],
    (t0, count): (usize, usize),
    (v, m, yt): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (ins, outs) = (s.ins, s.outs);
    let images = xin.len() / s.in_len();
    assert!(
        u.len() == POINTS * ins * outs
            && v.len() >= POINTS * count * ins
            && m.len() >= POINTS * count * outs
            && yt.len() == images * s.out_len()
            && t0 + count <= images * s.th * s.tw,
        "winograd: buffer sizes"
    );
    assert!(cpu_has_avx512(), "winograd: needs AVX-512");
    for (tb, p) in blocks(count) {
        for j in 0..p {
            let (k, ty, tx) = s.tile(t0 + tb + j);
            let at = k * s.in_len() + (2 * ty * s.wp + 2 * tx) * ins;
            for q in 0..ins / LANES {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F is present (asserted). Reads the 4×4 patch of 16
                // channels at `at + q·16`: rows `2ty..2ty + 4 ≤ hp`, columns
                // `2tx..2tx + 4 ≤ wp` of image `k < images`, inside `xin`. Writes 16 points
                // at `(ξ·count + tb)·ins + q·16p + 16j`, `j < p`, `q < ins/16`: inside
                // the block's `ins·p` values of point `ξ < 16`, inside `v` (asserted).
                unsafe {
                    avx512::input_tile(
                        xin.as_ptr().add(at + q * LANES),
                        s.wp * ins,
                        ins,
                        v.as_mut_ptr().add(tb * ins + q * LANES * p + LANES * j),
                        count * ins,
                    )
                };
            }
        }
    }
    for xi in 0..POINTS {
        for o0 in (0..outs).step_by(2 * LANES) {
            let width = (outs - o0).min(2 * LANES);
            for (tb, p) in blocks(count) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F is present (asserted). Reads the block's `ins·p`
                // values of point `xi` in `v` and rows `c < ins` of `U[xi]` at columns
                // `o0..o0 + width ≤ outs`; writes `m[(xi·count + tb + j)·outs + o0..][..width]`
                // for `j < p`: all inside the asserted lengths.
                unsafe {
                    avx512::product(
                        v.as_ptr().add((xi * count + tb) * ins),
                        ins,
                        u.as_ptr().add(xi * ins * outs + o0),
                        outs,
                        m.as_mut_ptr().add((xi * count + tb) * outs + o0),
                        (p, width / LANES),
                    )
                };
            }
        }
    }
    for t in 0..count {
        let (k, ty, tx) = s.tile(t0 + t);
        let (rows, cols) = ((s.oh - 2 * ty).min(2), (s.ow - 2 * tx).min(2));
        let at = k * s.out_len() + (2 * ty * s.ow + 2 * tx) * outs;
        for o0 in (0..outs).step_by(LANES) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted). Reads `m[(ξ·count + t)·outs + o0..]`
            // (16 values, ξ < 16), inside `m`; writes 16 channels of output rows
            // `2ty + i < oh`, columns `2tx + j < ow` of image `k`, inside `yt`.
            unsafe {
                avx512::output_tile(
                    m.as_ptr().add(t * outs + o0),
                    count * outs,
                    yt.as_mut_ptr().add(at + o0),
                    s.ow * outs,
                    outs,
                    (rows, cols),
                )
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// `U = G g Gᵀ` for 16 outputs: `g` holds taps `k = 3ky + kx` at `g + k·gstride`,
    /// `U[ξ]` goes to `u + ξ·ustride`. `G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weights(g: *const f32, gstride: usize, u: *mut f32, ustride: usize) {
        let half = _mm512_set1_ps(0.5);
        let mut w = [_mm512_setzero_ps(); 9];
        for (k, w) in w.iter_mut().enumerate() {
            *w = _mm512_loadu_ps(g.add(k * gstride));
        }
        // h = G g: 4 rows × 3 columns
        let mut h = [[_mm512_setzero_ps(); 3]; 4];
        for col in 0..3 {
            let (g0, g1, g2) = (w[col], w[3 + col], w[6 + col]);
            let even = _mm512_add_ps(g0, g2);
            h[0][col] = g0;
            h[1][col] = _mm512_mul_ps(_mm512_add_ps(even, g1), half);
            h[2][col] = _mm512_mul_ps(_mm512_sub_ps(even, g1), half);
            h[3][col] = g2;
        }
        // U = h Gᵀ
        for (i, h) in h.iter().enumerate() {
            let even = _mm512_add_ps(h[0], h[2]);
            let row = [
                h[0],
                _mm512_mul_ps(_mm512_add_ps(even, h[1]), half),
                _mm512_mul_ps(_mm512_sub_ps(even, h[1]), half),
                h[2],
            ];
            for (j, &r) in row.iter().enumerate() {
                _mm512_storeu_ps(u.add((4 * i + j) * ustride), r);
            }
        }
    }

    /// `V = Bᵀ d B` for 16 channels of one 4×4 patch (`d[i][j]` at `x + i·row + j·col`),
    /// `V[ξ]` to `v + ξ·vstride`. `Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_tile(
        x: *const f32,
        row: usize,
        col: usize,
        v: *mut f32,
        vstride: usize,
    ) {
        let mut d = [[_mm512_setzero_ps(); 4]; 4];
        for (i, d) in d.iter_mut().enumerate() {
            for (j, d) in d.iter_mut().enumerate() {
                *d = _mm512_loadu_ps(x.add(i * row + j * col));
            }
        }
        let mut t = [[_mm512_setzero_ps(); 4]; 4];
        for j in 0..4 {
            t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
            t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
            t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
            t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
        }
        for (i, t) in t.iter().enumerate() {
            let r = [
                _mm512_sub_ps(t[0], t[2]),
                _mm512_add_ps(t[1], t[2]),
                _mm512_sub_ps(t[2], t[1]),
                _mm512_sub_ps(t[1], t[3]),
            ];
            for (j, &r) in r.iter().enumerate() {
                _mm512_storeu_ps(v.add((4 * i + j) * vstride), r);
            }
        }
    }

    /// `Y = Aᵀ M A` for 16 channels of one tile (`M[ξ]` at `m + ξ·mstride`), stored for the
    /// first `rows × cols` of its 2×2 positions at `y + i·row + j·col`.
    /// `Aᵀ = [1 1 1 0; 0 1 −1 −1]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_tile(
        m: *const f32,
        mstride: usize,
        y: *mut f32,
        row: usize,
        col: usize,
        (rows, cols): (usize, usize),
    ) {
        let mut mv = [_mm512_setzero_ps(); 16];
        for (xi, mv) in mv.iter_mut().enumerate() {
            *mv = _mm512_loadu_ps(m.add(xi * mstride));
        }
        let mut s = [[_mm512_setzero_ps(); 4]; 2];
        for j in 0..4 {
            let (m0, m1, m2, m3) = (mv[j], mv[4 + j], mv[8 + j], mv[12 + j]);
            s[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
            s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        for (i, s) in s.iter().enumerate().take(rows) {
            let r = [
                _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]),
                _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]),
            ];
            for (j, &r) in r.iter().enumerate().take(cols) {
                _mm512_storeu_ps(y.add(i * row + j * col), r);
            }
        }
    }

    /// `m[j·ustride + o] = Σ_c v[c, j] · u[c·ustride + o]` for `j < p ≤ 14` tiles and
    /// `o < 16·ov` (`ov ∈ {1, 2}`; `U`'s rows and `M`'s have the same length, the output
    /// channels), `v` in runs of 16 channels (see [`super::chunk_product`]), `ins` a multiple
    /// of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        v: *const f32,
        ins: usize,
        u: *const f32,
        ustride: usize,
        m: *mut f32,
        (p, ov): (usize, usize),
    ) {
        macro_rules! by_p {
            ($ov:literal) => {
                match p {
                    14 => run::<14, $ov>(v, ins, u, ustride, m),
                    13 => run::<13, $ov>(v, ins, u, ustride, m),
                    12 => run::<12, $ov>(v, ins, u, ustride, m),
                    11 => run::<11, $ov>(v, ins, u, ustride, m),
                    10 => run::<10, $ov>(v, ins, u, ustride, m),
                    9 => run::<9, $ov>(v, ins, u, ustride, m),
                    8 => run::<8, $ov>(v, ins, u, ustride, m),
                    7 => run::<7, $ov>(v, ins, u, ustride, m),
                    6 => run::<6, $ov>(v, ins, u, ustride, m),
                    5 => run::<5, $ov>(v, ins, u, ustride, m),
                    4 => run::<4, $ov>(v, ins, u, ustride, m),
                    3 => run::<3, $ov>(v, ins, u, ustride, m),
                    2 => run::<2, $ov>(v, ins, u, ustride, m),
                    _ => run::<1, $ov>(v, ins, u, ustride, m),
                }
            };
        }
        if ov == 2 {
            by_p!(2)
        } else {
            by_p!(1)
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const P: usize, const OV: usize>(
        v: *const f32,
        ins: usize,
        u: *const f32,
        ustride: usize,
        m: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); OV]; P];
        for q in 0..ins / LANES {
            let vq = v.add(q * LANES * P);
            let uq = u.add(q * LANES * ustride);
            for c in 0..LANES {
                let mut wv = [_mm512_setzero_ps(); OV];
                for (k, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_ps(uq.add(c * ustride + k * LANES));
                }
                for (j, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*vq.add(j * LANES + c));
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(wv, xv, *a);
                    }
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (k, &a) in acc.iter().enumerate() {
                _mm512_storeu_ps(m.add(j * ustride + k * LANES), a);
            }
        }
    }
}
