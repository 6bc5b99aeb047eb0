//! Autograd ops on dfdx tensors that dfdx 0.13 lacks on stable Rust.
//!
//! Each op copies its inputs out of the tensors, runs a kernel from [`crate::kernels`],
//! builds the output tensor and, when the input carries an [`OwnedTape`], registers a
//! backward closure that takes the output's gradient and adds into the gradients of the
//! input and of the parameters (looked up by tensor, so they need not be traced).
//!
//! Activations are `(batch, channels, height, width)` tensors with the channel count in the
//! type: [`Act`]. Inputs must be contiguous (every tensor that these ops and dfdx's
//! non-view ops produce is; realise a permuted view before passing it).
//!
//! The output's gradient is *moved out* of the [`Gradients`] when an op's backward runs,
//! so gradients of intermediate activations are not kept; parameter and input gradients
//! are.

use dfdx::prelude::*;

use crate::error::{shape_err, Result};
use crate::kernels::{batchnorm as bn, conv, elementwise as ew, pool};

/// A `(batch, C, height, width)` activation on the CPU.
pub type Act<const C: usize, T = NoneTape> = Tensor<(usize, Const<C>, usize, usize), f32, Cpu, T>;

/// A `(batch, F)` feature or logit matrix whose second dim is `F`.
pub type Mat<F, T = NoneTape> = Tensor<(usize, F), f32, Cpu, T>;

/// Copies a contiguous tensor's values out.
pub fn read<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>) -> Vec<f32> {
    let mut v = vec![0.0f32; t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// Convolution hyper-parameters (square kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Groups.
    pub groups: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            kernel: 1,
            stride: 1,
            padding: 0,
            groups: 1,
        }
    }
}

/// 2-D convolution `x ⋆ weight` (no bias), weight `(O, I / groups, k, k)` in any shape
/// type with that many elements.
pub fn conv2d<const I: usize, const O: usize, WS: Shape, T: Tape<f32, Cpu>>(
    x: Act<I, T>,
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
) -> Result<Act<O, T>> {
    let &(n, _, h, w) = x.shape();
    let g = conv_geom::<I, O, WS>([n, h, w], weight, cfg)?;
    let kind = conv_kind(&g);
    let _t = crate::profile::scope(kind.0);
    let xs = read(&x);
    let ws = read(weight);
    let mut y = ew::zeroed(g.output_len());
    conv::conv2d_forward(&g, &xs, &ws, &mut y);
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = dev.try_tensor_from_vec(y, (n, Const::<O>, g.out_h(), g.out_w()))?;
    if T::OWNS_TAPE {
        let (xg, wg, og) = (x.ghost(), weight.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let _t = crate::profile::scope(kind.1);
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let mut dw: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&wg)?);
            conv::conv2d_backward(
                &g,
                &xs,
                &ws,
                &dy,
                Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
                &mut dw,
            );
            **grads.get_or_alloc_mut(&wg)? = dw;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

fn conv_kind(g: &conv::Conv2dGeom) -> (&'static str, &'static str) {
    if g.groups > 1 {
        ("conv grouped fwd", "conv grouped bwd")
    } else if g.kernel == 1 {
        ("conv 1x1 fwd", "conv 1x1 bwd")
    } else {
        ("conv kxk fwd", "conv kxk bwd")
    }
}

/// The checked geometry of an `I → O` convolution of an `(n, I, h, w)` input.
fn conv_geom<const I: usize, const O: usize, WS: Shape>(
    [n, h, w]: [usize; 3],
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
) -> Result<conv::Conv2dGeom> {
    let g = conv::Conv2dGeom {
        batch: n,
        in_channels: I,
        out_channels: O,
        in_h: h,
        in_w: w,
        kernel: cfg.kernel,
        stride: cfg.stride,
        padding: cfg.padding,
        groups: cfg.groups,
    };
    g.validate().map_err(|m| shape_err("conv2d", m))?;
    if weight.shape().num_elements() != g.weight_len() {
        return Err(shape_err(
            "conv2d",
            format!(
                "weight has {} elements, expected {O}x{}x{}x{}",
                weight.shape().num_elements(),
                g.in_per_group(),
                cfg.kernel,
                cfg.kernel
            ),
        ));
    }
    Ok(g)
}

/// Batch-norm constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnConfig {
    /// Added to the variance, PyTorch's default 1e-5.
    pub eps: f64,
    /// Running-statistics momentum, PyTorch's default 0.1.
    pub momentum: f64,
    /// Apply a ReLU after the affine transform (fused).
    pub relu: bool,
}

