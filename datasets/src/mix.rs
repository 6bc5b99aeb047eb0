//! Batch-level augmentation: mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019), as
//! torchvision's classification references apply them (`RandomMixUp` / `RandomCutMix`
//! under `RandomChoice`): each batch is mixed with itself rolled by one sample, with one
//! `λ ~ Beta(α, α)` per batch; the targets become `λ · onehot(y) + (1 − λ) · onehot(y')`.

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Beta, Distribution};

/// Which batch mixes are on; an α of 0 turns one off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MixConfig {
    /// Mixup's Beta parameter α (torchvision's V2 recipe: 0.2).
    pub mixup_alpha: f32,
    /// Cutmix's Beta parameter α (torchvision's V2 recipe: 1.0).
    pub cutmix_alpha: f32,
}

/// How a batch was mixed.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixed {
    /// The second label of each sample (the labels rolled by one).
    pub second: Vec<usize>,
    /// The weight of each sample's own label, in [0, 1]; for cutmix, the share of the
    /// image that kept its own pixels.
    pub lam: f32,
    /// Which mix was applied.
    pub kind: MixKind,
}

/// Mixup or cutmix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixKind {
    /// Pixel-wise blend of the two images.
    Mixup,
    /// A box of the rolled image pasted into each image.
    Cutmix,
}

impl MixConfig {
    /// Whether any mix is on.
    pub fn any(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }

    /// Checks the α values: finite and 0 or more.
    pub fn validate(&self) -> Result<(), String> {
        for (name, a) in [
            ("mixup-alpha", self.mixup_alpha),
            ("cutmix-alpha", self.cutmix_alpha),
        ] {
            if !a.is_finite() || a < 0.0 {
                return Err(format!(
                    "--{name} {a} is out of range: 0 (off) or a positive number"
                ));
            }
        }
        Ok(())
    }

    /// Mixes the `(N, C, H, W)` batch `data` in place (when both mixes are on, one of them
    /// chosen with equal odds) and returns the mixed targets; `None` when both are off or
    /// the batch has fewer than two samples.
    pub fn apply(
        &self,
        data: &mut [f32],
        shape: [usize; 4],
        labels: &[usize],
        rng: &mut StdRng,
    ) -> Option<Mixed> {
        let [n, c, h, w] = shape;
        debug_assert_eq!(data.len(), n * c * h * w);
        if !self.any() || n < 2 {
            return None;
        }
        let kind = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) if rng.gen_bool(0.5) => MixKind::Cutmix,
            (true, _) => MixKind::Mixup,
            _ => MixKind::Cutmix,
        };
        let alpha = match kind {
            MixKind::Mixup => self.mixup_alpha,
            MixKind::Cutmix => self.cutmix_alpha,
        };
        let lam = beta(alpha, rng);
        let per = c * h * w;
        // sample i is mixed with sample i - 1 (sample 0 with the last): the batch rolled by one
        let rolled: Vec<f32> = data[(n - 1) * per..]
            .iter()
            .chain(&data[..(n - 1) * per])
            .copied()
            .collect();
        let second: Vec<usize> = std::iter::once(labels[n - 1])
            .chain(labels[..n - 1].iter().copied())
            .collect();
        let lam = match kind {
            MixKind::Mixup => {
                for (d, r) in data.iter_mut().zip(&rolled) {
                    *d = lam * *d + (1.0 - lam) * r;
                }
                lam
            }
            MixKind::Cutmix => {
                // a box of (1 − λ) of the area at a uniform centre, clipped to the image;
                // λ is then the share actually kept
                let ratio = (1.0 - lam).sqrt();
                let (bw, bh) = ((w as f32 * ratio) as usize, (h as f32 * ratio) as usize);
                let (cx, cy) = (rng.gen_range(0..w), rng.gen_range(0..h));
                let x0 = cx.saturating_sub(bw / 2);
                let x1 = (cx + bw / 2).min(w);
                let y0 = cy.saturating_sub(bh / 2);
                let y1 = (cy + bh / 2).min(h);
                for (img, rimg) in data.chunks_mut(per).zip(rolled.chunks(per)) {
                    for ch in 0..c {
                        for y in y0..y1 {
                            let row = (ch * h + y) * w;
                            img[row + x0..row + x1].copy_from_slice(&rimg[row + x0..row + x1]);
                        }
                    }
                }
                1.0 - ((x1 - x0) * (y1 - y0)) as f32 / (w * h) as f32
            }
        };
        Some(Mixed { second, lam, kind })
    }
}

