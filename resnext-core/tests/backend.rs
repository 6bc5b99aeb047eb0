//! The device seam: the wiring of blocks, stages and networks runs on any backend.

use std::cell::Cell;

use dfdx::prelude::*;
use resnext_core::backend::cpu::{CpuAct, CpuBackend, CpuLogits};
use resnext_core::backend::{Backend, TrainBackend};
use resnext_core::builders;
use resnext_core::nn::{BatchNorm2d, ConvLayer, Linear as LinearLayer};
use resnext_core::ops::Act;
use resnext_core::params::walk_mut;
use resnext_core::Result;

use crate::common::rel_err;
use crate::model::RandomBn;
use crate::parity::Tiny;

/// A backend that computes shapes only: an activation is its `[n, h, w]`, and every
/// operation is counted. It stands in for a device backend: it plugs into the same wiring
/// without touching the model.
#[derive(Default)]
struct Shapes {
    conv_bn: Cell<usize>,
    trained: Cell<usize>,
}

/// An activation of [`Shapes`]: dims, with the channel count in the type.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dims<const C: usize>([usize; 3]);

impl Backend for Shapes {
    type Act<const C: usize> = Dims<C>;
    type Logits<O: Dim> = (usize, usize);

    fn fork<const C: usize>(&self, x: Dims<C>) -> (Dims<C>, Dims<C>) {
        (x, x)
    }

    fn identity<const I: usize, const O: usize>(&self, x: Dims<I>) -> Result<Dims<O>> {
        assert_eq!(I, O, "identity shortcut between different channel counts");
        Ok(Dims(x.0))
    }

    fn conv_bn_eval<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: Dims<I>,
        _conv: &C,
        _bn: &BatchNorm2d<O, f32, Cpu>,
        _relu: bool,
        residual: Option<Dims<O>>,
    ) -> Result<Dims<O>> {
        self.conv_bn.set(self.conv_bn.get() + 1);
        let [n, h, w] = x.0;
        let (oh, ow, _) = C::cost(h, w);
        if let Some(r) = residual {
            assert_eq!(r.0, [n, oh, ow], "residual of another shape");
        }
        Ok(Dims([n, oh, ow]))
    }

    fn max_pool<const C: usize, const K: usize, const S: usize, const P: usize>(
        &self,
        x: Dims<C>,
    ) -> Result<Dims<C>> {
        let [n, h, w] = x.0;
        Ok(Dims([n, (h + 2 * P - K) / S + 1, (w + 2 * P - K) / S + 1]))
    }

    fn avg_pool<const F: usize>(&self, x: Dims<F>) -> Result<(usize, usize)> {
        Ok((x.0[0], F))
    }

    fn classify<const F: usize, O: Dim>(
        &self,
        x: Dims<F>,
        fc: &LinearLayer<F, O, f32, Cpu>,
    ) -> Result<(usize, usize)> {
        Ok((x.0[0], fc.weight.shape().0.size()))
    }
}

impl TrainBackend for Shapes {
    fn conv_bn_train<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: Dims<I>,
        conv: &C,
        bn: &mut BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<Dims<O>>,
    ) -> Result<Dims<O>> {
        self.trained.set(self.trained.get() + 1);
        self.conv_bn_eval(x, conv, bn, relu, residual)
    }
}

#[test]
fn a_second_backend_runs_resnext50_through_the_same_wiring() {
    let dev = Cpu::default();
    let mut net = dev.build_module::<builders::ResNeXt50_32x4d<10>, f32>();
    let b = Shapes::default();
    assert_eq!(net.eval_on(&b, Dims([2, 224, 224])).unwrap(), (2, 10));
    // the stem, 16 blocks of three convolutions, and a projection shortcut per stage
    assert_eq!(b.conv_bn.get(), 1 + 16 * 3 + 4);
    assert_eq!(net.train_on(&b, Dims([2, 64, 64])).unwrap(), (2, 10));
    assert_eq!(b.trained.get(), 53);
}

#[test]
fn the_cpu_backend_gives_the_same_logits_on_buffers_and_on_tensors() {
    // `forward` without a tape runs on plain buffers; on tensors without a tape each
    // convolution is one fused op; with a tape the differentiable ops run one by one.
    let dev = Cpu::seed_from_u64(11);
    let mut net = dev.build_module::<Tiny, f32>();
    walk_mut(&mut net, "", &mut RandomBn(3)).unwrap();
    let x: Act<3> = dev.sample_normal_like(&(2, Const::<3>, 12, 12));
    let buffers = net.forward(x.clone()).as_vec();
    let on_tensors = match net
        .eval_on(&CpuBackend::<NoneTape>::new(), CpuAct::Tensor(x.clone()))
        .unwrap()
    {
        CpuLogits::Tensor(t) => t.as_vec(),
        CpuLogits::Rows(_) => panic!("a tensor input gave buffer logits"),
    };
    let taped = net.forward(x.trace(Gradients::leaky())).as_vec();
    assert_eq!(buffers.len(), 2 * 10);
    assert!(rel_err(&buffers, &on_tensors) <= 1e-5);
    assert!(rel_err(&buffers, &taped) <= 1e-5);
}
