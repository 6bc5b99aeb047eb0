//! The per-image augmentations of torchvision's current recipes: [`TrivialAugmentWide`]
//! (Müller & Hutter 2021) and [`RandomErasing`] (Zhong et al. 2020). Both are
//! [`Transform`]s, seeded like the others: the same rng state gives the same image.
//!
//! TrivialAugmentWide works on values in [0, 1] (place it before `Normalize`), with
//! torchvision's operations and magnitude bins (31, "wide" ranges); the geometric ones use
//! nearest-neighbour sampling and fill with 0, as torchvision's defaults do. Random
//! erasing works on normalised values and erases to 0 (place it after `Normalize`).

use rand::rngs::StdRng;
use rand::Rng;

use crate::transforms::{Sample, Transform};

/// The operations of TrivialAugmentWide, in torchvision's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugmentOp {
    /// No change.
    Identity,
    /// Shear along x by up to ±0.99.
    ShearX,
    /// Shear along y by up to ±0.99.
    ShearY,
    /// Shift along x by up to ±32 pixels.
    TranslateX,
    /// Shift along y by up to ±32 pixels.
    TranslateY,
    /// Rotate about the centre by up to ±135°.
    Rotate,
    /// Scale brightness by 1 ± 0.99.
    Brightness,
    /// Blend with the greyscale image by 1 ± 0.99 (saturation).
    Color,
    /// Blend with the mean grey by 1 ± 0.99.
    Contrast,
    /// Blend with a smoothed image by 1 ± 0.99.
    Sharpness,
    /// Keep 8 down to 2 bits of each 8-bit value.
    Posterize,
    /// Invert the values at or above a threshold from 1 down to 0.
    Solarize,
    /// Stretch each channel to the full range.
    AutoContrast,
    /// Equalise each channel's histogram.
    Equalize,
}

impl AugmentOp {
    /// All operations.
    pub const ALL: [AugmentOp; 14] = [
        AugmentOp::Identity,
        AugmentOp::ShearX,
        AugmentOp::ShearY,
        AugmentOp::TranslateX,
        AugmentOp::TranslateY,
        AugmentOp::Rotate,
        AugmentOp::Brightness,
        AugmentOp::Color,
        AugmentOp::Contrast,
        AugmentOp::Sharpness,
        AugmentOp::Posterize,
        AugmentOp::Solarize,
        AugmentOp::AutoContrast,
        AugmentOp::Equalize,
    ];

    /// The magnitude of bin `bin` of `bins` (torchvision's `_augmentation_space` for the
    /// wide variant), and whether a random sign applies.
    pub fn magnitude(self, bin: usize, bins: usize) -> (f32, bool) {
        let lin = |hi: f32| hi * bin as f32 / (bins - 1).max(1) as f32;
        match self {
            AugmentOp::Identity | AugmentOp::AutoContrast | AugmentOp::Equalize => (0.0, false),
            AugmentOp::ShearX | AugmentOp::ShearY => (lin(0.99), true),
            AugmentOp::TranslateX | AugmentOp::TranslateY => (lin(32.0), true),
            AugmentOp::Rotate => (lin(135.0), true),
            AugmentOp::Brightness
            | AugmentOp::Color
            | AugmentOp::Contrast
            | AugmentOp::Sharpness => (lin(0.99), true),
            // bits: 8 - round(bin / ((bins - 1) / 6))
            AugmentOp::Posterize => {
                let step = (bins - 1).max(1) as f32 / 6.0;
                ((8.0 - (bin as f32 / step).round()).max(0.0), false)
            }
            AugmentOp::Solarize => (1.0 - lin(1.0), false),
        }
    }

