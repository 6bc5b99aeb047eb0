//! Training on the GPU: the training copies of the parameters (kept and updated on the
//! GPU from the first step on), a tape of backward operations recorded by the forward
//! pass, the batch-norm layers in training mode, the cross-entropy loss, the backward pass
//! and the optimiser's update, all without a host round trip but the loss and the logits.
//!
//! The host model stays the master that is saved and loaded: [`Gpu::sync_to_host`] copies
//! the GPU's weights, running statistics and optimiser state into it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use dfdx::prelude::*;

use super::conv::ConvW;
use super::gpu::{call_err, driver_err, raw, DevBuf, FoldedConv, Gpu};
use super::kernels::{grid_for, BLOCK};
use super::{int, ConvDims, CudaAct, CudaLogits};
use crate::backend::device::Precision;
use crate::backend::{param_key, TrainBackend};
use crate::error::{Error, Result};
use crate::model::TrainOutput;
use crate::nn::{BatchNorm2d, ConvLayer};
use crate::ops::{BnConfig, Targets};
use crate::optim::{AdamScales, Algorithm, OptimConfig, Optimizer};
use crate::params::{ParamKind, ParamVisitor, ParamVisitorMut, Params};

/// A launch of the per-channel kernels: a block of [`BLOCK`] threads a channel.
pub(super) fn per_channel(channels: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (channels.clamp(1, 65_535) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A parameter or buffer's training copy on the GPU.
pub(crate) struct TrainParam {
    /// The values.
    pub(super) value: RefCell<CudaSlice<f32>>,
    /// The gradient, summed over the step's backward pass (none for a buffer).
    pub(super) grad: Option<RefCell<CudaSlice<f32>>>,
    /// The optimiser's state (SGD: momentum; AdamW: the two moments), made at the first
    /// update.
    slots: RefCell<Vec<CudaSlice<f32>>>,
    /// Whether the SGD momentum has not been set yet (it starts as the first gradient).
    fresh: Cell<bool>,
    pub(super) len: usize,
    /// The host tensor's [`param_key`].
    pub(super) key: usize,
}

impl TrainParam {
    /// The gradient of a trainable parameter.
    pub(super) fn grad(&self) -> &RefCell<CudaSlice<f32>> {
        self.grad.as_ref().expect("a trainable parameter")
    }
}

/// A backward operation: given the gradient of the activation it made, adds the
/// gradients of its inputs to `Grads` and of its parameters to theirs.
type BackwardOp = Box<dyn FnOnce(&Gpu, DevBuf, &mut Grads) -> Result<()>>;

/// A recorded backward operation: the id of the activation it takes the gradient of, the
/// operation, and the keys of the parameters whose gradients it writes.
type TapeOp = (u64, BackwardOp, Vec<usize>);

/// The backward operations of a forward pass, in the order their forwards ran.
#[derive(Default)]
pub(crate) struct Tape {
    recording: bool,
    next_id: u64,
    ops: Vec<TapeOp>,
}

/// The gradients of the activations reached so far in a backward pass, by activation id.
#[derive(Default)]
pub(super) struct Grads {
    map: HashMap<u64, DevBuf>,
}

impl Grads {
    /// The gradient of activation `id` of `len` values to write or add to, and whether it
    /// already held one (add) or is new with contents unset (write); zeroed when `zero`.
    pub(super) fn slot(
        &mut self,
        gpu: &Gpu,
        id: u64,
        len: usize,
        zero: bool,
    ) -> Result<(&mut DevBuf, bool)> {
        let existed = self.map.contains_key(&id);
        if !existed {
            let mut b = gpu.alloc_act(len, "an activation's gradient")?;
            if zero {
                gpu.inner
                    .stream
                    .memset_zeros(b.slice_mut())
                    .map_err(call_err("zeroing a gradient"))?;
            }
            self.map.insert(id, b);
        }
        Ok((self.map.get_mut(&id).expect("slot just made"), existed))
    }

    /// The residual gradient a kernel writes or adds to, for the residual activation `id`
    /// of `len` values: its device address (null for id 0, no residual) and whether to add
    /// (1) or write (0).
    fn residual(&mut self, gpu: &Gpu, id: u64, len: usize) -> Result<(u64, i32)> {
        if id == 0 {
            return Ok((0, 0));
        }
        let (slot, existed) = self.slot(gpu, id, len, false)?;
        Ok((raw(gpu, Some(slot)), i32::from(existed)))
    }
}

impl Gpu {
    /// Whether the forward pass now running records its backward.
    pub(super) fn recording(&self) -> bool {
        self.inner.tape.borrow().recording
    }

    /// Records `op` as the backward of a new activation when recording: its id (0, not
    /// tracked, otherwise).
    pub(super) fn record(
        &self,
        op: impl FnOnce(&Gpu, DevBuf, &mut Grads) -> Result<()> + 'static,
    ) -> u64 {
        self.record_writing(Vec::new(), op)
    }

    /// [`Gpu::record`] for an op that writes the gradients of the parameters with these
    /// [keys](TrainParam::key).
    pub(super) fn record_writing(
        &self,
        keys: Vec<usize>,
        op: impl FnOnce(&Gpu, DevBuf, &mut Grads) -> Result<()> + 'static,
    ) -> u64 {
        let mut t = self.inner.tape.borrow_mut();
        if !t.recording {
            return 0;
        }
        t.next_id += 1;
        let id = t.next_id;
        t.ops.push((id, Box::new(op), keys));
        id
    }

    /// The training copy of `t`, made from the host values on first use: with a gradient
    /// when `trainable`.
    pub(super) fn train_param<S: Shape>(
        &self,
        t: &Tensor<S, f32, Cpu>,
        trainable: bool,
    ) -> Result<Rc<TrainParam>> {
        let key = param_key(t);
        if let Some(p) = self.inner.train.borrow().get(&key) {
            return Ok(p.clone());
        }
        let v = t.as_vec();
        let stream = &self.inner.stream;
        let value = stream
            .clone_htod(&v)
            .map_err(|e| driver_err(e, "model parameters", v.len() * 4))?;
        let grad = if trainable {
            Some(RefCell::new(stream.alloc_zeros::<f32>(v.len()).map_err(
                |e| driver_err(e, "parameter gradients", v.len() * 4),
            )?))
        } else {
            None
        };
        let p = Rc::new(TrainParam {
            value: RefCell::new(value),
            grad,
            slots: RefCell::new(Vec::new()),
            fresh: Cell::new(true),
            len: v.len(),
            key,
        });
        self.inner.train.borrow_mut().insert(key, p.clone());
        Ok(p)
    }

    /// The weights of `p` in bf16 for a mixed-precision convolution (converted from the
    /// f32 training copy at each use, so they follow its updates); none in fp32, where the
    /// convolution reads the training copy itself.
    fn act_weights(&self, p: &TrainParam) -> Result<Option<DevBuf>> {
        if self.precision() == Precision::Fp32 {
            return Ok(None);
        }
        let mut b = self.alloc_act(p.len, "a convolution's weights in bf16")?;
        let (n, value) = (p.len as i64, p.value.borrow());
        // SAFETY: the training copy and b hold n values.
        launch!(self, to_act, grid_for(p.len), "the weight conversion kernel";
            &*value, b.slice_mut(), &n)?;
        drop(value);
        Ok(Some(b))
    }

    /// The gradient of the parameter `t` from the last training step on this GPU (none
    /// when `t` has no training copy here or is a buffer).
    pub fn gradient<S: Shape>(&self, t: &Tensor<S, f32, Cpu>) -> Result<Option<Vec<f32>>> {
        let Some(p) = self.inner.train.borrow().get(&param_key(t)).cloned() else {
            return Ok(None);
        };
        let Some(g) = &p.grad else { return Ok(None) };
        let v = self
            .inner
            .stream
            .clone_dtoh(&*g.borrow())
            .map_err(call_err("copying a gradient from the GPU"))?;
        Ok(Some(v))
    }

    /// Drops the training copies of every parameter, their gradients and optimiser state:
    /// the next training step starts again from the host model (call it after loading
    /// weights into a model that was training on this GPU).
    pub fn reset_training(&self) {
        self.inner.train.borrow_mut().clear();
        *self.inner.tape.borrow_mut() = Tape::default();
    }

    /// Copies the weights and running statistics trained on this GPU into `net` (and, when
    /// given, the optimiser state into `opt`), so that it can be saved, averaged or run on
    /// the CPU (the batch counters are kept on the host all along). Parameters never used
    /// on the GPU are left as they are.
    pub fn sync_to_host<M: Params>(&self, net: &mut M, opt: Option<&mut Optimizer>) -> Result<()> {
        struct Sync<'a> {
            gpu: &'a Gpu,
            opt: Option<&'a mut Optimizer>,
        }
        impl ParamVisitorMut for Sync<'_> {
            type Error = Error;
            fn tensor<S: Shape>(
                &mut self,
                name: &str,
                t: &mut Tensor<S, f32, Cpu>,
                _kind: ParamKind,
            ) -> Result<()> {
                let Some(p) = self.gpu.inner.train.borrow().get(&param_key(t)).cloned() else {
                    return Ok(());
                };
                let stream = &self.gpu.inner.stream;
                let v = stream
                    .clone_dtoh(&*p.value.borrow())
                    .map_err(call_err("copying parameters from the GPU"))?;
                t.copy_from(&v);
                if let Some(opt) = self.opt.as_deref_mut() {
                    let names = opt.cfg.slots();
                    for (slot, buf) in names.iter().zip(p.slots.borrow().iter()) {
                        let v = stream
                            .clone_dtoh(buf)
                            .map_err(call_err("copying optimiser state from the GPU"))?;
                        opt.set_state(format!("{slot}.{name}"), v);
                    }
                }
                Ok(())
            }
        }
        net.visit_params_mut("", &mut Sync { gpu: self, opt })
    }

    /// One training step on this GPU: `forward` runs the training-mode forward pass of
    /// `net` on `x` (recorded), then the cross-entropy against `targets`, the backward pass
    /// and `opt`'s update, all on the GPU. A non-finite loss is an error and leaves the
    /// weights as they were (the running statistics have seen the batch), as on the CPU.
    pub fn train_step_by<const C: usize, O: Dim, M: Params>(
        &self,
        net: &mut M,
        x: CudaAct<C>,
        targets: Targets<'_>,
        opt: &mut Optimizer,
        forward: impl FnOnce(&mut M, &Gpu, CudaAct<C>) -> Result<CudaLogits<O>>,
    ) -> Result<TrainOutput> {
        self.zero_grads()?;
        {
            let mut t = self.inner.tape.borrow_mut();
            t.ops.clear();
            t.recording = true;
        }
        let logits = forward(net, self, x);
        let ops = {
            let mut t = self.inner.tape.borrow_mut();
            t.recording = false;
            std::mem::take(&mut t.ops)
        };
        let logits = logits?;
        let (loss, values, dlogits) = self.cross_entropy(&logits, targets)?;
        if !loss.is_finite() {
            return Err(Error::NonFinite(format!("loss is {loss}")));
        }
        let mut grads = Grads::default();
        if logits.id != 0 {
            grads.map.insert(logits.id, dlogits);
        }
        drop(logits);
        // in a group of GPUs, each bucket of gradients is summed as soon as the backward
        // pass has written it
        let mut sync = self.gradient_sync(self.trained(net, &opt.cfg)?);
        for (id, op, writes) in ops.into_iter().rev() {
            if let Some(dy) = grads.map.remove(&id) {
                op(self, dy, &mut grads)?;
            }
            sync.written(&writes)?;
        }
        let (params, world) = sync.finish()?;
        let grad_norm = self.update(&params, world, opt)?;
        Ok(TrainOutput {
            loss,
            logits: values,
            grad_norm,
        })
    }

    /// Sets every trainable training copy's gradient to zero.
    fn zero_grads(&self) -> Result<()> {
        for p in self.inner.train.borrow().values() {
            if let Some(g) = &p.grad {
                self.inner
                    .stream
                    .memset_zeros(&mut *g.borrow_mut())
                    .map_err(call_err("zeroing the gradients"))?;
            }
        }
        Ok(())
    }

    /// The mean cross-entropy of `logits` against `targets`, the logits on the host, and
    /// the loss's gradient with respect to the logits (on the GPU).
    fn cross_entropy<O: Dim>(
        &self,
        logits: &CudaLogits<O>,
        targets: Targets<'_>,
    ) -> Result<(f32, Vec<f32>, DevBuf)> {
        let (n, k) = logits.shape();
        targets.validate(n, k)?;
        let stream = &self.inner.stream;
        let labels = |t: &[usize]| -> Result<CudaSlice<i32>> {
            let v: Vec<i32> = t.iter().map(|&c| c as i32).collect();
            Ok(stream
                .clone_htod(&v)
                .map_err(|e| driver_err(e, "the labels", v.len() * 4))?)
        };
        let a = labels(targets.labels)?;
        let b = targets.mixed.map(|(b, _)| labels(b)).transpose()?;
        let lam = targets.mixed.map_or(1.0f32, |(_, lam)| lam);
        let eps = targets.label_smoothing;
        let mut rows = self.alloc(n, "the loss")?;
        let mut dlogits = self.alloc(n * k, "the logits' gradient")?;
        let null = 0u64;
        let (rn, kc) = (n as i64, int(k, "classes")?);
        // SAFETY: logits and dlogits hold n·k values, a and b n labels each below k
        // (validated), rows n values; one warp a row.
        match &b {
            Some(b) => launch!(self, cross_entropy, grid_for(n * 32), "the cross-entropy kernel";
                logits.buf.slice(), &a, b, &lam, &eps, &rn, &kc, rows.slice_mut(),
                dlogits.slice_mut())?,
            None => launch!(self, cross_entropy, grid_for(n * 32), "the cross-entropy kernel";
                logits.buf.slice(), &a, &null, &lam, &eps, &rn, &kc, rows.slice_mut(),
                dlogits.slice_mut())?,
        };
        let per_row = self.download(&rows)?;
        let values = self.download(&logits.buf)?;
        let loss = (per_row.iter().map(|&v| v as f64).sum::<f64>() / n.max(1) as f64) as f32;
        Ok((loss, values, dlogits))
    }

    /// The parameters of `net` that `cfg` updates and that have a training copy here, with
    /// their learning rate and weight decay, in the order `net` lists them (the same in
    /// every process of a group).
    pub(super) fn trained<M: Params>(&self, net: &M, cfg: &OptimConfig) -> Result<Vec<Trained>> {
        struct Collect<'a> {
            gpu: &'a Gpu,
            cfg: &'a OptimConfig,
            out: Vec<Trained>,
        }
        impl ParamVisitor for Collect<'_> {
            type Error = Error;
            fn tensor<S: Shape>(
                &mut self,
                name: &str,
                t: &Tensor<S, f32, Cpu>,
                kind: ParamKind,
            ) -> Result<()> {
                let Some((lr, decay)) = self.cfg.rates(name, kind) else {
                    return Ok(());
                };
                if let Some(p) = self.gpu.inner.train.borrow().get(&param_key(t)) {
                    if p.grad.is_some() {
                        self.out.push(Trained {
                            name: name.to_string(),
                            lr,
                            decay,
                            p: p.clone(),
                        });
                    }
                }
                Ok(())
            }
        }
        let mut c = Collect {
            gpu: self,
            cfg,
            out: Vec::new(),
        };
        net.visit_params("", &mut c)?;
        Ok(c.out)
    }

    /// `opt`'s update of `params` from their gradients, summed over a group of `world`
    /// GPUs (divided by it here, in the update's gradient scale and in the norm); the
    /// gradients' global norm when the optimiser clips.
    fn update(&self, params: &[Trained], world: usize, opt: &mut Optimizer) -> Result<Option<f32>> {
        let cfg = opt.cfg.clone();
        let stream = &self.inner.stream;
        let avg = 1.0 / world as f64;
        let (scale, norm) = match cfg.clip_grad_norm {
            Some(max) => {
                let mut sum = stream
                    .alloc_zeros::<f64>(1)
                    .map_err(|e| driver_err(e, "the gradient norm", 8))?;
                for t in params {
                    let g = t.p.grad().borrow();
                    let len = t.p.len as i64;
                    // SAFETY: g holds len values, sum one.
                    launch!(self, sum_squares, grid_for(t.p.len), "the gradient-norm kernel";
                        &*g, &len, &mut sum)?;
                }
                let total = stream
                    .clone_dtoh(&sum)
                    .map_err(call_err("copying the gradient norm from the GPU"))?[0];
                let norm = total.sqrt() * avg;
                if !norm.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "the gradient norm is {norm}; no parameter was updated"
                    )));
                }
                // as torch: max / (norm + 1e-6), never above 1
                (
                    ((max as f64) / (norm + 1e-6)).min(1.0) * avg,
                    Some(norm as f32),
                )
            }
            None => (avg, None),
        };
        let scale = scale as f32;
        let step = opt.advance();
        for t in params {
            let (p, lr, decay) = (&t.p, t.lr, t.decay);
            let mut st = p.slots.borrow_mut();
            // the state a resumed optimiser brings, else zeros
            for slot in &cfg.slots()[st.len().min(cfg.slots().len())..] {
                let buf = match opt.state(&format!("{slot}.{}", t.name)) {
                    Some(v) if v.len() == p.len => {
                        p.fresh.set(false);
                        stream.clone_htod(v)
                    }
                    _ => stream.alloc_zeros::<f32>(p.len),
                }
                .map_err(|e| driver_err(e, "optimiser state", p.len * 4))?;
                st.push(buf);
            }
            let mut v = p.value.borrow_mut();
            let g = p.grad().borrow();
            let (len, grid) = (p.len as i64, grid_for(p.len));
            // SAFETY (each): p, g and every state slot hold len values.
            match cfg.algorithm {
                Algorithm::Sgd if cfg.momentum != 0.0 => {
                    let (nesterov, fresh) =
                        (i32::from(cfg.nesterov), i32::from(p.fresh.replace(false)));
                    launch!(self, sgd_step, grid, "the SGD kernel";
                        &mut *v, &*g, &mut st[0], &len, &lr, &cfg.momentum, &decay,
                        &scale, &nesterov, &fresh)?;
                }
                Algorithm::Sgd => {
                    let (null, zero) = (0u64, 0i32);
                    launch!(self, sgd_step, grid, "the SGD kernel";
                        &mut *v, &*g, &null, &len, &lr, &0.0f32, &decay, &scale,
                        &zero, &zero)?;
                }
                Algorithm::AdamW { beta1, beta2, eps } => {
                    let a = AdamScales::at(step, lr, decay, beta1, beta2);
                    let (m, rest) = st.split_at_mut(1);
                    launch!(self, adamw_step, grid, "the AdamW kernel";
                        &mut *v, &*g, &mut m[0], &mut rest[0], &len, &a.step_size,
                        &a.bc2_sqrt, &beta1, &beta2, &eps, &a.shrink, &scale)?;
                }
            }
        }
        Ok(norm)
    }
}

