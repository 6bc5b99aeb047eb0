//! The training loss: [`cross_entropy`] with label smoothing, and against the mixed
//! targets of mixup and cutmix ([`cross_entropy_mixed`]).

use dfdx::prelude::*;

use super::{read, record, Mat};
use crate::error::{shape_err, Result};
use crate::profile::Label;

/// Mean cross-entropy of `logits` (N × K) against class indices, with PyTorch's label
/// smoothing (the target puts `1 - ε + ε/K` on the label and `ε/K` elsewhere). Returns the
/// scalar loss; its gradient is `(softmax − target) / N`.
pub fn cross_entropy<K: Dim, T: Tape<f32, Cpu>>(
    logits: Mat<K, T>,
    targets: &[usize],
    label_smoothing: f32,
) -> Result<Tensor<Rank0, f32, Cpu, T>> {
    cross_entropy_mixed(logits, Targets::hard(targets, label_smoothing))
}

/// What a training batch is scored against: a class per row, optionally mixed with a
/// second class per row (mixup and cutmix: the target is `lam · onehot(a) + (1 − lam) ·
/// onehot(b)`, torchvision's convention), and label smoothing ε on top.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Targets<'a> {
    /// The class of each row.
    pub labels: &'a [usize],
    /// The second class of each row and the first one's weight `lam` in [0, 1].
    pub mixed: Option<(&'a [usize], f32)>,
    /// Label smoothing ε in [0, 1).
    pub label_smoothing: f32,
}

impl<'a> Targets<'a> {
    /// Plain labels with label smoothing.
    pub fn hard(labels: &'a [usize], label_smoothing: f32) -> Self {
        Self {
            labels,
            mixed: None,
            label_smoothing,
        }
    }

    /// An error unless these targets fit `n` rows of `k` classes: a label for each row,
    /// each below `k`, a mixing weight in [0, 1] and a label smoothing in [0, 1).
    pub fn validate(&self, n: usize, k: usize) -> Result<()> {
        let rows = |t: &[usize], what: &str| -> Result<()> {
            if t.len() != n {
                return Err(shape_err(
                    "cross_entropy",
                    format!("{} {what} for a batch of {n}", t.len()),
                ));
            }
            if let Some(c) = t.iter().find(|&&c| c >= k) {
                return Err(shape_err(
                    "cross_entropy",
                    format!("target class {c} is out of range for {k} classes"),
                ));
            }
            Ok(())
        };
        rows(self.labels, "targets")?;
        if let Some((b, lam)) = self.mixed {
            rows(b, "mixed targets")?;
            if !(0.0..=1.0).contains(&lam) {
                return Err(shape_err(
                    "cross_entropy",
                    format!("the mixing weight {lam} is not in [0, 1]"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(shape_err(
                "cross_entropy",
                format!("label smoothing {} is not in [0, 1)", self.label_smoothing),
            ));
        }
        Ok(())
    }

    /// The target probability of class `j` in row `row` of `k` classes.
    fn q(&self, row: usize, j: usize, k: usize) -> f64 {
        let eps = self.label_smoothing as f64;
        let hit = |c: usize| if c == j { 1.0 } else { 0.0 };
        let one = match self.mixed {
            None => hit(self.labels[row]),
            Some((b, lam)) => {
                let lam = lam as f64;
                lam * hit(self.labels[row]) + (1.0 - lam) * hit(b[row])
            }
        };
        eps / k as f64 + (1.0 - eps) * one
    }
}

/// [`cross_entropy`] against [`Targets`]: soft targets of two classes per row (mixup,
/// cutmix) with label smoothing. The gradient is `(softmax − target) / N`.
pub fn cross_entropy_mixed<K: Dim, T: Tape<f32, Cpu>>(
    logits: Mat<K, T>,
    targets: Targets<'_>,
) -> Result<Tensor<Rank0, f32, Cpu, T>> {
    let &(n, k) = logits.shape();
    let k = k.size();
    let label_smoothing = targets.label_smoothing;
    targets.validate(n, k)?;
    let z = read(&logits);
    let mut probs = vec![0.0f32; z.len()];
    let mut loss = 0.0f64;
    for (row, (zr, pr)) in z
        .chunks(k.max(1))
        .zip(probs.chunks_mut(k.max(1)))
        .enumerate()
    {
        let max = zr.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + zr.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        for (j, (&v, p)) in zr.iter().zip(pr.iter_mut()).enumerate() {
            let logp = v as f64 - lse;
            *p = logp.exp() as f32;
            loss -= targets.q(row, j, k) * logp;
        }
    }
    let dev = logits.device().clone();
    let (logits, tape) = logits.split_tape();
    let loss = vec![(loss / n.max(1) as f64) as f32];
    let labels = targets.labels.to_vec();
    let mixed = targets.mixed.map(|(b, lam)| (b.to_vec(), lam));
    let lg = logits.ghost();
    record(
        &dev,
        loss,
        (),
        tape,
        Label::CrossEntropy,
        move |dl, grads| {
            let targets = Targets {
                labels: &labels,
                mixed: mixed.as_ref().map(|(b, lam)| (b.as_slice(), *lam)),
                label_smoothing,
            };
            let scale = dl[0] / n.max(1) as f32;
            let g = grads.get_or_alloc_mut(&lg)?;
            for (row, (gr, pr)) in g
                .chunks_mut(k.max(1))
                .zip(probs.chunks(k.max(1)))
                .enumerate()
            {
                for (j, (gv, &p)) in gr.iter_mut().zip(pr).enumerate() {
                    *gv += scale * (p - targets.q(row, j, k) as f32);
                }
            }
            Ok(())
        },
    )
}
