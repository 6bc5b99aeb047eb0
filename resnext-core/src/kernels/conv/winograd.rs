//! Grouped 3×3 stride-1 convolution forward by Winograd's minimal filtering, F(2×2, 3×3)
//! and F(4×4, 3×3) (Lavin & Gray 2016), with channels in the vector lanes at every
//! instruction-set level ([`super::simd`]): for groups of 16 to 64 channels (ResNeXt-50's
//! stages 3 and 4, ResNeXt-29's groups of 64).
//!
//! Each `m×m` block of outputs ("tile", `m` = 2 or 4, [`Tiling`]) comes from an
//! `(m+2)×(m+2)` patch of input `d` as `Y = Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`:
//! `(m+2)²` products per input channel and tile instead of the direct convolution's `9m²`,
//! so the multiplications (which are the time) drop 2.25× (F(2×2)) or 4× (F(4×4)) at image
//! sizes the tiles cover exactly. At 7×7, which either size covers as 8×8, that is 1.7× and
//! 3.1×; at 14×14 (16×16 in tiles of 4) 2.25× and 3.1×. F(4×4)'s transforms have larger
//! coefficients (up to 8 and 16⁄15), so it rounds more: about 4e-6 of the largest output
//! at 64 channels per group, against 4e-7 for F(2×2) (`tiles::F4` says which points keep
//! it there).
//! The element-wise products summed over channels are, for each transform point `ξ`, one
//! matrix product `M[ξ] = V[ξ] · U[ξ]` (tiles × input channels times input × output
//! channels), run with the same register tile as [`super::lanes`]: up to 14 tiles × 32
//! output channels with AVX-512, 6 × 16 with AVX2 or NEON, one row of `U` and one
//! broadcast per tile per step.
//!
//! Data flow of one task (one group, a few images):
//! 1. the group's weights to `U[ξ][c][o]` (`G g Gᵀ`, output channels in the lanes), unless
//!    prepared once ([`pack_forward_weights`], for inference);
//! 2. the images' input planes transposed to padded rows of positions × channels;
//! 3. per chunk of tiles: each tile's `Bᵀ d B` (16 vectors per 16 channels) into `V`, the 16
//!    products into `M`, and each tile's `Aᵀ M A` into position × channel rows;
//! 4. those rows transposed into the output planes, and the caller's epilogue on them.
//!
//! The input gradient of a stride-1 convolution is itself one (of the output gradient,
//! with each group's weights transposed and turned by 180°), so [`conv2d_input_grad`] runs
//! it through the same forward. The weight gradient ([`conv2d_weight_grad`]) runs the
//! forward's tiling backwards: output-gradient tiles through the adjoint of the output
//! transform, their products with the input tiles' transforms summed over every tile of
//! the batch, once per group through the adjoint of the weight transform.

use std::borrow::Cow;
use std::marker::PhantomData;

use rayon::prelude::*;

use super::layout::{lane_tile, transpose, transpose_into};
use super::{Conv2dGeom, Dest};
use crate::kernels::simd::{self, Kernel, Simd};
use crate::kernels::{as_uninit, isa, scratch};

/// Channels of one run in `V` (see [`chunk_product`]); groups have a multiple of it.
const UNIT: usize = super::LANE_CHANNELS;
/// F(2×2)-tiles the per-call weight transform must have to pay (two AVX-512 register
/// blocks).
const PAYS_TILES: usize = 28;
/// Transform points × tiles per pass of transform, products and inverse transform (56
/// tiles of F(2×2)'s 16 points, 24 of F(4×4)'s 36), so that its `V` and `M` (points ×
/// tiles × channels each) stay in the L2 cache.
const CHUNK_POINTS: usize = 56 * 16;
/// Values of transposed input and output one task aims for (256 KB), which sets how many
/// images it takes.
const TASK_VALUES: usize = 1 << 16;
/// Values added to the distance between transform points in `U`, `V` and `M` (one cache
/// line): a tile's transform reads or writes a vector at each of its 16 or 36 points, and
/// at a distance of a power of two (2 or 4 KB at stage 4 of ResNeXt-50) those all fall in
/// one set of the L1 cache, which holds 8 of them.
const SKEW: usize = 16;

/// The distance between transform points of `len` values each.
fn point_stride(len: usize) -> usize {
    len + SKEW
}

/// The size of Winograd's output tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiling {
    /// F(2×2, 3×3): 2×2 outputs from 16 transform points.
    F2,
    /// F(4×4, 3×3): 4×4 outputs from 36 transform points.
    F4,
}

impl Tiling {
    /// Both, for tests and measurements.
    pub const ALL: [Tiling; 2] = [Tiling::F2, Tiling::F4];

    /// The tiling [`conv2d_forward`] uses for `g`: F(4×4) where it does at most two thirds
    /// of F(2×2)'s products once the tiles that stick out past the edge are counted. So
    /// 7×7 (both tile it as 8×8: 144 against 256 products per channel pair), 8×8, 16×16
    /// and 32×32 take F(4×4); 14×14 (16×16 in tiles of 4: 576 against 784 products) and
    /// the other sizes below 25 whose last tiles of 4 are half padding (1, 2, 5, 6, 9, …)
    /// F(2×2). Paired `opbench` runs on AMD Zen 4 (batch 8, GFLOP/s, F(2×2)
    /// against F(4×4)): stage 4 of ResNeXt-50 forward 238–247 against 337–348 at
    /// AVX-512 and 233–239 against 302–314 at AVX2, backward 197–204 against 228–232 and
    /// 188–191 against 201–215; stage 3 level at AVX-512 (forward 239–257 against
    /// 247–268) and F(2×2) ahead at AVX2 (236–243 against 214–232), where the 16×16
    /// products are small beside the transforms.
    pub fn for_geom(g: &Conv2dGeom) -> Tiling {
        let (oh, ow) = (g.out_h(), g.out_w());
        // outputs computed, whole tiles
        let cover = |m: usize| oh.div_ceil(m) * m * ow.div_ceil(m) * m;
        // products: F(2×2) 16 per 4 outputs, F(4×4) 36 per 16
        if 3 * 36 * cover(4) <= 2 * 64 * cover(2) {
            Tiling::F4
        } else {
            Tiling::F2
        }
    }

    /// Outputs per tile side.
    fn m(self) -> usize {
        match self {
            Tiling::F2 => 2,
            Tiling::F4 => 4,
        }
    }

    /// Transform points: `(m + 2)²`.
    fn points(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
}

/// Whether [`conv2d_forward`] runs `g`: a 3×3 stride-1 grouped convolution that
/// [`super::lanes::suits`] (16 to 64 channels per group); any instruction-set level.
///
/// Except on full-width AVX-512 ([`isa::wide_fma`]) for groups of 16 input channels, where
/// the product has only 16 multiply-adds per transform point and tile, so the transforms
/// dominate: there [`super::lanes`]' direct product is faster (5th-generation Xeon, stage 3
/// of ResNeXt-50: 305–312 against 211–240 GFLOP/s; on AMD Zen 4, whose 512-bit FMAs
/// take two passes, Winograd is the faster one).
pub fn suits(g: &Conv2dGeom) -> bool {
    suits_shape(g) && !(isa::wide_fma() && g.in_per_group() <= UNIT)
}

/// Whether [`conv2d_forward`], which transforms the weights in every task, pays off over
/// [`lanes`] for `g`: it [`suits`] and the batch has at least two register blocks of tiles
/// (at batch 1 a 7×7 image has 16, over which one group's weight transform does not pay).
/// Weights transformed once ([`pack_forward_weights`]) pay wherever it suits.
pub fn pays_per_call(g: &Conv2dGeom) -> bool {
    suits(g) && g.batch * g.out_h().div_ceil(2) * g.out_w().div_ceil(2) >= PAYS_TILES
}

/// The shape half of [`suits`].
pub fn suits_shape(g: &Conv2dGeom) -> bool {
    g.kernel == 3 && g.stride == 1 && g.groups > 1 && g.lane_channels()
}

/// A grouped 3×3 convolution's weights transformed for [`conv2d_forward_packed`]: per
/// group, `U[ξ][c][o] = (G g_{o,c} Gᵀ)[ξ]` at `ξ·point_stride(ins·outs) + c·outs + o`.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    data: Vec<f32>,
    tiling: Tiling,
    groups: usize,
    ins: usize,
    outs: usize,
    pairs: Pairs,
}

impl WinogradWeights {
    /// Group `grp`'s values.
    fn group(&self, grp: usize) -> &[f32] {
        let len = self.tiling.points() * point_stride(self.ins * self.outs);
        &self.data[grp * len..][..len]
    }
}

/// Transforms `w` (PyTorch's `(out, in / groups, 3, 3)` layout) once for
/// [`conv2d_forward_packed`], for the tiling [`Tiling::for_geom`] picks. ([`conv2d_forward`]
/// transforms each group in its task instead.)
pub fn pack_forward_weights(g: &Conv2dGeom, w: &[f32]) -> WinogradWeights {
    pack_forward_weights_tiled(g, Tiling::for_geom(g), w)
}