/// A parameter the optimiser updates, with its training copy ([`Gpu::trained`]).
pub(super) struct Trained {
    name: String,
    lr: f32,
    decay: f32,
    pub(super) p: Rc<TrainParam>,
}

/// What a training-mode convolution + batch norm keeps for its backward.
struct ConvBnSaved {
    x: Rc<DevBuf>,
    x_id: u64,
    z: DevBuf,
    y: Rc<DevBuf>,
    mean: DevBuf,
    invstd: DevBuf,
    w: Rc<TrainParam>,
    /// The weights in bf16 the forward ran with (mixed precision only).
    w_act: Option<DevBuf>,
    gamma: Rc<TrainParam>,
    beta: Rc<TrainParam>,
    d: ConvDims,
    relu: bool,
    res_id: u64,
    channels: usize,
    plane: usize,
    /// Whether the statistics are the group's (synchronised batch norm), and over how
    /// many GPUs' batches (1 otherwise).
    synced: bool,
    world: usize,
}

impl ConvBnSaved {
    fn backward(self, gpu: &Gpu, dy: DevBuf, grads: &mut Grads) -> Result<()> {
        let len = self.z.len();
        let n = self.d.y[0];
        let (channels, plane) = (int(self.channels, "channels")?, self.plane as i64);
        let relu = i32::from(self.relu);
        let mut sums = gpu.alloc(2 * self.channels, "batch-norm gradient sums")?;
        {
            let mut dgamma = self.gamma.grad().borrow_mut();
            let mut dbeta = self.beta.grad().borrow_mut();
            // SAFETY: dy, y and z hold n·channels·plane values; mean, invstd, dγ, dβ
            // `channels`; sums 2·channels.
            launch!(gpu, bn_backward_reduce, per_channel(self.channels), "the batch-norm backward kernel";
                dy.slice(), self.y.slice(), self.z.slice(), self.mean.slice(),
                self.invstd.slice(), &relu, sums.slice_mut(), &mut *dgamma, &mut *dbeta,
                &n, &channels, &plane)?;
        }
        if self.synced {
            // the input gradient needs the group's sums of g and g·x̂ (γ's and β's
            // gradients above keep this GPU's share: the gradient sums add them up)
            gpu.group_sum(&mut sums.view_mut())?;
        }
        let mut dz = gpu.alloc_act(len, "a convolution's output gradient")?;
        {
            let (res_ptr, acc) = grads.residual(gpu, self.res_id, len)?;
            let (total, m) = (len as i64, (len / self.channels * self.world) as i64);
            let gamma = self.gamma.value.borrow();
            // SAFETY: as above; dz and the residual's gradient hold len values.
            launch!(gpu, bn_backward_apply, grid_for(len), "the batch-norm backward kernel";
                dy.slice(), self.y.slice(), self.z.slice(), self.mean.slice(),
                self.invstd.slice(), &*gamma, sums.slice(), &relu, dz.slice_mut(),
                &res_ptr, &acc, &total, &channels, &plane, &m)?;
        }
        drop((dy, self.z, self.y));
        gpu.conv_backward_filter(&self.d, &self.x, &dz, &mut self.w.grad().borrow_mut())?;
        if self.x_id != 0 {
            let (dx, existed) = grads.slot(gpu, self.x_id, self.x.len(), false)?;
            let w = self.w.value.borrow();
            let w = match &self.w_act {
                Some(b) => ConvW::Act(b),
                None => ConvW::F32(&w),
            };
            gpu.conv_backward_data(&self.d, w, &dz, dx, existed)?;
        }
        Ok(())
    }
}