/// A draw from Beta(α, α), α > 0.
fn beta(alpha: f32, rng: &mut StdRng) -> f32 {
    match Beta::new(alpha, alpha) {
        Ok(d) => d.sample(rng).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn batch(n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        (0..n * c * h * w)
            .map(|i| (i / (c * h * w)) as f32 + 0.001 * (i % (c * h * w)) as f32)
            .collect()
    }

    proptest! {
        #[test]
        fn mixes_are_deterministic_convex_and_label_consistent(
            n in 2usize..6, c in 1usize..4, h in 1usize..9, w in 1usize..9,
            mixup in prop_oneof![Just(0.0f32), 0.05f32..2.0],
            cutmix in prop_oneof![Just(0.0f32), 0.05f32..2.0],
            seed in any::<u64>(),
        ) {
            let cfg = MixConfig { mixup_alpha: mixup, cutmix_alpha: cutmix };
            let shape = [n, c, h, w];
            let orig = batch(n, c, h, w);
            let labels: Vec<usize> = (0..n).map(|i| i * 7 % 5).collect();
            let (mut a, mut b) = (orig.clone(), orig.clone());
            let ma = cfg.apply(&mut a, shape, &labels, &mut StdRng::seed_from_u64(seed));
            let mb = cfg.apply(&mut b, shape, &labels, &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&ma, &mb);
            let Some(m) = ma else {
                prop_assert!(!cfg.any());
                prop_assert_eq!(a, orig);
                return Ok(());
            };
            prop_assert!(cfg.any());
            prop_assert!((0.0..=1.0).contains(&m.lam));
            if mixup == 0.0 {
                prop_assert_eq!(m.kind, MixKind::Cutmix);
            }
            if cutmix == 0.0 {
                prop_assert_eq!(m.kind, MixKind::Mixup);
            }
            let per = c * h * w;
            for i in 0..n {
                let j = (i + n - 1) % n;
                prop_assert_eq!(m.second[i], labels[j]);
                let (own, other) = (&orig[i * per..(i + 1) * per], &orig[j * per..(j + 1) * per]);
                let got = &a[i * per..(i + 1) * per];
                match m.kind {
                    MixKind::Mixup => {
                        for k in 0..per {
                            let want = m.lam * own[k] + (1.0 - m.lam) * other[k];
                            prop_assert!((got[k] - want).abs() < 1e-4);
                        }
                    }
                    MixKind::Cutmix => {
                        // every pixel is its own or the rolled one, and λ is the share kept
                        let kept = (0..per).filter(|&k| got[k] == own[k]).count();
                        prop_assert!((0..per).all(|k| got[k] == own[k] || got[k] == other[k]));
                        prop_assert!((kept as f32 / per as f32 - m.lam).abs() < 1e-5,
                            "kept {} of {}, lam {}", kept, per, m.lam);
                    }
                }
            }
        }
    }

    #[test]
    fn both_mixes_are_chosen_when_both_are_on() {
        let cfg = MixConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 1.0,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let kinds: Vec<MixKind> = (0..200)
            .map(|_| {
                let mut d = batch(4, 1, 8, 8);
                cfg.apply(&mut d, [4, 1, 8, 8], &[0, 1, 2, 3], &mut rng)
                    .unwrap()
                    .kind
            })
            .collect();
        let cut = kinds.iter().filter(|k| **k == MixKind::Cutmix).count();
        assert!((70..=130).contains(&cut), "{cut} cutmix of 200");
    }

    #[test]
    fn mixup_lambda_follows_its_beta_distribution() {
        // Beta(α, α) has mean 1/2 and variance 1 / (4 (2α + 1))
        let cfg = MixConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 0.0,
        };
        let mut rng = StdRng::seed_from_u64(9);
        let lams: Vec<f64> = (0..4000)
            .map(|_| {
                let mut d = vec![0.0; 2];
                cfg.apply(&mut d, [2, 1, 1, 1], &[0, 1], &mut rng)
                    .unwrap()
                    .lam as f64
            })
            .collect();
        let mean = lams.iter().sum::<f64>() / lams.len() as f64;
        let var = lams.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lams.len() as f64;
        assert!((mean - 0.5).abs() < 0.03, "mean {mean}");
        let want = 1.0 / (4.0 * (2.0 * 0.2 + 1.0));
        assert!((var - want).abs() < 0.02, "variance {var}, want {want}");
    }

    #[test]
    fn bad_alphas_are_named() {
        for (m, c, name) in [(-1.0, 0.0, "mixup-alpha"), (0.0, f32::NAN, "cutmix-alpha")] {
            let e = MixConfig {
                mixup_alpha: m,
                cutmix_alpha: c,
            }
            .validate()
            .unwrap_err();
            assert!(e.contains(name), "{e}");
        }
    }
}
