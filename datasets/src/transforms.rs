//! Seeded, composable image transforms on `f32` channels-first samples.
//!
//! A [`Pipeline`] scales 8-bit pixels to `[0, 1]` and then applies its steps in order.
//! Random steps draw from the `rng` they are handed; the loader seeds one per sample from
//! `(seed, epoch, sample index)`, so results do not depend on thread scheduling.

use rand::rngs::StdRng;
use rand::Rng;

use crate::Image;

/// Per-channel means and standard deviations of well-known datasets (after scaling to [0, 1]).
pub mod constants {
    /// CIFAR-10 training-set mean.
    pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
    /// CIFAR-10 training-set standard deviation.
    pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
    /// CIFAR-100 training-set mean.
    pub const CIFAR100_MEAN: [f32; 3] = [0.5071, 0.4865, 0.4409];
    /// CIFAR-100 training-set standard deviation.
    pub const CIFAR100_STD: [f32; 3] = [0.2673, 0.2564, 0.2762];
    /// ImageNet mean (torchvision).
    pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    /// ImageNet standard deviation (torchvision).
    pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
    /// MNIST mean.
    pub const MNIST_MEAN: [f32; 1] = [0.1307];
    /// MNIST standard deviation.
    pub const MNIST_STD: [f32; 1] = [0.3081];
    /// Fashion-MNIST mean.
    pub const FASHION_MNIST_MEAN: [f32; 1] = [0.2860];
    /// Fashion-MNIST standard deviation.
    pub const FASHION_MNIST_STD: [f32; 1] = [0.3530];
}

/// A channels-first `f32` image.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `channels * height * width` values.
    pub data: Vec<f32>,
}