impl TrainBackend for Gpu {
    fn conv_bn_train<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: CudaAct<I>,
        conv: &C,
        bn: &mut BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<CudaAct<O>>,
    ) -> Result<CudaAct<O>> {
        let [n, ..] = x.dims;
        let (g, d) = super::conv_shape("conv_bn_train", &x, conv, &residual)?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let w = self.train_param(conv.weight(), true)?;
        let gamma = self.train_param(&bn.weight, true)?;
        let beta = self.train_param(&bn.bias, true)?;
        let run_mean = self.train_param(&bn.running_mean, false)?;
        let run_var = self.train_param(&bn.running_var, false)?;
        let len = g.output_len();
        let what = format!("a convolution output at batch {n}");
        let mut z = self.alloc_act(len, &what)?;
        let w_act = self.act_weights(&w)?;
        {
            let wv = w.value.borrow();
            let wc = match &w_act {
                Some(b) => ConvW::Act(b),
                None => ConvW::F32(&wv),
            };
            self.conv_forward(&d, &x.buf, wc, &mut z)?;
        }
        let mut mean = self.alloc(O, "batch-norm statistics")?;
        let mut invstd = self.alloc(O, "batch-norm statistics")?;
        let cfg = BnConfig::default();
        let (ni, channels, plane) = (int(n, "batch")?, int(O, "channels")?, (oh * ow) as i64);
        // synchronised batch norm: the statistics of the whole group's batch (every GPU's
        // of the same size, as on the CPU)
        let synced = self.syncs_bn();
        let world = if synced { self.group_world() } else { 1 };
        {
            let (mut rm, mut rv) = (run_mean.value.borrow_mut(), run_var.value.borrow_mut());
            if !synced {
                // SAFETY: z holds n·O·plane values; mean, invstd and the running
                // statistics O.
                launch!(self, bn_stats, per_channel(O), "the batch-norm statistics kernel";
                    z.slice(), mean.slice_mut(), invstd.slice_mut(), &mut *rm, &mut *rv,
                    &ni, &channels, &plane, &cfg.eps, &cfg.momentum)?;
            } else {
                let count = (len / O * world) as f64;
                let stream = &self.inner.stream;
                let alloc = || {
                    stream
                        .alloc_zeros::<f64>(O)
                        .map_err(|e| driver_err(e, "batch-norm statistics", O * 8))
                };
                let (mut sums, mut squares, null) = (alloc()?, alloc()?, 0u64);
                // SAFETY (all three): z holds n·O·plane values, the sums O each.
                launch!(self, bn_moments, per_channel(O), "the batch-norm statistics kernel";
                    z.slice(), &null, &count, &mut sums, &ni, &channels, &plane)?;
                self.group_sum(&mut sums)?;
                launch!(self, bn_moments, per_channel(O), "the batch-norm statistics kernel";
                    z.slice(), &sums, &count, &mut squares, &ni, &channels, &plane)?;
                self.group_sum(&mut squares)?;
                launch!(self, bn_stats_finish, grid_for(O), "the batch-norm statistics kernel";
                    &sums, &squares, &count, mean.slice_mut(), invstd.slice_mut(), &mut *rm,
                    &mut *rv, &channels, &cfg.eps, &cfg.momentum)?;
            }
        }
        let mut y = self.alloc_act(len, &what)?;
        {
            let res_ptr = raw(self, residual.as_ref().map(|r| &*r.buf));
            let (relu_i, total) = (i32::from(relu), len as i64);
            let (gv, bv) = (gamma.value.borrow(), beta.value.borrow());
            // SAFETY: z, y and the residual hold len values; the rest O.
            launch!(self, bn_apply, grid_for(len), "the batch-norm kernel";
                z.slice(), y.slice_mut(), mean.slice(), invstd.slice(), &*gv, &*bv,
                &res_ptr, &relu_i, &total, &channels, &plane)?;
        }
        bn.num_batches_tracked += 1;
        let y = Rc::new(y);
        let saved = ConvBnSaved {
            x_id: x.id,
            x: x.buf,
            z,
            y: y.clone(),
            mean,
            invstd,
            w,
            w_act,
            gamma,
            beta,
            d,
            relu,
            res_id: residual.as_ref().map_or(0, |r| r.id),
            channels: O,
            plane: oh * ow,
            synced,
            world,
        };
        drop(residual);
        let writes = vec![saved.w.key, saved.gamma.key, saved.beta.key];
        let id = self.record_writing(writes, move |gpu, dy, grads| saved.backward(gpu, dy, grads));
        Ok(CudaAct {
            buf: y,
            dims: [n, oh, ow],
            id,
        })
    }

    fn stop_grad<const C: usize>(&self, x: CudaAct<C>) -> Result<CudaAct<C>> {
        self.inner.tape.borrow_mut().recording = false;
        Ok(CudaAct { id: 0, ..x })
    }

    fn resume_grad<const C: usize>(&self, x: CudaAct<C>) -> Result<CudaAct<C>> {
        self.inner.tape.borrow_mut().recording = true;
        Ok(x)
    }
}