    /// Applies the operation with magnitude `m` (already signed).
    pub fn apply(self, s: Sample, m: f32) -> Sample {
        match self {
            AugmentOp::Identity => s,
            AugmentOp::ShearX => warp(&s, |x, y| (x + m * y, y)),
            AugmentOp::ShearY => warp(&s, |x, y| (x, y + m * x)),
            AugmentOp::TranslateX => warp(&s, |x, y| (x - m.trunc(), y)),
            AugmentOp::TranslateY => warp(&s, |x, y| (x, y - m.trunc())),
            AugmentOp::Rotate => {
                // the output pixel at (x, y) comes from rotating it back about the centre
                let (cx, cy) = (s.width as f32 * 0.5, s.height as f32 * 0.5);
                let (sin, cos) = (-m).to_radians().sin_cos();
                warp(&s, |x, y| {
                    let (dx, dy) = (x + 0.5 - cx, y + 0.5 - cy);
                    (
                        cos * dx + sin * dy + cx - 0.5,
                        -sin * dx + cos * dy + cy - 0.5,
                    )
                })
            }
            AugmentOp::Brightness => map(s, |v| v * (1.0 + m)),
            AugmentOp::Color => {
                if s.channels != 3 {
                    return s;
                }
                let grey = greyscale(&s);
                blend(s, |_, i| grey[i], 1.0 + m)
            }
            AugmentOp::Contrast => {
                let grey = greyscale(&s);
                let mean = grey.iter().sum::<f32>() / grey.len().max(1) as f32;
                blend(s, |_, _| mean, 1.0 + m)
            }
            AugmentOp::Sharpness => {
                let smooth = smoothed(&s);
                let hw = s.height * s.width;
                blend(s, |c, i| smooth[c * hw + i], 1.0 + m)
            }
            AugmentOp::Posterize => {
                let mask = !((1u32 << (8 - (m as u32).min(8))) - 1) & 0xff;
                map(s, |v| (to_u8(v) as u32 & mask) as f32 / 255.0)
            }
            AugmentOp::Solarize => map(s, |v| if v >= m { 1.0 - v } else { v }),
            AugmentOp::AutoContrast => per_channel(s, |ch| {
                let lo = ch.iter().cloned().fold(f32::INFINITY, f32::min);
                let hi = ch.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                if hi > lo {
                    let scale = 1.0 / (hi - lo);
                    for v in ch.iter_mut() {
                        *v = (*v - lo) * scale;
                    }
                }
            }),
            AugmentOp::Equalize => per_channel(s, equalize),
        }
    }
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

fn map(mut s: Sample, f: impl Fn(f32) -> f32) -> Sample {
    for v in &mut s.data {
        *v = f(*v).clamp(0.0, 1.0);
    }
    s
}

fn per_channel(mut s: Sample, f: impl Fn(&mut [f32])) -> Sample {
    let hw = (s.height * s.width).max(1);
    for ch in s.data.chunks_mut(hw) {
        f(ch);
    }
    s
}

/// `other + factor · (v − other)`, clamped to [0, 1]; `other(c, i)` is the blend target of
/// pixel `i` of channel `c`.
fn blend(mut s: Sample, other: impl Fn(usize, usize) -> f32, factor: f32) -> Sample {
    let hw = (s.height * s.width).max(1);
    for (k, v) in s.data.iter_mut().enumerate() {
        let o = other(k / hw, k % hw);
        *v = (o + factor * (*v - o)).clamp(0.0, 1.0);
    }
    s
}

/// ITU-R 601-2 luma of a 3-channel image (the image itself for one channel).
fn greyscale(s: &Sample) -> Vec<f32> {
    let hw = s.height * s.width;
    if s.channels != 3 {
        return s.data[..hw].to_vec();
    }
    (0..hw)
        .map(|i| 0.299 * s.data[i] + 0.587 * s.data[hw + i] + 0.114 * s.data[2 * hw + i])
        .collect()
}

/// PIL's SMOOTH filter (3 × 3, centre 5, others 1, over 13), border pixels kept.
fn smoothed(s: &Sample) -> Vec<f32> {
    let (h, w) = (s.height, s.width);
    let mut out = s.data.clone();
    for c in 0..s.channels {
        let base = c * h * w;
        for y in 1..h.saturating_sub(1) {
            for x in 1..w.saturating_sub(1) {
                let mut acc = 4.0 * s.data[base + y * w + x];
                for dy in 0..3 {
                    for dx in 0..3 {
                        acc += s.data[base + (y + dy - 1) * w + x + dx - 1];
                    }
                }
                out[base + y * w + x] = acc / 13.0;
            }
        }
    }
    out
}

/// PIL's `ImageOps.equalize` on one channel of 8-bit values.
fn equalize(ch: &mut [f32]) {
    let mut hist = [0usize; 256];
    for &v in ch.iter() {
        hist[to_u8(v) as usize] += 1;
    }
    let nonzero: Vec<usize> = hist.iter().copied().filter(|&c| c > 0).collect();
    let last = nonzero.last().copied().unwrap_or(0);
    let step = (ch.len() - last) / 255;
    if nonzero.len() <= 1 || step == 0 {
        return;
    }
    let mut lut = [0u8; 256];
    let mut n = step / 2;
    for (i, &count) in hist.iter().enumerate() {
        lut[i] = (n / step).min(255) as u8;
        n += count;
    }
    for v in ch.iter_mut() {
        *v = lut[to_u8(*v) as usize] as f32 / 255.0;
    }
}

/// Resamples `s` with nearest neighbours: output `(x, y)` reads input `src(x, y)`; outside
/// the image reads 0.
fn warp(s: &Sample, src: impl Fn(f32, f32) -> (f32, f32)) -> Sample {
    let (h, w) = (s.height, s.width);
    let mut out = vec![0.0; s.data.len()];
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = src(x as f32, y as f32);
            let (sx, sy) = (sx.round(), sy.round());
            if sx < 0.0 || sy < 0.0 || sx >= w as f32 || sy >= h as f32 {
                continue;
            }
            let (sx, sy) = (sx as usize, sy as usize);
            for c in 0..s.channels {
                out[(c * h + y) * w + x] = s.data[(c * h + sy) * w + sx];
            }
        }
    }
    Sample {
        channels: s.channels,
        height: h,
        width: w,
        data: out,
    }
}

