//! The buffers the direct-family kernels ([`super::direct`], [`super::lanes`],
//! [`super::winograd`]) share, and the vector helpers that fill them: one group's input
//! zero-padded and split by stride phase ([`FwdLayout`]), its output gradient padded for the
//! input-gradient products ([`BwdLayout`]), row copies and (de)interleaving, block
//! transposes. No algorithm here: the kernels import this module, never each other.

use std::mem::MaybeUninit;

use super::{Conv2dGeom, Dest};
use crate::kernels::simd::{self, dispatch, load_n, store_n, Kernel, Simd};
use crate::kernels::{as_uninit, scratch};

/// Grids are padded to a multiple of this many positions: the widest vector (AVX-512's
/// 16 lanes), so that every level's vectors tile them.
pub(super) const LANES: usize = 16;
/// Zeros after each packed buffer, so the last vector of a grid may read past its end.
pub(super) const SLACK: usize = 4 * LANES;
/// At most this many input values per batched weight-gradient product (1 MB).
pub(super) const WG_CHUNK_VALUES: usize = 1 << 18;
pub(super) fn round_up(n: usize, m: usize) -> usize {
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
pub(super) fn copy(dst: &mut [f32], src: &[f32]) {
    copy_uninit(as_uninit(dst), src);
}

/// [`copy`] into values that need not be initialised (it writes every one).
pub(super) fn copy_uninit(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy: lengths");
    copy_rows_into(src, src.len(), dst, dst.len());
}

/// Row `r` of `src` (rows of `w` values) to `dst[r·pitch..][..w]`.
pub(super) fn copy_rows(src: &[f32], w: usize, dst: &mut [f32], pitch: usize) {
    copy_rows_into(src, w, as_uninit(dst), pitch);
}

/// [`copy_rows`] into values that need not be initialised.
fn copy_rows_into(src: &[f32], w: usize, dst: &mut [MaybeUninit<f32>], pitch: usize) {
    let rows = src.len() / w.max(1);
    if rows == 0 {
        return;
    }
    assert!(
        w <= pitch && (rows - 1) * pitch + w <= dst.len(),
        "copy_rows: lengths"
    );
    struct K<'a>(&'a [f32], usize, usize, &'a mut [MaybeUninit<f32>], usize);
    impl Kernel for K<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let K(src, w, rows, dst, pitch) = self;
            let d = dst.as_mut_ptr().cast::<f32>();
            for r in 0..rows {
                // SAFETY: reads `src[r·w..][..w]`, writes `dst[r·pitch..][..w]`, in
                // bounds by the assert above.
                unsafe { simd::copy::<S>(d.add(r * pitch), src.as_ptr().add(r * w), w) }
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

/// A stride-2 split of whole planes' rows, in one dispatch: for row `i` of plane `c` of
/// `src` (planes of `h` rows of `w` values), `dst[e + j] = src[(c·h + i)·w + 2j]` and
/// `dst[o + j] = src[(c·h + i)·w + 2j + 1]`, where `(e, o) = at(c, i)`.
pub(super) fn deinterleave2_rows(
    src: &[f32],
    (h, w): (usize, usize),
    dst: &mut [f32],
    at: impl Fn(usize, usize) -> (usize, usize),
) {
    if w == 0 || h == 0 {
        return;
    }
    struct K<'a, F>(&'a [f32], (usize, usize), &'a mut [f32], F);
    impl<F: Fn(usize, usize) -> (usize, usize)> Kernel for K<'_, F> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let K(src, (h, w), dst, at) = self;
            let (d, planes) = (dst.as_mut_ptr(), src.len() / (h * w));
            for c in 0..planes {
                for i in 0..h {
                    let (e, o) = at(c, i);
                    assert!(
                        e + w.div_ceil(2) <= dst.len() && o + w / 2 <= dst.len(),
                        "deinterleave2_rows: plane {c} row {i} out of bounds"
                    );
                    // SAFETY: `src[(c·h + i)·w..][..w]` is in `src`; `dst[e..][..⌈w/2⌉]`
                    // and `dst[o..][..⌊w/2⌋]` are in bounds (asserted just above).
                    unsafe {
                        let row = src.as_ptr().add((c * h + i) * w);
                        deinterleave2_at::<S>(row, w, d.add(e), d.add(o));
                    }
                }
            }
        }
    }
    // SAFETY: as in the kernel.
    unsafe { dispatch(K(src, (h, w), dst, at)) }
}

/// One vector pair of [`deinterleave2_at`]: `src[i..i + 2·LANES]` to `ev`/`od` at
/// `i/2..i/2 + LANES`, `i` even.
///
/// # Safety
/// Those ranges are readable and writable.
#[inline(always)]
unsafe fn deinterleave2_step<S: Simd>(src: *const f32, i: usize, ev: *mut f32, od: *mut f32) {
    // SAFETY: the caller's
    unsafe {
        let p = src.add(i);
        let (e, o) = S::deinterleave(S::load(p), S::load(p.add(S::LANES)));
        S::store(ev.add(i / 2), e);
        S::store(od.add(i / 2), o);
    }
}

/// `ev[j] = src[2j]`, `od[j] = src[2j + 1]` for `j < ⌈len/2⌉` and `j < ⌊len/2⌋`.
#[inline(always)]
unsafe fn deinterleave2_at<S: Simd>(src: *const f32, len: usize, ev: *mut f32, od: *mut f32) {
    let n = S::LANES;
    let mut i = 0;
    while i + 2 * n <= len {
        // SAFETY: `i + 2n ≤ len`, in the caller's bounds
        unsafe { deinterleave2_step::<S>(src, i, ev, od) };
        i += 2 * n;
    }
    let rest = len - i;
    if rest > 0 && len >= 2 * n && len.is_multiple_of(2) {
        // the last `2n` values again, overlapping the ones done (they start at an even
        // index, so they split the same way): cheaper than part vectors, whose masked
        // stores are slow on AMD CPUs at AVX2
        // SAFETY: `2n ≤ len`, in the caller's bounds
        unsafe { deinterleave2_step::<S>(src, len - 2 * n, ev, od) };
    } else if rest > 0 {
        // the last `rest < 2n` values, as part vectors
        // SAFETY: reads `src[i..]`, writes `ev[i/2..]` (⌈rest/2⌉ values) and `od[i/2..]`
        // (⌊rest/2⌋), all in bounds.
        unsafe {
            let p = src.add(i);
            let a = simd::load_n::<S>(p, rest.min(n));
            let b = simd::load_n::<S>(p.add(rest.min(n)), rest.saturating_sub(n));
            let (e, o) = S::deinterleave(a, b);
            simd::store_n::<S>(ev.add(i / 2), rest.div_ceil(2), e);
            simd::store_n::<S>(od.add(i / 2), rest / 2, o);
        }
    }
}

/// The inverse of [`deinterleave2_rows`], added into or written: for row `i` of plane `c`
/// of `dst` (planes of `h` rows of `w` values), `dst[(c·h + i)·w + 2j] (+)= ev[j]` and
/// `dst[(c·h + i)·w + 2j + 1] (+)= od[j]`, where `(ev, od) = rows(c, i)` hold `⌈w/2⌉` and
/// `⌊w/2⌋` values. Writes (or adds into) every value of `dst`.
pub(super) fn interleave2_rows<'a>(
    dst: Dest<'_>,
    (h, w): (usize, usize),
    rows: impl Fn(usize, usize) -> (&'a [f32], &'a [f32]),
) {
    assert_eq!(dst.len() % (h * w).max(1), 0, "interleave2_rows: planes");
    if w == 0 || h == 0 {
        return;
    }
    struct K<F>(*mut f32, usize, bool, (usize, usize), F);
    impl<'a, F: Fn(usize, usize) -> (&'a [f32], &'a [f32])> Kernel for K<F> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let K(dst, len, add, (h, w), rows) = self;
            for r in 0..len / w {
                let (ev, od) = rows(r / h, r % h);
                assert!(
                    ev.len() == w.div_ceil(2) && od.len() == w / 2,
                    "interleave2_rows: plane {} row {} lengths",
                    r / h,
                    r % h
                );
                // SAFETY: row `r` of `dst`'s `len / w` rows; the lengths asserted above.
                unsafe {
                    let d = dst.add(r * w);
                    if add {
                        interleave2_at::<S, true>(d, w, ev, od)
                    } else {
                        interleave2_at::<S, false>(d, w, ev, od)
                    }
                }
            }
        }
    }
    let (ptr, len, add) = dst.raw();
    // SAFETY: the kernel reads (when adding) and writes `dst`'s `len` values only.
    unsafe { dispatch(K(ptr, len, add, (h, w), rows)) }
}