impl Sample {
    fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// One step of a pipeline.
pub trait Transform: Send + Sync + std::fmt::Debug {
    /// Applies the step; random steps draw from `rng`.
    fn apply(&self, s: Sample, rng: &mut StdRng) -> Sample;
}

/// `(x - mean[c]) / std[c]`.
#[derive(Clone, Debug)]
pub struct Normalize {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl Transform for Normalize {
    fn apply(&self, mut s: Sample, _: &mut StdRng) -> Sample {
        let hw = s.height * s.width;
        for c in 0..s.channels {
            let (m, d) = (self.mean[c % self.mean.len()], self.std[c % self.std.len()]);
            for v in &mut s.data[c * hw..(c + 1) * hw] {
                *v = (*v - m) / d;
            }
        }
        s
    }
}

/// Zero-pads by `padding` on every side, then crops a random `size × size` window
/// (the standard CIFAR augmentation with `size` 32, `padding` 4).
#[derive(Clone, Debug)]
pub struct RandomCrop {
    /// Output height and width.
    pub size: usize,
    /// Zero padding added on every side first.
    pub padding: usize,
}

impl Transform for RandomCrop {
    fn apply(&self, s: Sample, rng: &mut StdRng) -> Sample {
        let (ph, pw) = (s.height + 2 * self.padding, s.width + 2 * self.padding);
        let top = rng.gen_range(0..=ph.saturating_sub(self.size));
        let left = rng.gen_range(0..=pw.saturating_sub(self.size));
        let pad = self.padding as isize;
        crop(&s, self.size, top as isize - pad, left as isize - pad)
    }
}

/// The `size × size` window of `s` whose top-left corner is at (`top`, `left`), which may
/// lie outside the image: positions outside it are zero.
fn crop(s: &Sample, size: usize, top: isize, left: isize) -> Sample {
    let mut out = vec![0.0; s.channels * size * size];
    for c in 0..s.channels {
        for y in 0..size {
            let sy = top + y as isize;
            if sy < 0 || sy >= s.height as isize {
                continue;
            }
            for x in 0..size {
                let sx = left + x as isize;
                if sx >= 0 && sx < s.width as isize {
                    out[(c * size + y) * size + x] = s.at(c, sy as usize, sx as usize);
                }
            }
        }
    }
    Sample {
        channels: s.channels,
        height: size,
        width: size,
        data: out,
    }
}

/// Mirrors left-right with probability `p`.
#[derive(Clone, Debug)]
pub struct RandomHorizontalFlip {
    /// Probability of flipping.
    pub p: f64,
}

impl Transform for RandomHorizontalFlip {
    fn apply(&self, mut s: Sample, rng: &mut StdRng) -> Sample {
        if rng.gen_bool(self.p) {
            for row in s.data.chunks_mut(s.width) {
                row.reverse();
            }
        }
        s
    }
}

/// Bilinear resampling of the window `(top, left, h, w)` to `out_h × out_w` (half-pixel
/// centres, as PyTorch's `align_corners=False`).
fn resample(s: &Sample, top: f32, left: f32, h: f32, w: f32, out_h: usize, out_w: usize) -> Sample {
    let mut out = vec![0.0; s.channels * out_h * out_w];
    let (sy, sx) = (h / out_h as f32, w / out_w as f32);
    for y in 0..out_h {
        let fy = (top + (y as f32 + 0.5) * sy - 0.5).clamp(0.0, (s.height - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
        let y1 = (y0 + 1).min(s.height - 1);
        for x in 0..out_w {
            let fx = (left + (x as f32 + 0.5) * sx - 0.5).clamp(0.0, (s.width - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
            let x1 = (x0 + 1).min(s.width - 1);
            for c in 0..s.channels {
                let a = s.at(c, y0, x0) * (1.0 - tx) + s.at(c, y0, x1) * tx;
                let b = s.at(c, y1, x0) * (1.0 - tx) + s.at(c, y1, x1) * tx;
                out[(c * out_h + y) * out_w + x] = a * (1.0 - ty) + b * ty;
            }
        }
    }
    Sample {
        channels: s.channels,
        height: out_h,
        width: out_w,
        data: out,
    }
}

/// Resizes so that the shorter side is `shorter`, keeping the aspect ratio (bilinear).
#[derive(Clone, Debug)]
pub struct Resize {
    /// Target length of the shorter side.
    pub shorter: usize,
}

impl Transform for Resize {
    fn apply(&self, s: Sample, _: &mut StdRng) -> Sample {
        let (h, w) = if s.height <= s.width {
            (
                self.shorter,
                (s.width * self.shorter).div_ceil(s.height).max(1),
            )
        } else {
            (
                (s.height * self.shorter).div_ceil(s.width).max(1),
                self.shorter,
            )
        };
        resample(&s, 0.0, 0.0, s.height as f32, s.width as f32, h, w)
    }
}

/// Crops the central `size × size` window (zero-pads when the image is smaller).
#[derive(Clone, Debug)]
pub struct CenterCrop {
    /// Output height and width.
    pub size: usize,
}

impl Transform for CenterCrop {
    fn apply(&self, s: Sample, _: &mut StdRng) -> Sample {
        let top = (s.height as isize - self.size as isize) / 2;
        let left = (s.width as isize - self.size as isize) / 2;
        crop(&s, self.size, top, left)
    }
}

/// torchvision's `RandomResizedCrop`: a window of random area fraction in `scale` and
/// aspect ratio in `ratio` (log-uniform), resized to `size × size`; after 10 failed draws,
/// the central crop of the clamped ratio.
#[derive(Clone, Debug)]
pub struct RandomResizedCrop {
    /// Output height and width.
    pub size: usize,
    /// Area fraction range, (0.08, 1.0) by default.
    pub scale: (f32, f32),
    /// Aspect-ratio range, (3/4, 4/3) by default.
    pub ratio: (f32, f32),
}

impl RandomResizedCrop {
    /// The ImageNet defaults at `size`.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, s: Sample, rng: &mut StdRng) -> Sample {
        let (h, w) = (s.height as f32, s.width as f32);
        let area = h * w;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.gen_range(self.scale.0..=self.scale.1);
            let ar = rng.gen_range(lr0..=lr1).exp();
            let cw = (target * ar).sqrt().round();
            let ch = (target / ar).sqrt().round();
            if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
                let top = rng.gen_range(0..=(h - ch) as usize) as f32;
                let left = rng.gen_range(0..=(w - cw) as usize) as f32;
                return resample(&s, top, left, ch, cw, self.size, self.size);
            }
        }
        let ar = w / h;
        let (cw, ch) = if ar < self.ratio.0 {
            (w, (w / self.ratio.0).round())
        } else if ar > self.ratio.1 {
            ((h * self.ratio.1).round(), h)
        } else {
            (w, h)
        };
        resample(
            &s,
            ((h - ch) / 2.0).floor(),
            ((w - cw) / 2.0).floor(),
            ch,
            cw,
            self.size,
            self.size,
        )
    }
}

/// Scales 8-bit pixels to `[0, 1]`, then runs its steps.
#[derive(Debug, Default)]
pub struct Pipeline {
    scale: f32,
    steps: Vec<Box<dyn Transform>>,
}

impl Pipeline {
    /// A pipeline for pixels whose full scale is `max_value` (255 for 8-bit images).
    pub fn new(max_value: f32) -> Self {
        Self {
            scale: 1.0 / max_value,
            steps: Vec::new(),
        }
    }
    /// Appends a step.
    pub fn then(mut self, t: impl Transform + 'static) -> Self {
        self.steps.push(Box::new(t));
        self
    }
    /// Runs the pipeline on one image.
    pub fn run(&self, img: &Image, rng: &mut StdRng) -> Sample {
        let mut s = Sample {
            channels: img.channels,
            height: img.height,
            width: img.width,
            data: img.data.iter().map(|&v| v as f32 * self.scale).collect(),
        };
        for t in &self.steps {
            s = t.apply(s, rng);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(c: usize, h: usize, w: usize) -> Sample {
        Sample {
            channels: c,
            height: h,
            width: w,
            data: (0..c * h * w).map(|i| i as f32).collect(),
        }
    }

    #[test]
    fn random_crop_with_padding_shifts_and_pads_with_zeros() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let s = RandomCrop {
                size: 4,
                padding: 1,
            }
            .apply(ramp(1, 4, 4), &mut rng);
            assert_eq!((s.height, s.width, s.data.len()), (4, 4, 16));
            // every value is either padding or a pixel of the source
            assert!(s
                .data
                .iter()
                .all(|&v| v == 0.0 || (v.fract() == 0.0 && v < 16.0)));
        }
    }

    #[test]
    fn flip_reverses_rows_and_normalize_uses_channel_constants() {
        let mut rng = StdRng::seed_from_u64(0);
        let s = RandomHorizontalFlip { p: 1.0 }.apply(ramp(1, 2, 3), &mut rng);
        assert_eq!(s.data, vec![2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
        let s = Normalize {
            mean: vec![1.0, 2.0],
            std: vec![2.0, 4.0],
        }
        .apply(ramp(2, 1, 2), &mut rng);
        assert_eq!(s.data, vec![-0.5, 0.0, 0.0, 0.25]);
    }

    #[test]
    fn resize_and_center_crop_keep_constant_images_constant() {
        let mut rng = StdRng::seed_from_u64(0);
        let s = Sample {
            channels: 3,
            height: 30,
            width: 50,
            data: vec![0.5; 3 * 30 * 50],
        };
        let r = Resize { shorter: 12 }.apply(s.clone(), &mut rng);
        assert_eq!((r.height, r.width), (12, 20));
        let c = CenterCrop { size: 10 }.apply(r, &mut rng);
        assert_eq!((c.height, c.width), (10, 10));
        assert!(c.data.iter().all(|&v| (v - 0.5).abs() < 1e-6));
        let rr = RandomResizedCrop::new(7).apply(s, &mut rng);
        assert_eq!(rr.data.len(), 3 * 49);
        assert!(rr.data.iter().all(|&v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn pipelines_are_deterministic_given_the_rng() {
        let p = Pipeline::new(255.0)
            .then(RandomResizedCrop::new(5))
            .then(RandomHorizontalFlip { p: 0.5 });
        let img = Image {
            channels: 1,
            height: 9,
            width: 9,
            data: (0..81).collect(),
        };
        let a = p.run(&img, &mut StdRng::seed_from_u64(7));
        let b = p.run(&img, &mut StdRng::seed_from_u64(7));
        assert_eq!(a, b);
    }
}