/// [`pack_forward_weights`] for a given tiling.
pub fn pack_forward_weights_tiled(g: &Conv2dGeom, tiling: Tiling, w: &[f32]) -> WinogradWeights {
    pack(g, tiling, (w, Pairs::No))
}

/// [`pack_forward_weights`] of `g`'s weights `w` for its groups run as `pairs` say.
pub(super) fn pack_forward_weights_as(g: &Conv2dGeom, pairs: Pairs, w: &[f32]) -> WinogradWeights {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    let p = run_geom(g, pairs);
    pack(&p, Tiling::for_geom(&p), (&pair_weights(g, &p, w), pairs))
}

fn pack(g: &Conv2dGeom, tiling: Tiling, (w, pairs): (&[f32], Pairs)) -> WinogradWeights {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    assert!(suits_shape(g), "winograd: unsuitable convolution");
    let (ins, outs) = (g.in_per_group(), g.out_per_group());
    let len = tiling.points() * point_stride(ins * outs);
    let mut buf = vec![0.0; g.groups * len];
    buf.par_chunks_exact_mut(len)
        .zip(w.par_chunks_exact(outs * ins * 9))
        .for_each(|(u, wg)| transform_weights(tiling, wg, ins, outs, u));
    WinogradWeights {
        data: buf,
        tiling,
        groups: g.groups,
        ins,
        outs,
        pairs,
    }
}

/// `u = U` of one group's weights `wg[o][c][ky][kx]`.
fn transform_weights(tiling: Tiling, wg: &[f32], ins: usize, outs: usize, u: &mut [f32]) {
    let taps = ins * 9;
    assert!(
        wg.len() == outs * taps && u.len() == tiling.points() * point_stride(ins * outs),
        "winograd weights: length"
    );
    // taps × outputs, so that the outputs of one tap are contiguous vectors
    let mut t = scratch::take_stale(taps * outs);
    transpose(wg, taps, outs, taps, &mut t, outs, false);
    // SAFETY: reads `t[(9c + k)·outs + o]` for `k < 9`, `o < outs`, `c < ins`, writes
    // `u[ξ·point_stride(ins·outs) + c·outs + o]` for `ξ < points`: inside both lengths
    // asserted above.
    unsafe {
        let (t, u) = (t.as_ptr(), u.as_mut_ptr());
        match tiling {
            Tiling::F2 => simd::dispatch(WeightTransform::<tiles::F2> {
                t,
                ins,
                outs,
                u,
                tiling: PhantomData,
            }),
            Tiling::F4 => simd::dispatch(WeightTransform::<tiles::F4> {
                t,
                ins,
                outs,
                u,
                tiling: PhantomData,
            }),
        }
    };
    scratch::give([t]);
}

/// [`transform_weights`]' arguments, checked.
struct WeightTransform<T> {
    t: *const f32,
    ins: usize,
    outs: usize,
    u: *mut f32,
    tiling: PhantomData<T>,
}

impl<T: tiles::Transforms> Kernel for WeightTransform<T> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let WeightTransform {
            t, ins, outs, u, ..
        } = self;
        for c in 0..ins {
            for o0 in (0..outs).step_by(S::LANES) {
                // SAFETY: `LANES` outputs of input channel `c` (outs a multiple of 16).
                unsafe {
                    T::weights::<S>(
                        t.add(9 * c * outs + o0),
                        outs,
                        u.add(c * outs + o0),
                        point_stride(ins * outs),
                    )
                };
            }
        }
    }
}

/// Where a task's weights come from.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// PyTorch's layout, transformed by each task for its group.
    Plain(&'a [f32], Pairs),
    /// Transformed once.
    Packed(&'a WinogradWeights),
}

impl Weights<'_> {
    fn pairs(&self) -> Pairs {
        match self {
            Weights::Plain(_, pairs) => *pairs,
            Weights::Packed(w) => w.pairs,
        }
    }
}

/// Whether a convolution's groups run one by one or two at a time: each two neighbouring
/// groups taken as one ([`Conv2dGeom::paired`]), whose weights are zero where one half's
/// input channels meet the other half's outputs ([`pair_weights`]). The entry points
/// taking a `Pairs` take the convolution's own geometry and weights and do the pairing
/// (and the weight gradient's unpairing, [`add_unpaired`]) themselves. Groups of 16 made
/// of two of 8 (ResNeXt-50's stage 2) run a product over each half's 8 channels
/// ([`tiles::product_pairs`], on [`Simd::Narrow`]) that skips those zeros: half the
/// multiply-adds. (Groups of 48 made of two of 24 multiply the zeros, as does the weight
/// gradient.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pairs {
    /// Each group on its own.
    No,
    /// Two groups as one, in its first and second half.
    Halves,
}

/// The geometry that runs `g` for `pairs`: `g`, or [`Conv2dGeom::paired`]`(g)`.
fn run_geom(g: &Conv2dGeom, pairs: Pairs) -> Conv2dGeom {
    match pairs {
        Pairs::No => *g,
        Pairs::Halves => g.paired().expect("winograd: groups that do not pair"),
    }
}

/// `g`'s weights `w` for `p = `[`run_geom`]`(g, pairs)`: as they are, or each two
/// neighbouring groups' filters side by side, zeros where one group's output channel
/// meets the other's input channel.
fn pair_weights<'a>(g: &Conv2dGeom, p: &Conv2dGeom, w: &'a [f32]) -> Cow<'a, [f32]> {
    if p.groups == g.groups {
        return Cow::Borrowed(w);
    }
    let (ipg, opg, taps) = (g.in_per_group(), g.out_per_group(), g.kernel * g.kernel);
    let mut wp = vec![0.0; p.weight_len()];
    // output channel `o` (global in both) keeps its filter, at the half of its group
    for (o, row) in wp.chunks_exact_mut(p.in_per_group() * taps).enumerate() {
        let half = (o / opg) % 2;
        row[half * ipg * taps..][..ipg * taps].copy_from_slice(&w[o * ipg * taps..][..ipg * taps]);
    }
    Cow::Owned(wp)
}

/// Adds the part of `p = `[`Conv2dGeom::paired`]`(g)`'s weight gradient `dwp` that is
/// `g`'s (each filter's half of its own group) into `dw`.
fn add_unpaired(g: &Conv2dGeom, p: &Conv2dGeom, dwp: &[f32], dw: &mut [f32]) {
    let (ipg, opg, taps) = (g.in_per_group(), g.out_per_group(), g.kernel * g.kernel);
    for (o, (row, d)) in dwp
        .chunks_exact(p.in_per_group() * taps)
        .zip(dw.chunks_exact_mut(ipg * taps))
        .enumerate()
    {
        let half = (o / opg) % 2;
        for (d, v) in d.iter_mut().zip(&row[half * ipg * taps..][..ipg * taps]) {
            *d += v;
        }
    }
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
    conv2d_forward_tiled(g, Tiling::for_geom(g), x, w, y, epilogue);
}

/// [`conv2d_forward`] with a given tiling.
pub fn conv2d_forward_tiled(
    g: &Conv2dGeom,
    tiling: Tiling,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    let y = Dest::Write(as_uninit(y));
    forward(g, tiling, x, Weights::Plain(w, Pairs::No), y, epilogue);
}

/// [`conv2d_forward`] into `y` (written, every value, new memory too, or added into), its
/// groups run as `pairs` say (the output and the epilogue's channels are `g`'s either way).
pub(super) fn conv2d_forward_into(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    pairs: Pairs,
    y: Dest<'_>,
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    let p = run_geom(g, pairs);
    let w = Weights::Plain(&pair_weights(g, &p, w), pairs);
    forward(&p, Tiling::for_geom(&p), x, w, y, epilogue);
}

/// [`conv2d_forward`] with weights from [`pack_forward_weights`].
pub fn conv2d_forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    w: &WinogradWeights,
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    conv2d_forward_packed_into(g, x, w, Dest::Write(as_uninit(y)), epilogue)
}

/// [`conv2d_forward_packed`] into `y`: written, every value (new memory too), or added
/// into. (Weights packed for paired groups, [`pack_forward_weights_as`], run `g` paired.)
pub(super) fn conv2d_forward_packed_into(
    g: &Conv2dGeom,
    x: &[f32],
    w: &WinogradWeights,
    y: Dest<'_>,
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let g = &run_geom(g, w.pairs);
    assert!(
        w.groups == g.groups && w.ins == g.in_per_group() && w.outs == g.out_per_group(),
        "conv2d: packed weights do not match the geometry"
    );
    forward(g, w.tiling, x, Weights::Packed(w), y, epilogue);
}

/// The geometry whose forward is `g`'s input gradient at stride 1: output gradient in,
/// input gradient out, padding `k − 1 − p`.
fn transposed(g: &Conv2dGeom) -> Conv2dGeom {
    Conv2dGeom {
        in_channels: g.out_channels,
        out_channels: g.in_channels,
        in_h: g.out_h(),
        in_w: g.out_w(),
        padding: (g.kernel - 1).saturating_sub(g.padding),
        ..*g
    }
}

