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
//! buffers from a caching allocator. Training on the GPU is not implemented yet.
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

mod alloc;
mod conv;
mod gpu;
pub mod kernels;

pub use alloc::{size_class, CachingPool, PoolStats, RawAlloc};
pub use conv::{workspace_growth, ConvDims};
pub use gpu::{device_count, driver_present, DevBuf, Gpu};

use std::rc::Rc;

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::PushKernelArg;
use dfdx::prelude::*;

use self::gpu::{call_err, FoldedConv, GpuLinear};
use self::kernels::grid_for;
use super::{param_key, Backend};
use crate::error::{shape_err, Result};
use crate::nn::{BatchNorm2d, ConvLayer, Linear};
use crate::ops::{conv_geom, folded_weights, BnConfig};

/// A `(batch, C, height, width)` activation on the GPU: the channel count in the type, the
/// rest at run time. Cloning shares the buffer (activations are never written in place).
#[derive(Clone, Debug)]
pub struct CudaAct<const C: usize> {
    buf: Rc<DevBuf>,
    dims: [usize; 3],
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
}

impl<O: Dim> CudaLogits<O> {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols.size())
    }
}

/// An `i32` kernel argument from a size (the kernels take 32-bit sizes where CUDA's own
/// limits are 32-bit; 64-bit totals are passed as `i64`).
fn int(v: usize, what: &str) -> Result<i32> {
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
        let buf = self.upload(x, &format!("an input batch of {n}"))?;
        Ok(CudaAct {
            buf: Rc::new(buf),
            dims: [n, h, w],
        })
    }

    /// The values of an activation, `(n, C, h, w)` row-major, copied to the host.
    pub fn activation<const C: usize>(&self, x: &CudaAct<C>) -> Result<Vec<f32>> {
        Ok(self.download(&x.buf)?)
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
            w: self.upload_param(&w)?,
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
        let g = conv_geom::<I, O, _>(x.dims, conv.weight(), C::CONFIG)?;
        let d = ConvDims::of(&g)?;
        let (oh, ow) = (g.out_h(), g.out_w());
        if let Some(r) = &residual {
            if r.dims != [n, oh, ow] {
                return Err(shape_err(
                    "conv_bn_eval",
                    format!(
                        "residual of shape {:?} does not match the output ({n}, {O}, {oh}, {ow})",
                        r.shape()
                    ),
                ));
            }
        }
        let f = self.folded(conv, bn)?;
        let mut y = self.alloc(
            g.output_len(),
            &format!("a convolution output at batch {n}"),
        )?;
        self.inner.convs.borrow_mut().forward(
            &self.inner.stream,
            &d,
            &x.buf.view(),
            &f.w,
            &mut y.view_mut(),
        )?;
        drop(x);
        let total = g.output_len() as i64;
        let (relu, channels, plane) = (i32::from(relu), int(O, "channels")?, (oh * ow) as i64);
        let stream = &self.inner.stream;
        let mut launch = stream.launch_builder(&self.inner.k.bias_residual_act);
        let mut yv = y.view_mut();
        launch.arg(&mut yv).arg(&f.shift);
        let rv = residual.as_ref().map(|r| r.buf.view());
        let null = 0u64;
        match &rv {
            Some(r) => launch.arg(r),
            None => launch.arg(&null),
        };
        launch.arg(&relu).arg(&total).arg(&channels).arg(&plane);
        // SAFETY: y and the residual hold `total` values, shift `channels`; the kernel
        // reads and writes only those.
        unsafe { launch.launch(grid_for(g.output_len())) }
            .map_err(call_err("the convolution epilogue kernel"))?;
        Ok(CudaAct {
            buf: Rc::new(y),
            dims: [n, oh, ow],
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
        let mut y = self.alloc(len, &format!("a max-pool output at batch {n}"))?;
        let planes = (n * C) as i64;
        let args = [
            int(h, "height")?,
            int(w, "width")?,
            int(oh, "height")?,
            int(ow, "width")?,
        ];
        let (k, s, p) = (K as i32, S as i32, P as i32);
        let xv = x.buf.view();
        let mut yv = y.view_mut();
        let mut launch = self.inner.stream.launch_builder(&self.inner.k.max_pool2d);
        launch.arg(&xv).arg(&mut yv).arg(&planes);
        for a in &args {
            launch.arg(a);
        }
        launch.arg(&k).arg(&s).arg(&p);
        // SAFETY: x holds planes·h·w values, y planes·oh·ow.
        unsafe { launch.launch(grid_for(len)) }.map_err(call_err("the max-pool kernel"))?;
        Ok(CudaAct {
            buf: Rc::new(y),
            dims: [n, oh, ow],
        })
    }

    fn avg_pool<const F: usize>(&self, x: CudaAct<F>) -> Result<CudaLogits<Const<F>>> {
        let [n, h, w] = x.dims;
        let rows = (n * F) as i64;
        let plane = int(h * w, "plane")?;
        let mut y = self.alloc(n * F, &format!("pooled features at batch {n}"))?;
        let xv = x.buf.view();
        let mut yv = y.view_mut();
        let mut launch = self
            .inner
            .stream
            .launch_builder(&self.inner.k.global_avg_pool);
        launch.arg(&xv).arg(&mut yv).arg(&rows).arg(&plane);
        // SAFETY: x holds rows·plane values, y rows; one warp (32 threads) a row.
        unsafe { launch.launch(grid_for(n * F * 32)) }
            .map_err(call_err("the average-pool kernel"))?;
        Ok(CudaLogits {
            buf: y,
            rows: n,
            cols: Const,
        })
    }

    fn classify<const F: usize, O: Dim>(
        &self,
        x: CudaAct<F>,
        fc: &Linear<F, O, f32, Cpu>,
    ) -> Result<CudaLogits<O>> {
        let n = x.dims[0];
        let pooled = self.avg_pool(x)?;
        let l = self.linear(fc)?;
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
                .gemm(cfg, &l.w, &pooled.buf.view(), &mut y.view_mut())
        }
        .map_err(call_err("the classifier's cuBLAS product"))?;
        let (rows, ncols) = (n as i64, int(o, "classes")?);
        let mut yv = y.view_mut();
        let mut launch = self
            .inner
            .stream
            .launch_builder(&self.inner.k.add_bias_rows);
        launch.arg(&mut yv).arg(&l.b).arg(&rows).arg(&ncols);
        // SAFETY: y holds rows·cols values, b cols.
        unsafe { launch.launch(grid_for(n * o)) }.map_err(call_err("the bias kernel"))?;
        Ok(CudaLogits {
            buf: y,
            rows: n,
            cols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::GpuError;
    use crate::builders::{ResNeXt29_8x64d, ResNeXt50_32x4d};

    /// The typed networks run on the GPU backend with their channel counts checked at
    /// compile time (type-checked here; run by the GPU tests below where a GPU is).
    #[allow(dead_code)]
    fn typed_networks_take_and_give_gpu_activations(
        gpu: &Gpu,
        dev: &Cpu,
    ) -> Result<(CudaLogits<Const<1000>>, CudaLogits<Const<10>>)> {
        let net = dev.build_module::<ResNeXt50_32x4d<1000>, f32>();
        let x: CudaAct<3> = gpu.input(&[0.0; 3 * 64 * 64], [1, 3, 64, 64])?;
        let cifar = dev.build_module::<ResNeXt29_8x64d<10>, f32>();
        let y: CudaAct<3> = gpu.input(&[0.0; 3 * 32 * 32], [1, 3, 32, 32])?;
        Ok((net.eval_on(gpu, x)?, cifar.eval_on(gpu, y)?))
    }

    /// Whether to run the GPU tests: a driver and a GPU are there. `RESNEXT_REQUIRE_GPU=1`
    /// (the GPU check script sets it) makes their absence a failure instead of a skip.
    fn gpu_or_skip() -> Option<Gpu> {
        let required = std::env::var_os("RESNEXT_REQUIRE_GPU").is_some();
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) if !required => {
                eprintln!("skipped: {e}");
                None
            }
            Err(e) => panic!("RESNEXT_REQUIRE_GPU is set: {e}"),
        }
    }

    /// Max |a - b| / max(1, |b|) over the values.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0.0, f32::max)
    }

    /// On a GPU: every network's eval-mode logits equal the CPU's (fp32, TF32 off), with
    /// random weights and running statistics, at two batch sizes and odd image sizes.
    #[test]
    fn gpu_eval_logits_match_the_cpu() {
        let Some(gpu) = gpu_or_skip() else { return };
        let dev = Cpu::seed_from_u64(7);
        for (arch, shape) in [
            ("resnext11_8x8d", [3, 3, 32, 32]),
            ("resnext29_8x64d", [2, 3, 33, 31]),
            ("resnext50_32x4d", [2, 3, 96, 80]),
        ] {
            let arch: crate::model::Arch = arch.parse().unwrap();
            let mut net = arch.build(&dev, 3, 17).unwrap();
            let x = crate::testing::values(5, shape.iter().product());
            // one training step on the CPU: running statistics and weights no longer the
            // initial ones, so the folding of every batch norm is tested
            let mut opt = crate::optim::Optimizer::new(crate::optim::OptimConfig {
                lr: 0.05,
                ..Default::default()
            });
            let labels: Vec<usize> = (0..shape[0]).collect();
            net.train_step(x.clone(), shape, &labels, 0.0, &mut opt)
                .unwrap();
            let cpu = net.forward_eval(x.clone(), shape).unwrap();
            let on_gpu = net.forward_eval_gpu(&gpu, &x, shape).unwrap();
            let e = rel_err(&on_gpu, &cpu);
            assert!(e <= 1e-4, "{arch} {shape:?}: relative error {e}");
            // the second call reuses the GPU copies of the parameters
            let again = net.forward_eval_gpu(&gpu, &x, shape).unwrap();
            assert_eq!(again, on_gpu, "{arch}: not deterministic");
        }
        let s = gpu.memory();
        assert!(s.hits > 0 && s.in_use == 0, "{s:?}");
    }

    /// On a machine without the NVIDIA driver (CI's), opening a GPU is an error that says
    /// so, not a panic.
    #[test]
    fn without_a_driver_opening_a_gpu_is_an_error_naming_the_driver() {
        if driver_present() {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        assert!(matches!(device_count(), Err(GpuError::NoDriver)));
        let e = Gpu::open(0).unwrap_err();
        assert!(matches!(e, GpuError::NoDriver), "{e}");
        assert!(e.to_string().starts_with("no CUDA driver found"), "{e}");
    }

    /// Random running statistics and affine parameters for `bn`.
    fn randomize<const C: usize>(bn: &mut BatchNorm2d<C, f32, Cpu>, seed: u64) {
        let v = |k: u64| crate::testing::values(seed * 4 + k, C);
        bn.weight.copy_from(&v(0));
        bn.bias.copy_from(&v(1));
        bn.running_mean.copy_from(&v(2));
        let var: Vec<f32> = v(3).iter().map(|x| 0.5 + x.abs()).collect();
        bn.running_var.copy_from(&var);
    }

    /// One fused convolution + batch norm (+ residual, + ReLU) on the GPU against the CPU.
    fn conv_case<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
    >(
        gpu: &Gpu,
        [n, h, w]: [usize; 3],
        relu: bool,
        residual: bool,
    ) {
        let dev = Cpu::seed_from_u64(3);
        let conv = dev.build_module::<crate::builders::Conv2d<I, O, K, S, P, G>, f32>();
        let mut bn = dev.build_module::<crate::builders::BatchNorm2d<O>, f32>();
        randomize(&mut bn, (I * 31 + O * 7 + K + S) as u64);
        let x = crate::testing::values(1, n * I * h * w);
        let (oh, ow) = ((h + 2 * P - K) / S + 1, (w + 2 * P - K) / S + 1);
        let r = residual.then(|| crate::testing::values(2, n * O * oh * ow));
        let (cpu, ..) = crate::ops::conv2d_bn_eval_raw::<I, O, _>(
            &x,
            [n, h, w],
            &conv.weight,
            <crate::nn::Conv2d<I, O, K, S, P, G, f32, Cpu> as ConvLayer<I, O>>::CONFIG,
            bn.eval_ref(),
            BnConfig::default().eps,
            relu,
            r.as_deref(),
        )
        .unwrap();
        gpu.forget_params();
        let xg = gpu.input::<I>(&x, [n, I, h, w]).unwrap();
        let rg = r
            .as_ref()
            .map(|r| gpu.input::<O>(r, [n, O, oh, ow]).unwrap());
        let y = gpu.conv_bn_eval(xg, &conv, &bn, relu, rg).unwrap();
        assert_eq!(y.shape(), [n, O, oh, ow]);
        let e = rel_err(&gpu.activation(&y).unwrap(), &cpu);
        assert!(
            e <= 1e-4,
            "conv {I}->{O} k{K} s{S} g{G} on {n}x{h}x{w}: relative error {e}"
        );
    }

    /// On a GPU: each convolution shape of the networks (stem 7×7/2, 1×1, grouped 3×3 at
    /// stride 1 and 2, the CIFAR stem), pooling and the head against the CPU.
    #[test]
    fn gpu_ops_match_the_cpu() {
        let Some(gpu) = gpu_or_skip() else { return };
        conv_case::<3, 64, 7, 2, 3, 1>(&gpu, [2, 45, 38], true, false);
        conv_case::<3, 64, 3, 1, 1, 1>(&gpu, [2, 32, 32], true, false);
        conv_case::<64, 128, 1, 1, 0, 1>(&gpu, [3, 14, 15], true, false);
        conv_case::<128, 128, 3, 1, 1, 32>(&gpu, [2, 14, 13], true, false);
        conv_case::<128, 128, 3, 2, 1, 32>(&gpu, [2, 15, 14], true, false);
        conv_case::<256, 256, 3, 2, 1, 8>(&gpu, [1, 9, 9], true, false);
        conv_case::<128, 256, 1, 1, 0, 1>(&gpu, [2, 7, 7], true, true);
        conv_case::<64, 256, 1, 2, 0, 1>(&gpu, [2, 14, 14], false, false);

        let (n, c, h, w) = (2, 16, 13, 11);
        let x = crate::testing::values(9, n * c * h * w);
        let xg = gpu.input::<16>(&x, [n, c, h, w]).unwrap();
        let y = gpu.max_pool::<16, 3, 2, 1>(xg.clone()).unwrap();
        let (cpu, oh, ow) = crate::ops::max_pool2d_raw(&x, [n, c, h, w], 3, 2, 1).unwrap();
        assert_eq!(y.shape(), [n, c, oh, ow]);
        assert_eq!(gpu.activation(&y).unwrap(), cpu, "max pool");
        let pooled = gpu.avg_pool::<16>(xg.clone()).unwrap();
        let cpu = crate::ops::global_avg_pool_raw(&x, [n, c, h, w]).unwrap();
        assert!(
            rel_err(&gpu.logits(&pooled).unwrap(), &cpu) <= 1e-5,
            "average pool"
        );

        let dev = Cpu::seed_from_u64(5);
        let fc = dev.build_module::<crate::builders::Linear<16, 10>, f32>();
        let logits = gpu.classify(xg, &fc).unwrap();
        let cpu = crate::ops::linear_raw(&cpu, n, &fc.weight, &fc.bias).unwrap();
        assert_eq!(logits.shape(), (n, 10));
        assert!(
            rel_err(&gpu.logits(&logits).unwrap(), &cpu) <= 1e-5,
            "classifier"
        );
    }
}