/// `dst[2j] (+)= ev[j]`, `dst[2j + 1] (+)= od[j]` (added with `ADD`, else written, `dst`
/// not read), where `ev` holds `⌈n/2⌉` values and `od` `⌊n/2⌋`; `n` values at `dst`.
#[inline(always)]
unsafe fn interleave2_at<S: Simd, const ADD: bool>(
    dst: *mut f32,
    len: usize,
    ev: &[f32],
    od: &[f32],
) {
    let n = S::LANES;
    let mut j = 0;
    while j + n <= od.len() {
        // SAFETY: reads `ev`/`od[j..j + n]` (`od` is the shorter), `dst[2j..2j + 2n]`,
        // within `2·od.len() ≤ len`.
        unsafe {
            let (lo, hi) = S::interleave(S::load(ev.as_ptr().add(j)), S::load(od.as_ptr().add(j)));
            let d = dst.add(2 * j);
            put::<S, ADD>(d, n, lo);
            put::<S, ADD>(d.add(n), n, hi);
        }
        j += n;
    }
    let k = len - 2 * j;
    if k > 0 {
        // the last `k < 2·LANES` values, as part vectors
        // SAFETY: reads `ev[j..]`, `od[j..]`, `dst[2j..]`, each to its end only.
        unsafe {
            let (lo, hi) = S::interleave(
                simd::load_n::<S>(ev.as_ptr().add(j), ev.len() - j),
                simd::load_n::<S>(od.as_ptr().add(j), od.len() - j),
            );
            let d = dst.add(2 * j);
            let (k0, k1) = (k.min(S::LANES), k.saturating_sub(S::LANES));
            put::<S, ADD>(d, k0, lo);
            put::<S, ADD>(d.add(k0), k1, hi);
        }
    }
}