/// Whether [`conv2d_input_grad`] can run `g`'s input gradient: a 3×3 stride-1
/// convolution with padding at most 2 (so the gradient is a padded convolution too) whose
/// transposed geometry [`suits`].
pub fn suits_input_grad_shape(g: &Conv2dGeom) -> bool {
    g.kernel == 3 && g.stride == 1 && g.padding <= 2 && suits_shape(&transposed(g))
}

/// Whether [`conv2d_input_grad`] pays off for `g`: it [`suits_input_grad_shape`], the
/// per-call weight transform pays ([`pays_per_call`]), and the level's multiply-adds are
/// not so cheap that [`super::lanes`]' input gradient is faster ([`isa::wide_fma`]: on the
/// 5th-generation Xeon at AVX-512 it is, by 7% at stages 3 and 4 of ResNeXt-50).
pub fn suits_input_grad(g: &Conv2dGeom) -> bool {
    suits_input_grad_shape(g) && pays_per_call(&transposed(g)) && !isa::wide_fma()
}

/// Whether [`conv2d_weight_grad`] pays off for `g`: where the input gradient is on
/// Winograd too ([`suits_input_grad`], so not at full-width AVX-512, [`isa::wide_fma`]). On
/// the Xeon forced to AVX2, ResNeXt-50's stage 4 (7×7, 32 channels per group, batch 8,
/// F(4×4)) runs 1.5× the channel-in-lanes weight gradient, and the whole stage-3 backward
/// (14×14, 16 channels per group, F(2×2)) 15% faster (2.25 against 2.64 ms on the AMX
/// Xeon; level on the 5th-generation one); at full-width AVX-512 the two are level at stage
/// 3 and the lanes kernel is 5–15% ahead at stage 4.
pub fn suits_weight_grad(g: &Conv2dGeom) -> bool {
    suits_input_grad(g)
}

/// The input gradient of a convolution that [`suits_input_grad_shape`], from the output
/// gradient `dy` and `g`'s weights `w`: added into `dx` with `accumulate`, else written
/// over it.
pub fn conv2d_input_grad(g: &Conv2dGeom, w: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
    conv2d_input_grad_into(g, w, Pairs::No, dy, add_or_write(dx, accumulate));
}

/// [`conv2d_input_grad`] into `dx` (added into, or written, every value, new memory too),
/// its groups run as `pairs` say.
pub(super) fn conv2d_input_grad_into(
    g: &Conv2dGeom,
    w: &[f32],
    pairs: Pairs,
    dy: &[f32],
    dx: Dest<'_>,
) {
    assert_eq!(w.len(), g.weight_len(), "conv2d backward: weight length");
    let p = run_geom(g, pairs);
    let tiling = Tiling::for_geom(&transposed(&p));
    input_grad(&p, tiling, (&pair_weights(g, &p, w), pairs), dy, dx);
}

/// `dx` to add into with `accumulate`, else to write over.
fn add_or_write(dx: &mut [f32], accumulate: bool) -> Dest<'_> {
    if accumulate {
        Dest::Add(dx)
    } else {
        Dest::Write(as_uninit(dx))
    }
}

/// [`conv2d_input_grad`] with a given tiling.
pub fn conv2d_input_grad_tiled(
    g: &Conv2dGeom,
    tiling: Tiling,
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    input_grad(g, tiling, (w, Pairs::No), dy, add_or_write(dx, accumulate));
}

/// [`conv2d_input_grad_tiled`] into `dx`.
fn input_grad(
    g: &Conv2dGeom,
    tiling: Tiling,
    (w, pairs): (&[f32], Pairs),
    dy: &[f32],
    dx: Dest<'_>,
) {
    assert!(
        suits_input_grad_shape(g),
        "winograd: unsuitable input gradient"
    );
    assert_eq!(w.len(), g.weight_len(), "conv2d backward: weight length");
    let t = transposed(g);
    // wt[grp][c][o][ky][kx] = w[grp][o][c][2 − ky][2 − kx]
    let (ins, outs) = (g.in_per_group(), g.out_per_group());
    let mut wt = scratch::take_stale(w.len());
    wt.par_chunks_exact_mut(ins * outs * 9)
        .zip(w.par_chunks_exact(ins * outs * 9))
        .for_each(|(dst, src)| {
            for (o, src) in src.chunks_exact(ins * 9).enumerate() {
                for (c, taps) in src.chunks_exact(9).enumerate() {
                    let d = &mut dst[(c * outs + o) * 9..][..9];
                    for (d, &v) in d.iter_mut().zip(taps.iter().rev()) {
                        *d = v;
                    }
                }
            }
        });
    // (a pair's transposed weights are zero between the same halves)
    forward(&t, tiling, dy, Weights::Plain(&wt, pairs), dx, |_, _, _| {});
    scratch::give([wt]);
}

/// The weight gradient of a convolution that [`suits_shape`], added into `dw`, by the
/// adjoint of the forward's tiling: each tile's output gradient goes back through the
/// output transform (`D = A dy Aᵀ`), meets the tile's input transform `V = Bᵀ d B` at each
/// point, and the products summed over every tile of every image (`M[ξ][o][c] = Σ_t
/// D[ξ][t][o] · V[ξ][t][c]`, one long matrix product per point whose sums stay in
/// registers) go back through the weight transform once per group (`Gᵀ M G`). Where the
/// tiles cover the output exactly, F(2×2) does 16 products per 4 outputs where the direct
/// method does 36, F(4×4) 36 per 16 where it does 144.
pub fn conv2d_weight_grad(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    conv2d_weight_grad_tiled(g, Tiling::for_geom(g), x, dy, dw);
}

/// [`conv2d_weight_grad`] with `g`'s groups run as `pairs` say.
pub(super) fn conv2d_weight_grad_as(
    g: &Conv2dGeom,
    pairs: Pairs,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) {
    if pairs == Pairs::No {
        return conv2d_weight_grad(g, x, dy, dw);
    }
    assert_eq!(
        dw.len(),
        g.weight_len(),
        "conv2d backward: weight-gradient length"
    );
    let p = run_geom(g, pairs);
    let mut dwp = vec![0.0; p.weight_len()];
    conv2d_weight_grad(&p, x, dy, &mut dwp);
    add_unpaired(g, &p, &dwp, dw);
}

/// [`conv2d_weight_grad`] with a given tiling.
pub fn conv2d_weight_grad_tiled(
    g: &Conv2dGeom,
    tiling: Tiling,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) {
    assert!(suits_shape(g), "winograd: unsuitable convolution");
    assert_eq!(x.len(), g.input_len(), "conv2d backward: input length");
    assert_eq!(
        dy.len(),
        g.output_len(),
        "conv2d backward: output-gradient length"
    );
    assert_eq!(
        dw.len(),
        g.weight_len(),
        "conv2d backward: weight-gradient length"
    );
    let s = Shape::new(g, tiling, Pairs::No);
    if s.out_len() == 0 || g.batch == 0 {
        return;
    }
    // one task per group, its images in order: the sums do not depend on the thread count
    dw.par_chunks_exact_mut(s.outs * s.ins * 9)
        .enumerate()
        .for_each(|(grp, dwg)| match tiling {
            Tiling::F2 => weight_grad_group::<tiles::F2>(g, &s, x, dy, grp, dwg),
            Tiling::F4 => weight_grad_group::<tiles::F4>(g, &s, x, dy, grp, dwg),
        });
}

/// Group `grp`'s weight gradient, added into `dwg` (`[o][c][ky][kx]`).
fn weight_grad_group<T: tiles::Transforms>(
    g: &Conv2dGeom,
    s: &Shape,
    x: &[f32],
    dy: &[f32],
    grp: usize,
    dwg: &mut [f32],
) {
    let (ins, outs) = (s.ins, s.outs);
    let out_grp = s.out_len();
    // images per pass, so that the transposed input and output gradient stay near 256 KB
    let per = (TASK_VALUES / (s.in_len() + out_grp)).clamp(1, g.batch);
    let ms = point_stride(outs * ins);
    let mut m = scratch::take_stale(T::POINTS * ms);
    let mut dyt = scratch::take_stale(per * out_grp);
    let tiles_max = per * s.th * s.tw;
    let chunk = tiles_max.div_ceil(tiles_max.div_ceil(CHUNK_POINTS / s.points));
    let mut v = scratch::take_stale(T::POINTS * point_stride(chunk * ins));
    let mut d = scratch::take_stale(T::POINTS * point_stride(chunk * outs));
    let plane = s.oh * s.ow;
    let mut first = true;
    for n0 in (0..g.batch).step_by(per) {
        let images = per.min(g.batch - n0);
        let (key, xin) = pack_input(g, s, x, grp, n0..n0 + images);
        for k in 0..images {
            let src = &dy[((n0 + k) * g.groups + grp) * out_grp..][..out_grp];
            transpose(
                src,
                plane,
                outs,
                plane,
                &mut dyt[k * out_grp..],
                outs,
                false,
            );
        }
        let tiles = images * s.th * s.tw;
        for t0 in (0..tiles).step_by(chunk) {
            let count = chunk.min(tiles - t0);
            weight_grad_chunk::<T>(
                s,
                (&xin, &dyt[..images * out_grp]),
                (t0, count),
                (&mut v, &mut d, &mut m),
                !first,
            );
            first = false;
        }
        scratch::give_keyed(key, xin);
    }
    // dW = Gᵀ M G, taps of each output channel as rows of input channels, then to
    // PyTorch's layout
    let mut taps = scratch::take_stale(outs * 9 * ins);
    // SAFETY: reads `m[ξ·ms + o·ins + c0..][..LANES]` for `ξ < POINTS`, `o < outs`,
    // `c0 + LANES ≤ ins` (ins a multiple of 16); writes `taps[(9o + k)·ins + c0..][..LANES]`
    // for `k < 9`: inside both (asserted).
    assert!(m.len() >= T::POINTS * ms && taps.len() == outs * 9 * ins);
    unsafe {
        simd::dispatch(WeightAdjoint::<T> {
            m: m.as_ptr(),
            ms,
            ins,
            outs,
            taps: taps.as_mut_ptr(),
            tiling: PhantomData,
        })
    };
    // (nine rows, shorter than a square block of lanes: plainly)
    for (src, dst) in taps
        .chunks_exact(9 * ins)
        .zip(dwg.chunks_exact_mut(ins * 9))
    {
        for (c, dst) in dst.chunks_exact_mut(9).enumerate() {
            for (k, d) in dst.iter_mut().enumerate() {
                *d += src[k * ins + c];
            }
        }
    }
    scratch::give([m, dyt, v, d, taps]);
}

