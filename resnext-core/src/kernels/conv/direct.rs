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
//! channels × 3 vectors of positions in registers (4 × 2 where there are 16 registers)
//! and streams the taps; it is written once over [`super::simd`] and runs as AVX-512,
//! AVX2 + FMA, NEON or plain code, as [`super::isa::level`] says.
//!
//! The input gradient is the same product on the padded output gradient (one product per
//! stride phase of the input), and the weight gradient is
//! `dW[o][t] = Σ_q dY[o][q] · in[q + off[t]]`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::layout::{
    copy, copy_uninit, images_by_group, round_up, zeroed, BwdLayout, FwdLayout, Prefetcher, LANES,
    NO_PREFETCH, SLACK, WG_CHUNK_VALUES,
};
use super::{Conv2dGeom, Dest};
use crate::kernels::simd::dispatch;
use crate::kernels::{as_uninit, assume_init, scratch};

/// Grid positions below which the weight gradient batches images into one product: with
/// grids this short (7×7 images) the per-weight reduction across lanes costs more than the
/// products. Batching pays for it with the padding rows between images, so longer grids
/// (14×14 and up) stay one image per product.
const WG_BATCH_BELOW: usize = 128;

/// Whether [`conv2d_forward`]/[`conv2d_backward`] here are the better choice for `g`:
/// grouped convolutions with at most 64 channels per group, kernel larger than 1.
pub fn suits(g: &Conv2dGeom) -> bool {
    g.groups > 1 && g.kernel > 1 && g.in_per_group() <= 64 && g.out_per_group() <= 64
}

