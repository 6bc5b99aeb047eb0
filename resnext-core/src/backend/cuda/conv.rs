//! cuDNN convolutions: the descriptors of a [`Conv2dGeom`] (host-side, tested without a
//! GPU), and a plan per shape (descriptors, the algorithm cuDNN picks, its workspace size)
//! made once and cached, with one workspace buffer that grows to the largest plan.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg,
};
use half::bf16;

use super::gpu::{call_err, DevBuf, Gpu};
use crate::backend::device::{GpuError, Precision};
use crate::kernels::conv::Conv2dGeom;

/// The NCHW dims cuDNN is given for a convolution: input, filter `(O, I / groups, k, k)`,
/// output, and padding/stride per axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvDims {
    /// Input `(n, c, h, w)`.
    pub x: [c_int; 4],
    /// Filter `(o, c / groups, k, k)`.
    pub w: [c_int; 4],
    /// Output `(n, o, oh, ow)`.
    pub y: [c_int; 4],
    /// Padding (h, w).
    pub pad: [c_int; 2],
    /// Stride (h, w).
    pub stride: [c_int; 2],
    /// Groups (cardinality).
    pub groups: c_int,
}

impl ConvDims {
    /// The dims of `g`: an error when `g` is not a valid convolution or a size does not
    /// fit cuDNN's 32-bit dims (or its tensors pass 2^31 elements).
    pub fn of(g: &Conv2dGeom) -> Result<Self, GpuError> {
        g.validate().map_err(|msg| GpuError::Call {
            what: "convolution".into(),
            msg,
        })?;
        let too_big = |what: &str| {
            GpuError::Call {
            what: "convolution".into(),
            msg: format!(
                "the {what} of a convolution on {:?} does not fit cuDNN's 32-bit sizes; use a smaller batch",
                [g.batch, g.in_channels, g.in_h, g.in_w]
            ),
        }
        };
        let int = |v: usize, what: &str| c_int::try_from(v).map_err(|_| too_big(what));
        for (len, what) in [
            (g.input_len(), "input"),
            (g.output_len(), "output"),
            (g.weight_len(), "weight"),
        ] {
            int(len, what)?;
        }
        Ok(Self {
            x: [
                int(g.batch, "batch")?,
                int(g.in_channels, "input")?,
                int(g.in_h, "input")?,
                int(g.in_w, "input")?,
            ],
            w: [
                int(g.out_channels, "weight")?,
                int(g.in_per_group(), "weight")?,
                int(g.kernel, "weight")?,
                int(g.kernel, "weight")?,
            ],
            y: [
                int(g.batch, "batch")?,
                int(g.out_channels, "output")?,
                int(g.out_h(), "output")?,
                int(g.out_w(), "output")?,
            ],
            pad: [int(g.padding, "padding")?; 2],
            stride: [int(g.stride, "stride")?; 2],
            groups: int(g.groups, "groups")?,
        })
    }
}

/// The size a workspace of `have` bytes grows to for a plan needing `need`: never smaller,
/// rounded up to 1 MiB so that a run of slightly larger plans does not reallocate each time.
pub fn workspace_growth(have: usize, need: usize) -> usize {
    if need <= have {
        have
    } else {
        need.div_ceil(1 << 20) << 20
    }
}

/// An element type of the convolutions' activations and weights: f32, or bf16 for mixed
/// precision (computing in f32 either way).
pub(super) trait Elem: CudnnDataType + DeviceRepr + Copy + 'static {
    /// `v` in this type (cuDNN's scaling factors, 0 and 1, are exact in both).
    fn of(v: f32) -> Self;
    /// The cuDNN math type: fp32 means fp32 (no TF32 tensor-core rounding, so results
    /// match the CPU's); bf16 runs on the tensor cores.
    const MATH: sys::cudnnMathType_t;
    /// The plans of this type.
    fn plans(c: &mut Plans) -> &mut HashMap<ConvDims, Plan<Self>>;
}