impl Default for BnConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
            relu: false,
        }
    }
}

fn bn_geom<const C: usize, T>(x: &Act<C, T>) -> bn::BnGeom {
    let &(n, _, h, w) = x.shape();
    bn::BnGeom {
        batch: n,
        channels: C,
        spatial: h * w,
    }
}

fn bn_finish<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    y: Vec<f32>,
    gamma: &Tensor<Rank1<C>, f32, Cpu>,
    beta: &Tensor<Rank1<C>, f32, Cpu>,
    saved: (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
    relu: bool,
    train: bool,
) -> Result<Act<C, T>> {
    let g = bn_geom(&x);
    let shape = *x.shape();
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = dev.try_tensor_from_vec(y, shape)?;
    if T::OWNS_TAPE {
        let (xs, gs, bs, mean, inv_std) = saved;
        let (xg, gg, bg, og) = (x.ghost(), gamma.ghost(), beta.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let _t = crate::profile::scope("batch_norm bwd");
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let (mut dgamma, mut dbeta) = (vec![0.0f32; C], vec![0.0f32; C]);
            let ch = bn::BnChannels {
                gamma: &gs,
                beta: &bs,
                mean: &mean,
                inv_std: &inv_std,
                relu,
            };
            bn::bn_backward(
                &g,
                &xs,
                &ch,
                train,
                &dy,
                Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
                &mut dgamma,
                &mut dbeta,
            );
            ew::add_into(grads.get_or_alloc_mut(&gg)?, &dgamma);
            ew::add_into(grads.get_or_alloc_mut(&bg)?, &dbeta);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// Batch statistics need more than one value per channel.
fn check_batch_stats(g: &bn::BnGeom, what: &str, shape: &impl std::fmt::Debug) -> Result<()> {
    if g.per_channel() < 2 {
        return Err(shape_err(
            "batch_norm2d",
            format!("training needs more than one value per channel, got {what} {shape:?}"),
        ));
    }
    Ok(())
}

/// Folds a training batch's statistics into the running-statistics tensors.
fn update_running<const C: usize>(
    g: &bn::BnGeom,
    stats: &bn::BnStats,
    momentum: f64,
    running_mean: &mut Tensor<Rank1<C>, f32, Cpu>,
    running_var: &mut Tensor<Rank1<C>, f32, Cpu>,
) {
    let (mut rm, mut rv) = (read(running_mean), read(running_var));
    bn::update_running(g, stats, momentum, &mut rm, &mut rv);
    running_mean.copy_from(&rm);
    running_var.copy_from(&rv);
}

/// Training-mode batch norm (PyTorch semantics): normalises with the batch mean and biased
/// variance, and updates the running statistics in place with the unbiased variance.
pub fn batch_norm2d_train<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    gamma: &Tensor<Rank1<C>, f32, Cpu>,
    beta: &Tensor<Rank1<C>, f32, Cpu>,
    running_mean: &mut Tensor<Rank1<C>, f32, Cpu>,
    running_var: &mut Tensor<Rank1<C>, f32, Cpu>,
    cfg: BnConfig,
) -> Result<Act<C, T>> {
    let _t = crate::profile::scope("batch_norm train fwd");
    let g = bn_geom(&x);
    check_batch_stats(&g, "input", x.shape())?;
    let xs = read(&x);
    let (gs, bs) = (read(gamma), read(beta));
    let mut y = ew::zeroed(g.len());
    let stats = bn::bn_train_forward(&g, &xs, &gs, &bs, cfg.eps, cfg.relu, &mut y);
    update_running(&g, &stats, cfg.momentum, running_mean, running_var);
    bn_finish(
        x,
        y,
        gamma,
        beta,
        (xs, gs, bs, stats.mean, stats.inv_std),
        cfg.relu,
        true,
    )
}

/// Eval-mode batch norm: normalises with the running statistics (differentiable in `x`,
/// `gamma` and `beta`).
pub fn batch_norm2d_eval<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    gamma: &Tensor<Rank1<C>, f32, Cpu>,
    beta: &Tensor<Rank1<C>, f32, Cpu>,
    running_mean: &Tensor<Rank1<C>, f32, Cpu>,
    running_var: &Tensor<Rank1<C>, f32, Cpu>,
    cfg: BnConfig,
) -> Result<Act<C, T>> {
    let _t = crate::profile::scope("batch_norm eval fwd");
    let g = bn_geom(&x);
    let xs = read(&x);
    let (gs, bs, rm, rv) = (
        read(gamma),
        read(beta),
        read(running_mean),
        read(running_var),
    );
    let (scale, _) = bn::eval_affine(&gs, &bs, &rm, &rv, cfg.eps);
    let mut y = ew::zeroed(g.len());
    bn::affine_forward(&g, &xs, &rm, &scale, &bs, cfg.relu, &mut y);
    let inv_std: Vec<f32> = rv
        .iter()
        .map(|&v| (1.0 / (v as f64 + cfg.eps).sqrt()) as f32)
        .collect();
    bn_finish(
        x,
        y,
        gamma,
        beta,
        (xs, gs, bs, rm, inv_std),
        cfg.relu,
        false,
    )
}

/// 2-D max pooling with square window `kernel`, `stride` and implicit -inf `padding`.
pub fn max_pool2d<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Act<C, T>> {
    let &(n, _, h, w) = x.shape();
    let g = pool::PoolGeom {
        planes: n * C,
        in_h: h,
        in_w: w,
        kernel,
        stride,
        padding,
    };
    g.validate().map_err(|m| shape_err("max_pool2d", m))?;
    let (oh, ow) = (g.out_h(), g.out_w());
    let _t = crate::profile::scope("max_pool fwd");
    let xs = read(&x);
    let mut y = vec![0.0f32; n * C * oh * ow];
    if !T::OWNS_TAPE {
        pool::max_pool_forward_values(&g, &xs, &mut y);
        drop(xs);
        let (x, tape) = x.split_tape();
        return Ok(x
            .device()
            .try_tensor_from_vec(y, (n, Const::<C>, oh, ow))?
            .put_tape(tape));
    }
    let mut argmax = vec![0u32; y.len()];
    pool::max_pool_forward(&g, &xs, &mut y, &mut argmax);
    drop(xs);
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = dev.try_tensor_from_vec(y, (n, Const::<C>, oh, ow))?;
    if T::OWNS_TAPE {
        let (xg, og) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            pool::max_pool_backward(&g, &argmax, &dy, grads.get_or_alloc_mut(&xg)?);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// Global average pooling `(N, C, H, W) → (N, C)`.
pub fn global_avg_pool<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
) -> Result<Mat<Const<C>, T>> {
    let &(n, _, h, w) = x.shape();
    if h * w == 0 {
        return Err(shape_err(
            "global_avg_pool",
            format!("empty spatial size {h}x{w}"),
        ));
    }
    let xs = read(&x);
    let mut y = vec![0.0f32; n * C];
    pool::global_avg_pool_forward(h * w, &xs, &mut y);
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = dev.try_tensor_from_vec(y, (n, Const::<C>))?;
    if T::OWNS_TAPE {
        let (xg, og) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            pool::global_avg_pool_backward(h * w, &dy, grads.get_or_alloc_mut(&xg)?);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// `relu(a + b)`: the residual merge of a ResNeXt block.
pub fn add_relu<const C: usize, T: Tape<f32, Cpu> + Merge<T>>(
    a: Act<C, T>,
    b: Act<C, T>,
) -> Result<Act<C, T>> {
    if a.shape() != b.shape() {
        return Err(shape_err(
            "add_relu",
            format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    let shape = *a.shape();
    let _t = crate::profile::scope("add_relu fwd");
    let (av, bv) = (read(&a), read(&b));
    let mut y = ew::zeroed(av.len());
    ew::add_relu_forward(&av, &bv, &mut y);
    drop((av, bv));
    // The backward pass needs only where y > 0: one bit per value instead of y itself.
    let mask = if T::OWNS_TAPE {
        ew::positive_mask(&y)
    } else {
        Vec::new()
    };
    let dev = a.device().clone();
    let (a, ta) = a.split_tape();
    let (b, tb) = b.split_tape();
    let mut tape = ta.merge(tb);
    let out = dev.try_tensor_from_vec(y, shape)?;
    if T::OWNS_TAPE {
        let (ag, bg, og) = (a.ghost(), b.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let _t = crate::profile::scope("add_relu bwd");
            let mut dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            ew::apply_positive_mask(&mask, &mut dy);
            ew::add_into(grads.get_or_alloc_mut(&ag)?, &dy);
            ew::add_into(grads.get_or_alloc_mut(&bg)?, &dy);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// Dense layer `x · weightᵀ + bias` with weight `(O, F)`; `O` may be a runtime dim.
pub fn linear<const F: usize, O: Dim, T: Tape<f32, Cpu>>(
    x: Mat<Const<F>, T>,
    weight: &Tensor<(O, Const<F>), f32, Cpu>,
    bias: &Tensor<(O,), f32, Cpu>,
) -> Result<Mat<O, T>> {
    let n = x.shape().0;
    let o = weight.shape().0;
    if bias.shape().0.size() != o.size() {
        return Err(shape_err(
            "linear",
            format!(
                "bias has {} elements, weight has {} rows",
                bias.shape().0.size(),
                o.size()
            ),
        ));
    }
    let (xs, ws, bs) = (read(&x), read(weight), read(bias));
    let mut y = vec![0.0f32; n * o.size()];
    ew::linear_forward(n, F, o.size(), &xs, &ws, &bs, &mut y);
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = dev.try_tensor_from_vec(y, (n, o))?;
    if T::OWNS_TAPE {
        let (xg, wg, bg, og) = (x.ghost(), weight.ghost(), bias.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let (mut dw, mut db) = (vec![0.0f32; ws.len()], vec![0.0f32; bs.len()]);
            ew::linear_backward(
                n,
                F,
                o.size(),
                &xs,
                &ws,
                &dy,
                Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
                &mut dw,
                &mut db,
            );
            ew::add_into(grads.get_or_alloc_mut(&wg)?, &dw);
            ew::add_into(grads.get_or_alloc_mut(&bg)?, &db);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

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
    let (logits, mut tape) = logits.split_tape();
    let out = dev.try_tensor_from_vec(vec![(loss / n.max(1) as f64) as f32], ())?;
    if T::OWNS_TAPE {
        let targets = targets.to_vec();
        let (lg, og) = (logits.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dl = grads.get_or_alloc_mut(&og)?[0];
            let scale = dl / n.max(1) as f32;
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
        });
    }
    Ok(out.put_tape(tape))
}

/// Eval-mode batch norm as a per-channel `(scale, shift)`.
fn fold_bn<const C: usize>(bn: BnRef<'_, C>, eps: f64) -> (Vec<f32>, Vec<f32>) {
    bn::eval_affine(
        &read(bn.gamma),
        &read(bn.beta),
        &read(bn.mean),
        &read(bn.var),
        eps,
    )
}

pub use fold_cache::{with_fold_cache, FoldCache};

/// Inference sessions: convolution weights with their batch norm folded in, prepared once
/// and reused by every later call of [`conv2d_bn_eval`]/[`conv2d_bn_eval_raw`] on the same
/// weight tensor, instead of being folded and packed again per call (for ResNeXt-50 that
/// is 100 MB of weights read and written per forward pass: most of a batch-1 forward).
mod fold_cache {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, PoisonError};

    use crate::kernels::conv::PreparedWeights;

    pub(super) struct Folded {
        pub(super) w: PreparedWeights,
        pub(super) shift: Vec<f32>,
    }

    /// Folded weights keyed by the address of the weight tensor they came from.
    ///
    /// Valid only while the modules it has seen are neither changed nor moved: whoever owns
    /// the model clears it after any change (as [`crate::model::Network`]'s implementations
    /// do after loading weights or a training step). Install it for a call with
    /// [`with_fold_cache`].
    #[derive(Default)]
    pub struct FoldCache {
        map: Mutex<HashMap<usize, Arc<Folded>>>,
    }

    impl std::fmt::Debug for FoldCache {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FoldCache")
                .field("entries", &self.len())
                .finish()
        }
    }

    impl FoldCache {
        /// An empty cache.
        pub fn new() -> Self {
            Self::default()
        }
        /// Forgets every folded weight (call after the model changed).
        pub fn clear(&self) {
            self.map
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        /// Number of cached convolutions.
        pub fn len(&self) -> usize {
            self.map
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
        }
        /// Whether nothing is cached.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
    }

    thread_local! {
        static ACTIVE: RefCell<Option<Arc<FoldCache>>> = const { RefCell::new(None) };
    }

    /// Runs `f` with `cache` serving the eval-mode convolutions it calls on this thread.
    pub fn with_fold_cache<R>(cache: &Arc<FoldCache>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<FoldCache>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                ACTIVE.with(|a| *a.borrow_mut() = prev);
            }
        }
        let _restore = Restore(ACTIVE.with(|a| a.borrow_mut().replace(cache.clone())));
        f()
    }

    /// The folded weights for `key` from the active cache (made with `make` on a miss), or
    /// `None` when no cache is active.
    pub(super) fn lookup(key: usize, make: impl FnOnce() -> Folded) -> Option<Arc<Folded>> {
        let cache = ACTIVE.with(|a| a.borrow().clone())?;
        if let Some(f) = cache
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Some(f.clone());
        }
        let folded = Arc::new(make());
        cache
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, folded.clone());
        Some(folded)
    }
}

/// Borrowed batch-norm tensors (γ, β, running mean, running variance).
#[derive(Clone, Copy, Debug)]
pub struct BnRef<'a, const C: usize> {
    /// Scale γ.
    pub gamma: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Shift β.
    pub beta: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Running mean.
    pub mean: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Running variance.
    pub var: &'a Tensor<Rank1<C>, f32, Cpu>,
}

/// Inference only: convolution with an eval-mode batch norm folded into its weights, an
/// optional residual added, and an optional ReLU, in one pass over the output
/// (`relu?(bn(conv(x)) + residual)`). Equal to the composition of [`conv2d`],
/// [`batch_norm2d_eval`] and [`add_relu`] up to rounding.
pub fn conv2d_bn_eval<const I: usize, const O: usize, WS: Shape>(
    x: Act<I>,
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
    bn: BnRef<'_, O>,
    eps: f64,
    relu: bool,
    residual: Option<&Act<O>>,
) -> Result<Act<O>> {
    let &(n, _, h, w) = x.shape();
    let res = residual.map(read);
    let (y, oh, ow) = conv2d_bn_eval_raw::<I, O, WS>(
        &read(&x),
        [n, h, w],
        weight,
        cfg,
        bn,
        eps,
        relu,
        res.as_deref(),
    )?;
    Ok(x.device().try_tensor_from_vec(y, (n, Const::<O>, oh, ow))?)
}

/// [`conv2d_bn_eval`] on a plain `(n, I, h, w)` buffer: returns the output buffer and its
/// height and width. Lets a stage run its blocks without copying activations in and out
/// of tensors between convolutions.
pub fn conv2d_bn_eval_raw<const I: usize, const O: usize, WS: Shape>(
    x: &[f32],
    [n, h, w]: [usize; 3],
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
    bn: BnRef<'_, O>,
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
) -> Result<(Vec<f32>, usize, usize)> {
    let g = conv_geom::<I, O, WS>([n, h, w], weight, cfg)?;
    let _t = crate::profile::scope(match conv_kind(&g).0 {
        "conv grouped fwd" => "conv grouped+bn eval",
        "conv 1x1 fwd" => "conv 1x1+bn eval",
        _ => "conv kxk+bn eval",
    });
    if x.len() != g.input_len() {
        return Err(shape_err(
            "conv2d",
            format!(
                "input has {} values, shape ({n}, {I}, {h}, {w}) needs {}",
                x.len(),
                g.input_len()
            ),
        ));
    }
    if let Some(r) = residual {
        if r.len() != g.output_len() {
            return Err(shape_err(
                "conv2d_bn_eval",
                format!(
                    "residual has {} values, the output ({n}, {O}, {}, {}) has {}",
                    r.len(),
                    g.out_h(),
                    g.out_w(),
                    g.output_len()
                ),
            ));
        }
    }
    let mut y = ew::zeroed(g.output_len());
    let key = weight as *const Tensor<WS, f32, Cpu> as usize;
    if let Some(folded) = fold_cache::lookup(key, || {
        let (scale, shift) = fold_bn(bn, eps);
        let mut ws = read(weight);
        let per = ws.len() / O;
        for (row, s) in ws.chunks_mut(per.max(1)).zip(&scale) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        fold_cache::Folded {
            w: conv::PreparedWeights::new(&g, ws),
            shift,
        }
    }) {
        conv::conv2d_forward_fused(
            &g,
            x,
            &folded.w,
            None,
            &folded.shift,
            residual,
            relu,
            &mut y,
        );
    } else {
        // No cache: scale in the epilogue rather than a pass over the weights.
        let (scale, shift) = fold_bn(bn, eps);
        let w = conv::PreparedWeights::new(&g, read(weight));
        conv::conv2d_forward_fused(&g, x, &w, Some(&scale), &shift, residual, relu, &mut y);
    }
    Ok((y, g.out_h(), g.out_w()))
}

/// Batch-norm tensors for a training-mode call: γ and β, and the running statistics it
/// updates.
#[derive(Debug)]
pub struct BnTrainRef<'a, const C: usize> {
    /// Scale γ.
    pub gamma: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Shift β.
    pub beta: &'a Tensor<Rank1<C>, f32, Cpu>,
    /// Running mean, updated in place.
    pub mean: &'a mut Tensor<Rank1<C>, f32, Cpu>,
    /// Running variance, updated in place.
    pub var: &'a mut Tensor<Rank1<C>, f32, Cpu>,
}

/// Training: convolution, batch norm with batch statistics, an optional residual add and
/// the ReLU of `cfg` (`relu?(bn(conv(x)) + residual)`), as one differentiable op. Equal to
/// [`conv2d`], then [`batch_norm2d_train`], then [`add_relu`] (or the fused ReLU), up to
/// rounding, and updates the running statistics the same way.
///
/// Faster than the composition because the convolution's output never becomes a tensor:
/// the batch norm reads it where the convolution wrote it, and its input gradient is
/// computed in place in the output gradient's buffer and handed straight to the
/// convolution's backward pass (no copy, no zero-filled gradient buffer, no second pass).
/// With a residual, `cfg.relu` applies after the add and the add costs no extra pass.
pub fn conv2d_bn_train<const I: usize, const O: usize, WS: Shape, T: Tape<f32, Cpu> + Merge<T>>(
    x: Act<I, T>,
    weight: &Tensor<WS, f32, Cpu>,
    conv_cfg: ConvConfig,
    bn: BnTrainRef<'_, O>,
    cfg: BnConfig,
    residual: Option<Act<O, T>>,
) -> Result<Act<O, T>> {
    let &(n, _, h, w) = x.shape();
    let g = conv_geom::<I, O, WS>([n, h, w], weight, conv_cfg)?;
    let out_shape = (n, Const::<O>, g.out_h(), g.out_w());
    if let Some(r) = &residual {
        if *r.shape() != out_shape {
            return Err(shape_err(
                "conv2d_bn_train",
                format!(
                    "residual has shape {:?}, the output has {out_shape:?}",
                    r.shape()
                ),
            ));
        }
    }
    let bg = bn::BnGeom {
        batch: n,
        channels: O,
        spatial: g.out_h() * g.out_w(),
    };
    check_batch_stats(&bg, "output", &out_shape)?;
    let kind = conv_kind(&g);
    let (xs, ws, yc, planes) = {
        let _t = crate::profile::scope(kind.0);
        let xs = read(&x);
        let ws = read(weight);
        let mut yc = ew::zeroed(g.output_len());
        let planes = conv::conv2d_forward_plane_stats(&g, &xs, &ws, &mut yc);
        (xs, ws, yc, planes)
    };
    let _t = crate::profile::scope("batch_norm train fwd");
    let (gs, bs) = (read(bn.gamma), read(bn.beta));
    let stats = bn::stats_from_planes(&bg, &planes, cfg.eps);
    let scale: Vec<f32> = gs.iter().zip(&stats.inv_std).map(|(a, b)| a * b).collect();
    let mut y = ew::zeroed(g.output_len());
    let (res, mut tape) = match residual {
        Some(r) => {
            let rs = read(&r);
            if cfg.relu {
                bn::affine_add_relu_forward(&bg, &yc, &stats.mean, &scale, &bs, &rs, &mut y);
            } else {
                bn::affine_forward(&bg, &yc, &stats.mean, &scale, &bs, false, &mut y);
                ew::add_into(&mut y, &rs);
            }
            let (r, tr) = r.split_tape();
            (Some(r.ghost()), tr)
        }
        None => {
            bn::affine_forward(&bg, &yc, &stats.mean, &scale, &bs, cfg.relu, &mut y);
            (None, Default::default())
        }
    };
    update_running(&bg, &stats, cfg.momentum, bn.mean, bn.var);
    // With a residual the ReLU's mask cannot be recomputed from the batch norm's input:
    // keep one bit per output value.
    let mask = if T::OWNS_TAPE && cfg.relu && res.is_some() {
        ew::positive_mask(&y)
    } else {
        Vec::new()
    };
    let dev = x.device().clone();
    let (x, tx) = x.split_tape();
    tape = tx.merge(tape);
    let out = dev.try_tensor_from_vec(y, out_shape)?;
    if T::OWNS_TAPE {
        let (xg, wg, og) = (x.ghost(), weight.ghost(), out.ghost());
        let (gg, bgh) = (bn.gamma.ghost(), bn.beta.ghost());
        let bn_relu = cfg.relu && res.is_none();
        tape.add_backward_op(move |grads| {
            let mut d: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            {
                let _t = crate::profile::scope("batch_norm bwd");
                if let Some(rg) = &res {
                    if !mask.is_empty() {
                        ew::apply_positive_mask(&mask, &mut d);
                    }
                    ew::add_into(grads.get_or_alloc_mut(rg)?, &d);
                }
                let (mut dgamma, mut dbeta) = (vec![0.0f32; O], vec![0.0f32; O]);
                let ch = bn::BnChannels {
                    gamma: &gs,
                    beta: &bs,
                    mean: &stats.mean,
                    inv_std: &stats.inv_std,
                    relu: bn_relu,
                };
                bn::bn_backward_in_place(&bg, &yc, &ch, &mut d, &mut dgamma, &mut dbeta);
                ew::add_into(grads.get_or_alloc_mut(&gg)?, &dgamma);
                ew::add_into(grads.get_or_alloc_mut(&bgh)?, &dbeta);
            }
            drop(yc);
            let _t = crate::profile::scope(kind.1);
            // the weight gradient accumulates straight into its slot, moved out meanwhile
            let mut dw: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&wg)?);
            conv::conv2d_backward(
                &g,
                &xs,
                &ws,
                &d,
                Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
                &mut dw,
            );
            **grads.get_or_alloc_mut(&wg)? = dw;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}
