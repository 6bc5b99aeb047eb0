//! Parity with PyTorch on the same weights (fixtures from `tools/make_fixtures.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use dfdx::prelude::*;
use resnext_core::builders::{Linear, ResNeXt50_32x4d, ResNeXtCifar, Stage};
use resnext_core::params::{ParamKind, ParamVisitor, ParamVisitorMut};
use resnext_core::weights;
use safetensors::SafeTensors;

use crate::common::rel_err;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// name → (values, shape) of every f32 tensor in a fixture file.
fn read_io(name: &str) -> HashMap<String, (Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(fixture(name)).expect("fixture present");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, (vals, v.shape().to_vec()))
        })
        .collect()
}

/// Compares each parameter's gradient (and each buffer after a train step) with the
/// fixture's `grad.<name>` / `after.<name>` where present.
struct CompareGrads<'a> {
    grads: &'a mut Gradients<f32, Cpu>,
    io: &'a HashMap<String, (Vec<f32>, Vec<usize>)>,
    tol: f32,
    checked: usize,
}

impl ParamVisitor for CompareGrads<'_> {
    type Error = resnext_core::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> resnext_core::Result<()> {
        let (key, got) = if kind == ParamKind::Buffer {
            (format!("after.{name}"), t.as_vec())
        } else {
            (
                format!("grad.{name}"),
                self.grads.get_or_alloc_mut(t).expect("alloc").to_vec(),
            )
        };
        if let Some((want, _)) = self.io.get(&key) {
            // Where the fixture records PyTorch's own f32 error against a float64 reference,
            // we must be at least that close (with 2x slack for summation order).
            let tol = match self.io.get(&format!("torch_f32_err.{name}")) {
                Some((torch_err, _)) => self.tol.max(2.0 * torch_err[0]),
                None => self.tol,
            };
            let e = rel_err(&got, want);
            assert!(e <= tol, "{key}: relative error {e:e} > {tol:e}");
            self.checked += 1;
        }
        Ok(())
    }
}

fn one_hot(dev: &Cpu, labels: &[usize], classes: usize) -> Tensor<(usize, usize), f32, Cpu> {
    let mut v = vec![0.0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        v[i * classes + l] = 1.0;
    }
    dev.tensor_from_vec(v, (labels.len(), classes))
}

/// The small CIFAR-layout network of the fixtures.
pub(crate) type Tiny = ResNeXtCifar<
    3,
    16,
    Stage<16, 32, 64, 1, 4, 1>,
    Stage<64, 64, 128, 2, 8, 2>,
    Stage<128, 64, 256, 2, 8, 1>,
    Linear<256, 10>,
>;

#[test]
fn tiny_cifar_layout_matches_pytorch_in_eval_and_train_mode() {
    let io = read_io("tiny_io.safetensors");
    let dev = Cpu::default();
    let mut net = dev.build_module::<Tiny, f32>();
    weights::load_safetensors(&mut net, fixture("tiny_weights.safetensors"))
        .expect("torch-written file loads");
    assert_eq!(
        net.bn1.num_batches_tracked, 7,
        "int64 num_batches_tracked restored"
    );

    let (x, xs) = &io["input"];
    let x = dev.tensor_from_vec(x.clone(), (xs[0], Const::<3>, xs[2], xs[3]));
    let eval = net.forward(x.clone());
    let e = rel_err(&eval.as_vec(), &io["eval_logits"].0);
    assert!(e <= 1e-4, "eval logits: relative error {e:e}");

    let labels: Vec<usize> = io["labels"].0.iter().map(|&l| l as usize).collect();
    let logits = net.forward_mut(x.trace(Gradients::leaky()));
    let e = rel_err(&logits.as_vec(), &io["train_logits"].0);
    assert!(e <= 1e-4, "train logits: relative error {e:e}");
    let logits = logits.reshape_like(&(labels.len(), 10usize));
    let loss = cross_entropy_with_logits_loss(logits, one_hot(&dev, &labels, 10));
    let e = rel_err(&[loss.array()], &io["loss"].0);
    assert!(e <= 1e-5, "loss: relative error {e:e}");
    let mut grads = loss.backward();

    let e = rel_err(&grads.get(&x).as_vec(), &io["grad.input"].0);
    assert!(e <= 1e-4, "input gradient: relative error {e:e}");
    let mut cmp = CompareGrads {
        grads: &mut grads,
        io: &io,
        tol: 1e-4,
        checked: 0,
    };
    resnext_core::params::Params::visit_params(&net, "", &mut cmp).unwrap();
    // every parameter gradient and every running statistic of the file
    assert_eq!(
        cmp.checked,
        io.keys()
            .filter(|k| k.starts_with("grad.") || k.starts_with("after."))
            .count()
            - 1
    );
}

