//! The training loss: [`cross_entropy`] with label smoothing.

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
    let &(n, k) = logits.shape();
    let k = k.size();
    if targets.len() != n {
        return Err(shape_err(
            "cross_entropy",
            format!("{} targets for a batch of {n}", targets.len()),
        ));
    }
    if let Some(t) = targets.iter().find(|&&t| t >= k) {
        return Err(shape_err(
            "cross_entropy",
            format!("target class {t} is out of range for {k} classes"),
        ));
    }
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(shape_err(
            "cross_entropy",
            format!("label smoothing {label_smoothing} is not in [0, 1)"),
        ));
    }
    let z = read(&logits);
    let mut probs = vec![0.0f32; z.len()];
    let mut loss = 0.0f64;
    let off = label_smoothing as f64 / k as f64;
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
            let q = off
                + if j == targets[row] {
                    1.0 - label_smoothing as f64
                } else {
                    0.0
                };
            loss -= q * logp;
        }
    }
    let dev = logits.device().clone();
    let (logits, tape) = logits.split_tape();
    let loss = vec![(loss / n.max(1) as f64) as f32];
    let targets = targets.to_vec();
    let lg = logits.ghost();
    record(
        &dev,
        loss,
        (),
        tape,
        Label::CrossEntropy,
        move |dl, grads| {
            let scale = dl[0] / n.max(1) as f32;
            let g = grads.get_or_alloc_mut(&lg)?;
            for (row, (gr, pr)) in g
                .chunks_mut(k.max(1))
                .zip(probs.chunks(k.max(1)))
                .enumerate()
            {
                for (j, (gv, &p)) in gr.iter_mut().zip(pr).enumerate() {
                    let q = off as f32
                        + if j == targets[row] {
                            1.0 - label_smoothing
                        } else {
                            0.0
                        };
                    *gv += scale * (p - q);
                }
            }
            Ok(())
        },
    )
}