/// The first `k ≤ LANES` lanes of `v` to `d`, added to its values with `ADD` (else `d` is
/// not read).
#[inline(always)]
unsafe fn put<S: Simd, const ADD: bool>(d: *mut f32, k: usize, v: S::V) {
    // SAFETY: `k` values at `d` (the caller's contract).
    unsafe {
        let v = if ADD { S::add(load_n::<S>(d, k), v) } else { v };
        store_n::<S>(d, k, v)
    }
}

/// `off(c, ky, kx)` for every tap of `ipg` channels of a `k × k` kernel, in PyTorch's
/// weight order.
fn tap_offsets(ipg: usize, k: usize, off: impl Fn(usize, usize, usize) -> usize) -> Vec<usize> {
    (0..ipg)
        .flat_map(|c| (0..k * k).map(move |t| (c, t / k, t % k)))
        .map(|(c, ky, kx)| off(c, ky, kx))
        .collect()
}

/// How one group's input is laid out for the forward product: zero-padded, split into
/// `stride × stride` phase planes of `rows × pitch`, one set per channel
/// ([`FwdLayout::new`]); or, at stride 2, one padded plane per channel read at every
/// second column and row ([`FwdLayout::unsplit`]).
#[derive(Clone, Debug)]
pub(super) struct FwdLayout {
    pub(super) pitch: usize,
    pub(super) rows: usize,
    /// Distance in the buffer between output positions `(r, j)` and `(r, j + 1)`: 1 split
    /// into phases, `stride` unsplit (and [`FwdLayout::row`] between rows).
    pub(super) step: usize,
    /// Values of the packed input, slack included.
    pub(super) len: usize,
    /// Offset of each tap `(c, ky, kx)`, in PyTorch's weight order.
    pub(super) offs: Vec<usize>,
    /// Output grid: `oh` rows of `pitch` positions, padded to [`LANES`].
    pub(super) qpad: usize,
}