/// Tiles `t0..t0 + count` of [`weight_grad_group`]'s pass: the transforms into `v` and
/// `d`, their products added into `m` (written over it unless `accumulate`).
fn weight_grad_chunk<T: tiles::Transforms>(
    s: &Shape,
    (xin, dyt): (&[f32], &[f32]),
    (t0, count): (usize, usize),
    (v, d, m): (&mut [f32], &mut [f32], &mut [f32]),
    accumulate: bool,
) {
    let (ins, outs) = (s.ins, s.outs);
    let images = xin.len() / s.in_len();
    assert!(
        s.m == T::M
            && s.points == T::POINTS
            && dyt.len() == images * s.out_len()
            && v.len() >= T::POINTS * point_stride(count * ins)
            && d.len() >= T::POINTS * point_stride(count * outs)
            && m.len() >= T::POINTS * point_stride(outs * ins)
            && t0 + count <= images * s.th * s.tw,
        "winograd weight gradient: buffer sizes"
    );
    // SAFETY: the kernel's reads and writes are inside the lengths asserted above (see
    // `WeightGradKernel::run`).
    unsafe {
        simd::dispatch(WeightGradKernel::<T> {
            s,
            xin: xin.as_ptr(),
            dyt: dyt.as_ptr(),
            t0,
            count,
            v: v.as_mut_ptr(),
            d: d.as_mut_ptr(),
            m: m.as_mut_ptr(),
            accumulate,
            tiling: PhantomData,
        })
    }
}

/// [`weight_grad_chunk`]'s arguments, checked.
struct WeightGradKernel<'a, T> {
    s: &'a Shape,
    xin: *const f32,
    dyt: *const f32,
    t0: usize,
    count: usize,
    v: *mut f32,
    d: *mut f32,
    m: *mut f32,
    accumulate: bool,
    tiling: PhantomData<T>,
}

impl<T: tiles::Transforms> Kernel for WeightGradKernel<'_, T> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let WeightGradKernel {
            s,
            xin,
            dyt,
            t0,
            count,
            v,
            d,
            m,
            accumulate,
            ..
        } = self;
        let (ins, outs) = (s.ins, s.outs);
        let (channels, pmax) = lane_tile::<S>();
        let (vs, ds, ms) = (
            point_stride(count * ins),
            point_stride(count * outs),
            point_stride(outs * ins),
        );
        for t in 0..count {
            let (k, ty, tx) = s.tile(t0 + t);
            let at = k * s.in_len() + (T::M * ty * s.wp + T::M * tx) * ins;
            for c0 in (0..ins).step_by(S::LANES) {
                // SAFETY: reads the (m+2)×(m+2) patch of `LANES` channels at `at + c0`
                // inside image `k`'s padded rows; writes `v[ξ·vs + t·ins + c0..][..LANES]`.
                unsafe {
                    T::input_tile::<S>(xin.add(at + c0), s.wp * ins, ins, v.add(t * ins + c0), vs)
                };
            }
            let (rows, cols) = ((s.oh - T::M * ty).min(T::M), (s.ow - T::M * tx).min(T::M));
            let at = k * s.out_len() + (T::M * ty * s.ow + T::M * tx) * outs;
            for o0 in (0..outs).step_by(S::LANES) {
                // SAFETY: reads output-gradient rows `m·ty + i < oh`, columns `m·tx + j <
                // ow` of image `k` (`LANES` channels at `o0`); writes
                // `d[ξ·ds + t·outs + o0..][..LANES]`.
                unsafe {
                    T::output_adjoint::<S>(
                        dyt.add(at + o0),
                        s.ow * outs,
                        outs,
                        (rows, cols),
                        d.add(t * outs + o0),
                        ds,
                    )
                };
            }
        }
        for xi in 0..T::POINTS {
            for (o0, p) in blocks(outs, pmax) {
                for c0 in (0..ins).step_by(channels) {
                    let width = (ins - c0).min(channels);
                    // SAFETY: reads `d[xi·ds + t·outs + o0 + j]` (`j < p`, `t < count`) and
                    // `v[xi·vs + t·ins + c0..][..width]`; reads and writes
                    // `m[xi·ms + (o0 + j)·ins + c0..][..width]`.
                    unsafe {
                        tiles::outer_sum::<S>(
                            d.add(xi * ds + o0),
                            outs,
                            v.add(xi * vs + c0),
                            ins,
                            count,
                            m.add(xi * ms + o0 * ins + c0),
                            (p, width / S::LANES),
                            accumulate,
                        )
                    };
                }
            }
        }
    }
}

/// `taps[(9o + k)·ins + c] = (Gᵀ M[·][o][c] G)[k]` of one group's summed products.
struct WeightAdjoint<T> {
    m: *const f32,
    ms: usize,
    ins: usize,
    outs: usize,
    taps: *mut f32,
    tiling: PhantomData<T>,
}

impl<T: tiles::Transforms> Kernel for WeightAdjoint<T> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let WeightAdjoint {
            m,
            ms,
            ins,
            outs,
            taps,
            ..
        } = self;
        for o in 0..outs {
            for c0 in (0..ins).step_by(S::LANES) {
                // SAFETY: see `weight_grad_group`.
                unsafe {
                    T::weights_adjoint::<S>(
                        m.add(o * ins + c0),
                        ms,
                        taps.add(9 * o * ins + c0),
                        ins,
                    )
                };
            }
        }
    }
}

/// The sizes one task works with.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// Outputs per tile side and transform points.
    m: usize,
    points: usize,
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
    /// Tile rows and columns (`m×m` outputs each).
    th: usize,
    tw: usize,
    /// Rows and columns of the padded, transposed input: whole tiles' patches.
    hp: usize,
    wp: usize,
    /// Two groups of 8 taken as one of 16 ([`super::Conv2dGeom::paired`]): `U` is zero
    /// between the halves, and the product skips those zeros.
    pairs: bool,
}

