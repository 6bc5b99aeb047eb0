//! The CUDA backend (feature `cuda`): a sibling of [`cpu`](super::cpu) on
//! [cudarc](https://docs.rs/cudarc), which loads the CUDA libraries at run time, so this
//! builds on a machine with no CUDA toolkit and fails with an error, not a panic, on one
//! with no driver.
//!
//! What runs on the GPU today is the eval-mode forward pass of every network:
//! convolutions through cuDNN (grouped, fp32 with TF32 off, the algorithm chosen once per
//! shape and the workspace reused) with the batch norm folded into the weights, the
//! epilogue (shift, residual, ReLU), pooling and the classifier's bias in the backend's own
//! kernels (`kernels.cu`, compiled by NVRTC when the GPU is opened), the classifier's
//! product in cuBLAS. Activations stay on the GPU from the first layer to the logits, in
//! buffers from a caching allocator.
//!
//! Training runs there too ([`Gpu::train_step_by`], `train_gpu` of the networks): the
//! forward pass in training mode records its backward operations on a tape (batch norm
//! with the batch's statistics in the backend's kernels, cuDNN's backward convolutions),
//! and the cross-entropy, the backward pass and the optimiser's update (SGD with momentum,
//! Nesterov and weight decay, or AdamW; clipping by the global norm) run on the GPU on
//! training copies of the parameters, which [`Gpu::sync_to_host`] copies back to the host
//! model.
//!
//! Mixed precision ([`Gpu::open_with`] and [`Precision::Bf16`]): the kernels are compiled
//! with bf16 activations, so every activation and activation gradient takes half the
//! memory and the convolutions run in cuDNN's bf16 configuration on the tensor cores
//! (accumulating in f32); the batch-norm statistics, the weights, their gradients (cuDNN's
//! bf16 weight gradient is added to the f32 one), the optimiser and the classifier stay
//! f32, and each training weight is converted to bf16 for the convolution that reads it.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dfdx::prelude::*;
//! use resnext_core::backend::cuda::Gpu;
//! use resnext_core::builders::ResNeXt50_32x4d;
//!
//! let dev = Cpu::default();
//! let net = dev.build_module::<ResNeXt50_32x4d<1000>, f32>();
//! let gpu = Gpu::open(0)?;
//! let x = gpu.input::<3>(&vec![0.0; 2 * 3 * 224 * 224], [2, 3, 224, 224])?;
//! let logits = gpu.logits(&net.eval_on(&gpu, x)?)?; // (2, 1000), row-major
//! # Ok(()) }
//! ```

/// Launches kernel `$func` of `$gpu` over `$cfg` with the arguments listed; `$what` names
/// it in an error. The callers' SAFETY notes say why every buffer holds what the kernel
/// reads and writes.
macro_rules! launch {
    ($gpu:expr, $func:ident, $cfg:expr, $what:expr; $($arg:expr),* $(,)?) => {{
        let mut l = $gpu.inner.stream.launch_builder(&$gpu.inner.k.$func);
        $( l.arg($arg); )*
        // SAFETY: see the caller.
        unsafe { l.launch($cfg) }.map(drop).map_err(call_err($what))
    }};
}

mod alloc;
mod conv;
mod gpu;
mod group;
pub mod kernels;
mod train;

pub use crate::backend::device::Precision;
pub use alloc::{
    size_class, CachingPool, PoolStats, RawAlloc, LARGE_ROUND, SMALL_LIMIT, SMALL_ROUND,
};
pub use conv::{workspace_growth, ConvDims};
pub use gpu::{device_count, driver_present, DevBuf, Gpu};
pub use group::{id_as_values, id_from_values, nccl_present, BucketPlan};

use std::rc::Rc;

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::PushKernelArg;
use dfdx::prelude::*;

use self::conv::ConvW;
use self::gpu::{call_err, raw, FoldedConv, GpuLinear};
use self::kernels::grid_for;
use super::{param_key, Backend};
use crate::error::{shape_err, Result};
use crate::kernels::conv::Conv2dGeom;
use crate::nn::{BatchNorm2d, ConvLayer, Linear};
use crate::ops::{conv_geom, folded_weights, BnConfig};

