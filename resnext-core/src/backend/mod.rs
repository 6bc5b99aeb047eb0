//! The device seam: what computes a typed network.
//!
//! The typed modules in [`crate::nn`] and [`crate::model`] own the parameters (dfdx tensors
//! on the host, with torchvision's names: weights I/O, the optimiser and parameter counts
//! work on them) and the wiring: which convolution feeds which batch norm, where the
//! shortcut joins. The wiring is written once, over a [`Backend`]
//! ([`crate::model::Layer`]), so a mis-wired block fails to compile whatever computes it.
//! A backend owns the activations and the arithmetic. [`cpu::CpuBackend`] is the one
//! that exists: its activations are dfdx tensors on a tape (training, and eval mode with
//! gradients) or, for inference without a tape, plain buffers that pass from one fused
//! convolution + batch norm to the next.
//!
//! A backend on another device is a sibling of [`cpu`]: it names its own activation type
//! (device memory plus the runtime dims, the channel count still in the type), implements
//! [`Backend`] (and [`TrainBackend`] to train), and keeps its own copy of each parameter
//! it is handed, keyed by [`param_key`] (the host tensor stays the master that is saved
//! and loaded). Nothing in [`crate::nn`] or [`crate::model`] changes for it.

use dfdx::prelude::*;

use crate::error::Result;
use crate::nn::{BatchNorm2d, ConvLayer, Linear};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;

/// The operations a ResNeXt's eval-mode forward pass needs, on activations of the
/// backend's own type. Every activation carries its channel count in the type, so the
/// wiring written over this trait is checked at compile time.
pub trait Backend {
    /// A `(batch, C, height, width)` activation.
    type Act<const C: usize>;
    /// `(batch, O)` logits.
    type Logits<O: Dim>;

    /// Two handles on `x`, for a block's residual branch and its shortcut.
    fn fork<const C: usize>(&self, x: Self::Act<C>) -> (Self::Act<C>, Self::Act<C>);

    /// The identity shortcut: `x` as an activation with `O` channels, where `I == O` is
    /// checked at run time (blocks call it only then).
    fn identity<const I: usize, const O: usize>(&self, x: Self::Act<I>) -> Result<Self::Act<O>>;

    /// Eval mode: `relu?(bn(conv(x)) + residual)` with the running statistics of `bn`.
    fn conv_bn_eval<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: Self::Act<I>,
        conv: &C,
        bn: &BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<Self::Act<O>>,
    ) -> Result<Self::Act<O>>;

    /// Max pooling with a `K × K` window, stride `S`, padding `P`.
    fn max_pool<const C: usize, const K: usize, const S: usize, const P: usize>(
        &self,
        x: Self::Act<C>,
    ) -> Result<Self::Act<C>>;

    /// Global average pooling: the `(batch, F)` embedding a head classifies.
    fn avg_pool<const F: usize>(&self, x: Self::Act<F>) -> Result<Self::Logits<Const<F>>>;

    /// The head: global average pooling, then the fully connected layer `fc`.
    fn classify<const F: usize, O: Dim>(
        &self,
        x: Self::Act<F>,
        fc: &Linear<F, O, f32, Cpu>,
    ) -> Result<Self::Logits<O>>;
}

/// A [`Backend`] that also trains: batch norm with batch statistics.
pub trait TrainBackend: Backend {
    /// Training mode: `relu?(bn(conv(x)) + residual)` with the batch's statistics; updates
    /// the running statistics of `bn` (PyTorch's momentum 0.1, unbiased variance) and its
    /// batch counter.
    fn conv_bn_train<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: Self::Act<I>,
        conv: &C,
        bn: &mut BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<Self::Act<O>>,
    ) -> Result<Self::Act<O>>;

    /// `x` cut off from gradient recording: what follows runs as inference until
    /// [`TrainBackend::resume_grad`] (a frozen first part of a network, which needs no
    /// gradient). The default records as usual.
    fn stop_grad<const C: usize>(&self, x: Self::Act<C>) -> Result<Self::Act<C>> {
        Ok(x)
    }

    /// Gradient recording started again on `x`, the output of a frozen first part.
    fn resume_grad<const C: usize>(&self, x: Self::Act<C>) -> Result<Self::Act<C>> {
        Ok(x)
    }
}

/// The identity of a parameter tensor, stable while the module holding it is neither
/// moved nor dropped: what a backend keys its own copy of that parameter by (as the CPU
/// backend's [`FoldCache`](crate::ops::FoldCache) keys folded weights).
pub fn param_key<S: Shape>(t: &Tensor<S, f32, Cpu>) -> usize {
    t as *const Tensor<S, f32, Cpu> as usize
}