/// splitmix64(fnv1a(name) + i), top 24 bits, mapped to [lo, hi) in f64 (the generator in
/// `tools/make_fixtures.py`).
fn gen_uniform(name: &str, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut h: u64 = 0xCBF29CE484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001B3);
    }
    (0..n as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i).wrapping_add(0x9E3779B97F4A7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

struct Generate;

impl ParamVisitorMut for Generate {
    type Error = resnext_core::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> resnext_core::Result<()> {
        let shape: Vec<usize> = t.shape().concrete().into();
        let (lo, hi) = if name.ends_with("running_mean") {
            (-0.1, 0.1)
        } else if name.ends_with("running_var") {
            (0.5, 1.5)
        } else if shape.len() == 1 {
            if name.ends_with("weight") {
                (0.2, 0.6)
            } else {
                (-0.1, 0.1)
            }
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let a = if shape.len() == 4 {
                (6.0 / fan_in as f64).sqrt()
            } else {
                1.0 / (fan_in as f64).sqrt()
            };
            (-a, a)
        };
        t.copy_from(&gen_uniform(name, shape.iter().product(), lo, hi));
        Ok(())
    }
    fn counter(&mut self, _: &str, value: &mut u64) -> resnext_core::Result<()> {
        *value = 0;
        Ok(())
    }
}

#[test]
fn resnext50_32x4d_matches_torchvision_at_224_eval_and_64_train() {
    let io = read_io("r50_io.safetensors");
    let dev = Cpu::default();
    let mut net = dev.build_module::<ResNeXt50_32x4d<1000>, f32>();
    resnext_core::params::Params::visit_params_mut(&mut net, "", &mut Generate).unwrap();

    let x = dev.tensor_from_vec(
        gen_uniform("input", 2 * 3 * 224 * 224, -1.0, 1.0),
        (2, Const::<3>, 224, 224),
    );
    let e = rel_err(&net.forward(x).as_vec(), &io["eval_logits"].0);
    assert!(e <= 1e-4, "eval logits at 224: relative error {e:e}");

    let x = dev.tensor_from_vec(
        gen_uniform("input64", 2 * 3 * 64 * 64, -1.0, 1.0),
        (2, Const::<3>, 64, 64),
    );
    let logits = net.forward_mut(x.trace(Gradients::leaky()));
    let e = rel_err(&logits.as_vec(), &io["train_logits"].0);
    assert!(e <= 1e-4, "train logits at 64: relative error {e:e}");
    let logits = logits.reshape_like(&(2usize, 1000usize));
    let loss = cross_entropy_with_logits_loss(logits, one_hot(&dev, &[3, 7], 1000));
    let e = rel_err(&[loss.array()], &io["loss"].0);
    assert!(e <= 1e-4, "loss: relative error {e:e}");
    let mut grads = loss.backward();
    let mut cmp = CompareGrads {
        grads: &mut grads,
        io: &io,
        tol: 1e-4,
        checked: 0,
    };
    resnext_core::params::Params::visit_params(&net, "", &mut cmp).unwrap();
    assert_eq!(cmp.checked, 6, "all six gradients in the fixture compared");
}
