//! Exponential moving average of a model's weights, as torchvision's classification
//! references keep it (`ExponentialMovingAverage`, an `AveragedModel` with
//! `use_buffers=True`): every tensor, batch-norm running statistics included, follows
//! `ema = decay · ema + (1 − decay) · value`; the first update after a reset copies the
//! model; integer counters are copied.

use std::collections::BTreeMap;

use dfdx::prelude::*;

use crate::error::{shape_err, Error};
use crate::params::{ParamKind, ParamVisitor, ParamVisitorMut, Params};

/// The averaged tensors of a model, by torchvision name.
#[derive(Clone, Debug)]
pub struct Ema {
    decay: f32,
    values: BTreeMap<String, Vec<f32>>,
    counters: BTreeMap<String, u64>,
    n_averaged: u64,
}

impl Ema {
    /// An empty average with `decay` in [0, 1).
    pub fn new(decay: f32) -> Self {
        Self {
            decay,
            values: BTreeMap::new(),
            counters: BTreeMap::new(),
            n_averaged: 0,
        }
    }

    /// torchvision's adjustment of `--model-ema-decay` to the run: the decay per update
    /// when the average is updated every `every` steps of `batch` images for `epochs`
    /// epochs (`alpha = (1 − decay) · batch · every / epochs`, at most 1).
    pub fn adjusted_decay(decay: f32, batch: usize, every: usize, epochs: usize) -> f32 {
        let adjust = (batch * every) as f64 / epochs.max(1) as f64;
        let alpha = ((1.0 - decay as f64) * adjust).min(1.0);
        (1.0 - alpha) as f32
    }

    /// The decay per update.
    pub fn decay(&self) -> f32 {
        self.decay
    }

    /// Updates since the last reset (0: the next update copies the model).
    pub fn n_averaged(&self) -> u64 {
        self.n_averaged
    }

    /// Sets the update count (when a saved average is restored with [`Ema::copy`]).
    pub fn set_n_averaged(&mut self, n: u64) {
        self.n_averaged = n;
    }

    /// Makes the next update copy the model (torchvision resets during warm-up).
    pub fn reset(&mut self) {
        self.n_averaged = 0;
    }

    /// Folds the model's current tensors into the average.
    pub fn update<M: Params>(&mut self, model: &M) {
        let copy = self.n_averaged == 0;
        let Ok(()) = model.visit_params("", &mut Update { ema: self, copy });
        self.n_averaged += 1;
    }

    /// Replaces the average by the model's tensors, keeping the update count (restoring a
    /// saved average loaded into a model).
    pub fn copy<M: Params>(&mut self, model: &M) {
        let Ok(()) = model.visit_params(
            "",
            &mut Update {
                ema: self,
                copy: true,
            },
        );
    }

    /// Writes the average into `model` (another instance of the same architecture), to
    /// evaluate or save it. An average that lacks one of the model's tensors or has it at
    /// another size is an error, and `model` may then be partly written.
    pub fn write_to<M: Params>(&self, model: &mut M) -> Result<(), Error> {
        model.visit_params_mut("", &mut Write { ema: self })
    }
}

struct Update<'a> {
    ema: &'a mut Ema,
    copy: bool,
}

impl ParamVisitor for Update<'_> {
    type Error = std::convert::Infallible;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> Result<(), Self::Error> {
        let v = t.as_vec();
        let d = self.ema.decay;
        match self.ema.values.get_mut(name) {
            Some(avg) if !self.copy && avg.len() == v.len() => {
                for (a, x) in avg.iter_mut().zip(&v) {
                    *a = d * *a + (1.0 - d) * x;
                }
            }
            _ => {
                self.ema.values.insert(name.to_string(), v);
            }
        }
        Ok(())
    }
    fn counter(&mut self, name: &str, value: u64) -> Result<(), Self::Error> {
        self.ema.counters.insert(name.to_string(), value);
        Ok(())
    }
}

struct Write<'a> {
    ema: &'a Ema,
}

impl ParamVisitorMut for Write<'_> {
    type Error = Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> Result<(), Error> {
        match self.ema.values.get(name) {
            Some(v) if v.len() == t.shape().num_elements() => {
                t.copy_from(v);
                Ok(())
            }
            Some(v) => Err(shape_err(
                "ema",
                format!(
                    "`{name}` has {} values in the average, {} in the model",
                    v.len(),
                    t.shape().num_elements()
                ),
            )),
            None => Err(shape_err("ema", format!("the average has no `{name}`"))),
        }
    }
    fn counter(&mut self, name: &str, value: &mut u64) -> Result<(), Error> {
        if let Some(&c) = self.ema.counters.get(name) {
            *value = c;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use proptest::prelude::*;

    type Lin = Linear<2, Const<2>, f32, Cpu>;

    fn model(dev: &Cpu, v: &[f32]) -> Lin {
        Lin {
            weight: dev.tensor_from_vec(v[..4].to_vec(), (Const::<2>, Const::<2>)),
            bias: dev.tensor_from_vec(v[4..6].to_vec(), (Const::<2>,)),
        }
    }

    proptest! {
        /// Against the definition written out in f64: a reset (or the start) copies, each
        /// later update blends.
        #[test]
        fn the_average_follows_its_definition(
            decay in 0f32..0.9999,
            snapshots in prop::collection::vec(prop::collection::vec(-5f32..5.0, 6), 1..12),
            resets in prop::collection::vec(any::<bool>(), 12),
        ) {
            let dev = Cpu::default();
            let mut ema = Ema::new(decay);
            let mut want: Vec<f64> = Vec::new();
            for (k, snap) in snapshots.iter().enumerate() {
                if resets[k] {
                    ema.reset();
                }
                let copy = ema.n_averaged() == 0;
                ema.update(&model(&dev, snap));
                want = if copy {
                    snap.iter().map(|&v| v as f64).collect()
                } else {
                    want.iter()
                        .zip(snap)
                        .map(|(&a, &x)| decay as f64 * a + (1.0 - decay as f64) * x as f64)
                        .collect()
                };
            }
            let mut out = model(&dev, &[0.0; 6]);
            ema.write_to(&mut out).unwrap();
            let mut got = out.weight.as_vec();
            got.extend(out.bias.as_vec());
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{} vs {}", g, w);
            }
        }
    }

    #[test]
    fn the_adjusted_decay_is_torchvisions() {
        // torchvision's V2 recipe: decay 0.99998, 32 steps, batch 1024 (8 × 128), 600 epochs
        let d = Ema::adjusted_decay(0.99998, 1024, 32, 600);
        let want = 1.0 - (1.0 - 0.99998f32 as f64) * 1024.0 * 32.0 / 600.0;
        assert!((d as f64 - want).abs() < 1e-6, "{d} vs {want}");
        assert_eq!(Ema::adjusted_decay(0.5, 64, 32, 1), 0.0);
    }

    #[test]
    fn writing_an_average_of_another_model_is_an_error() {
        let dev = Cpu::default();
        let mut ema = Ema::new(0.9);
        ema.update(&model(&dev, &[1.0; 6]));
        let mut other: Linear<3, Const<2>, f32, Cpu> = Linear {
            weight: dev.zeros(),
            bias: dev.zeros(),
        };
        let e = ema.write_to(&mut other).unwrap_err().to_string();
        assert!(e.contains("weight"), "{e}");
    }
}