impl FwdLayout {
    pub(super) fn new(g: &Conv2dGeom) -> Self {
        let (s, k, p) = (g.stride, g.kernel, g.padding);
        let (oh, ow) = (g.out_h(), g.out_w());
        let pitch = (g.in_w + 2 * p).div_ceil(s).max(ow + (k - 1) / s);
        let rows = (g.in_h + 2 * p).div_ceil(s).max(oh + (k - 1) / s) + 1;
        let plane = rows * pitch;
        let ipg = g.in_per_group();
        let offs = tap_offsets(ipg, k, |c, ky, kx| {
            ((c * s + ky % s) * s + kx % s) * plane + (ky / s) * pitch + kx / s
        });
        Self {
            pitch,
            rows,
            step: 1,
            len: ipg * s * s * plane + SLACK,
            offs,
            qpad: round_up(oh * pitch, LANES),
        }
    }

    /// One zero-padded plane per channel, not split by phase (a copy of each row rather
    /// than a split of it), for a product whose tiles step through the input `stride`
    /// columns and rows at a time: the channel-in-lanes forward at stride 2. (Not for the
    /// kernels with positions in the lanes, which need consecutive positions adjacent.)
    pub(super) fn unsplit(g: &Conv2dGeom) -> Self {
        let (s, k, p) = (g.stride, g.kernel, g.padding);
        let (oh, ow) = (g.out_h(), g.out_w());
        // the last output reads padded column (ow − 1)·s + k − 1 < in_w + 2p
        let pitch = (g.in_w + 2 * p).max((ow.max(1) - 1) * s + k);
        let rows = (g.in_h + 2 * p).max((oh.max(1) - 1) * s + k) + 1;
        let plane = rows * pitch;
        let ipg = g.in_per_group();
        let offs = tap_offsets(ipg, k, |c, ky, kx| c * plane + ky * pitch + kx);
        Self {
            pitch,
            rows,
            step: s,
            len: ipg * plane + SLACK,
            offs,
            qpad: round_up(oh * pitch, LANES),
        }
    }