impl Elem for f32 {
    fn of(v: f32) -> Self {
        v
    }
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_FMA_MATH;
    fn plans(c: &mut Plans) -> &mut HashMap<ConvDims, Plan<Self>> {
        &mut c.f32
    }
}

impl Elem for bf16 {
    fn of(v: f32) -> Self {
        bf16::from_f32(v)
    }
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    fn plans(c: &mut Plans) -> &mut HashMap<ConvDims, Plan<Self>> {
        &mut c.bf16
    }
}

/// One convolution shape made ready for cuDNN, with activations and weights of type `T`.
pub(super) struct Plan<T: Elem> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    /// The backward algorithms and their workspace sizes, chosen at the first backward
    /// pass of the shape (an eval-only run never asks cuDNN for them).
    data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

impl<T: Elem> Plan<T> {
    fn new(cudnn: &Arc<Cudnn>, d: &ConvDims) -> Result<Self, GpuError> {
        let e = call_err("cuDNN convolution descriptor");
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x = cudnn.create_4d_tensor::<T>(nchw, d.x).map_err(&e)?;
        let y = cudnn.create_4d_tensor::<T>(nchw, d.y).map_err(&e)?;
        let w = cudnn.create_4d_filter::<T>(nchw, d.w).map_err(&e)?;
        let mut conv = cudnn
            .create_conv2d::<f32>(
                d.pad,
                d.stride,
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(&e)?;
        conv.set_group_count(d.groups).map_err(&e)?;
        conv.set_math_type(T::MATH).map_err(&e)?;
        let op = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        let algo = op
            .pick_algorithm()
            .map_err(call_err("choosing a cuDNN algorithm"))?;
        let workspace = op
            .get_workspace_size(algo)
            .map_err(call_err("cuDNN workspace size"))?;
        Ok(Self {
            x,
            w,
            y,
            conv,
            algo,
            workspace,
            data: None,
            filter: None,
        })
    }

    fn backward_data(&self) -> ConvBackwardData<'_, T, f32, T> {
        ConvBackwardData {
            conv: &self.conv,
            dx: &self.x,
            w: &self.w,
            dy: &self.y,
        }
    }

    fn backward_filter(&self) -> ConvBackwardFilter<'_, T, f32, T> {
        ConvBackwardFilter {
            conv: &self.conv,
            x: &self.x,
            dw: &self.w,
            dy: &self.y,
        }
    }
}

/// cuDNN's (alpha, beta): overwrite the output, or add to what it holds.
fn scaling<T: Elem>(accumulate: bool) -> (T, T) {
    (T::of(1.0), T::of(if accumulate { 1.0 } else { 0.0 }))
}

/// Plans by element type and shape.
#[derive(Default)]
pub(super) struct Plans {
    f32: HashMap<ConvDims, Plan<f32>>,
    bf16: HashMap<ConvDims, Plan<bf16>>,
}

/// The plans, and the workspace they share.
pub(super) struct Convs {
    cudnn: Arc<Cudnn>,
    plans: Plans,
    workspace: Option<CudaSlice<u8>>,
}

impl Convs {
    pub(super) fn new(cudnn: Arc<Cudnn>) -> Self {
        Self {
            cudnn,
            plans: Plans::default(),
            workspace: None,
        }
    }

    /// The plan of shape `d` for type `T`, made on first use.
    fn plan<T: Elem>(&mut self, d: &ConvDims) -> Result<&mut Plan<T>, GpuError> {
        let plans = T::plans(&mut self.plans);
        if !plans.contains_key(d) {
            plans.insert(*d, Plan::new(&self.cudnn, d)?);
        }
        Ok(plans.get_mut(d).expect("plan just made"))
    }

