//! The optimisers, with PyTorch's update rules: SGD with momentum, Nesterov and L2 weight
//! decay (`torch.optim.SGD`), and AdamW with decoupled weight decay (`torch.optim.AdamW`);
//! parameter groups, gradient-norm clipping, and learning-rate schedules.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::Result;
use crate::params::{ParamKind, ParamVisitor, ParamVisitorMut, Params};
use crate::weights::WeightsError;

/// The update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Algorithm {
    /// SGD: `momentum` and `nesterov` of [`OptimConfig`] apply; weight decay is L2 (added
    /// to the gradient).
    Sgd,
    /// AdamW (Loshchilov & Hutter 2019): weight decay is decoupled (`p -= lr·λ·p`), the
    /// step is `lr · m̂ / (√v̂ + eps)` with bias-corrected moments.
    AdamW {
        /// Decay of the first moment (PyTorch: 0.9).
        beta1: f32,
        /// Decay of the second moment (PyTorch: 0.999).
        beta2: f32,
        /// Added to the denominator (PyTorch: 1e-8).
        eps: f32,
    },
}

impl Algorithm {
    /// AdamW with PyTorch's default betas and eps.
    pub const ADAMW: Algorithm = Algorithm::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
}

/// Optimiser hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    /// The update rule.
    pub algorithm: Algorithm,
    /// Learning rate (set per step by the schedule).
    pub lr: f32,
    /// SGD's momentum factor μ (0 disables the buffer).
    pub momentum: f32,
    /// SGD's Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay λ: L2 for SGD, decoupled for AdamW.
    pub weight_decay: f32,
    /// Also decay batch-norm parameters and biases (off by default, as is usual for ResNets).
    pub decay_vectors: bool,
    /// Parameter groups: the first group whose prefix starts a parameter's name scales its
    /// learning rate; a scale of 0 freezes it (no update, no decay, no state: the parameter
    /// stays bit-identical). Parameters in no group take the plain rate.
    pub groups: Vec<ParamGroup>,
    /// Scale all gradients down together when their global L2 norm exceeds this
    /// (`torch.nn.utils.clip_grad_norm_`); frozen parameters do not count.
    pub clip_grad_norm: Option<f32>,
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

impl OptimConfig {
    /// The learning-rate multiplier of the parameter `name`.
    pub fn lr_scale(&self, name: &str) -> f32 {
        self.groups
            .iter()
            .find(|g| g.prefixes.iter().any(|p| name.starts_with(p.as_str())))
            .map_or(1.0, |g| g.lr_scale)
    }

    /// Whether the optimiser updates (and keeps state for) the tensor `name` of `kind`: a
    /// trainable tensor outside every frozen group.
    pub fn updates(&self, name: &str, kind: ParamKind) -> bool {
        self.rates(name, kind).is_some()
    }

    /// The learning rate and weight decay of the tensor `name` of `kind`: none when the
    /// optimiser leaves it alone ([`OptimConfig::updates`]).
    pub(crate) fn rates(&self, name: &str, kind: ParamKind) -> Option<(f32, f32)> {
        let scale = self.lr_scale(name);
        if kind == ParamKind::Buffer || scale == 0.0 {
            return None;
        }
        let decay = if kind == ParamKind::Weight || self.decay_vectors {
            self.weight_decay
        } else {
            0.0
        };
        Some((self.lr * scale, decay))
    }

    /// The state slots each trainable parameter has, as name prefixes of the saved state.
    pub(crate) fn slots(&self) -> &'static [&'static str] {
        match self.algorithm {
            Algorithm::Sgd if self.momentum != 0.0 => &["momentum"],
            Algorithm::Sgd => &[],
            Algorithm::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Sgd,
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            decay_vectors: false,
            groups: Vec::new(),
            clip_grad_norm: None,
        }
    }
}