/// torchvision's `TrivialAugmentWide`: one operation drawn uniformly, at a magnitude bin
/// drawn uniformly from `bins` (31), with a random sign where the operation has one.
#[derive(Clone, Debug)]
pub struct TrivialAugmentWide {
    /// Magnitude bins (torchvision: 31).
    pub bins: usize,
}

impl Default for TrivialAugmentWide {
    fn default() -> Self {
        Self { bins: 31 }
    }
}

impl Transform for TrivialAugmentWide {
    fn apply(&self, s: Sample, rng: &mut StdRng) -> Sample {
        let op = AugmentOp::ALL[rng.gen_range(0..AugmentOp::ALL.len())];
        let bin = rng.gen_range(0..self.bins.max(1));
        let (m, signed) = op.magnitude(bin, self.bins.max(1));
        let m = if signed && rng.gen_bool(0.5) { -m } else { m };
        op.apply(s, m)
    }
}

/// torchvision's `RandomErasing`: with probability `p`, a rectangle of area fraction in
/// `scale` and aspect ratio in `ratio` (log-uniform) set to 0; up to 10 draws, none
/// erased when no draw fits.
#[derive(Clone, Debug)]
pub struct RandomErasing {
    /// Probability of erasing.
    pub p: f64,
    /// Area fraction range: (0.02, 0.33).
    pub scale: (f32, f32),
    /// Aspect-ratio range: (0.3, 3.3).
    pub ratio: (f32, f32),
}

impl RandomErasing {
    /// torchvision's defaults with probability `p`.
    pub fn new(p: f64) -> Self {
        Self {
            p,
            scale: (0.02, 0.33),
            ratio: (0.3, 3.3),
        }
    }