/// What an eval-mode (frozen) convolution inside a trained network keeps for its
/// backward: its inputs' gradients only.
pub(super) struct EvalConvSaved {
    pub(super) x_id: u64,
    pub(super) x_len: usize,
    pub(super) w: Rc<FoldedConv>,
    pub(super) y: Rc<DevBuf>,
    pub(super) d: ConvDims,
    pub(super) relu: bool,
    pub(super) res_id: u64,
}

impl EvalConvSaved {
    pub(super) fn backward(self, gpu: &Gpu, dy: DevBuf, grads: &mut Grads) -> Result<()> {
        let len = dy.len();
        let mut dz = gpu.alloc_act(len, "a convolution's output gradient")?;
        {
            let (res_ptr, acc) = grads.residual(gpu, self.res_id, len)?;
            let (relu, total) = (i32::from(self.relu), len as i64);
            // SAFETY: dy, y, dz and the residual's gradient hold len values.
            launch!(gpu, act_backward, grid_for(len), "the activation backward kernel";
                dy.slice(), self.y.slice(), &relu, dz.slice_mut(), &res_ptr, &acc, &total)?;
        }
        if self.x_id != 0 {
            let (dx, existed) = grads.slot(gpu, self.x_id, self.x_len, false)?;
            gpu.conv_backward_data(&self.d, ConvW::Act(&self.w.w), &dz, dx, existed)?;
        }
        Ok(())
    }
}

