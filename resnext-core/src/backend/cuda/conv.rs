//! cuDNN convolutions: the descriptors of a [`Conv2dGeom`] (host-side, tested without a
//! GPU), and a plan per shape (descriptors, the algorithm cuDNN picks, its workspace size)
//! made once and cached, with one workspace buffer that grows to the largest plan.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::gpu::call_err;
use crate::backend::device::GpuError;
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

/// One convolution shape made ready for cuDNN.
pub(super) struct Plan {
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    conv: ConvDescriptor<f32>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    /// The backward algorithms and their workspace sizes, chosen at the first backward
    /// pass of the shape (an eval-only run never asks cuDNN for them).
    data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

impl Plan {
    fn new(cudnn: &Arc<Cudnn>, d: &ConvDims) -> Result<Self, GpuError> {
        let e = call_err("cuDNN convolution descriptor");
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x = cudnn.create_4d_tensor::<f32>(nchw, d.x).map_err(&e)?;
        let y = cudnn.create_4d_tensor::<f32>(nchw, d.y).map_err(&e)?;
        let w = cudnn.create_4d_filter::<f32>(nchw, d.w).map_err(&e)?;
        let mut conv = cudnn
            .create_conv2d::<f32>(
                d.pad,
                d.stride,
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(&e)?;
        conv.set_group_count(d.groups).map_err(&e)?;
        // fp32 means fp32: no TF32 tensor-core rounding, so results match the CPU's
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_FMA_MATH)
            .map_err(&e)?;
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

    fn backward_data(&self) -> ConvBackwardData<'_, f32, f32, f32> {
        ConvBackwardData {
            conv: &self.conv,
            dx: &self.x,
            w: &self.w,
            dy: &self.y,
        }
    }

    fn backward_filter(&self) -> ConvBackwardFilter<'_, f32, f32, f32> {
        ConvBackwardFilter {
            conv: &self.conv,
            x: &self.x,
            dw: &self.w,
            dy: &self.y,
        }
    }
}

/// cuDNN's (alpha, beta): overwrite the output, or add to what it holds.
fn scaling(accumulate: bool) -> (f32, f32) {
    (1.0, if accumulate { 1.0 } else { 0.0 })
}

/// Plans by shape, and the workspace they share.
pub(super) struct Convs {
    cudnn: Arc<Cudnn>,
    plans: HashMap<ConvDims, Plan>,
    workspace: Option<CudaSlice<u8>>,
}

impl Convs {
    pub(super) fn new(cudnn: Arc<Cudnn>) -> Self {
        Self {
            cudnn,
            plans: HashMap::new(),
            workspace: None,
        }
    }

    /// The plan of shape `d`, made on first use.
    fn plan(&mut self, d: &ConvDims) -> Result<&mut Plan, GpuError> {
        if !self.plans.contains_key(d) {
            let plan = Plan::new(&self.cudnn, d)?;
            self.plans.insert(*d, plan);
        }
        Ok(self.plans.get_mut(d).expect("plan just made"))
    }

    /// `y = conv(x, w)` for the shape `d` (`y` overwritten).
    pub(super) fn forward(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), GpuError> {
        let need = self.plan(d)?.workspace;
        let ws = grown(&mut self.workspace, stream, need)?;
        let plan = &self.plans[d];
        let op = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        // SAFETY: the buffers hold the descriptors' sizes (checked by the caller against
        // the same geometry), f32 NCHW as described.
        unsafe { op.launch(plan.algo, ws, (1.0f32, 0.0f32), x, w, y) }
            .map_err(call_err("cuDNN convolution"))
    }

    /// `dx (+)= conv_transpose(dy, w)`, the input gradient of the shape `d`.
    pub(super) fn backward_data(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        w: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        dx: &mut impl DevicePtrMut<f32>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let plan = self.plan(d)?;
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
            self.plans[d]
                .backward_data()
                .launch(algo, ws, scaling(accumulate), dx, w, dy)
        }
        .map_err(call_err("cuDNN convolution backward (data)"))
    }

    /// `dw (+)= the weight gradient of the shape `d` from its input `x` and `dy`.
    pub(super) fn backward_filter(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        x: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        dw: &mut impl DevicePtrMut<f32>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let plan = self.plan(d)?;
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
            self.plans[d]
                .backward_filter()
                .launch(algo, ws, scaling(accumulate), x, dw, dy)
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