    /// The rectangle `(top, left, h, w)` a draw picks for an `h × w` image, if any.
    fn rect(&self, h: usize, w: usize, rng: &mut StdRng) -> Option<(usize, usize, usize, usize)> {
        let area = (h * w) as f32;
        let (l0, l1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.gen_range(self.scale.0..=self.scale.1);
            let ar = rng.gen_range(l0..=l1).exp();
            let eh = (target * ar).sqrt().round() as usize;
            let ew = (target / ar).sqrt().round() as usize;
            if eh == 0 || ew == 0 || eh >= h || ew >= w {
                continue;
            }
            let top = rng.gen_range(0..=h - eh);
            let left = rng.gen_range(0..=w - ew);
            return Some((top, left, eh, ew));
        }
        None
    }
}

impl Transform for RandomErasing {
    fn apply(&self, mut s: Sample, rng: &mut StdRng) -> Sample {
        if !rng.gen_bool(self.p.clamp(0.0, 1.0)) {
            return s;
        }
        if let Some((top, left, eh, ew)) = self.rect(s.height, s.width, rng) {
            let (h, w) = (s.height, s.width);
            for c in 0..s.channels {
                for y in top..top + eh {
                    let row = (c * h + y) * w;
                    s.data[row + left..row + left + ew].fill(0.0);
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn image(c: usize, h: usize, w: usize, seed: u64) -> Sample {
        let mut rng = StdRng::seed_from_u64(seed);
        Sample {
            channels: c,
            height: h,
            width: w,
            data: (0..c * h * w)
                .map(|_| rng.gen_range(0u8..=255) as f32 / 255.0)
                .collect(),
        }
    }

    proptest! {
        #[test]
        fn trivial_augment_is_seeded_and_keeps_shape_and_range(
            c in prop_oneof![Just(1usize), Just(3)], h in 1usize..20, w in 1usize..20,
            img_seed in any::<u64>(), seed in any::<u64>(),
        ) {
            let s = image(c, h, w, img_seed);
            let ta = TrivialAugmentWide::default();
            let a = ta.apply(s.clone(), &mut StdRng::seed_from_u64(seed));
            let b = ta.apply(s.clone(), &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!((a.channels, a.height, a.width), (c, h, w));
            prop_assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)), "{:?}", a.data);
        }

        #[test]
        fn every_op_keeps_shape_and_range_at_every_magnitude(
            c in prop_oneof![Just(1usize), Just(3)], h in 1usize..12, w in 1usize..12,
            img_seed in any::<u64>(), op in 0usize..14, bin in 0usize..31, neg in any::<bool>(),
        ) {
            let s = image(c, h, w, img_seed);
            let op = AugmentOp::ALL[op];
            let (m, signed) = op.magnitude(bin, 31);
            let out = op.apply(s.clone(), if signed && neg { -m } else { m });
            prop_assert_eq!((out.channels, out.height, out.width), (c, h, w));
            prop_assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
            if bin == 0 && !matches!(op, AugmentOp::AutoContrast | AugmentOp::Equalize | AugmentOp::Solarize) {
                // magnitude 0 is the identity (posterize keeps all 8 bits)
                for (x, y) in out.data.iter().zip(&s.data) {
                    prop_assert!((x - y).abs() < 1e-6, "{:?} at magnitude 0", op);
                }
            }
        }

        #[test]
        fn random_erasing_is_seeded_and_erases_one_rectangle_or_nothing(
            c in 1usize..4, h in 1usize..24, w in 1usize..24,
            img_seed in any::<u64>(), seed in any::<u64>(),
        ) {
            let mut s = image(c, h, w, img_seed);
            for v in &mut s.data {
                *v += 1.0; // no value is 0 before erasing
            }
            let t = RandomErasing::new(1.0);
            let a = t.apply(s.clone(), &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(&a, &t.apply(s.clone(), &mut StdRng::seed_from_u64(seed)));
            let erased: Vec<(usize, usize)> = (0..h)
                .flat_map(|y| (0..w).map(move |x| (y, x)))
                .filter(|&(y, x)| a.data[y * w + x] == 0.0)
                .collect();
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let k = (ch * h + y) * w + x;
                        let zero = erased.contains(&(y, x));
                        prop_assert_eq!(a.data[k] == 0.0, zero, "channels erased differently");
                        if !zero {
                            prop_assert_eq!(a.data[k], s.data[k]);
                        }
                    }
                }
            }
            if let (Some(&(y0, x0)), Some(&(y1, x1))) = (erased.first(), erased.last()) {
                // a filled rectangle, smaller than the image, of 2% to 33% of it (rounded)
                prop_assert_eq!(erased.len(), (y1 - y0 + 1) * (x1 - x0 + 1));
                prop_assert!(y1 - y0 + 1 < h && x1 - x0 + 1 < w);
                let frac = erased.len() as f32 / (h * w) as f32;
                prop_assert!(frac <= 0.33 * 2.5 + 2.0 / (h.min(w) as f32), "{}", frac);
            }
        }
    }