/// An optimiser: its configuration and its per-parameter state, keyed by torchvision name
/// (SGD: one momentum buffer; AdamW: the two moments) and the number of steps taken.
///
/// SGD, per parameter `p` with gradient `g`: `g += λ p` (if decayed); `b = μ b + g`
/// (`b = g` on the first step); `g = g + μ b` (Nesterov) or `g = b`; `p -= lr g`.
///
/// AdamW, at step `t`: `p -= lr λ p` (if decayed); `m = β1 m + (1-β1) g`;
/// `v = β2 v + (1-β2) g²`; `p -= lr/(1-β1^t) · m / (√v/√(1-β2^t) + eps)`.
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// Hyper-parameters.
    pub cfg: OptimConfig,
    /// `slot.name` → values (`momentum.layer1.0.conv1.weight`).
    state: BTreeMap<String, Vec<f32>>,
    /// Steps taken (AdamW's bias correction).
    steps: u64,
}

/// The sum of squares of the trainable gradients.
struct GradNorm<'a> {
    cfg: &'a OptimConfig,
    grads: &'a mut Gradients<f32, Cpu>,
    sum: f64,
}

impl ParamVisitor for GradNorm<'_> {
    type Error = crate::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<()> {
        if !self.cfg.updates(name, kind) {
            return Ok(());
        }
        let g = self.grads.get_or_alloc_mut(t)?;
        self.sum += g
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
            .sum::<f64>();
        Ok(())
    }
}

/// AdamW's per-step factors at step `t` (from 1): `p *= shrink`, then
/// `p -= step_size · m / (√v / bc2_sqrt + eps)`.
pub(crate) struct AdamScales {
    /// `lr / (1 − β1^t)`.
    pub(crate) step_size: f32,
    /// `√(1 − β2^t)`.
    pub(crate) bc2_sqrt: f32,
    /// `1 − lr·λ` (decoupled weight decay).
    pub(crate) shrink: f32,
}

impl AdamScales {
    pub(crate) fn at(t: u64, lr: f32, decay: f32, beta1: f32, beta2: f32) -> Self {
        let t = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (beta1 as f64).powi(t);
        let bc2 = 1.0 - (beta2 as f64).powi(t);
        Self {
            step_size: (lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            shrink: 1.0 - lr * decay,
        }
    }
}

struct Step<'a> {
    cfg: &'a OptimConfig,
    state: &'a mut BTreeMap<String, Vec<f32>>,
    grads: &'a mut Gradients<f32, Cpu>,
    /// The step being taken, from 1.
    t: u64,
    /// Gradient multiplier from clipping (1 without).
    clip: f32,
    /// The parameter being updated, copied out of its tensor (dfdx gives no in-place
    /// access); one buffer for all parameters, so no fresh memory is filled per tensor.
    scratch: Vec<f32>,
}

/// Takes the slot `slot` of `name` out of `state` (zeros of `len` when new), and whether
/// it was new.
fn take_slot(
    state: &mut BTreeMap<String, Vec<f32>>,
    slot: &str,
    name: &str,
    len: usize,
) -> (Vec<f32>, bool) {
    match state.remove(&format!("{slot}.{name}")) {
        Some(v) => (v, false),
        None => (vec![0.0; len], true),
    }
}

impl ParamVisitorMut for Step<'_> {
    type Error = crate::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<()> {
        let Some((lr, decay)) = self.cfg.rates(name, kind) else {
            return Ok(());
        };
        let n = t.shape().num_elements();
        if self.scratch.len() < n {
            self.scratch.resize(n, 0.0);
        }
        let p = &mut self.scratch[..n];
        t.copy_into(p);
        let grad = self.grads.get_or_alloc_mut(t)?;
        let clip = self.clip;
        // chunks in parallel: the update streams 100 MB of weights, gradients and momentum
        // for ResNeXt-50, too much for one core's share of the memory bandwidth
        const CHUNK: usize = 1 << 14;
        match self.cfg.algorithm {
            Algorithm::Sgd if self.cfg.momentum != 0.0 => {
                let (mu, nesterov) = (self.cfg.momentum, self.cfg.nesterov);
                let (mut b, fresh) = take_slot(self.state, "momentum", name, p.len());
                p.par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .zip(b.par_chunks_mut(CHUNK))
                    .for_each(|((pc, gc), bc)| {
                        for ((pv, &gv), bv) in pc.iter_mut().zip(gc).zip(bc) {
                            let g = gv * clip + decay * *pv;
                            *bv = if fresh { g } else { mu * *bv + g };
                            let step = if nesterov { g + mu * *bv } else { *bv };
                            *pv -= lr * step;
                        }
                    });
                self.state.insert(format!("momentum.{name}"), b);
            }
            Algorithm::Sgd => p
                .par_chunks_mut(CHUNK)
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(pc, gc)| {
                    for (pv, &gv) in pc.iter_mut().zip(gc) {
                        *pv -= lr * (gv * clip + decay * *pv);
                    }
                }),
            Algorithm::AdamW { beta1, beta2, eps } => {
                let (mut m, _) = take_slot(self.state, "exp_avg", name, p.len());
                let (mut v, _) = take_slot(self.state, "exp_avg_sq", name, p.len());
                let AdamScales {
                    step_size,
                    bc2_sqrt,
                    shrink,
                } = AdamScales::at(self.t, lr, decay, beta1, beta2);
                p.par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                    .for_each(|((pc, gc), (mc, vc))| {
                        for (((pv, &gv), mv), vv) in pc.iter_mut().zip(gc).zip(mc).zip(vc) {
                            let g = gv * clip;
                            *pv *= shrink;
                            *mv = beta1 * *mv + (1.0 - beta1) * g;
                            *vv = beta2 * *vv + (1.0 - beta2) * g * g;
                            *pv -= step_size * *mv / (vv.sqrt() / bc2_sqrt + eps);
                        }
                    });
                self.state.insert(format!("exp_avg.{name}"), m);
                self.state.insert(format!("exp_avg_sq.{name}"), v);
            }
        }
        t.copy_from(p);
        Ok(())
    }
}