/// A `(batch, C, height, width)` activation on the GPU: the channel count in the type, the
/// rest at run time. Cloning shares the buffer (activations are never written in place).
#[derive(Clone, Debug)]
pub struct CudaAct<const C: usize> {
    buf: Rc<DevBuf>,
    dims: [usize; 3],
    /// Which recorded operation made it (its gradient's key in a backward pass); 0 when
    /// none did (an input, or made while not recording).
    id: u64,
}

impl<const C: usize> CudaAct<C> {
    /// `(batch, C, height, width)`.
    pub fn shape(&self) -> [usize; 4] {
        let [n, h, w] = self.dims;
        [n, C, h, w]
    }
}

/// `(batch, O)` rows on the GPU (logits or pooled features), row-major.
#[derive(Debug)]
pub struct CudaLogits<O: Dim> {
    buf: DevBuf,
    rows: usize,
    cols: O,
    /// As [`CudaAct`]'s.
    id: u64,
}

impl<O: Dim> CudaLogits<O> {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols.size())
    }
}

/// An `i32` kernel argument from a size (the kernels take 32-bit sizes where CUDA's own
/// limits are 32-bit; 64-bit totals are passed as `i64`).
pub(super) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| shape_err("cuda", format!("{what} ({v}) does not fit a 32-bit size")))
}

impl Gpu {
    /// An `(n, C, h, w)` batch copied to the GPU, checked against `C`.
    pub fn input<const C: usize>(&self, x: &[f32], shape: [usize; 4]) -> Result<CudaAct<C>> {
        let [n, c, h, w] = shape;
        if c != C {
            return Err(shape_err(
                "input",
                format!("expected {C} channels, got a batch of shape {shape:?}"),
            ));
        }
        if n == 0 || h == 0 || w == 0 || x.len() != n * c * h * w {
            return Err(shape_err(
                "input",
                format!(
                    "{} values do not fill shape {shape:?} (no size may be 0)",
                    x.len()
                ),
            ));
        }
        let buf = self.upload_act(x, &format!("an input batch of {n}"))?;
        Ok(CudaAct {
            buf: Rc::new(buf),
            dims: [n, h, w],
            id: 0,
        })
    }

    /// The values of an activation, `(n, C, h, w)` row-major, copied to the host (as f32
    /// in either precision).
    pub fn activation<const C: usize>(&self, x: &CudaAct<C>) -> Result<Vec<f32>> {
        Ok(self.download_act(&x.buf)?)
    }

    /// The values of `(rows, cols)` logits, row-major, copied to the host.
    pub fn logits<O: Dim>(&self, y: &CudaLogits<O>) -> Result<Vec<f32>> {
        Ok(self.download(&y.buf)?)
    }

    /// The folded weights and shift of `conv` + `bn` on the GPU (made on first use).
    fn folded<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        conv: &C,
        bn: &BatchNorm2d<O, f32, Cpu>,
    ) -> Result<Rc<FoldedConv>> {
        let key = param_key(conv.weight());
        if let Some(f) = self.inner.params.borrow().convs.get(&key) {
            return Ok(f.clone());
        }
        let (w, shift) = folded_weights(conv.weight(), bn.eval_ref(), BnConfig::default().eps);
        let f = Rc::new(FoldedConv {
            w: self.upload_act(&w, "model parameters")?,
            shift: self.upload_param(&shift)?,
        });
        self.inner.params.borrow_mut().convs.insert(key, f.clone());
        Ok(f)
    }

    /// `fc`'s weight and bias on the GPU (made on first use).
    fn linear<const F: usize, O: Dim>(&self, fc: &Linear<F, O, f32, Cpu>) -> Result<Rc<GpuLinear>> {
        let key = param_key(&fc.weight);
        if let Some(l) = self.inner.params.borrow().linears.get(&key) {
            return Ok(l.clone());
        }
        let l = Rc::new(GpuLinear {
            w: self.upload_param(&fc.weight.as_vec())?,
            b: self.upload_param(&fc.bias.as_vec())?,
        });
        self.inner
            .params
            .borrow_mut()
            .linears
            .insert(key, l.clone());
        Ok(l)
    }
}