/// Whether the forward pass here beats im2col + GEMM for `g`: [`suits`], and also dense
/// convolutions with very few input channels and a large kernel (an RGB stem: 3 input
/// channels, 7×7), whose im2col matrix is ~50× the input. Their backward pass stays on
/// im2col + GEMM, which splits the weight gradient over the batch. At batch sizes below
/// the thread count the forward splits each image's output channels among the threads.
pub fn suits_forward(g: &Conv2dGeom) -> bool {
    suits(g) || (g.groups == 1 && g.kernel >= 5 && g.in_channels <= 4 && g.out_channels <= 64)
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
/// With `parallel`, the blocks of output channels are tasks of their own (for a call that
/// is the only task, as an image's stem at batch 1). Else `prefetch` (the next task's
/// input) is pulled into the L2 cache along the first block's tiles, so that its reads
/// from memory overlap the products rather than follow them.
fn taps_product(
    inp: &[f32],
    offs: &[usize],
    w: &PackedWeights,
    qpad: usize,
    out: &mut [f32],
    parallel: bool,
    prefetch: &[f32],
) {
    assert_eq!(offs.len(), w.taps, "taps_product: tap count");
    assert!(qpad.is_multiple_of(LANES), "taps_product: padded grid");
    assert!(out.len() >= w.outs * qpad, "taps_product: output buffer");
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(max_off + qpad <= inp.len(), "taps_product: input buffer");
    let block = |&(_, ob, at): &(usize, usize, usize), ob_out: &mut [f32], prefetch: &[f32]| {
        let wb = &w.data[at..at + ob * w.taps];
        // SAFETY: the asserts above bound every read of `inp` (`q + off < qpad + max_off`);
        // the kernel reads `wb[t·ob + o]` and writes `ob_out[o·qpad + q]` for `o < ob`,
        // `q < qpad` only (`ob_out` holds `ob · qpad` values).
        unsafe {
            dispatch(tiles::ProductBlock {
                inp,
                offs,
                w: wb,
                ob,
                qpad,
                out: ob_out,
                prefetch,
            })
        };
    };
    // the blocks cover the channels in order, so their outputs are consecutive pieces
    let mut rest = &mut out[..w.outs * qpad];
    let mut pieces = Vec::with_capacity(w.blocks.len());
    for b in &w.blocks {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(b.1 * qpad);
        pieces.push((b, piece));
        rest = tail;
    }
    if parallel {
        pieces
            .into_par_iter()
            .for_each(|(b, piece)| block(b, piece, &[]));
    } else {
        for (k, (b, piece)) in pieces.into_iter().enumerate() {
            block(b, piece, if k == 0 { prefetch } else { &[] });
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
    use super::{Prefetcher, NO_PREFETCH};
    use crate::kernels::simd::{Kernel, Simd};

    /// One block of `ob ∈ {1, 2, 4, 8}` output channels over the whole grid: see
    /// [`super::taps_product`].
    pub(super) struct ProductBlock<'a> {
        pub inp: &'a [f32],
        pub offs: &'a [usize],
        pub w: &'a [f32],
        pub ob: usize,
        pub qpad: usize,
        pub out: &'a mut [f32],
        /// Values to pull into the L2 cache along the tiles (a hint: any slice).
        pub prefetch: &'a [f32],
    }

    impl Kernel for ProductBlock<'_> {
        type Output = ();

        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let (i, o, wp) = (self.inp.as_ptr(), self.out.as_mut_ptr(), self.w.as_ptr());
            let (offs, qpad, pf) = (self.offs, self.qpad, self.prefetch);
            // OB × NT accumulators, NT input vectors and a broadcast in registers: 24 + 4
            // of 32, or 8 + 3 of 16 (4 × 3 would fill all 16, and LLVM then spills an
            // accumulator on every tap); eight channels on 16 registers as two halves.
            // SAFETY (every arm): the caller's bounds; each half-block reads its own
            // weights (`w[t·8 + o0 + o]`) and writes its own rows of `out`.
            unsafe {
                if S::REGS >= 32 {
                    match self.ob {
                        8 => run::<S, 8, 8, 3>(i, offs, wp, qpad, o, pf),
                        4 => run::<S, 4, 4, 5>(i, offs, wp, qpad, o, pf),
                        2 => run::<S, 2, 2, 8>(i, offs, wp, qpad, o, pf),
                        _ => run::<S, 1, 1, 8>(i, offs, wp, qpad, o, pf),
                    }
                } else {
                    match self.ob {
                        8 => {
                            run::<S, 8, 4, 2>(i, offs, wp, qpad, o, pf);
                            run::<S, 8, 4, 2>(i, offs, wp.add(4), qpad, o.add(4 * qpad), &[]);
                        }
                        4 => run::<S, 4, 4, 2>(i, offs, wp, qpad, o, pf),
                        2 => run::<S, 2, 2, 5>(i, offs, wp, qpad, o, pf),
                        _ => run::<S, 1, 1, 8>(i, offs, wp, qpad, o, pf),
                    }
                }
            }
        }
    }

    /// Tiles of `NT` vectors over the grid; the last few vectors in tiles as even as
    /// possible (4 left over as 2 + 2, not 3 + 1: a one-vector tile is load-bound). `WS`
    /// is the row stride of the packed weights, `OB ≤ WS` the channels of this pass. The
    /// cache lines of `prefetch` are hinted into the L2 cache, as many after each tile.
    #[inline(always)]
    unsafe fn run<S: Simd, const WS: usize, const OB: usize, const NT: usize>(
        i: *const f32,
        offs: &[usize],
        w: *const f32,
        qpad: usize,
        o: *mut f32,
        prefetch: &[f32],
    ) {
        let ranges = [(prefetch.as_ptr(), prefetch.len()), NO_PREFETCH[1]];
        let mut prefetch = Prefetcher::new(ranges, qpad.div_ceil(NT * S::LANES));
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
            prefetch.step();
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

/// Packs `w` for [`conv2d_forward_packed`]: one [`PackedWeights`] per group. Depends on
/// the weights, the channel counts, kernel and groups only.
pub fn pack_forward_weights(g: &Conv2dGeom, w: &[f32]) -> Vec<PackedWeights> {
    assert_eq!(w.len(), g.weight_len(), "conv2d: weight length");
    let opg = g.out_per_group();
    let taps = g.in_per_group() * g.kernel * g.kernel;
    (0..g.groups)
        .into_par_iter()
        .map(|grp| {
            let wg = &w[grp * opg * taps..(grp + 1) * opg * taps];
            PackedWeights::new(opg, taps, |o, t| wg[o * taps + t])
        })
        .collect()
}

/// Forward of a convolution that [`suits_forward`], each (image, group)'s output passed
/// to `epilogue(image, first channel, values)` while still in cache. Overwrites `y`. One
/// task per (image, group), and per block of output channels where those are fewer than
/// the threads.
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    conv2d_forward_into(g, x, w, as_uninit(y), epilogue);
}

/// [`conv2d_forward`] into `y`, whose every value it writes without reading any (new
/// memory needs no zero-filling first).
pub(super) fn conv2d_forward_into(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [MaybeUninit<f32>],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let packed = pack_forward_weights(g, w);
    conv2d_forward_packed_into(g, x, &packed, y, epilogue);
}

/// [`conv2d_forward`] with weights from [`pack_forward_weights`].
pub fn conv2d_forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    packed: &[PackedWeights],
    y: &mut [f32],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    conv2d_forward_packed_into(g, x, packed, as_uninit(y), epilogue);
}

