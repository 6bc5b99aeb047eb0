//! Networks chosen by name at run time, with a class count known only at run time: what
//! the command-line tools use.
//!
//! The channel wiring stays checked at compile time: each architecture is one of the
//! typed presets in [`crate::builders`], with its classifier swapped for a
//! [`Linear`](crate::nn::Linear) whose output dim is a `usize`.

use std::fmt;
use std::path::Path;

use dfdx::prelude::*;

use super::train_step::{train_step, train_step_by, TrainOutput};
use super::{
    FeatureMap, Features, Frozen, LayerSummary, ResNeXt, ResNeXtCifar, StageMeta, TrainFrozen,
};
use crate::builders as b;
use crate::ema::Ema;
use crate::error::{shape_err, Error, Result};
use crate::nn;
use crate::ops::{Act, Targets};
use crate::optim::Optimizer;
use crate::params::Params;
use crate::weights::{self, WeightsError};

/// A network behind a trait object: eval forward, weights, summary.
pub trait Network {
    /// Which architecture this is.
    fn arch(&self) -> Arch;
    /// Input channels.
    fn in_channels(&self) -> usize;
    /// Output classes.
    fn classes(&self) -> usize;
    /// Trainable parameters.
    fn num_params(&self) -> usize;
    /// Per-part summary for an `h × w` input.
    fn summary(&self, h: usize, w: usize) -> Vec<LayerSummary>;
    /// Eval-mode logits `(n, classes)` (row-major) of an `(n, C, h, w)` batch.
    fn forward_eval(&self, x: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>>;
    /// Eval-mode logits `(n, classes)` (row-major) of an `(n, C, h, w)` batch, computed
    /// on `gpu` (feature `cuda`). The parameters are copied to the GPU at the first call
    /// and again after the model changes.
    #[cfg(feature = "cuda")]
    fn forward_eval_gpu(
        &self,
        gpu: &crate::backend::cuda::Gpu,
        x: &[f32],
        shape: [usize; 4],
    ) -> Result<Vec<f32>>;
    /// Width of the pooled embedding (the classifier's input).
    fn embed_dim(&self) -> usize;
    /// Eval-mode pooled embeddings `(n, embed_dim)` (row-major) of an `(n, C, h, w)` batch.
    fn embed(&self, x: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>>;
    /// Eval-mode feature maps (stem, then each stage) of an `(n, C, h, w)` batch.
    fn feature_maps(&self, x: Vec<f32>, shape: [usize; 4]) -> Result<Vec<FeatureMap>>;
    /// Loads torchvision-named safetensors weights (all or nothing).
    fn load_safetensors(&mut self, path: &Path) -> Result<(), WeightsError>;
    /// Loads torchvision-named safetensors weights under `mode` (all or nothing), saying
    /// which tensors were loaded and which kept ([`weights::load_with`]).
    fn load_safetensors_with(
        &mut self,
        path: &Path,
        mode: weights::LoadMode,
    ) -> Result<weights::LoadReport, WeightsError>;
    /// Saves torchvision-named safetensors weights atomically.
    fn save_safetensors(&self, path: &Path) -> Result<(), WeightsError>;
    /// Loads `opt`'s momentum buffers from `path`, checked against this network
    /// ([`Optimizer::load_state_for`]).
    fn load_optimizer_state(&self, opt: &mut Optimizer, path: &Path) -> Result<(), WeightsError>;
    /// Holds the parts in `frozen` fixed in [`Network::train_step`]: eval-mode batch norm,
    /// no gradients for a frozen start. (The optimiser's groups must skip their
    /// parameters too: [`Frozen::prefixes`].)
    fn set_frozen(&mut self, frozen: Frozen);
    /// Sets the last batch norm's γ of every block to zero, so each block starts as the
    /// identity (torchvision's `zero_init_residual`).
    fn zero_init_residual(&mut self);
    /// One training step on an `(n, C, h, w)` batch: training-mode forward (batch
    /// statistics), cross-entropy with `label_smoothing`, backward, and an optimiser
    /// update. A non-finite loss is an error and leaves the weights as they were.
    fn train_step(
        &mut self,
        x: Vec<f32>,
        shape: [usize; 4],
        targets: &[usize],
        label_smoothing: f32,
        opt: &mut Optimizer,
    ) -> Result<TrainOutput> {
        self.train_step_on(x, shape, Targets::hard(targets, label_smoothing), opt)
    }
    /// Folds this network's weights into the moving average `ema` ([`Ema::update`]).
    fn ema_update(&self, ema: &mut Ema);
    /// Replaces the average by this network's weights ([`Ema::copy`]).
    fn ema_copy(&self, ema: &mut Ema);
    /// Sets this network's weights to the average ([`Ema::write_to`]).
    fn ema_write(&mut self, ema: &Ema) -> Result<()>;
    /// [`Network::train_step`] against any [`Targets`]: the mixed ones of mixup and cutmix.
    fn train_step_on(
        &mut self,
        x: Vec<f32>,
        shape: [usize; 4],
        targets: Targets<'_>,
        opt: &mut Optimizer,
    ) -> Result<TrainOutput>;
    /// [`Network::train_step_on`] on `gpu` (feature `cuda`): the weights, their gradients,
    /// the running statistics and the optimiser state stay on the GPU between steps
    /// (copied there from this network at the first step); the parts set by
    /// [`Network::set_frozen`] are held fixed as on the CPU. Call
    /// [`Network::sync_from_gpu`] before saving or evaluating the network, and
    /// [`Gpu::reset_training`](crate::backend::cuda::Gpu::reset_training) after loading
    /// weights into it mid-training.
    #[cfg(feature = "cuda")]
    fn train_step_gpu(
        &mut self,
        gpu: &crate::backend::cuda::Gpu,
        x: &[f32],
        shape: [usize; 4],
        targets: Targets<'_>,
        opt: &mut Optimizer,
    ) -> Result<TrainOutput>;
    /// Copies what training on `gpu` changed (weights, running statistics, and `opt`'s
    /// state when given) into this network ([`Gpu::sync_to_host`](crate::backend::cuda::Gpu::sync_to_host)).
    #[cfg(feature = "cuda")]
    fn sync_from_gpu(
        &mut self,
        gpu: &crate::backend::cuda::Gpu,
        opt: Option<&mut Optimizer>,
    ) -> Result<()>;
}

struct Named<M> {
    arch: Arch,
    net: M,
    /// Folded inference weights; cleared whenever `net` changes.
    folded: std::sync::Arc<crate::ops::FoldCache>,
    /// Parts held fixed in training.
    frozen: Frozen,
}

/// An error unless `len` values fill an `(n, C, h, w)` batch of `shape` for `arch`.
fn check_input<const C: usize>(arch: Arch, len: usize, shape: [usize; 4]) -> Result<()> {
    let [n, c, h, w] = shape;
    if c != C {
        return Err(shape_err(
            "forward",
            format!("{arch} expects {C} input channels, got input of shape {shape:?}"),
        ));
    }
    if len != n * c * h * w {
        return Err(shape_err(
            "forward",
            format!("{len} values do not fill shape {shape:?}"),
        ));
    }
    Ok(())
}

/// An `(n, C, h, w)` batch as a tensor on the device of `like`, checked against `C`.
fn input<const C: usize>(
    like: &Tensor<impl Shape, f32, Cpu>,
    arch: Arch,
    x: Vec<f32>,
    shape: [usize; 4],
) -> Result<Act<C>> {
    check_input::<C>(arch, x.len(), shape)?;
    let [n, _, h, w] = shape;
    Ok(like
        .device()
        .try_tensor_from_vec(x, (n, Const::<C>, h, w))?)
}

macro_rules! impl_network {
    ($ty:ident <$(const $cp:ident),*> [$($L:ident),+]) => {
        impl<const C: usize, $(const $cp: usize,)* const F: usize, $($L,)+> Network for Named<$ty<C, $($cp,)* $($L,)+ nn::Linear<F, usize, f32, Cpu>, f32, Cpu>>
        where
            $ty<C, $($cp,)* $($L,)+ nn::Linear<F, usize, f32, Cpu>, f32, Cpu>: Module<Act<C>, Output = Tensor<(usize, usize), f32, Cpu>, Error = Error>
                + ModuleMut<Act<C, OwnedTape<f32, Cpu>>, Output = Tensor<(usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>, Error = Error>
                + Features<C>
                + TrainFrozen<C, usize>
                + super::OnGpu<C>,
            $($L: TensorCollection<f32, Cpu> + StageMeta,)+
        {
            fn arch(&self) -> Arch {
                self.arch
            }
            fn in_channels(&self) -> usize {
                C
            }
            fn classes(&self) -> usize {
                self.net.fc.weight.shape().0
            }
            fn num_params(&self) -> usize {
                self.net.num_params()
            }
            fn summary(&self, h: usize, w: usize) -> Vec<LayerSummary> {
                self.net.summary(h, w)
            }
            fn forward_eval(&self, x: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>> {
                let x = input::<C>(&self.net.conv1.weight, self.arch, x, shape)?;
                crate::ops::with_fold_cache(&self.folded, || Ok(self.net.try_forward(x)?.as_vec()))
            }
            #[cfg(feature = "cuda")]
            fn forward_eval_gpu(&self, gpu: &crate::backend::cuda::Gpu, x: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
                check_input::<C>(self.arch, x.len(), shape)?;
                gpu.use_model_state(self.folded.stamp());
                let x = gpu.input::<C>(x, shape)?;
                gpu.logits(&super::OnGpu::<C>::eval_gpu(&self.net, gpu, x)?)
            }
            fn embed_dim(&self) -> usize {
                self.net.embed_dim()
            }
            fn embed(&self, x: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>> {
                let x = input::<C>(&self.net.conv1.weight, self.arch, x, shape)?;
                crate::ops::with_fold_cache(&self.folded, || self.net.embed_rows(x))
            }
            fn feature_maps(&self, x: Vec<f32>, shape: [usize; 4]) -> Result<Vec<FeatureMap>> {
                let x = input::<C>(&self.net.conv1.weight, self.arch, x, shape)?;
                crate::ops::with_fold_cache(&self.folded, || self.net.feature_maps(x))
            }
            fn load_safetensors(&mut self, path: &Path) -> Result<(), WeightsError> {
                self.folded.clear();
                weights::load_safetensors(&mut self.net, path)
            }
            fn load_safetensors_with(&mut self, path: &Path, mode: weights::LoadMode) -> Result<weights::LoadReport, WeightsError> {
                self.folded.clear();
                weights::load_safetensors_with(&mut self.net, path, mode)
            }
            fn save_safetensors(&self, path: &Path) -> Result<(), WeightsError> {
                weights::save_safetensors(&self.net, path)
            }
            fn load_optimizer_state(&self, opt: &mut Optimizer, path: &Path) -> Result<(), WeightsError> {
                opt.load_state_for(path, &self.net)
            }
            fn train_step_on(&mut self, x: Vec<f32>, shape: [usize; 4], targets: Targets<'_>, opt: &mut Optimizer) -> Result<TrainOutput> {
                let [n, c, h, w] = shape;
                if c != C || x.len() != n * c * h * w {
                    return Err(shape_err("train_step", format!("{} expects (N, {C}, H, W) input, got shape {shape:?} with {} values", self.arch, x.len())));
                }
                self.folded.clear();
                let dev = self.net.conv1.weight.device().clone();
                let x: Act<C> = dev.try_tensor_from_vec(x, (n, Const::<C>, h, w))?;
                if !self.frozen.any() {
                    return train_step(&mut self.net, x, targets, opt);
                }
                let frozen = self.frozen;
                train_step_by(&mut self.net, x, targets, opt, |net, x| net.forward_frozen(x, frozen))
            }
            #[cfg(feature = "cuda")]
            fn train_step_gpu(&mut self, gpu: &crate::backend::cuda::Gpu, x: &[f32], shape: [usize; 4], targets: Targets<'_>, opt: &mut Optimizer) -> Result<TrainOutput> {
                check_input::<C>(self.arch, x.len(), shape)?;
                self.folded.clear();
                let x = gpu.input::<C>(x, shape)?;
                let frozen = self.frozen;
                gpu.train_step_by(&mut self.net, x, targets, opt, |net, gpu, x| super::OnGpu::<C>::train_gpu(net, gpu, x, frozen))
            }
            #[cfg(feature = "cuda")]
            fn sync_from_gpu(&mut self, gpu: &crate::backend::cuda::Gpu, opt: Option<&mut Optimizer>) -> Result<()> {
                self.folded.clear();
                gpu.sync_to_host(&mut self.net, opt)
            }
            fn ema_update(&self, ema: &mut Ema) {
                ema.update(&self.net);
            }
            fn ema_copy(&self, ema: &mut Ema) {
                ema.copy(&self.net);
            }
            fn ema_write(&mut self, ema: &Ema) -> Result<()> {
                self.folded.clear();
                ema.write_to(&mut self.net)
            }
            fn set_frozen(&mut self, frozen: Frozen) {
                self.frozen = frozen;
            }
            fn zero_init_residual(&mut self) {
                self.folded.clear();
                let Ok(()) = self.net.visit_params_mut("", &mut ZeroLastGamma);
            }
        }
    };
}

impl_network!(ResNeXt<> [L1, L2, L3, L4]);
impl_network!(ResNeXtCifar<const STEM> [L1, L2, L3]);

/// Zeroes `*.bn3.weight`: the last batch norm of each bottleneck block.
struct ZeroLastGamma;

impl crate::params::ParamVisitorMut for ZeroLastGamma {
    type Error = std::convert::Infallible;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        _: crate::params::ParamKind,
    ) -> std::result::Result<(), Self::Error> {
        if name.ends_with(".bn3.weight") {
            t.fill_with_zeros();
        }
        Ok(())
    }
}

/// Builds a preset with a runtime class count.
pub trait BuildRuntime {
    /// The module with a `usize`-wide classifier.
    type Runtime;
    /// Builds it with `classes` outputs.
    fn build_runtime(dev: &Cpu, classes: usize) -> Result<Self::Runtime>;
}

impl<const C: usize, L1, L2, L3, L4, const F: usize, const N: usize> BuildRuntime
    for b::ResNeXt<C, L1, L2, L3, L4, b::Linear<F, N>>
where
    L1: BuildOnDevice<Cpu, f32>,
    L2: BuildOnDevice<Cpu, f32>,
    L3: BuildOnDevice<Cpu, f32>,
    L4: BuildOnDevice<Cpu, f32>,
{
    type Runtime = ResNeXt<
        C,
        L1::Built,
        L2::Built,
        L3::Built,
        L4::Built,
        nn::Linear<F, usize, f32, Cpu>,
        f32,
        Cpu,
    >;
    fn build_runtime(dev: &Cpu, classes: usize) -> Result<Self::Runtime> {
        Ok(ResNeXt {
            conv1: BuildModule::try_build(dev)?,
            bn1: BuildModule::try_build(dev)?,
            layer1: L1::try_build_on_device(dev)?,
            layer2: L2::try_build_on_device(dev)?,
            layer3: L3::try_build_on_device(dev)?,
            layer4: L4::try_build_on_device(dev)?,
            fc: nn::Linear::new_runtime(dev, classes)?,
        })
    }
}

impl<const C: usize, const STEM: usize, L1, L2, L3, const F: usize, const N: usize> BuildRuntime
    for b::ResNeXtCifar<C, STEM, L1, L2, L3, b::Linear<F, N>>
where
    L1: BuildOnDevice<Cpu, f32>,
    L2: BuildOnDevice<Cpu, f32>,
    L3: BuildOnDevice<Cpu, f32>,
{
    type Runtime = ResNeXtCifar<
        C,
        STEM,
        L1::Built,
        L2::Built,
        L3::Built,
        nn::Linear<F, usize, f32, Cpu>,
        f32,
        Cpu,
    >;
    fn build_runtime(dev: &Cpu, classes: usize) -> Result<Self::Runtime> {
        Ok(ResNeXtCifar {
            conv1: BuildModule::try_build(dev)?,
            bn1: BuildModule::try_build(dev)?,
            layer1: L1::try_build_on_device(dev)?,
            layer2: L2::try_build_on_device(dev)?,
            layer3: L3::try_build_on_device(dev)?,
            fc: nn::Linear::new_runtime(dev, classes)?,
        })
    }
}

/// The largest class count [`Arch::build`] accepts (ImageNet-21k has 21,841): a bound on
/// the classifier's memory whatever a file or a flag says.
pub const MAX_CLASSES: usize = 100_000;

macro_rules! archs {
    ($($variant:ident => $name:literal, $builder:ident, $cifar:literal;)+) => {
        /// The named architectures (snake_case names, as torchvision spells them).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum Arch {
            $(
                #[doc = concat!("`", $name, "`: [`crate::builders::", stringify!($builder), "`].")]
                $variant,
            )+
        }

        impl Arch {
            /// Every architecture, in listing order.
            pub const ALL: &'static [Arch] = &[$(Arch::$variant),+];

            /// The snake_case name.
            pub fn name(self) -> &'static str {
                match self { $(Arch::$variant => $name,)+ }
            }

            /// Whether this is a CIFAR-layout network (small images, 10 classes by default).
            pub fn is_cifar(self) -> bool {
                match self { $(Arch::$variant => $cifar,)+ }
            }

            /// Builds the network with `in_channels` (1 or 3) and `classes` outputs.
            pub fn build(self, dev: &Cpu, in_channels: usize, classes: usize) -> Result<Box<dyn Network>> {
                if !(1..=MAX_CLASSES).contains(&classes) {
                    return Err(shape_err("build", format!("class count {classes} is out of range: 1 to {MAX_CLASSES}")));
                }
                match (self, in_channels) {
                    $(
                        (Arch::$variant, 1) => Ok(Box::new(Named { arch: self, net: <b::$builder<1, 1> as BuildRuntime>::build_runtime(dev, classes)?, folded: Default::default(), frozen: Frozen::NONE })),
                        (Arch::$variant, 3) => Ok(Box::new(Named { arch: self, net: <b::$builder<1, 3> as BuildRuntime>::build_runtime(dev, classes)?, folded: Default::default(), frozen: Frozen::NONE })),
                    )+
                    (_, c) => Err(shape_err("build", format!("{c} input channels: the named networks take 1 or 3 (use the typed API for others)"))),
                }
            }
        }
    };
}

archs! {
    ResNeXt50_32x4d => "resnext50_32x4d", ResNeXt50_32x4d, false;
    ResNeXt101_32x8d => "resnext101_32x8d", ResNeXt101_32x8d, false;
    ResNeXt101_64x4d => "resnext101_64x4d", ResNeXt101_64x4d, false;
    ResNet50 => "resnet50", ResNet50, false;
    ResNeXt29_8x64d => "resnext29_8x64d", ResNeXt29_8x64d, true;
    ResNeXt29_16x64d => "resnext29_16x64d", ResNeXt29_16x64d, true;
    ResNeXt29_2x64d => "resnext29_2x64d", ResNeXt29_2x64d, true;
    ResNeXt29_4x64d => "resnext29_4x64d", ResNeXt29_4x64d, true;
    ResNeXt29_32x4d => "resnext29_32x4d", ResNeXt29_32x4d, true;
    ResNeXt11_8x8d => "resnext11_8x8d", ResNeXt11_8x8d, true;
}

impl Arch {
    /// The default class count: 1000 for ImageNet layouts, 10 for CIFAR ones.
    pub fn default_classes(self) -> usize {
        if self.is_cifar() {
            10
        } else {
            1000
        }
    }
    /// The default input size: 224 for ImageNet layouts, 32 for CIFAR ones.
    pub fn default_size(self) -> usize {
        if self.is_cifar() {
            32
        } else {
            224
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An architecture name that is not one of [`Arch::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown architecture `{given}`; valid names: {}", Arch::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", "))]
pub struct UnknownArch {
    /// What was asked for.
    pub given: String,
}

impl std::str::FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownArch> {
        Arch::ALL
            .iter()
            .copied()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownArch {
                given: s.to_string(),
            })
    }
}