/// The geometry of `conv` on `x` and its cuDNN dims: an error when they do not fit, or
/// when `residual` (if there is one) is not of the output's shape.
pub(super) fn conv_shape<const I: usize, const O: usize, C: ConvLayer<I, O>>(
    op: &'static str,
    x: &CudaAct<I>,
    conv: &C,
    residual: &Option<CudaAct<O>>,
) -> Result<(Conv2dGeom, ConvDims)> {
    let g = conv_geom::<I, O, _>(x.dims, conv.weight(), C::CONFIG)?;
    let d = ConvDims::of(&g)?;
    let out = [x.dims[0], g.out_h(), g.out_w()];
    match residual {
        Some(r) if r.dims != out => Err(shape_err(
            op,
            format!(
                "residual of shape {:?} does not match the output ({}, {O}, {}, {})",
                r.shape(),
                out[0],
                out[1],
                out[2]
            ),
        )),
        _ => Ok((g, d)),
    }
}

impl Backend for Gpu {
    type Act<const C: usize> = CudaAct<C>;
    type Logits<O: Dim> = CudaLogits<O>;

    fn fork<const C: usize>(&self, x: CudaAct<C>) -> (CudaAct<C>, CudaAct<C>) {
        (x.clone(), x)
    }

    fn identity<const I: usize, const O: usize>(&self, x: CudaAct<I>) -> Result<CudaAct<O>> {
        if I != O {
            return Err(shape_err(
                "identity",
                format!("an identity shortcut cannot turn {I} channels into {O}"),
            ));
        }
        Ok(CudaAct {
            buf: x.buf,
            dims: x.dims,
            id: x.id,
        })
    }