    /// Distance in the buffer between output positions `(r, j)` and `(r + 1, j)`: `pitch`
    /// split into phases, `stride · pitch` unsplit.
    pub(super) fn row(&self) -> usize {
        self.step * self.pitch
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
        if s == 1 || self.step > 1 {
            // every row of every channel shifted by the padding: one call per channel
            for (c, xc) in x.chunks_exact(h * w).enumerate() {
                let at = start + c * plane + p * self.pitch + p;
                copy_rows(xc, w, &mut buf[at..], self.pitch);
            }
            return;
        }
        if s == 2 && h > 0 {
            // Even input columns go to phase p % 2 from column p / 2, odd ones to the other
            // phase from column (p + 1) / 2: every row of every channel in one call.
            let (ev, od) = (
                (p % 2) * plane + p / 2,
                ((p + 1) % 2) * plane + p.div_ceil(2),
            );
            let pitch = self.pitch;
            // where input row `iy` of channel `c` starts, before the column phases: `base`
            // below at s = 2, in shifts (the rows are many and short, a division shows)
            deinterleave2_rows(x, (h, w), buf, |c, iy| {
                let py = iy + p;
                let b = start + (4 * c + 2 * (py & 1)) * plane + (py >> 1) * pitch;
                (b + ev, b + od)
            });
            return;
        }
        // where input row `iy` of channel `c` starts in `buf`, before the column phases
        let base = |c: usize, iy: usize| {
            let py = iy + p;
            start + (c * s + py % s) * s * plane + (py / s) * self.pitch
        };
        for (c, xc) in x.chunks_exact(h * w).enumerate() {
            for (iy, src) in xc.chunks_exact(w).enumerate() {
                let base = base(c, iy);
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
    pub(super) qpad: usize,
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
pub(super) fn images_by_group<'a>(g: &Conv2dGeom, dx: Option<Dest<'a>>) -> Vec<Vec<Dest<'a>>> {
    let mut groups: Vec<Vec<Dest<'a>>> = (0..g.groups).map(|_| Vec::new()).collect();
    let in_grp = g.in_per_group() * g.in_h * g.in_w;
    if let (Some(dx), true) = (dx, in_grp > 0) {
        for (i, part) in dx.chunks(in_grp).into_iter().enumerate() {
            groups[i % g.groups].push(part);
        }
    }
    groups
}

impl BwdLayout {
    /// Adds (or writes) one image's input gradient for one group, computed per stride
    /// phase, into `dxn` (channel planes of `in_h × in_w`): `row(c, phase, i)` is row `i`
    /// of phase `phase`'s grid for channel `c`, `wj` values, whose entry `j` belongs at
    /// input row `s·i + a`, column `s·j + b` (phase index `a · min(s, w) + b`). Phases that
    /// no tap reaches are skipped (a written `dxn` is zero-filled first where there are
    /// any).
    pub(super) fn add_phases<'a>(
        &self,
        g: &Conv2dGeom,
        mut dxn: Dest<'_>,
        row: impl Fn(usize, usize, usize) -> &'a [f32],
    ) {
        let (s, hw, sw) = (g.stride, g.in_h * g.in_w, g.stride.min(g.in_w));
        let every = self.phases.iter().all(|ph| !ph.taps.is_empty());
        if s == 2 && g.in_w >= 2 && every {
            // every row of every channel in one call
            interleave2_rows(dxn, (g.in_h, g.in_w), |c, iy| {
                let (a, i) = (iy & 1, iy >> 1);
                (row(c, a * sw, i), row(c, a * sw + 1, i))
            });
            return;
        }
        if s == 1 && every {
            for c in 0..dxn.len() / hw.max(1) {
                for i in 0..g.in_h {
                    dxn.part((c * g.in_h + i) * g.in_w..(c * g.in_h + i + 1) * g.in_w)
                        .put(row(c, 0, i));
                }
            }
            return;
        }
        let dxn = dxn.init();
        for (c, dxc) in dxn.chunks_exact_mut(hw).enumerate() {
            for (iy, dst) in dxc.chunks_exact_mut(g.in_w).enumerate() {
                let (a, i) = (iy % s, iy / s);
                let row = |b: usize| {
                    let idx = a * sw + b;
                    (!self.phases[idx].taps.is_empty()).then(|| row(c, idx, i))
                };
                // (stride 1 has one phase, which every tap reaches: written above)
                if s == 2 && g.in_w >= 2 {
                    match (row(0), row(1)) {
                        (Some(e), Some(o)) => {
                            interleave2_rows(Dest::Add(dst), (1, g.in_w), |_, _| (e, o))
                        }
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

/// `dst[j·dstride + i] = src[i·sstride + j]` (or `+=` with `add`) for `i < rows`, `j < cols`.
pub fn transpose(
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
        rows <= dstride && (cols - 1) * dstride + rows <= dst.len(),
        "transpose: destination"
    );
    // SAFETY: `dst` holds the values asserted above.
    unsafe { transpose_to(src, sstride, (rows, cols), dst.as_mut_ptr(), dstride, add) }
}

/// [`transpose`] of `rows × cols` values into all of `dst` (`cols` rows of `rows`), written
/// or added into; returns `dst`, every value now initialised.
pub(super) fn transpose_into<'a>(
    src: &[f32],
    sstride: usize,
    rows: usize,
    cols: usize,
    dst: Dest<'a>,
) -> &'a mut [f32] {
    let (ptr, len, add) = dst.raw();
    assert_eq!(len, rows * cols, "transpose_into: destination");
    if len == 0 {
        return &mut [];
    }
    // SAFETY: `dst` holds `rows · cols` values (asserted), every one of them written (or
    // added into) once, so that all `len` values at `ptr` (`dst`'s, borrowed for `'a`) are
    // initialised after.
    unsafe {
        transpose_to(src, sstride, (rows, cols), ptr, rows, add);
        std::slice::from_raw_parts_mut(ptr, len)
    }
}

/// [`transpose`] into `dst`, with the source checked here.
///
/// # Safety
/// `dst` is valid for `(cols − 1)·dstride + rows` values, `rows ≤ dstride`, `rows` and
/// `cols` positive.
unsafe fn transpose_to(
    src: &[f32],
    sstride: usize,
    (rows, cols): (usize, usize),
    dst: *mut f32,
    dstride: usize,
    add: bool,
) {
    assert!(
        cols <= sstride && (rows - 1) * sstride + cols <= src.len(),
        "transpose: source"
    );
    // SAFETY: the kernel reads `src[i·sstride + j]` and writes `dst[j·dstride + i]` for
    // `i < rows`, `j < cols` only: the source asserted above, the destination the caller's.
    unsafe {
        simd::dispatch(Transpose {
            src: src.as_ptr(),
            sstride,
            rows,
            cols,
            dst,
            dstride,
            add,
        })
    }
}

/// [`transpose`] in square blocks of the level's lanes.
struct Transpose {
    src: *const f32,
    sstride: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    dstride: usize,
    add: bool,
}

impl Kernel for Transpose {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let n = S::LANES;
        for i0 in (0..self.rows).step_by(n) {
            for j0 in (0..self.cols).step_by(n) {
                // SAFETY: the block is inside the caller's `rows × cols`.
                unsafe {
                    transpose_block::<S>(
                        self.src.add(i0 * self.sstride + j0),
                        self.sstride,
                        (self.rows - i0).min(n),
                        (self.cols - j0).min(n),
                        self.dst.add(j0 * self.dstride + i0),
                        self.dstride,
                        self.add,
                    )
                };
            }
        }
    }
}

/// `dst[j·dstride + i] (+)= src[i·sstride + j]` for `i < rows ≤ LANES`, `j < cols ≤ LANES`.
#[inline(always)]
unsafe fn transpose_block<S: Simd>(
    src: *const f32,
    sstride: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    dstride: usize,
    add: bool,
) {
    // Constant trip counts and indices throughout, so that the compiler unrolls every loop
    // and keeps the array in registers.
    // SAFETY: reads and writes inside the block (the caller's contract).
    unsafe {
        let mut r = [S::zero(); 16];
        #[allow(clippy::needless_range_loop)]
        for i in 0..S::LANES {
            if i < rows {
                r[i] = load_n::<S>(src.add(i * sstride), cols);
            }
        }
        S::transpose(&mut r);
        #[allow(clippy::needless_range_loop)]
        for j in 0..S::LANES {
            if j < cols {
                let p = dst.add(j * dstride);
                let v = if add {
                    S::add(load_n::<S>(p, rows), r[j])
                } else {
                    r[j]
                };
                store_n::<S>(p, rows, v);
            }
        }
    }
}

/// `(channels, positions)` of the channel-in-lanes kernels' register tile at level `S`
/// ([`super::lanes`]' products, [`super::winograd`]'s tile products): 32 channels (two
/// vectors) × 14 positions with AVX-512's 32 registers (28 accumulators, two weight
/// vectors, a broadcast); 16 channels × 6 positions elsewhere (AVX2 and the plain level:
/// two 8-lane vectors, 12 accumulators of 16 registers; NEON: four 4-lane vectors, 24 of
/// 32). A 16-channel block on AVX-512 is one vector × 14 positions.
#[inline(always)]
pub(super) fn lane_tile<S: Simd>() -> (usize, usize) {
    if S::LANES == 16 {
        (2 * super::LANE_CHANNELS, 14)
    } else {
        (super::LANE_CHANNELS, 6)
    }
}

/// `f32` values per cache line.
pub(super) const CACHE_LINE: usize = 16;

/// Memory to pull into the L2 cache while a kernel runs (the next task's input, or the
/// output it will write): up to two `(first value, values)` ranges. Addresses only: hinted,
/// never read through.
pub(super) type Prefetch = [(*const f32, usize); 2];

/// No prefetching.
pub(super) const NO_PREFETCH: Prefetch = [(std::ptr::null(), 0); 2];

/// A [`Prefetch`]'s cache lines spread evenly over a kernel's steps (its register tiles),
/// as many hinted after each: early enough to arrive before the next task, few enough at
/// a time not to queue behind the kernel's own loads.
pub(super) struct Prefetcher {
    ranges: Prefetch,
    /// Lines of the first range, and of both.
    first: usize,
    lines: usize,
    per_step: usize,
    next: usize,
}

impl Prefetcher {
    /// `ranges` over `steps` steps.
    #[inline(always)]
    pub(super) fn new(ranges: Prefetch, steps: usize) -> Self {
        let first = ranges[0].1.div_ceil(CACHE_LINE);
        let lines = first + ranges[1].1.div_ceil(CACHE_LINE);
        Self {
            ranges,
            first,
            lines,
            per_step: lines.div_ceil(steps.max(1)),
            next: 0,
        }
    }

    /// Hints the next step's share of the lines.
    #[inline(always)]
    pub(super) fn step(&mut self) {
        let end = (self.next + self.per_step).min(self.lines);
        for l in self.next..end {
            prefetch_l2(self.line(l));
        }
        self.next = end;
    }

    /// Line `l`, counted through both ranges.
    #[inline(always)]
    fn line(&self, l: usize) -> *const f32 {
        let [(a, _), (b, len_b)] = self.ranges;
        if l < self.first {
            a.wrapping_add(l * CACHE_LINE)
        } else {
            b.wrapping_add(((l - self.first) * CACHE_LINE).min(len_b))
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa;
    use crate::kernels::simd::run_at;

    /// Splits `src` into `ev` and `od`, then adds them back into `sum` and writes them
    /// into `out` (one row each; `out` one value longer).
    struct SplitJoin<'a> {
        src: &'a [f32],
        ev: &'a mut [f32],
        od: &'a mut [f32],
        sum: &'a mut [f32],
        out: &'a mut [f32],
    }

    impl Kernel for SplitJoin<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<S: Simd>(self) {
            let n = self.src.len();
            assert!(self.ev.len() >= n.div_ceil(2) && self.od.len() >= n / 2);
            assert_eq!(self.sum.len(), n);
            assert_eq!(self.out.len(), n + 1);
            // SAFETY: lengths asserted above
            unsafe {
                let (ev, od) = (self.ev.as_mut_ptr(), self.od.as_mut_ptr());
                deinterleave2_at::<S>(self.src.as_ptr(), n, ev, od);
                let (ev, od) = (&self.ev[..n.div_ceil(2)], &self.od[..n / 2]);
                interleave2_at::<S, true>(self.sum.as_mut_ptr(), n, ev, od);
                interleave2_at::<S, false>(self.out.as_mut_ptr(), n, ev, od);
            }
        }
    }

    #[test]
    fn rows_split_by_parity_and_join_back_at_every_level() {
        // rows shorter than one vector, between one and two, and longer, odd and even
        for l in isa::available() {
            for n in 1usize..=70 {
                let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
                // one slot past each half, which must stay untouched
                let (mut ev, mut od) = (vec![-1.0; n.div_ceil(2) + 1], vec![-1.0; n / 2 + 1]);
                let mut sum: Vec<f32> = (0..n).map(|i| 1000.0 * i as f32).collect();
                let mut out = vec![f32::NAN; n + 1];
                out[n] = -1.0;
                let k = SplitJoin {
                    src: &src,
                    ev: &mut ev,
                    od: &mut od,
                    sum: &mut sum,
                    out: &mut out,
                };
                // SAFETY: an available level; the kernel asserts its lengths
                unsafe { run_at(l, k) };
                let evens: Vec<f32> = src.iter().step_by(2).copied().collect();
                let odds: Vec<f32> = src.iter().skip(1).step_by(2).copied().collect();
                assert_eq!(ev[..evens.len()], evens[..], "{l}, {n} values: even half");
                assert_eq!(od[..odds.len()], odds[..], "{l}, {n} values: odd half");
                assert_eq!(
                    (ev[evens.len()], od[odds.len()]),
                    (-1.0, -1.0),
                    "{l}, {n}: past the end"
                );
                assert_eq!(out[..n], src[..], "{l}, {n} values: written back");
                assert_eq!(out[n], -1.0, "{l}, {n} values: written past the end");
                for (i, (&s, &x)) in sum.iter().zip(&src).enumerate() {
                    assert_eq!(
                        s,
                        1000.0 * i as f32 + x,
                        "{l}, {n} values: joined value {i}"
                    );
                }
            }
        }
    }
}