impl Optimizer {
    /// A new optimiser with empty state.
    pub fn new(cfg: OptimConfig) -> Self {
        Self {
            cfg,
            state: BTreeMap::new(),
            steps: 0,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Counts a step taken elsewhere (on a GPU, with the state there): the new count.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn advance(&mut self) -> u64 {
        self.steps += 1;
        self.steps
    }

    /// The state `slot.name` (`momentum.layer1.0.conv1.weight`), if there is one.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn state(&self, key: &str) -> Option<&Vec<f32>> {
        self.state.get(key)
    }

    /// Sets the state `slot.name` (copied back from a GPU).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn set_state(&mut self, key: String, values: Vec<f32>) {
        self.state.insert(key, values);
    }

    /// Updates every trainable tensor of `model` from its gradient in `grads` (clipped first
    /// when [`OptimConfig::clip_grad_norm`] is set). Returns the gradients' global L2 norm
    /// before clipping when clipping is on, else `None`.
    pub fn step<M: Params>(
        &mut self,
        model: &mut M,
        grads: &mut Gradients<f32, Cpu>,
    ) -> Result<Option<f32>> {
        let _t = crate::profile::scope(crate::profile::Label::SgdStep);
        let (clip, norm) = match self.cfg.clip_grad_norm {
            Some(max) => {
                let mut n = GradNorm {
                    cfg: &self.cfg,
                    grads: &mut *grads,
                    sum: 0.0,
                };
                model.visit_params("", &mut n)?;
                let norm = n.sum.sqrt() as f32;
                if !norm.is_finite() {
                    return Err(crate::Error::NonFinite(format!(
                        "the gradient norm is {norm}; no parameter was updated"
                    )));
                }
                // as torch: max / (norm + 1e-6), never above 1
                (
                    ((max as f64) / (n.sum.sqrt() + 1e-6)).min(1.0) as f32,
                    Some(norm),
                )
            }
            None => (1.0, None),
        };
        self.steps += 1;
        model.visit_params_mut(
            "",
            &mut Step {
                cfg: &self.cfg,
                state: &mut self.state,
                grads,
                t: self.steps,
                clip,
                scratch: Vec::new(),
            },
        )?;
        Ok(norm)
    }