    #[test]
    fn the_erasing_probability_is_respected() {
        let t = RandomErasing::new(0.25);
        let mut rng = StdRng::seed_from_u64(5);
        let s = Sample {
            channels: 1,
            height: 32,
            width: 32,
            data: vec![1.0; 1024],
        };
        let erased = (0..2000)
            .filter(|_| t.apply(s.clone(), &mut rng).data.contains(&0.0))
            .count();
        // at 32 × 32 nearly every draw fits, so the share erased is close to p
        assert!((400..=600).contains(&erased), "{erased} of 2000");
        let never = RandomErasing::new(0.0);
        assert!((0..100).all(|_| never.apply(s.clone(), &mut rng) == s));
    }

    #[test]
    fn trivial_augment_draws_every_operation() {
        // identity aside, each op changes a textured image of mid-range values at a large
        // magnitude
        let mut s = image(3, 32, 32, 1);
        for v in &mut s.data {
            *v = (to_u8(*v) as f32 * 0.6 + 50.0).round() / 255.0;
        }
        for op in AugmentOp::ALL {
            let (m, _) = op.magnitude(30, 31);
            let out = op.apply(s.clone(), m);
            assert_eq!(out == s, op == AugmentOp::Identity, "{op:?}");
        }
        let ta = TrivialAugmentWide::default();
        let mut rng = StdRng::seed_from_u64(2);
        let changed = (0..300)
            .filter(|_| ta.apply(s.clone(), &mut rng) != s)
            .count();
        assert!(changed > 200, "{changed} of 300 changed");
    }

    #[test]
    fn posterize_solarize_and_equalize_match_their_definitions() {
        let s = Sample {
            channels: 1,
            height: 1,
            width: 4,
            data: vec![0.0, 100.0 / 255.0, 200.0 / 255.0, 1.0],
        };
        // 4 bits: values & 0xf0
        let p = AugmentOp::Posterize.apply(s.clone(), 4.0);
        assert_eq!(
            p.data,
            vec![0.0, 96.0 / 255.0, 192.0 / 255.0, 240.0 / 255.0]
        );
        assert_eq!(AugmentOp::Posterize.magnitude(0, 31).0, 8.0);
        assert_eq!(AugmentOp::Posterize.magnitude(30, 31).0, 2.0);
        let so = AugmentOp::Solarize.apply(s.clone(), 0.5);
        assert_eq!(so.data, vec![0.0, 100.0 / 255.0, 1.0 - 200.0 / 255.0, 0.0]);
        // two neighbouring values, half the pixels each, equalise to the extremes (PIL)
        let two = Sample {
            channels: 1,
            height: 32,
            width: 32,
            data: (0..1024).map(|i| (100 + i % 2) as f32 / 255.0).collect(),
        };
        let e = AugmentOp::Equalize.apply(two, 0.0);
        assert!(
            e.data.chunks(2).all(|p| p == [0.0, 1.0]),
            "{:?}",
            &e.data[..4]
        );
        let t = AugmentOp::TranslateX.apply(s.clone(), 1.0);
        assert_eq!(t.data, vec![0.0, 0.0, 100.0 / 255.0, 200.0 / 255.0]);
    }
}