/// [`conv2d_forward_packed`] into `y`, whose every value it writes without reading any.
pub(super) fn conv2d_forward_packed_into(
    g: &Conv2dGeom,
    x: &[f32],
    packed: &[PackedWeights],
    y: &mut [MaybeUninit<f32>],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
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
    // fewer (image, group) tasks than threads: each splits its channels too
    let few_tasks = g.batch * g.groups < rayon::current_num_threads();
    y.par_chunks_mut(out_grp).enumerate().for_each(|(i, yg)| {
        let (n, grp) = (i / g.groups, i % g.groups);
        let xg = &x[(n * g.groups + grp) * in_grp..][..in_grp];
        // pooled per thread (see `scratch`); the packed input keyed by its layout
        let mut buf = scratch::take_keyed(&key);
        let [mut grid] = scratch::take();
        grid.resize(opg * layout.qpad, 0.0);
        layout.pack(g, xg, &mut buf);
        taps_product(
            &buf,
            &layout.offs,
            &packed[grp],
            layout.qpad,
            &mut grid,
            few_tasks,
            // the input of the task likely next on this thread (rayon runs a thread's
            // share of the range in order)
            x.get((i + 1) * in_grp..(i + 2) * in_grp).unwrap_or(&[]),
        );
        for (o, yo) in yg.chunks_exact_mut(oh * ow).enumerate() {
            let src = &grid[o * layout.qpad..];
            for (oy, dst) in yo.chunks_exact_mut(ow).enumerate() {
                copy_uninit(dst, &src[oy * layout.pitch..oy * layout.pitch + ow]);
            }
        }
        scratch::give_keyed(key, buf);
        scratch::give([grid]);
        // SAFETY: the rows just copied are every value of the group's `opg` planes of
        // `oh × ow`, which are `yg`.
        epilogue(n, grp * opg, unsafe { assume_init(yg) });
    });
}

/// Backward of a grouped convolution: adds the input gradient into `dx` (or writes it,
/// every value, when new memory) when given, and the weight gradient into `dw`. One task per group, images in order inside it, so the
/// weight gradient's summation order does not depend on the thread count.
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
            for (n, dxn) in std::mem::take(&mut dxg).into_iter().enumerate() {
                let dyn_ = &dy[(n * g.groups + grp) * out_grp..][..out_grp];
                // Input gradient, one stride phase at a time.
                bwd.pack(oh, ow, dyn_, &mut dypad);
                for ((ph, pw), grid) in bwd.phases.iter().zip(&phase_w).zip(grids.iter_mut()) {
                    if !ph.taps.is_empty() {
                        zeroed(grid, ipg * ph.qpad);
                        taps_product(&dypad, &ph.offs, pw, ph.qpad, grid, false, &[]);
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