    /// The state as safetensors bytes: `<slot>.<name>` f32 tensors and the step count as
    /// the one-element i64 tensor `step`.
    pub fn state_bytes(&self) -> Result<Vec<u8>, WeightsError> {
        let steps = (self.steps as i64).to_le_bytes();
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .state
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    b.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    b.len(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(n, b, len)| TensorView::new(Dtype::F32, vec![*len], b).map(|v| (n.clone(), v)))
            .chain(std::iter::once(
                TensorView::new(Dtype::I64, vec![1], &steps).map(|v| ("step".to_string(), v)),
            ))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WeightsError::Serialize { msg: e.to_string() })?;
        safetensors::tensor::serialize(views, &None)
            .map_err(|e| WeightsError::Serialize { msg: e.to_string() })
    }

    /// Saves the state atomically.
    pub fn save_state(&self, path: &Path) -> Result<(), WeightsError> {
        let bytes = self
            .state_bytes()
            .map_err(|e| crate::weights::unwritable(path, e))?;
        Ok(resnext_fs::write(path, &bytes)?)
    }

    /// Restores state saved by [`Optimizer::save_state`] (a file without `step`, as SGD
    /// wrote before it was saved, counts as step 0). Checks dtypes and names, not that the
    /// state fits a model: [`Optimizer::load_state_for`] does.
    pub fn load_state(&mut self, path: &Path) -> Result<(), WeightsError> {
        let bytes = resnext_fs::read_at_most(path, crate::weights::MAX_FILE_BYTES)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let slots = self.cfg.slots();
        let mut state = BTreeMap::new();
        let mut steps = 0u64;
        for (name, view) in st.tensors() {
            if name == "step" {
                if view.dtype() != Dtype::I64 || view.shape() != [1] {
                    return Err(WeightsError::Dtype {
                        path: path.into(),
                        name,
                        found: format!("{:?} {:?}", view.dtype(), view.shape()),
                        expected: "I64 of shape [1]",
                    });
                }
                let v = i64::from_le_bytes(view.data()[..8].try_into().expect("8 bytes"));
                steps = u64::try_from(v).map_err(|_| WeightsError::Value {
                    path: path.into(),
                    name: name.clone(),
                    what: format!("a negative step count ({v})"),
                    index: 0,
                })?;
                continue;
            }
            if !slots.iter().any(|s| {
                name.strip_prefix(s)
                    .is_some_and(|rest| rest.starts_with('.'))
            }) {
                return Err(WeightsError::Unexpected {
                    path: path.into(),
                    count: 1,
                    first: name,
                });
            }
            if view.dtype() != Dtype::F32 {
                return Err(WeightsError::Dtype {
                    path: path.into(),
                    name,
                    found: format!("{:?}", view.dtype()),
                    expected: "F32",
                });
            }
            state.insert(
                name,
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        if matches!(self.cfg.algorithm, Algorithm::AdamW { .. }) && steps == 0 && !state.is_empty()
        {
            return Err(WeightsError::Missing {
                path: path.into(),
                name: "step".into(),
                expected: vec![1],
            });
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }

    /// [`Optimizer::load_state`], then checks the state against `model`: each trainable
    /// tensor has every slot of the algorithm (SGD with momentum: `momentum`; AdamW:
    /// `exp_avg` and `exp_avg_sq`) at the right length, and nothing else is there. Anything
    /// else (a state saved for another model or another algorithm, a truncated buffer) is
    /// an error naming the file and the tensor, and leaves this optimiser as it was.
    pub fn load_state_for<M: Params>(
        &mut self,
        path: &Path,
        model: &M,
    ) -> Result<(), WeightsError> {
        let mut loaded = Optimizer::new(self.cfg.clone());
        loaded.load_state(path)?;
        let mut unmatched = loaded.state.clone();
        model.visit_params(
            "",
            &mut MatchBuffers {
                path,
                cfg: &self.cfg,
                unmatched: &mut unmatched,
            },
        )?;
        if let Some(first) = unmatched.keys().next() {
            return Err(WeightsError::Unexpected {
                path: path.into(),
                count: unmatched.len(),
                first: first.clone(),
            });
        }
        *self = loaded;
        Ok(())
    }
}

/// Takes each trainable tensor's state slots out of `unmatched`, checking their lengths.
struct MatchBuffers<'a> {
    path: &'a Path,
    /// Frozen parameters have no state.
    cfg: &'a OptimConfig,
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
        if !self.cfg.updates(name, kind) {
            return Ok(());
        }
        let want = t.shape().num_elements();
        for slot in self.cfg.slots() {
            let key = format!("{slot}.{name}");
            match self.unmatched.remove(&key) {
                Some(b) if b.len() == want => {}
                Some(b) => {
                    return Err(WeightsError::Shape {
                        path: self.path.into(),
                        name: key,
                        found: vec![b.len()],
                        expected: vec![want],
                    })
                }
                None => {
                    return Err(WeightsError::Missing {
                        path: self.path.into(),
                        name: key,
                        expected: vec![want],
                    })
                }
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use proptest::prelude::*;

    type Lin = Linear<3, Const<2>, f32, Cpu>;

    fn model(dev: &Cpu, values: &[f32]) -> Lin {
        Lin {
            weight: dev.tensor_from_vec(values[..6].to_vec(), (Const::<2>, Const::<3>)),
            bias: dev.tensor_from_vec(values[6..8].to_vec(), (Const::<2>,)),
        }
    }

    fn flat(m: &Lin) -> Vec<f32> {
        let mut v = m.weight.as_vec();
        v.extend(m.bias.as_vec());
        v
    }

    /// One step of `opt` on `m` with the gradient `g` (weight's 6 values, then bias's 2).
    fn step(opt: &mut Optimizer, m: &mut Lin, g: &[f32]) -> Option<f32> {
        let mut grads = Gradients::leaky();
        grads
            .get_or_alloc_mut(&m.weight)
            .unwrap()
            .copy_from_slice(&g[..6]);
        grads
            .get_or_alloc_mut(&m.bias)
            .unwrap()
            .copy_from_slice(&g[6..]);
        opt.step(m, &mut grads).unwrap()
    }

    /// The update rules written out per scalar in f64, from the papers and PyTorch's
    /// documentation: the reference the optimiser is checked against.
    #[allow(clippy::too_many_arguments)]
    fn reference(cfg: &OptimConfig, p0: &[f32], grads: &[Vec<f32>], bias_scale: f32) -> Vec<f64> {
        let mut p: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0f64; 8], vec![0f64; 8]);
        for (t, g) in grads.iter().enumerate() {
            // frozen parameters do not count in the norm
            let norm = g
                .iter()
                .enumerate()
                .filter(|&(i, _)| i < 6 || bias_scale != 0.0)
                .map(|(_, &x)| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let clip = cfg
                .clip_grad_norm
                .map_or(1.0, |c| (c as f64 / (norm + 1e-6)).min(1.0));
            for i in 0..8 {
                let vector = i >= 6;
                let lr = cfg.lr as f64 * if vector { bias_scale as f64 } else { 1.0 };
                if lr == 0.0 {
                    continue;
                }
                let wd = if !vector || cfg.decay_vectors {
                    cfg.weight_decay as f64
                } else {
                    0.0
                };
                let gi = g[i] as f64 * clip;
                match cfg.algorithm {
                    Algorithm::Sgd => {
                        let mu = cfg.momentum as f64;
                        let d = gi + wd * p[i];
                        m[i] = if t == 0 { d } else { mu * m[i] + d };
                        let s = if cfg.nesterov { d + mu * m[i] } else { m[i] };
                        p[i] -= lr * if mu == 0.0 { d } else { s };
                    }
                    Algorithm::AdamW { beta1, beta2, eps } => {
                        let (b1, b2) = (beta1 as f64, beta2 as f64);
                        p[i] *= 1.0 - lr * wd;
                        m[i] = b1 * m[i] + (1.0 - b1) * gi;
                        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                        let mhat = m[i] / (1.0 - b1.powi(t as i32 + 1));
                        let vhat = v[i] / (1.0 - b2.powi(t as i32 + 1));
                        p[i] -= lr * mhat / (vhat.sqrt() + eps as f64);
                    }
                }
            }
        }
        p
    }

    fn config() -> impl Strategy<Value = (OptimConfig, f32)> {
        (
            prop_oneof![
                Just(Algorithm::Sgd),
                (0.5f32..0.95, 0.9f32..0.9999, 1e-8f32..1e-3)
                    .prop_map(|(beta1, beta2, eps)| Algorithm::AdamW { beta1, beta2, eps }),
            ],
            (
                1e-3f32..0.5,
                prop_oneof![Just(0.0f32), 0.1f32..0.95],
                any::<bool>(),
            ),
            (0f32..0.1, any::<bool>()),
            prop::option::of(0.05f32..3.0),
            prop_oneof![Just(1.0f32), Just(0.0), 0.1f32..2.0],
        )
            .prop_map(
                |(algorithm, (lr, momentum, nesterov), (weight_decay, decay_vectors), clip, bs)| {
                    let cfg = OptimConfig {
                        algorithm,
                        lr,
                        momentum,
                        nesterov: nesterov && momentum > 0.0,
                        weight_decay,
                        decay_vectors,
                        groups: vec![ParamGroup {
                            prefixes: vec!["bias".into()],
                            lr_scale: bs,
                        }],
                        clip_grad_norm: clip,
                    };
                    (cfg, bs)
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn steps_match_the_reference_update_rules(
            (cfg, bias_scale) in config(),
            p0 in prop::collection::vec(-2f32..2.0, 8),
            grads in prop::collection::vec(prop::collection::vec(-3f32..3.0, 8), 1..6),
        ) {
            let dev = Cpu::default();
            let mut m = model(&dev, &p0);
            let mut opt = Optimizer::new(cfg.clone());
            for g in &grads {
                let norm = step(&mut opt, &mut m, g);
                prop_assert_eq!(norm.is_some(), cfg.clip_grad_norm.is_some());
            }
            let want = reference(&cfg, &p0, &grads, bias_scale);
            for (i, (&got, &want)) in flat(&m).iter().zip(&want).enumerate() {
                prop_assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "value {i}: {got} vs {want} ({cfg:?})"
                );
            }
            if bias_scale == 0.0 {
                prop_assert_eq!(m.bias.as_vec(), p0[6..].to_vec(), "a frozen group moved");
            }
        }

        #[test]
        fn state_round_trips_and_a_resumed_run_matches_an_uninterrupted_one(
            (cfg, _) in config(),
            p0 in prop::collection::vec(-2f32..2.0, 8),
            grads in prop::collection::vec(prop::collection::vec(-3f32..3.0, 8), 2..6),
            split in 1usize..5,
        ) {
            let split = split.min(grads.len() - 1);
            let dev = Cpu::default();
            let (mut a, mut b) = (model(&dev, &p0), model(&dev, &p0));
            let mut whole = Optimizer::new(cfg.clone());
            for g in &grads {
                step(&mut whole, &mut a, g);
            }
            let mut first = Optimizer::new(cfg.clone());
            for g in &grads[..split] {
                step(&mut first, &mut b, g);
            }
            let dir = std::env::temp_dir().join(format!("resnext-optim-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("state-{split}-{}.safetensors", grads.len()));
            first.save_state(&path).unwrap();
            let mut resumed = Optimizer::new(cfg.clone());
            resumed.load_state_for(&path, &b).unwrap();
            std::fs::remove_file(&path).unwrap();
            prop_assert_eq!(resumed.steps(), split as u64);
            for g in &grads[split..] {
                step(&mut resumed, &mut b, g);
            }
            prop_assert_eq!(flat(&a), flat(&b));
        }
    }

    #[test]
    fn a_state_of_another_algorithm_is_refused_and_leaves_the_optimiser_as_it_was() {
        let dev = Cpu::default();
        let mut m = model(&dev, &[0.5; 8]);
        let mut sgd = Optimizer::new(OptimConfig::default());
        step(&mut sgd, &mut m, &[1.0; 8]);
        let path =
            std::env::temp_dir().join(format!("resnext-sgd-{}.safetensors", std::process::id()));
        sgd.save_state(&path).unwrap();
        let mut adam = Optimizer::new(OptimConfig {
            algorithm: Algorithm::ADAMW,
            ..OptimConfig::default()
        });
        let err = adam.load_state_for(&path, &m).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("momentum."), "{err}");
        assert_eq!(adam.steps(), 0);
    }

    #[test]
    fn a_non_finite_gradient_norm_is_an_error_before_any_update() {
        let dev = Cpu::default();
        let mut m = model(&dev, &[0.5; 8]);
        let mut opt = Optimizer::new(OptimConfig {
            clip_grad_norm: Some(1.0),
            ..OptimConfig::default()
        });
        let mut grads = Gradients::leaky();
        grads.get_or_alloc_mut(&m.weight).unwrap()[2] = f32::NAN;
        grads.get_or_alloc_mut(&m.bias).unwrap();
        let err = opt.step(&mut m, &mut grads).unwrap_err().to_string();
        assert!(err.contains("gradient norm"), "{err}");
        assert_eq!(flat(&m), vec![0.5; 8]);
    }
}
