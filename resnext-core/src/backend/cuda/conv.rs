//! cuDNN convolutions: the descriptors of a [`Conv2dGeom`] (host-side, tested without a
//! GPU), and a plan per shape (descriptors, the algorithm cuDNN picks, its workspace size)
//! made once and cached, with one workspace buffer that grows to the largest plan.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cudnn::{sys, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor};
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
        })
    }
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

    /// `y = conv(x, w)` for the shape `d` (`y` overwritten).
    pub(super) fn forward(
        &mut self,
        stream: &Arc<CudaStream>,
        d: &ConvDims,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), GpuError> {
        if !self.plans.contains_key(d) {
            let plan = Plan::new(&self.cudnn, d)?;
            self.plans.insert(*d, plan);
        }
        let plan = &self.plans[d];
        let have = self.workspace.as_ref().map_or(0, |w| w.len());
        let size = workspace_growth(have, plan.workspace);
        if size > have {
            self.workspace = None;
            // SAFETY: the workspace is scratch cuDNN writes before it reads.
            let ws = unsafe { stream.alloc::<u8>(size) }
                .map_err(|e| super::gpu::driver_err(e, "a cuDNN workspace", size))?;
            self.workspace = Some(ws);
        }
        let op = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        // SAFETY: the buffers hold the descriptors' sizes (checked by the caller against
        // the same geometry), f32 NCHW as described.
        unsafe {
            op.launch(
                plan.algo,
                self.workspace.as_mut(),
                (1.0f32, 0.0f32),
                x,
                w,
                y,
            )
        }
        .map_err(call_err("cuDNN convolution"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geom(
        batch: usize,
        c: usize,
        o: usize,
        hw: usize,
        k: usize,
        s: usize,
        g: usize,
    ) -> Conv2dGeom {
        Conv2dGeom {
            batch,
            in_channels: c,
            out_channels: o,
            in_h: hw,
            in_w: hw,
            kernel: k,
            stride: s,
            padding: k / 2,
            groups: g,
        }
    }

    #[test]
    fn the_grouped_stage_two_convolution_is_described_as_pytorch_shapes_it() {
        // resnext50_32x4d layer2.0.conv2: 256 → 256, 3×3, stride 2, 32 groups, 56×56 in
        let d = ConvDims::of(&geom(8, 256, 256, 56, 3, 2, 32)).unwrap();
        assert_eq!(d.x, [8, 256, 56, 56]);
        assert_eq!(d.w, [256, 8, 3, 3]);
        assert_eq!(d.y, [8, 256, 28, 28]);
        assert_eq!((d.pad, d.stride, d.groups), ([1, 1], [2, 2], 32));
    }

    #[test]
    fn sizes_past_cudnns_32_bits_and_bad_groups_are_errors() {
        let e = ConvDims::of(&geom(1 << 16, 256, 256, 56, 1, 1, 1)).unwrap_err();
        assert!(e.to_string().contains("smaller batch"), "{e}");
        let e = ConvDims::of(&geom(1, 30, 32, 8, 3, 1, 4)).unwrap_err();
        assert!(e.to_string().contains("groups"), "{e}");
    }

    #[test]
    fn the_workspace_only_grows_in_whole_mebibytes() {
        assert_eq!(workspace_growth(0, 0), 0);
        assert_eq!(workspace_growth(0, 1), 1 << 20);
        assert_eq!(workspace_growth(4 << 20, 3 << 20), 4 << 20);
        assert_eq!(workspace_growth(4 << 20, (4 << 20) + 1), 5 << 20);
    }

    proptest! {
        /// The output dims cuDNN is told are those the CPU kernels compute.
        #[test]
        fn descriptor_dims_agree_with_the_cpu_geometry(
            n in 1usize..9, cg in 1usize..9, og in 1usize..9, g in 1usize..5,
            hw in 1usize..40, k in prop::sample::select(vec![1usize, 3, 7]), s in 1usize..3,
        ) {
            let geo = geom(n, cg * g, og * g, hw, k, s, g);
            prop_assume!(geo.validate().is_ok());
            let d = ConvDims::of(&geo).unwrap();
            // cuDNN's rule: out = (in + 2 pad - k) / stride + 1
            let out = |i: c_int| (i + 2 * d.pad[0] - d.w[2]) / d.stride[0] + 1;
            prop_assert_eq!(out(d.x[2]) as usize, geo.out_h());
            prop_assert_eq!(d.y, [n as c_int, (og * g) as c_int, geo.out_h() as c_int, geo.out_w() as c_int]);
            prop_assert_eq!(d.w[1] * d.groups, d.x[1]);
            prop_assert_eq!(d.w.iter().product::<c_int>() as usize, geo.weight_len());
        }
    }
}