impl Shape {
    fn new(g: &Conv2dGeom, tiling: Tiling, pairs: Pairs) -> Self {
        let (oh, ow) = (g.out_h(), g.out_w());
        let m = tiling.m();
        let (th, tw) = (oh.div_ceil(m), ow.div_ceil(m));
        Self {
            m,
            points: tiling.points(),
            ins: g.in_per_group(),
            outs: g.out_per_group(),
            h: g.in_h,
            w: g.in_w,
            pad: g.padding,
            oh,
            ow,
            th,
            tw,
            hp: m * th + 2,
            wp: m * tw + 2,
            pairs: pairs == Pairs::Halves && g.in_per_group() == UNIT && g.out_per_group() == UNIT,
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

/// The forward of `g`, its output written (every value) or added into `y`, each
/// (image, group)'s part passed to `epilogue` after.
fn forward(
    g: &Conv2dGeom,
    tiling: Tiling,
    x: &[f32],
    w: Weights,
    y: Dest<'_>,
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(suits_shape(g), "winograd: unsuitable convolution");
    assert_eq!(x.len(), g.input_len(), "conv2d: input length");
    assert_eq!(y.len(), g.output_len(), "conv2d: output length");
    let s = Shape::new(g, tiling, w.pairs());
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
    let mut tasks: Vec<Vec<(usize, Dest<'_>)>> = (0..g.groups * runs).map(|_| vec![]).collect();
    for (i, yg) in y.chunks(out_grp).into_iter().enumerate() {
        let (n, grp) = (i / g.groups, i % g.groups);
        tasks[grp * runs + n / per_task].push((n, yg));
    }
    tasks.into_par_iter().enumerate().for_each(|(task, outs)| {
        let grp = task / runs;
        // this group's transform, in a pooled buffer given back after the task
        let mut own = None;
        let u = match w {
            Weights::Packed(p) => p.group(grp),
            Weights::Plain(w, _) => {
                let len = s.outs * s.ins * 9;
                let u = own.insert(scratch::take_stale(s.points * point_stride(s.ins * s.outs)));
                transform_weights(tiling, &w[grp * len..][..len], s.ins, s.outs, u);
                &u[..]
            }
        };
        match tiling {
            Tiling::F2 => run_task::<tiles::F2>(g, &s, x, grp, u, outs, &epilogue),
            Tiling::F4 => run_task::<tiles::F4>(g, &s, x, grp, u, outs, &epilogue),
        }
        if let Some(u) = own {
            scratch::give([u]);
        }
    });
}

/// One group's output for the images in `outs` (`(image, output)` pairs).
fn run_task<T: tiles::Transforms>(
    g: &Conv2dGeom,
    s: &Shape,
    x: &[f32],
    grp: usize,
    u: &[f32],
    outs: Vec<(usize, Dest<'_>)>,
    epilogue: &(impl Fn(usize, usize, &mut [f32]) + Sync),
) {
    let images = outs.len();
    let (ins, outs_c) = (s.ins, s.outs);
    let (key, xin) = pack_input(g, s, x, grp, outs.iter().map(|(n, _)| *n));
    let tiles = images * s.th * s.tw;
    let chunk = tiles.div_ceil(tiles.div_ceil(CHUNK_POINTS / s.points));
    // (all overwritten before they are read)
    let mut v = scratch::take_stale(s.points * point_stride(chunk * ins));
    let mut m = scratch::take_stale(s.points * point_stride(chunk * outs_c));
    let mut yt = scratch::take_stale(images * s.out_len());
    for t0 in (0..tiles).step_by(chunk) {
        let count = chunk.min(tiles - t0);
        chunk_product::<T>(s, &xin, u, (t0, count), (&mut v, &mut m, &mut yt));
    }
    let plane = s.oh * s.ow;
    for (k, (n, yg)) in outs.into_iter().enumerate() {
        let src = &yt[k * s.out_len()..][..s.out_len()];
        epilogue(
            n,
            grp * outs_c,
            transpose_into(src, outs_c, plane, outs_c, yg),
        );
    }
    scratch::give([v, m, yt]);
    scratch::give_keyed(key, xin);
}

/// Group `grp`'s input planes of `images` transposed to padded rows of positions ×
/// channels, one image after another (`s.in_len()` values each), in a keyed buffer (so the
/// padding stays zero) to give back with its key.
fn pack_input(
    g: &Conv2dGeom,
    s: &Shape,
    x: &[f32],
    grp: usize,
    images: impl ExactSizeIterator<Item = usize>,
) -> (scratch::Key, Vec<f32>) {
    let count = images.len();
    let ins = s.ins;
    let in_grp = ins * s.h * s.w;
    let key = [
        scratch::tag::WINOGRAD_INPUT,
        s.hp,
        s.wp,
        ins,
        s.pad,
        s.h,
        s.w,
        count,
        0,
        0,
    ];
    let mut xin = scratch::take_keyed(&key);
    if xin.len() != count * s.in_len() {
        xin.clear();
        xin.resize(count * s.in_len(), 0.0);
    }
    // (whole planes at a time: fewer, fuller 16×16 blocks than row by row)
    let mut rows = scratch::take_stale(in_grp);
    for (k, n) in images.enumerate() {
        let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
        transpose(xg, s.h * s.w, ins, s.h * s.w, &mut rows, ins, false);
        let dst = &mut xin[k * s.in_len()..][..s.in_len()];
        for (r, src) in rows.chunks_exact(s.w * ins).enumerate() {
            let at = ((r + s.pad) * s.wp + s.pad) * ins;
            dst[at..at + s.w * ins].copy_from_slice(src);
        }
    }
    scratch::give([rows]);
    (key, xin)
}

/// Blocks of at most `pmax` tiles splitting `tiles` as evenly as possible: `(first, count)`.
fn blocks(tiles: usize, pmax: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = tiles.div_ceil(pmax);
    (0..nb).map(move |b| (b * tiles / nb, (b + 1) * tiles / nb - b * tiles / nb))
}

/// Tiles `t0..t0 + count` of a task: input transform into `v`, the 16 products into `m`,
/// output transform into the position × channel rows `yt`; `T` is `s`'s tiling.
///
/// `v` holds, for point `ξ`, the chunk's tiles block by block; a block of `p` tiles
/// starting at `tb` keeps its `ins × p` values at `ξ·point_stride(count·ins) + tb·ins` as runs of 16
/// channels: channel `16q + l` of the block's tile `j` at `q·16p + 16j + l`, so that the
/// product steps through one contiguous run of broadcasts per 16 channels. (Blocks are
/// sized by the level's register tile, so `v` is laid out for the level that runs.)
fn chunk_product<T: tiles::Transforms>(
    s: &Shape,
    xin: &[f32],
    u: &[f32],
    (t0, count): (usize, usize),
    (v, m, yt): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (ins, outs) = (s.ins, s.outs);
    let images = xin.len() / s.in_len();
    assert!(
        s.m == T::M
            && s.points == T::POINTS
            && u.len() == T::POINTS * point_stride(ins * outs)
            && v.len() >= T::POINTS * point_stride(count * ins)
            && m.len() >= T::POINTS * point_stride(count * outs)
            && yt.len() == images * s.out_len()
            && t0 + count <= images * s.th * s.tw,
        "winograd: buffer sizes"
    );
    // SAFETY: the kernel's reads and writes are inside the lengths asserted above (see
    // `Chunk::run`).
    unsafe {
        simd::dispatch(Chunk::<T> {
            s,
            xin: xin.as_ptr(),
            u: u.as_ptr(),
            t0,
            count,
            v: v.as_mut_ptr(),
            m: m.as_mut_ptr(),
            yt: yt.as_mut_ptr(),
            tiling: PhantomData,
        })
    }
}

/// [`chunk_product`]'s arguments, checked.
struct Chunk<'a, T> {
    s: &'a Shape,
    xin: *const f32,
    u: *const f32,
    t0: usize,
    count: usize,
    v: *mut f32,
    m: *mut f32,
    yt: *mut f32,
    tiling: PhantomData<T>,
}

impl<T: tiles::Transforms> Kernel for Chunk<'_, T> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let Chunk {
            s,
            xin,
            u,
            t0,
            count,
            v,
            m,
            yt,
            ..
        } = self;
        let (ins, outs) = (s.ins, s.outs);
        let (channels, pmax) = lane_tile::<S>();
        let (us, vs, ms) = (
            point_stride(ins * outs),
            point_stride(count * ins),
            point_stride(count * outs),
        );
        for (tb, p) in blocks(count, pmax) {
            for j in 0..p {
                let (k, ty, tx) = s.tile(t0 + tb + j);
                let at = k * s.in_len() + (T::M * ty * s.wp + T::M * tx) * ins;
                for q in 0..ins / UNIT {
                    for l in (0..UNIT).step_by(S::LANES) {
                        // SAFETY: reads the (m+2)×(m+2) patch of `LANES` channels at
                        // `at + q·16 + l`: rows `m·ty..m·ty + m + 2 ≤ hp`, columns
                        // `m·tx..m·tx + m + 2 ≤ wp` of image `k < images`, inside `xin`.
                        // Writes the points at `ξ·vs + tb·ins + q·16p + 16j + l`,
                        // `j < p`, `q < ins/16`: inside the block's `ins·p` values of
                        // point `ξ < POINTS`.
                        unsafe {
                            T::input_tile::<S>(
                                xin.add(at + q * UNIT + l),
                                s.wp * ins,
                                ins,
                                v.add(tb * ins + q * UNIT * p + UNIT * j + l),
                                vs,
                            )
                        };
                    }
                }
            }
        }
        for xi in 0..T::POINTS {
            if s.pairs {
                for (tb, p) in blocks(count, pmax) {
                    // SAFETY (`ins = outs = 16`): reads the block's `16·p` values of point
                    // `xi` in `v` and the two diagonal 8 × 8 blocks of `U[xi]`; writes
                    // `m[xi·ms + (tb + j)·16..][..16]` for `j < p`.
                    unsafe {
                        tiles::product_pairs::<S::Narrow>(
                            v.add(xi * vs + tb * ins),
                            u.add(xi * us),
                            outs,
                            m.add(xi * ms + tb * outs),
                            p,
                        )
                    };
                }
                continue;
            }
            for o0 in (0..outs).step_by(channels) {
                let width = (outs - o0).min(channels);
                for (tb, p) in blocks(count, pmax) {
                    // SAFETY: reads the block's `ins·p` values of point `xi` in `v` and
                    // rows `c < ins` of `U[xi]` at columns `o0..o0 + width ≤ outs`; writes
                    // `m[xi·ms + (tb + j)·outs + o0..][..width]` for `j < p`.
                    unsafe {
                        tiles::product::<S>(
                            v.add(xi * vs + tb * ins),
                            ins,
                            u.add(xi * us + o0),
                            outs,
                            m.add(xi * ms + tb * outs + o0),
                            (p, width / S::LANES),
                        )
                    };
                }
            }
        }
        for t in 0..count {
            let (k, ty, tx) = s.tile(t0 + t);
            let (rows, cols) = ((s.oh - T::M * ty).min(T::M), (s.ow - T::M * tx).min(T::M));
            let at = k * s.out_len() + (T::M * ty * s.ow + T::M * tx) * outs;
            for o0 in (0..outs).step_by(S::LANES) {
                // SAFETY: reads `m[ξ·ms + t·outs + o0..]` (`LANES` values,
                // ξ < POINTS); writes `LANES` channels of output rows `m·ty + i < oh`,
                // columns `m·tx + j < ow` of image `k`, inside `yt`.
                unsafe {
                    T::output_tile::<S>(
                        m.add(t * outs + o0),
                        ms,
                        yt.add(at + o0),
                        s.ow * outs,
                        outs,
                        (rows, cols),
                    )
                };
            }
        }
    }
}

/// The transforms and the product, over [`Simd`] (inlined into [`Chunk`] and
/// [`WeightTransform`]'s per-level instances).
#[allow(unsafe_op_in_unsafe_fn)]
mod tiles {
    use super::{Simd, UNIT};

