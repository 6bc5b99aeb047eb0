//! Stochastic gradient descent with momentum, Nesterov and decoupled-from-BN weight decay,
//! with PyTorch's `torch.optim.SGD` update rule, and learning-rate schedules.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::Result;
use crate::ops::read;
use crate::params::{ParamKind, ParamVisitor, ParamVisitorMut, Params};
use crate::weights::WeightsError;

/// SGD hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (set per step by the schedule).
    pub lr: f32,
    /// Momentum factor μ (0 disables the buffer).
    pub momentum: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay λ, added to the gradient as λ·p.
    pub weight_decay: f32,
    /// Also decay batch-norm parameters and biases (off by default, as is usual for ResNets).
    pub decay_vectors: bool,
    /// Parameter groups: the first group whose prefix starts a parameter's name scales its
    /// learning rate; a scale of 0 freezes it (no update, no decay, no momentum buffer:
    /// the parameter stays bit-identical). Parameters in no group take the plain rate.
    pub groups: Vec<ParamGroup>,
}

/// A group of parameters by name prefix (`conv1.`, `layer3.`, `fc.`) and its
/// learning-rate multiplier.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    /// Name prefixes of the group's parameters.
    pub prefixes: Vec<String>,
    /// Multiplier of the learning rate; 0 freezes the group.
    pub lr_scale: f32,
}

impl SgdConfig {
    /// The learning-rate multiplier of the parameter `name`.
    pub fn lr_scale(&self, name: &str) -> f32 {
        self.groups
            .iter()
            .find(|g| g.prefixes.iter().any(|p| name.starts_with(p.as_str())))
            .map_or(1.0, |g| g.lr_scale)
    }
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            decay_vectors: false,
            groups: Vec::new(),
        }
    }
}

/// SGD with one momentum buffer per parameter, keyed by torchvision name.
///
/// Per parameter `p` with gradient `g`: `g += λ p` (if decayed); `b = μ b + g` (`b = g` on
/// the first step); `g = g + μ b` (Nesterov) or `g = b`; `p -= lr g`.
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Hyper-parameters.
    pub cfg: SgdConfig,
    buffers: BTreeMap<String, Vec<f32>>,
}

struct Step<'a> {
    cfg: &'a SgdConfig,
    buffers: &'a mut BTreeMap<String, Vec<f32>>,
    grads: &'a mut Gradients<f32, Cpu>,
}

impl ParamVisitorMut for Step<'_> {
    type Error = crate::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<()> {
        let scale = self.cfg.lr_scale(name);
        if kind == ParamKind::Buffer || scale == 0.0 {
            return Ok(());
        }
        let mut p = read(t);
        let grad = self.grads.get_or_alloc_mut(t)?;
        let decay = if kind == ParamKind::Weight || self.cfg.decay_vectors {
            self.cfg.weight_decay
        } else {
            0.0
        };
        let (mu, lr) = (self.cfg.momentum, self.cfg.lr * scale);
        let buf = if mu != 0.0 {
            let fresh = !self.buffers.contains_key(name);
            let b = self
                .buffers
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; p.len()]);
            Some((b, fresh))
        } else {
            None
        };
        let nesterov = self.cfg.nesterov;
        // chunks in parallel: the update streams 100 MB of weights, gradients and momentum
        // for ResNeXt-50, too much for one core's share of the memory bandwidth
        const CHUNK: usize = 1 << 14;
        match buf {
            Some((b, fresh)) => p
                .par_chunks_mut(CHUNK)
                .zip(grad.par_chunks(CHUNK))
                .zip(b.par_chunks_mut(CHUNK))
                .for_each(|((pc, gc), bc)| {
                    for ((pv, &gv), bv) in pc.iter_mut().zip(gc).zip(bc) {
                        let g = gv + decay * *pv;
                        *bv = if fresh { g } else { mu * *bv + g };
                        let step = if nesterov { g + mu * *bv } else { *bv };
                        *pv -= lr * step;
                    }
                }),
            None => p
                .par_chunks_mut(CHUNK)
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(pc, gc)| {
                    for (pv, &gv) in pc.iter_mut().zip(gc) {
                        *pv -= lr * (gv + decay * *pv);
                    }
                }),
        }
        t.copy_from(&p);
        Ok(())
    }
}

impl Sgd {
    /// A new optimiser with empty momentum buffers.
    pub fn new(cfg: SgdConfig) -> Self {
        Self {
            cfg,
            buffers: BTreeMap::new(),
        }
    }

    /// Updates every trainable tensor of `model` from its gradient in `grads`.
    pub fn step<M: Params>(
        &mut self,
        model: &mut M,
        grads: &mut Gradients<f32, Cpu>,
    ) -> Result<()> {
        let _t = crate::profile::scope(crate::profile::Label::SgdStep);
        model.visit_params_mut(
            "",
            &mut Step {
                cfg: &self.cfg,
                buffers: &mut self.buffers,
                grads,
            },
        )
    }