    fn conv_bn_eval<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: CudaAct<I>,
        conv: &C,
        bn: &BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<CudaAct<O>>,
    ) -> Result<CudaAct<O>> {
        let [n, ..] = x.dims;
        let (g, d) = conv_shape("conv_bn_eval", &x, conv, &residual)?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let f = self.folded(conv, bn)?;
        let mut y = self.alloc_act(
            g.output_len(),
            &format!("a convolution output at batch {n}"),
        )?;
        self.conv_forward(&d, &x.buf, ConvW::Act(&f.w), &mut y)?;
        let total = g.output_len() as i64;
        let (relu, channels, plane) = (i32::from(relu), int(O, "channels")?, (oh * ow) as i64);
        let res_ptr = raw(self, residual.as_ref().map(|r| &*r.buf));
        // SAFETY: y and the residual hold `total` values, shift `channels`.
        launch!(self, bias_residual_act, grid_for(g.output_len()), "the convolution epilogue kernel";
            y.slice_mut(), &f.shift, &res_ptr, &relu, &total, &channels, &plane)?;
        let y = Rc::new(y);
        let res_id = residual.as_ref().map_or(0, |r| r.id);
        // a frozen convolution inside a trained network: its inputs' gradients only
        let id = if x.id != 0 || res_id != 0 {
            let saved = train::EvalConvSaved {
                x_id: x.id,
                x_len: x.buf.len(),
                w: f,
                y: y.clone(),
                d,
                relu: relu != 0,
                res_id,
            };
            self.record(move |gpu, dy, grads| saved.backward(gpu, dy, grads))
        } else {
            0
        };
        Ok(CudaAct {
            buf: y,
            dims: [n, oh, ow],
            id,
        })
    }

    fn max_pool<const C: usize, const K: usize, const S: usize, const P: usize>(
        &self,
        x: CudaAct<C>,
    ) -> Result<CudaAct<C>> {
        let [n, h, w] = x.dims;
        if K == 0 || S == 0 || h + 2 * P < K || w + 2 * P < K || P > K / 2 {
            return Err(shape_err(
                "max_pool2d",
                format!("a {K}×{K} window, stride {S}, padding {P} does not fit a {h}×{w} input"),
            ));
        }
        let (oh, ow) = ((h + 2 * P - K) / S + 1, (w + 2 * P - K) / S + 1);
        let len = n * C * oh * ow;
        let mut y = self.alloc_act(len, &format!("a max-pool output at batch {n}"))?;
        let planes = (n * C) as i64;
        let hw = [
            int(h, "height")?,
            int(w, "width")?,
            int(oh, "height")?,
            int(ow, "width")?,
        ];
        let ksp = [int(K, "window")?, int(S, "stride")?, int(P, "padding")?];
        let ([hi, wi, ohi, owi], [k, s, p]) = (&hw, &ksp);
        // SAFETY: x holds planes·h·w values, y planes·oh·ow.
        launch!(self, max_pool2d, grid_for(len), "the max-pool kernel";
            x.buf.slice(), y.slice_mut(), &planes, hi, wi, ohi, owi, k, s, p)?;
        let id = if x.id != 0 {
            let saved = train::MaxPoolSaved {
                x_id: x.id,
                x: x.buf.clone(),
                planes,
                hw,
                ksp,
            };
            self.record(move |gpu, dy, grads| saved.backward(gpu, dy, grads))
        } else {
            0
        };
        Ok(CudaAct {
            buf: Rc::new(y),
            dims: [n, oh, ow],
            id,
        })
    }

    fn avg_pool<const F: usize>(&self, x: CudaAct<F>) -> Result<CudaLogits<Const<F>>> {
        let [n, h, w] = x.dims;
        let rows = (n * F) as i64;
        let plane = int(h * w, "plane")?;
        let mut y = self.alloc(n * F, &format!("pooled features at batch {n}"))?;
        // SAFETY: x holds rows·plane values, y rows; one warp (32 threads) a row.
        launch!(self, global_avg_pool, grid_for(n * F * 32), "the average-pool kernel";
            x.buf.slice(), y.slice_mut(), &rows, &plane)?;
        Ok(CudaLogits {
            buf: y,
            rows: n,
            cols: Const,
            id: 0,
        })
    }

    fn classify<const F: usize, O: Dim>(
        &self,
        x: CudaAct<F>,
        fc: &Linear<F, O, f32, Cpu>,
    ) -> Result<CudaLogits<O>> {
        let [n, xh, xw] = x.dims;
        let (x_id, x_len) = (x.id, x.buf.len());
        let pooled = self.avg_pool(x)?;
        // training: the classifier's training copies (updated on the GPU), else its
        // eval copies
        let train = if self.recording() {
            Some((
                self.train_param(&fc.weight, true)?,
                self.train_param(&fc.bias, true)?,
            ))
        } else {
            None
        };
        let eval = match train {
            None => Some(self.linear(fc)?),
            Some(_) => None,
        };
        let refs = train
            .as_ref()
            .map(|(w, b)| (w.value.borrow(), b.value.borrow()));
        let (lw, lb) = match (&refs, &eval) {
            (Some((w, b)), _) => (&**w, &**b),
            (None, Some(l)) => (&l.w, &l.b),
            (None, None) => unreachable!("one of the two is made"),
        };
        let cols = fc.weight.shape().0;
        let o = cols.size();
        let mut y = self.alloc(n * o, &format!("logits at batch {n}"))?;
        // row-major y (n, o) = pooled (n, F) · Wᵀ, W (o, F) row-major: in cuBLAS's
        // column-major terms yᵀ (o × n) = W (F × o)ᵀ · pooledᵀ (F × n)
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(o, "classes")?,
            n: int(n, "batch")?,
            k: int(F, "features")?,
            alpha: 1.0f32,
            lda: int(F, "features")?,
            ldb: int(F, "features")?,
            beta: 0.0f32,
            ldc: int(o, "classes")?,
        };
        // SAFETY: W holds o·F values, pooled n·F, y n·o, as the dims say.
        unsafe {
            self.inner
                .blas
                .gemm(cfg, lw, &pooled.buf.view(), &mut y.view_mut())
        }
        .map_err(call_err("the classifier's cuBLAS product"))?;
        let (rows, ncols) = (n as i64, int(o, "classes")?);
        // SAFETY: y holds rows·cols values, b cols.
        launch!(self, add_bias_rows, grid_for(n * o), "the bias kernel";
            y.slice_mut(), lb, &rows, &ncols)?;
        drop(refs);
        let id = match train {
            Some((w, b)) => {
                let writes = vec![w.key, b.key];
                let saved = train::ClassifySaved {
                    pooled: pooled.buf,
                    x_id,
                    x_len,
                    plane: xh * xw,
                    dims: [n, o, F],
                    w,
                    b,
                };
                self.record_writing(writes, move |gpu, dy, grads| saved.backward(gpu, dy, grads))
            }
            None => 0,
        };
        Ok(CudaLogits {
            buf: y,
            rows: n,
            cols,
            id,
        })
    }
}