/// What a max pooling keeps for its backward.
pub(super) struct MaxPoolSaved {
    pub(super) x_id: u64,
    pub(super) x: Rc<DevBuf>,
    pub(super) planes: i64,
    /// Input and output height and width.
    pub(super) hw: [i32; 4],
    /// Window, stride, padding.
    pub(super) ksp: [i32; 3],
}

impl MaxPoolSaved {
    pub(super) fn backward(self, gpu: &Gpu, dy: DevBuf, grads: &mut Grads) -> Result<()> {
        let ([h, w, oh, ow], [k, s, p]) = (&self.hw, &self.ksp);
        let len = self.x.len();
        // the kernel adds in f32 (atomically): to the gradient itself in fp32, to a
        // zeroed f32 scratch written to it after in bf16
        let mut scratch = match gpu.precision() {
            Precision::Fp32 => None,
            Precision::Bf16 => {
                let mut b = gpu.alloc(len, "max pooling's input gradient")?;
                gpu.inner
                    .stream
                    .memset_zeros(b.slice_mut())
                    .map_err(call_err("zeroing a gradient"))?;
                Some(b)
            }
        };
        let (dx, existed) = grads.slot(gpu, self.x_id, len, scratch.is_none())?;
        {
            let target = match &mut scratch {
                Some(b) => b.slice_mut(),
                None => dx.slice_mut(),
            };
            // SAFETY: x and the target hold planes·h·w values, dy planes·oh·ow.
            launch!(gpu, max_pool2d_backward, grid_for(dy.len()), "the max-pool backward kernel";
                self.x.slice(), dy.slice(), target, &self.planes, h, w, oh, ow, k, s, p)?;
        }
        if let Some(b) = scratch {
            let (n, acc) = (len as i64, i32::from(existed));
            // SAFETY: the scratch and dx hold len values.
            launch!(gpu, float_to_act, grid_for(len), "the max-pool backward kernel";
                b.slice(), dx.slice_mut(), &n, &acc)?;
        }
        Ok(())
    }
}