    /// `y = conv(x, w)` for the shape `d` (`y` overwritten).
    pub(super) fn forward<T: Elem>(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<(), GpuError> {
        let need = self.plan::<T>(d)?.workspace;
        let ws = grown(&mut self.workspace, stream, need)?;
        let plan = &T::plans(&mut self.plans)[d];
        let op = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        // SAFETY: the buffers hold the descriptors' sizes (checked by the caller against
        // the same geometry), NCHW of type T as described.
        unsafe { op.launch(plan.algo, ws, scaling(false), x, w, y) }
            .map_err(call_err("cuDNN convolution"))
    }

    /// `dx (+)= conv_transpose(dy, w)`, the input gradient of the shape `d`.
    pub(super) fn backward_data<T: Elem>(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        w: &impl DevicePtr<T>,
        dy: &impl DevicePtr<T>,
        dx: &mut impl DevicePtrMut<T>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let plan = self.plan::<T>(d)?;
        let (algo, need) = match plan.data {
            Some(a) => a,
            None => {
                let op = plan.backward_data();
                let algo = op
                    .pick_algorithm()
                    .map_err(call_err("choosing a cuDNN backward-data algorithm"))?;
                let need = op
                    .get_workspace_size(algo)
                    .map_err(call_err("cuDNN workspace size"))?;
                plan.data = Some((algo, need));
                (algo, need)
            }
        };
        let ws = grown(&mut self.workspace, stream, need)?;
        // SAFETY: as in `forward`; dx holds the input's size, dy the output's.
        unsafe {
            T::plans(&mut self.plans)[d].backward_data().launch(
                algo,
                ws,
                scaling(accumulate),
                dx,
                w,
                dy,
            )
        }
        .map_err(call_err("cuDNN convolution backward (data)"))
    }

    /// `dw (+)= the weight gradient of the shape `d` from its input `x` and `dy`.
    pub(super) fn backward_filter<T: Elem>(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        x: &impl DevicePtr<T>,
        dy: &impl DevicePtr<T>,
        dw: &mut impl DevicePtrMut<T>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let plan = self.plan::<T>(d)?;
        let (algo, need) = match plan.filter {
            Some(a) => a,
            None => {
                let op = plan.backward_filter();
                let algo = op
                    .pick_algorithm()
                    .map_err(call_err("choosing a cuDNN backward-filter algorithm"))?;
                let need = op
                    .get_workspace_size(algo)
                    .map_err(call_err("cuDNN workspace size"))?;
                plan.filter = Some((algo, need));
                (algo, need)
            }
        };
        let ws = grown(&mut self.workspace, stream, need)?;
        // SAFETY: as in `forward`; dw holds the weight's size.
        unsafe {
            T::plans(&mut self.plans)[d].backward_filter().launch(
                algo,
                ws,
                scaling(accumulate),
                x,
                dw,
                dy,
            )
        }
        .map_err(call_err("cuDNN convolution backward (filter)"))
    }
}

/// The shared workspace `ws`, grown to at least `need` bytes
/// ([`workspace_growth`]).
fn grown<'a>(
    ws: &'a mut Option<CudaSlice<u8>>,
    stream: &Arc<CudaStream>,
    need: usize,
) -> Result<Option<&'a mut CudaSlice<u8>>, GpuError> {
    let have = ws.as_ref().map_or(0, |w| w.len());
    let size = workspace_growth(have, need);
    if size > have {
        *ws = None;
        // SAFETY: the workspace is scratch cuDNN writes before it reads.
        let fresh = unsafe { stream.alloc::<u8>(size) }
            .map_err(|e| super::gpu::driver_err(e, "a cuDNN workspace", size))?;
        *ws = Some(fresh);
    }
    Ok(ws.as_mut())
}