    /// One tiling's transforms, for `LANES` channels at a time: the weights' `U = G g Gᵀ`
    /// (`g` holds taps `k = 3ky + kx` at `g + k·gstride`, `U[ξ]` goes to `u + ξ·ustride`),
    /// the input's `V = Bᵀ d B` (`d[i][j]` at `x + i·row + j·col`, `V[ξ]` to
    /// `v + ξ·vstride`) and the output's `Y = Aᵀ M A` (`M[ξ]` at `m + ξ·mstride`, the first
    /// `rows × cols` of the tile's outputs stored at `y + i·row + j·col`).
    pub(super) trait Transforms {
        /// Outputs per tile side.
        const M: usize;
        /// Transform points, `(M + 2)²`.
        const POINTS: usize;
        unsafe fn weights<S: Simd>(g: *const f32, gstride: usize, u: *mut f32, ustride: usize);
        unsafe fn input_tile<S: Simd>(
            x: *const f32,
            row: usize,
            col: usize,
            v: *mut f32,
            vstride: usize,
        );
        unsafe fn output_tile<S: Simd>(
            m: *const f32,
            mstride: usize,
            y: *mut f32,
            row: usize,
            col: usize,
            rows_cols: (usize, usize),
        );
        /// The adjoint of `output_tile`: `D = A dy Aᵀ` of the first `rows × cols` values
        /// of an output-gradient tile (`dy[i][j]` at `y + i·row + j·col`, the rest zero),
        /// `D[ξ]` to `d + ξ·dstride`.
        unsafe fn output_adjoint<S: Simd>(
            y: *const f32,
            row: usize,
            col: usize,
            rows_cols: (usize, usize),
            d: *mut f32,
            dstride: usize,
        );
        /// The adjoint of `weights`: the taps' `Gᵀ M G` (`M[ξ]` at `m + ξ·mstride`, tap
        /// `k = 3ky + kx` to `g + k·gstride`).
        unsafe fn weights_adjoint<S: Simd>(
            m: *const f32,
            mstride: usize,
            g: *mut f32,
            gstride: usize,
        );
    }

    /// F(2×2, 3×3). `G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]`,
    /// `Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]`, `Aᵀ = [1 1 1 0; 0 1 −1 −1]`.
    pub(super) struct F2;

    /// `A` applied to one column of two values (the adjoint of F(2×2)'s `Aᵀ`).
    #[inline(always)]
    unsafe fn a2t<S: Simd>([y0, y1]: [S::V; 2]) -> [S::V; 4] {
        [y0, S::add(y0, y1), S::sub(y0, y1), S::sub(S::zero(), y1)]
    }

    /// `Gᵀ` applied to one column of four values (the adjoint of F(2×2)'s `G`).
    #[inline(always)]
    unsafe fn g2t<S: Simd>([u0, u1, u2, u3]: [S::V; 4]) -> [S::V; 3] {
        let half = S::splat(0.5);
        let (a, b) = (S::mul(S::add(u1, u2), half), S::mul(S::sub(u1, u2), half));
        [S::add(u0, a), b, S::add(a, u3)]
    }

    impl Transforms for F2 {
        const M: usize = 2;
        const POINTS: usize = 16;