/// What the head (global average pooling and the classifier) keeps for its backward.
pub(super) struct ClassifySaved {
    pub(super) pooled: DevBuf,
    pub(super) x_id: u64,
    pub(super) x_len: usize,
    pub(super) plane: usize,
    /// Batch, classes, features.
    pub(super) dims: [usize; 3],
    pub(super) w: Rc<TrainParam>,
    pub(super) b: Rc<TrainParam>,
}

impl ClassifySaved {
    pub(super) fn backward(self, gpu: &Gpu, dy: DevBuf, grads: &mut Grads) -> Result<()> {
        let [n, o, f] = self.dims;
        let (ni, oi, fi) = (int(n, "batch")?, int(o, "classes")?, int(f, "features")?);
        let blas = &gpu.inner.blas;
        {
            // column-major: dWᵀ (F × o) += pooledᵀ (F × n) · dy (n × o), i.e. the
            // row-major (o, F) dW += dyᵀ · pooled
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_T,
                m: fi,
                n: oi,
                k: ni,
                alpha: 1.0f32,
                lda: fi,
                ldb: oi,
                beta: 1.0f32,
                ldc: fi,
            };
            let mut dw = self.w.grad().borrow_mut();
            // SAFETY: pooled holds n·F values, dy n·o, dW o·F.
            unsafe { blas.gemm(cfg, &self.pooled.view(), &dy.view(), &mut *dw) }
                .map_err(call_err("the classifier's weight gradient (cuBLAS)"))?;
            let mut db = self.b.grad().borrow_mut();
            let rows = n as i64;
            // SAFETY: dy holds n·o values, db o.
            launch!(gpu, col_sum_add, grid_for(o), "the bias gradient kernel";
                dy.slice(), &mut *db, &rows, &oi)?;
        }
        if self.x_id != 0 {
            // column-major: dpooledᵀ (F × n) = W (F × o, the row-major (o, F)) · dyᵀ (o × n)
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: fi,
                n: ni,
                k: oi,
                alpha: 1.0f32,
                lda: fi,
                ldb: oi,
                beta: 0.0f32,
                ldc: fi,
            };
            let mut dp = gpu.alloc(n * f, "the pooled features' gradient")?;
            {
                let w = self.w.value.borrow();
                // SAFETY: W holds o·F values, dy n·o, dpooled n·F.
                unsafe { blas.gemm(cfg, &*w, &dy.view(), &mut dp.view_mut()) }
                    .map_err(call_err("the classifier's input gradient (cuBLAS)"))?;
            }
            let (dx, existed) = grads.slot(gpu, self.x_id, self.x_len, false)?;
            let (rows, plane, acc) = (
                (n * f) as i64,
                int(self.plane, "plane")?,
                i32::from(existed),
            );
            // SAFETY: dpooled holds n·F values, dx n·F·plane.
            launch!(gpu, avg_pool_backward, grid_for(self.x_len), "the average-pool backward kernel";
                dp.slice(), dx.slice_mut(), &rows, &plane, &acc)?;
        }
        Ok(())
    }
}