/// A convolution's weights as the convolutions read them.
pub(super) enum ConvW<'a> {
    /// In the activations' precision (folded eval-mode weights, the bf16 copy of a
    /// training weight).
    Act(&'a DevBuf),
    /// An f32 training copy, read as it is in fp32.
    F32(&'a CudaSlice<f32>),
}

impl ConvW<'_> {
    /// The weights as `T`, the element type of the GPU's precision: an error for f32
    /// weights given to a bf16 convolution (a bug of the backend, reported rather than
    /// read as the wrong type).
    fn typed<T: Elem>(&self) -> Result<CudaView<'_, T>, GpuError> {
        match self {
            ConvW::Act(b) => Ok(b.typed()),
            // SAFETY: an f32 slice read as T only where T is f32 (checked by the size)
            ConvW::F32(s) if std::mem::size_of::<T>() == 4 => {
                Ok(unsafe { s.transmute::<T>(s.len()) }.expect("the slice holds len values"))
            }
            ConvW::F32(_) => Err(GpuError::Call {
                what: "convolution".into(),
                msg: "f32 weights given to a bf16 convolution".into(),
            }),
        }
    }
}

impl Gpu {
    /// `y = conv(x, w)` for the shape `d`, in the GPU's precision.
    pub(super) fn conv_forward(
        &self,
        d: &ConvDims,
        x: &DevBuf,
        w: ConvW<'_>,
        y: &mut DevBuf,
    ) -> Result<(), GpuError> {
        fn run<T: Elem>(
            gpu: &Gpu,
            d: &ConvDims,
            x: &DevBuf,
            w: ConvW<'_>,
            y: &mut DevBuf,
        ) -> Result<(), GpuError> {
            let w = w.typed::<T>()?;
            gpu.inner.convs.borrow_mut().forward::<T>(
                &gpu.inner.stream,
                d,
                &x.typed(),
                &w,
                &mut y.typed_mut(),
            )
        }
        match self.precision() {
            Precision::Fp32 => run::<f32>(self, d, x, w, y),
            Precision::Bf16 => run::<bf16>(self, d, x, w, y),
        }
    }

    /// `dx (+)= conv_transpose(dy, w)`, the input gradient of the shape `d`.
    pub(super) fn conv_backward_data(
        &self,
        d: &ConvDims,
        w: ConvW<'_>,
        dy: &DevBuf,
        dx: &mut DevBuf,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        fn run<T: Elem>(
            gpu: &Gpu,
            d: &ConvDims,
            w: ConvW<'_>,
            dy: &DevBuf,
            dx: &mut DevBuf,
            acc: bool,
        ) -> Result<(), GpuError> {
            let w = w.typed::<T>()?;
            gpu.inner.convs.borrow_mut().backward_data::<T>(
                &gpu.inner.stream,
                d,
                &w,
                &dy.typed(),
                &mut dx.typed_mut(),
                acc,
            )
        }
        match self.precision() {
            Precision::Fp32 => run::<f32>(self, d, w, dy, dx, accumulate),
            Precision::Bf16 => run::<bf16>(self, d, w, dy, dx, accumulate),
        }
    }

    /// `dw += the weight gradient of the shape `d` from its input `x` and `dy`: dw is the
    /// f32 gradient of the weight; in bf16 cuDNN writes the gradient in bf16 to a scratch
    /// buffer, which a kernel adds to it.
    pub(super) fn conv_backward_filter(
        &self,
        d: &ConvDims,
        x: &DevBuf,
        dy: &DevBuf,
        dw: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let stream = &self.inner.stream;
        match self.precision() {
            Precision::Fp32 => self.inner.convs.borrow_mut().backward_filter::<f32>(
                stream,
                d,
                &x.typed(),
                &dy.typed(),
                dw,
                true,
            ),
            Precision::Bf16 => {
                let len = dw.len();
                let mut part = self.alloc_act(len, "a weight gradient in bf16")?;
                self.inner.convs.borrow_mut().backward_filter::<bf16>(
                    stream,
                    d,
                    &x.typed(),
                    &dy.typed(),
                    &mut part.typed_mut(),
                    false,
                )?;
                let n = len as i64;
                // SAFETY: part and dw hold n values.
                launch!(self, add_act_to_float, super::kernels::grid_for(len), "the weight-gradient kernel";
                    part.slice(), dw, &n)
            }
        }
    }
}