        #[inline(always)]
        unsafe fn weights<S: Simd>(g: *const f32, gstride: usize, u: *mut f32, ustride: usize) {
            let half = S::splat(0.5);
            let mut w = [S::zero(); 9];
            for (k, w) in w.iter_mut().enumerate() {
                *w = S::load(g.add(k * gstride));
            }
            // h = G g: 4 rows × 3 columns
            let mut h = [[S::zero(); 3]; 4];
            for col in 0..3 {
                let (g0, g1, g2) = (w[col], w[3 + col], w[6 + col]);
                let even = S::add(g0, g2);
                h[0][col] = g0;
                h[1][col] = S::mul(S::add(even, g1), half);
                h[2][col] = S::mul(S::sub(even, g1), half);
                h[3][col] = g2;
            }
            // U = h Gᵀ
            for (i, h) in h.iter().enumerate() {
                let even = S::add(h[0], h[2]);
                let row = [
                    h[0],
                    S::mul(S::add(even, h[1]), half),
                    S::mul(S::sub(even, h[1]), half),
                    h[2],
                ];
                for (j, &r) in row.iter().enumerate() {
                    S::store(u.add((4 * i + j) * ustride), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn input_tile<S: Simd>(
            x: *const f32,
            row: usize,
            col: usize,
            v: *mut f32,
            vstride: usize,
        ) {
            let mut d = [[S::zero(); 4]; 4];
            for (i, d) in d.iter_mut().enumerate() {
                for (j, d) in d.iter_mut().enumerate() {
                    *d = S::load(x.add(i * row + j * col));
                }
            }
            let mut t = [[S::zero(); 4]; 4];
            for j in 0..4 {
                t[0][j] = S::sub(d[0][j], d[2][j]);
                t[1][j] = S::add(d[1][j], d[2][j]);
                t[2][j] = S::sub(d[2][j], d[1][j]);
                t[3][j] = S::sub(d[1][j], d[3][j]);
            }
            for (i, t) in t.iter().enumerate() {
                let r = [
                    S::sub(t[0], t[2]),
                    S::add(t[1], t[2]),
                    S::sub(t[2], t[1]),
                    S::sub(t[1], t[3]),
                ];
                for (j, &r) in r.iter().enumerate() {
                    S::store(v.add((4 * i + j) * vstride), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn output_tile<S: Simd>(
            m: *const f32,
            mstride: usize,
            y: *mut f32,
            row: usize,
            col: usize,
            (rows, cols): (usize, usize),
        ) {
            let mut mv = [S::zero(); 16];
            for (xi, mv) in mv.iter_mut().enumerate() {
                *mv = S::load(m.add(xi * mstride));
            }
            let mut s = [[S::zero(); 4]; 2];
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mv[j], mv[4 + j], mv[8 + j], mv[12 + j]);
                s[0][j] = S::add(S::add(m0, m1), m2);
                s[1][j] = S::sub(S::sub(m1, m2), m3);
            }
            for (i, s) in s.iter().enumerate().take(rows) {
                let r = [
                    S::add(S::add(s[0], s[1]), s[2]),
                    S::sub(S::sub(s[1], s[2]), s[3]),
                ];
                for (j, &r) in r.iter().enumerate().take(cols) {
                    S::store(y.add(i * row + j * col), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn output_adjoint<S: Simd>(
            y: *const f32,
            row: usize,
            col: usize,
            (rows, cols): (usize, usize),
            d: *mut f32,
            dstride: usize,
        ) {
            let mut yv = [[S::zero(); 2]; 2];
            for (i, yv) in yv.iter_mut().enumerate().take(rows) {
                for (j, yv) in yv.iter_mut().enumerate().take(cols) {
                    *yv = S::load(y.add(i * row + j * col));
                }
            }
            // t = A dy (4 × 2), then D = t Aᵀ
            let (c0, c1) = (
                a2t::<S>([yv[0][0], yv[1][0]]),
                a2t::<S>([yv[0][1], yv[1][1]]),
            );
            for i in 0..4 {
                for (j, r) in a2t::<S>([c0[i], c1[i]]).into_iter().enumerate() {
                    S::store(d.add((4 * i + j) * dstride), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn weights_adjoint<S: Simd>(
            m: *const f32,
            mstride: usize,
            g: *mut f32,
            gstride: usize,
        ) {
            // t = Gᵀ M (3 × 4), column by column, then Gᵀ of each row
            let mut t = [[S::zero(); 4]; 3];
            for j in 0..4 {
                let mc = [0, 1, 2, 3].map(|i| S::load(m.add((4 * i + j) * mstride)));
                for (t, v) in t.iter_mut().zip(g2t::<S>(mc)) {
                    t[j] = v;
                }
            }
            for (ky, &t) in t.iter().enumerate() {
                for (kx, r) in g2t::<S>(t).into_iter().enumerate() {
                    S::store(g.add((3 * ky + kx) * gstride), r);
                }
            }
        }
    }

    /// F(4×4, 3×3), interpolating at 0, −1, 1, 2, −½ and ∞, the points that round least
    /// among the small ones (in a float32 simulation of 64 channels, a third of the error
    /// of the usual 0, ±1, ±2):
    /// `G = [1 0 0; ⅓ −⅓ ⅓; −⅓ −⅓ −⅓; 1⁄15 2⁄15 4⁄15; −16⁄15 8⁄15 −4⁄15; 0 0 1]`,
    /// `Bᵀ = [1 3⁄2 −2 −3⁄2 1 0; 0 1 ½ −5⁄2 1 0; 0 −1 −5⁄2 −½ 1 0; 0 −½ −1 ½ 1 0;
    /// 0 2 −1 −2 1 0; 0 1 3⁄2 −2 −3⁄2 1]`,
    /// `Aᵀ = [1 1 1 1 1 0; 0 −1 1 2 −½ 0; 0 1 1 4 ¼ 0; 0 −1 1 8 −⅛ 1]`.
    pub(super) struct F4;

    /// `G` applied to one column of three values.
    #[inline(always)]
    unsafe fn g4<S: Simd>([g0, g1, g2]: [S::V; 3]) -> [S::V; 6] {
        let even = S::add(g0, g2);
        let third = S::splat(1.0 / 3.0);
        let fifteenth = S::splat(1.0 / 15.0);
        // g0 + 2 g1 + 4 g2 and −16 g0 + 8 g1 − 4 g2
        let u3 = S::fma(g2, S::splat(4.0), S::fma(g1, S::splat(2.0), g0));
        let u4 = S::fma(
            g0,
            S::splat(-16.0),
            S::fma(g1, S::splat(8.0), S::mul(g2, S::splat(-4.0))),
        );
        [
            g0,
            S::mul(S::sub(even, g1), third),
            S::mul(S::add(even, g1), S::splat(-1.0 / 3.0)),
            S::mul(u3, fifteenth),
            S::mul(u4, fifteenth),
            g2,
        ]
    }

    /// `Bᵀ` applied to one column of six values.
    #[inline(always)]
    unsafe fn b4<S: Simd>([d0, d1, d2, d3, d4, d5]: [S::V; 6]) -> [S::V; 6] {
        let (c, e) = (S::sub(d4, d2), S::sub(d1, d3));
        // the pair at ±1: (d4 − d2 − 3⁄2 d3) ± (d1 − d3 + 3⁄2 d2)
        let even = S::fma(d3, S::splat(-1.5), c);
        let odd = S::fma(d2, S::splat(1.5), e);
        [
            S::fma(e, S::splat(1.5), S::fma(d2, S::splat(-2.0), S::add(d0, d4))),
            S::add(even, odd),
            S::sub(even, odd),
            S::fma(e, S::splat(-0.5), c),
            S::fma(e, S::splat(2.0), c),
            S::fma(
                c,
                S::splat(-1.5),
                S::add(d5, S::fma(d3, S::splat(-2.0), d1)),
            ),
        ]
    }

    /// `Aᵀ` applied to one column of six values.
    #[inline(always)]
    unsafe fn a4<S: Simd>([m0, m1, m2, m3, m4, m5]: [S::V; 6]) -> [S::V; 4] {
        let (a, b) = (S::add(m1, m2), S::sub(m2, m1));
        [
            S::add(S::add(m0, a), S::add(m3, m4)),
            S::fma(m4, S::splat(-0.5), S::fma(m3, S::splat(2.0), b)),
            S::fma(m4, S::splat(0.25), S::fma(m3, S::splat(4.0), a)),
            S::add(
                S::fma(m4, S::splat(-0.125), S::fma(m3, S::splat(8.0), b)),
                m5,
            ),
        ]
    }

    /// `A` applied to one column of four values (the adjoint of F(4×4)'s `Aᵀ`).
    #[inline(always)]
    unsafe fn a4t<S: Simd>([y0, y1, y2, y3]: [S::V; 4]) -> [S::V; 6] {
        let (even, odd) = (S::add(y0, y2), S::add(y1, y3));
        [
            y0,
            S::sub(even, odd),
            S::add(even, odd),
            S::fma(
                y3,
                S::splat(8.0),
                S::fma(y2, S::splat(4.0), S::fma(y1, S::splat(2.0), y0)),
            ),
            S::fma(
                y3,
                S::splat(-0.125),
                S::fma(y2, S::splat(0.25), S::fma(y1, S::splat(-0.5), y0)),
            ),
            y3,
        ]
    }

    /// `Gᵀ` applied to one column of six values (the adjoint of F(4×4)'s `G`).
    #[inline(always)]
    unsafe fn g4t<S: Simd>([u0, u1, u2, u3, u4, u5]: [S::V; 6]) -> [S::V; 3] {
        let third = S::splat(1.0 / 3.0);
        let fifteenth = S::splat(1.0 / 15.0);
        let (a, b) = (S::mul(S::sub(u1, u2), third), S::mul(S::add(u1, u2), third));
        [
            S::add(
                S::add(u0, a),
                S::mul(S::fma(u4, S::splat(-16.0), u3), fifteenth),
            ),
            S::sub(
                S::mul(S::fma(u4, S::splat(8.0), S::add(u3, u3)), fifteenth),
                b,
            ),
            S::add(
                S::add(a, u5),
                S::mul(S::mul(S::sub(u3, u4), S::splat(4.0)), fifteenth),
            ),
        ]
    }

    impl Transforms for F4 {
        const M: usize = 4;
        const POINTS: usize = 36;

        #[inline(always)]
        unsafe fn weights<S: Simd>(g: *const f32, gstride: usize, u: *mut f32, ustride: usize) {
            // h = G g: 6 rows × 3 columns
            let mut h = [[S::zero(); 3]; 6];
            for col in 0..3 {
                let w = [0, 3, 6].map(|k| S::load(g.add((k + col) * gstride)));
                for (h, v) in h.iter_mut().zip(g4::<S>(w)) {
                    h[col] = v;
                }
            }
            // U = h Gᵀ
            for (i, &h) in h.iter().enumerate() {
                for (j, r) in g4::<S>(h).into_iter().enumerate() {
                    S::store(u.add((6 * i + j) * ustride), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn input_tile<S: Simd>(
            x: *const f32,
            row: usize,
            col: usize,
            v: *mut f32,
            vstride: usize,
        ) {
            // t = Bᵀ d, column by column
            let mut t = [[S::zero(); 6]; 6];
            for j in 0..6 {
                let d = [0, 1, 2, 3, 4, 5].map(|i| S::load(x.add(i * row + j * col)));
                for (t, v) in t.iter_mut().zip(b4::<S>(d)) {
                    t[j] = v;
                }
            }
            // V = t B, row by row
            for (i, &t) in t.iter().enumerate() {
                for (j, r) in b4::<S>(t).into_iter().enumerate() {
                    S::store(v.add((6 * i + j) * vstride), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn output_tile<S: Simd>(
            m: *const f32,
            mstride: usize,
            y: *mut f32,
            row: usize,
            col: usize,
            (rows, cols): (usize, usize),
        ) {
            // s = Aᵀ M, column by column
            let mut s = [[S::zero(); 6]; 4];
            for j in 0..6 {
                let mc = [0, 1, 2, 3, 4, 5].map(|i| S::load(m.add((6 * i + j) * mstride)));
                for (s, v) in s.iter_mut().zip(a4::<S>(mc)) {
                    s[j] = v;
                }
            }
            // Y = s A, row by row
            for (i, &s) in s.iter().enumerate().take(rows) {
                for (j, r) in a4::<S>(s).into_iter().enumerate().take(cols) {
                    S::store(y.add(i * row + j * col), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn output_adjoint<S: Simd>(
            y: *const f32,
            row: usize,
            col: usize,
            (rows, cols): (usize, usize),
            d: *mut f32,
            dstride: usize,
        ) {
            let mut yv = [[S::zero(); 4]; 4];
            for (i, yv) in yv.iter_mut().enumerate().take(rows) {
                for (j, yv) in yv.iter_mut().enumerate().take(cols) {
                    *yv = S::load(y.add(i * row + j * col));
                }
            }
            // t = A dy (6 × 4), column by column, then D = t Aᵀ row by row
            let mut t = [[S::zero(); 4]; 6];
            for j in 0..4 {
                let c = a4t::<S>([yv[0][j], yv[1][j], yv[2][j], yv[3][j]]);
                for (t, v) in t.iter_mut().zip(c) {
                    t[j] = v;
                }
            }
            for (i, &t) in t.iter().enumerate() {
                for (j, r) in a4t::<S>(t).into_iter().enumerate() {
                    S::store(d.add((6 * i + j) * dstride), r);
                }
            }
        }

        #[inline(always)]
        unsafe fn weights_adjoint<S: Simd>(
            m: *const f32,
            mstride: usize,
            g: *mut f32,
            gstride: usize,
        ) {
            // t = Gᵀ M (3 × 6), column by column, then Gᵀ of each row
            let mut t = [[S::zero(); 6]; 3];
            for j in 0..6 {
                let mc = [0, 1, 2, 3, 4, 5].map(|i| S::load(m.add((6 * i + j) * mstride)));
                for (t, v) in t.iter_mut().zip(g4t::<S>(mc)) {
                    t[j] = v;
                }
            }
            for (ky, &t) in t.iter().enumerate() {
                for (kx, r) in g4t::<S>(t).into_iter().enumerate() {
                    S::store(g.add((3 * ky + kx) * gstride), r);
                }
            }
        }
    }

    /// `m[j·ustride + o] = Σ_c v[c, j] · u[c·ustride + o]` for `j < p` tiles (14 with 16
    /// lanes, 6 with fewer) and `o < LANES·ov` (`ov ∈ {1, 2}`, or 2 / 4 with 8 / 4 lanes; `U`'s rows and `M`'s have the same length, the output
    /// channels), `v` in runs of 16 channels (see [`super::chunk_product`]), `ins` a multiple
    /// of 16.
    #[inline(always)]
    pub(super) unsafe fn product<S: Simd>(
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
                    14 => run::<S, 14, $ov>(v, ins, u, ustride, m),
                    13 => run::<S, 13, $ov>(v, ins, u, ustride, m),
                    12 => run::<S, 12, $ov>(v, ins, u, ustride, m),
                    11 => run::<S, 11, $ov>(v, ins, u, ustride, m),
                    10 => run::<S, 10, $ov>(v, ins, u, ustride, m),
                    9 => run::<S, 9, $ov>(v, ins, u, ustride, m),
                    8 => run::<S, 8, $ov>(v, ins, u, ustride, m),
                    7 => run::<S, 7, $ov>(v, ins, u, ustride, m),
                    6 => run::<S, 6, $ov>(v, ins, u, ustride, m),
                    5 => run::<S, 5, $ov>(v, ins, u, ustride, m),
                    4 => run::<S, 4, $ov>(v, ins, u, ustride, m),
                    3 => run::<S, 3, $ov>(v, ins, u, ustride, m),
                    2 => run::<S, 2, $ov>(v, ins, u, ustride, m),
                    _ => run::<S, 1, $ov>(v, ins, u, ustride, m),
                }
            };
        }
        macro_rules! narrow {
            ($ov:literal) => {
                match p {
                    6 => run::<S, 6, $ov>(v, ins, u, ustride, m),
                    5 => run::<S, 5, $ov>(v, ins, u, ustride, m),
                    4 => run::<S, 4, $ov>(v, ins, u, ustride, m),
                    3 => run::<S, 3, $ov>(v, ins, u, ustride, m),
                    2 => run::<S, 2, $ov>(v, ins, u, ustride, m),
                    _ => run::<S, 1, $ov>(v, ins, u, ustride, m),
                }
            };
        }
        // 14 tiles × 1 or 2 vectors with 16 lanes, 6 tiles × 16 channels with 8 or 4
        match (S::LANES, ov) {
            (16, 2) => by_p!(2),
            (16, _) => by_p!(1),
            (8, _) => narrow!(2),
            _ => narrow!(4),
        }
    }

    /// [`product`] for a paired group (`ins = outs = 16`, `U` zero where an input channel
    /// of one half meets an output channel of the other): each half's 8 outputs from its
    /// own 8 inputs, on the level's vector of at most 8 lanes ([`Simd::Narrow`]), so none of
    /// the multiply-adds is with a zero. `p` tiles, at most 14 with 8 lanes and 32
    /// registers (AVX-512's narrow vector: 28 accumulators), else 6 (AVX2, NEON, plain).
    #[inline(always)]
    pub(super) unsafe fn product_pairs<S: Simd>(
        v: *const f32,
        u: *const f32,
        ustride: usize,
        m: *mut f32,
        p: usize,
    ) {
        macro_rules! by_p {
            ($ov:literal, $($p:literal)*) => {
                match p {
                    $($p => pairs::<S, $p, $ov>(v, u, ustride, m),)*
                    _ => pairs::<S, 1, $ov>(v, u, ustride, m),
                }
            };
        }
        debug_assert!(
            p <= if (S::LANES, S::REGS) == (8, 32) {
                14
            } else {
                6
            }
        );
        match (S::LANES, S::REGS) {
            (8, 32) => by_p!(1, 14 13 12 11 10 9 8 7 6 5 4 3 2),
            (8, _) => by_p!(1, 6 5 4 3 2),
            _ => by_p!(2, 6 5 4 3 2),
        }
    }

    #[inline(always)]
    unsafe fn pairs<S: Simd, const P: usize, const OV: usize>(
        v: *const f32,
        u: *const f32,
        ustride: usize,
        m: *mut f32,
    ) {
        const HALF: usize = UNIT / 2;
        let mut acc = [[[S::zero(); OV]; 2]; P];
        for c in 0..HALF {
            let mut wv = [[S::zero(); OV]; 2];
            for (h, wv) in wv.iter_mut().enumerate() {
                for (k, wv) in wv.iter_mut().enumerate() {
                    *wv = S::load(u.add((HALF * h + c) * ustride + HALF * h + k * S::LANES));
                }
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                for (h, acc) in acc.iter_mut().enumerate() {
                    let xv = S::splat(*v.add(j * UNIT + HALF * h + c));
                    for (a, &wv) in acc.iter_mut().zip(&wv[h]) {
                        *a = S::fma(wv, xv, *a);
                    }
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (h, acc) in acc.iter().enumerate() {
                for (k, &a) in acc.iter().enumerate() {
                    S::store(m.add(j * ustride + HALF * h + k * S::LANES), a);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn run<S: Simd, const P: usize, const OV: usize>(
        v: *const f32,
        ins: usize,
        u: *const f32,
        ustride: usize,
        m: *mut f32,
    ) {
        let mut acc = [[S::zero(); OV]; P];
        for q in 0..ins / UNIT {
            let vq = v.add(q * UNIT * P);
            let uq = u.add(q * UNIT * ustride);
            for c in 0..UNIT {
                let mut wv = [S::zero(); OV];
                for (k, wv) in wv.iter_mut().enumerate() {
                    *wv = S::load(uq.add(c * ustride + k * S::LANES));
                }
                for (j, acc) in acc.iter_mut().enumerate() {
                    let xv = S::splat(*vq.add(j * UNIT + c));
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        *a = S::fma(wv, xv, *a);
                    }
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (k, &a) in acc.iter().enumerate() {
                S::store(m.add(j * ustride + k * S::LANES), a);
            }
        }
    }

    /// `m[j·vstride + k·LANES..] (+)= Σ_{t < count} d[t·dstride + j] · v[t·vstride + k·LANES..]`
    /// for `j < p` rows (14 with 16 lanes, 6 with fewer) and `k < ov` vectors (1 or 2 with
    /// 16 lanes, 2 with 8, 4 with 4): a sum of rank-1 updates whose `p × ov` sums stay in
    /// registers for all `count` steps; added to `m` with `accumulate`, else written.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn outer_sum<S: Simd>(
        d: *const f32,
        dstride: usize,
        v: *const f32,
        vstride: usize,
        count: usize,
        m: *mut f32,
        (p, ov): (usize, usize),
        accumulate: bool,
    ) {
        macro_rules! by_p {
            ($ov:literal, $($p:literal)*) => {
                match p {
                    $($p => outer::<S, $p, $ov>(d, dstride, v, vstride, count, m, accumulate),)*
                    _ => outer::<S, 1, $ov>(d, dstride, v, vstride, count, m, accumulate),
                }
            };
        }
        match (S::LANES, ov) {
            (16, 2) => by_p!(2, 14 13 12 11 10 9 8 7 6 5 4 3 2),
            (16, _) => by_p!(1, 14 13 12 11 10 9 8 7 6 5 4 3 2),
            (8, _) => by_p!(2, 6 5 4 3 2),
            _ => by_p!(4, 6 5 4 3 2),
        }
    }

    #[inline(always)]
    unsafe fn outer<S: Simd, const P: usize, const OV: usize>(
        d: *const f32,
        dstride: usize,
        v: *const f32,
        vstride: usize,
        count: usize,
        m: *mut f32,
        accumulate: bool,
    ) {
        let mut acc = [[S::zero(); OV]; P];
        if accumulate {
            for (j, acc) in acc.iter_mut().enumerate() {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = S::load(m.add(j * vstride + k * S::LANES));
                }
            }
        }
        for t in 0..count {
            let (dt, vt) = (d.add(t * dstride), v.add(t * vstride));
            let mut xv = [S::zero(); OV];
            for (k, xv) in xv.iter_mut().enumerate() {
                *xv = S::load(vt.add(k * S::LANES));
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                let b = S::splat(*dt.add(j));
                for (a, &xv) in acc.iter_mut().zip(&xv) {
                    *a = S::fma(xv, b, *a);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (k, &a) in acc.iter().enumerate() {
                S::store(m.add(j * vstride + k * S::LANES), a);
            }
        }
    }
}