    /// The momentum buffers as safetensors bytes (`momentum.<name>`).
    pub fn state_bytes(&self) -> Result<Vec<u8>, WeightsError> {
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .buffers
            .iter()
            .map(|(n, b)| {
                (
                    format!("momentum.{n}"),
                    b.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    b.len(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(n, b, len)| TensorView::new(Dtype::F32, vec![*len], b).map(|v| (n.clone(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WeightsError::Serialize { msg: e.to_string() })?;
        safetensors::tensor::serialize(views, &None)
            .map_err(|e| WeightsError::Serialize { msg: e.to_string() })
    }

    /// Saves the momentum buffers atomically.
    pub fn save_state(&self, path: &Path) -> Result<(), WeightsError> {
        let bytes = self
            .state_bytes()
            .map_err(|e| crate::weights::unwritable(path, e))?;
        Ok(resnext_fs::write(path, &bytes)?)
    }

    /// Restores momentum buffers saved by [`Sgd::save_state`].
    pub fn load_state(&mut self, path: &Path) -> Result<(), WeightsError> {
        let bytes = resnext_fs::read_at_most(path, crate::weights::MAX_FILE_BYTES)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let mut buffers = BTreeMap::new();
        for (name, view) in st.tensors() {
            let Some(param) = name.strip_prefix("momentum.") else {
                return Err(WeightsError::Unexpected {
                    path: path.into(),
                    count: 1,
                    first: name,
                });
            };
            if view.dtype() != Dtype::F32 {
                return Err(WeightsError::Dtype {
                    path: path.into(),
                    name,
                    found: format!("{:?}", view.dtype()),
                    expected: "F32",
                });
            }
            buffers.insert(
                param.to_string(),
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        self.buffers = buffers;
        Ok(())
    }
}

impl Sgd {
    /// [`Sgd::load_state`], then checks the buffers against `model`: with momentum, one
    /// buffer of the right length per trainable tensor; without, none. Anything else (a
    /// state saved for another model, a truncated buffer) is an error naming the file and
    /// the buffer, and leaves this optimiser as it was.
    pub fn load_state_for<M: Params>(
        &mut self,
        path: &Path,
        model: &M,
    ) -> Result<(), WeightsError> {
        let mut loaded = Sgd::new(self.cfg.clone());
        loaded.load_state(path)?;
        let mut unmatched = loaded.buffers.clone();
        if self.cfg.momentum != 0.0 {
            model.visit_params(
                "",
                &mut MatchBuffers {
                    path,
                    cfg: &self.cfg,
                    unmatched: &mut unmatched,
                },
            )?;
        }
        if let Some(first) = unmatched.keys().next() {
            return Err(WeightsError::Unexpected {
                path: path.into(),
                count: unmatched.len(),
                first: format!("momentum.{first}"),
            });
        }
        self.buffers = loaded.buffers;
        Ok(())
    }
}

/// Takes each trainable tensor's momentum buffer out of `unmatched`, checking its length.
struct MatchBuffers<'a> {
    path: &'a Path,
    /// Frozen parameters have no buffer.
    cfg: &'a SgdConfig,
    unmatched: &'a mut BTreeMap<String, Vec<f32>>,
}

impl ParamVisitor for MatchBuffers<'_> {
    type Error = WeightsError;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<(), WeightsError> {
        if kind == ParamKind::Buffer || self.cfg.lr_scale(name) == 0.0 {
            return Ok(());
        }
        let want = t.shape().num_elements();
        match self.unmatched.remove(name) {
            Some(b) if b.len() == want => Ok(()),
            Some(b) => Err(WeightsError::Shape {
                path: self.path.into(),
                name: format!("momentum.{name}"),
                found: vec![b.len()],
                expected: vec![want],
            }),
            None => Err(WeightsError::Missing {
                path: self.path.into(),
                name: format!("momentum.{name}"),
                expected: vec![want],
            }),
        }
    }
}

/// Learning-rate schedules over epochs (with fractional progress inside an epoch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Multiply by `gamma` at each of `milestones` (fractions of the run: 0.5 and 0.75).
    Step {
        /// Factor per milestone.
        gamma: f32,
    },
    /// Cosine from the base rate to 0 over the run.
    Cosine,
}

impl Schedule {
    /// The rate at `epoch` (fractional) of `epochs`, with linear warm-up over `warmup` epochs.
    pub fn lr(self, base: f32, epoch: f32, epochs: usize, warmup: f32) -> f32 {
        if warmup > 0.0 && epoch < warmup {
            return base * (epoch + 1.0 / 64.0).min(warmup) / warmup;
        }
        let total = epochs.max(1) as f32;
        match self {
            Schedule::Step { gamma } => {
                let mut lr = base;
                for m in [0.5, 0.75] {
                    if epoch >= (m * total).floor() {
                        lr *= gamma;
                    }
                }
                lr
            }
            Schedule::Cosine => {
                let span = (total - warmup).max(1e-6);
                let t = ((epoch - warmup) / span).clamp(0.0, 1.0);
                base * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
            }
        }
    }
}
