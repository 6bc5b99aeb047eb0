//! Safetensors I/O: round trip, and precise errors for bad files.

use std::collections::HashMap;
use std::path::PathBuf;

use dfdx::prelude::*;
use resnext_core::builders::{Linear, ResNeXtCifar, Stage};
use resnext_core::weights::{self, WeightsError};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

type Small<const N: usize> = ResNeXtCifar<
    3,
    8,
    Stage<8, 8, 16, 1, 2, 1>,
    Stage<16, 16, 32, 2, 4, 2>,
    Stage<32, 16, 32, 2, 4, 1>,
    Linear<32, N>,
>;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("resnext-weights-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites a safetensors file through `edit` (name → (dtype, shape, bytes)).
fn rewrite(
    src: &[u8],
    edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = SafeTensors::deserialize(src).unwrap();
    let mut map: HashMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize(views, &None).unwrap()
}

#[test]
fn save_then_load_reproduces_outputs_and_counters() {
    let dir = TempDir::new("roundtrip");
    let dev = Cpu::seed_from_u64(1);
    let mut a = dev.build_module::<Small<5>, f32>();
    let _ = a.forward_mut(dev.sample_normal_like(&(4, Const::<3>, 8, 8)));
    let path = dir.0.join("a.safetensors");
    weights::save_safetensors(&a, &path).unwrap();
    let mut b = Cpu::seed_from_u64(2).build_module::<Small<5>, f32>();
    let x: Tensor<(usize, Const<3>, usize, usize), f32, Cpu> =
        dev.sample_normal_like(&(2, Const::<3>, 8, 8));
    assert_ne!(a.forward(x.clone()).as_vec(), b.forward(x.clone()).as_vec());
    weights::load_safetensors(&mut b, &path).unwrap();
    assert_eq!(a.forward(x.clone()).as_vec(), b.forward(x).as_vec());
    assert_eq!(b.bn1.num_batches_tracked, 1);
    assert_eq!(b.layer2.rest[0].bn3.num_batches_tracked, 1);
    // no temporary file left behind
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
}

fn expect_err(bytes: &[u8]) -> WeightsError {
    let dev = Cpu::default();
    let mut net = dev.build_module::<Small<5>, f32>();
    let before = net.fc.weight.as_vec();
    let err = weights::load_from_bytes(&mut net, bytes, std::path::Path::new("model.safetensors"))
        .unwrap_err();
    assert_eq!(
        net.fc.weight.as_vec(),
        before,
        "a failed load leaves the model untouched"
    );
    err
}

fn good_bytes() -> Vec<u8> {
    let dev = Cpu::default();
    weights::to_bytes(&dev.build_module::<Small<5>, f32>()).unwrap()
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dev = Cpu::default();
    let other = weights::to_bytes(&dev.build_module::<Small<7>, f32>()).unwrap();
    let msg = expect_err(&other).to_string();
    assert!(
        msg.contains("`fc.weight`")
            && msg.contains("[7, 32]")
            && msg.contains("[5, 32]")
            && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let bytes = rewrite(&good_bytes(), |m| {
        m.remove("layer2.1.conv2.weight");
    });
    let msg = expect_err(&bytes).to_string();
    assert!(
        msg.contains("missing tensor `layer2.1.conv2.weight`") && msg.contains("[16, 4, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let bytes = rewrite(&good_bytes(), |m| {
        m.insert(
            "layer9.0.conv1.weight".into(),
            (Dtype::F32, vec![1], vec![0; 4]),
        );
    });
    let msg = expect_err(&bytes).to_string();
    assert!(
        msg.contains("unexpected") && msg.contains("`layer9.0.conv1.weight`"),
        "{msg}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let bytes = rewrite(&good_bytes(), |m| {
        let (_, s, b) = m.remove("bn1.bias").unwrap();
        m.insert("bn1.bias".into(), (Dtype::I32, s, b));
    });
    let msg = expect_err(&bytes).to_string();
    assert!(msg.contains("`bn1.bias`") && msg.contains("I32"), "{msg}");
}

#[test]
fn corrupt_and_truncated_files_are_errors_not_panics() {
    let good = good_bytes();
    for bad in [
        &good[..good.len() / 2],
        &good[..5],
        b"not a safetensors file at all".as_slice(),
        &[],
    ] {
        let msg = expect_err(bad).to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("not a valid safetensors file"),
            "{msg}"
        );
    }
    let dev = Cpu::default();
    let mut net = dev.build_module::<Small<5>, f32>();
    let msg = weights::load_safetensors(&mut net, "/nonexistent/w.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cannot read `/nonexistent/w.safetensors`"),
        "{msg}"
    );
}

#[test]
fn f64_weights_and_missing_counters_load() {
    let bytes = rewrite(&good_bytes(), |m| {
        m.retain(|k, _| !k.ends_with("num_batches_tracked"));
        let (_, s, b) = m.remove("fc.bias").unwrap();
        let wide: Vec<u8> = b
            .chunks_exact(4)
            .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).to_le_bytes())
            .collect();
        m.insert("fc.bias".into(), (Dtype::F64, s, wide));
    });
    let dev = Cpu::default();
    let mut net = dev.build_module::<Small<5>, f32>();
    weights::load_from_bytes(&mut net, &bytes, std::path::Path::new("x")).unwrap();
    assert_eq!(net.bn1.num_batches_tracked, 0);
}

#[test]
fn inference_after_loading_or_training_uses_the_new_weights() {
    // Network::forward_eval caches BN-folded weights; loading weights and training steps
    // must invalidate that cache.
    use resnext_core::model::Arch;
    use resnext_core::optim::{OptimConfig, Optimizer};
    let dir = TempDir::new("fold-cache");
    let dev = Cpu::seed_from_u64(3);
    let arch = Arch::ResNeXt11_8x8d;
    let shape = [4, 3, 16, 16];
    let x: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut a = arch.build(&dev, 3, 10).unwrap();
    let mut b = arch.build(&dev, 3, 10).unwrap();
    let before = a.forward_eval(x.clone(), shape).unwrap();
    assert_eq!(
        before,
        a.forward_eval(x.clone(), shape).unwrap(),
        "cached pass repeats"
    );

    // load b's weights into a: a must now compute what b computes
    let b_file = dir.0.join("b.safetensors");
    b.save_safetensors(&b_file).unwrap();
    let from_b = b.forward_eval(x.clone(), shape).unwrap();
    a.load_safetensors(&b_file).unwrap();
    assert_eq!(a.forward_eval(x.clone(), shape).unwrap(), from_b);
    assert_ne!(before, from_b, "the two networks differ to begin with");

    // a training step changes weights and running statistics
    let mut opt = Optimizer::new(OptimConfig {
        lr: 0.1,
        ..Default::default()
    });
    a.train_step(x.clone(), shape, &[0, 1, 2, 3], 0.0, &mut opt)
        .unwrap();
    let after = a.forward_eval(x.clone(), shape).unwrap();
    assert_ne!(after, from_b, "the step changed the outputs");
    let a_file = dir.0.join("a.safetensors");
    a.save_safetensors(&a_file).unwrap();
    b.load_safetensors(&a_file).unwrap();
    let fresh = b.forward_eval(x, shape).unwrap();
    let err = after
        .iter()
        .zip(&fresh)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    assert!(err <= 1e-5, "stale cache: outputs differ by {err}");
}

#[test]
fn a_resnext50_file_loads_into_a_37_class_network_with_a_new_head() {
    use resnext_core::model::Arch;
    use resnext_core::weights::LoadMode;
    let d = TempDir::new("newhead");
    let dev = Cpu::seed_from_u64(3);
    let file = d.0.join("r50.safetensors");
    // the ImageNet network, torchvision's names (checked against torchvision elsewhere)
    Arch::ResNeXt50_32x4d
        .build(&dev, 3, 1000)
        .unwrap()
        .save_safetensors(&file)
        .unwrap();
    let mut net = Arch::ResNeXt50_32x4d.build(&dev, 3, 37).unwrap();
    let x = resnext_core::testing::values(1, 3 * 32 * 32);
    let before = net.embed(x.clone(), [1, 3, 32, 32]).unwrap();
    // strict: the classifier does not fit, the error names it and nothing changes
    let e = net.load_safetensors(&file).unwrap_err().to_string();
    assert!(
        e.contains("`fc.weight` has shape [1000, 2048] in the file, the model expects [37, 2048]"),
        "{e}"
    );
    assert_eq!(net.embed(x.clone(), [1, 3, 32, 32]).unwrap(), before);
    let report = net.load_safetensors_with(&file, LoadMode::NewHead).unwrap();
    let kept: Vec<&str> = report.kept.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(kept, ["fc.weight", "fc.bias"]);
    assert_eq!(
        report.kept[0].1,
        "[1000, 2048] in the file, [37, 2048] here"
    );
    // every other tensor and batch-norm counter of the file was loaded
    let in_file = weights::inspect(&file).unwrap();
    assert_eq!(report.loaded.len(), in_file.len() - 2);
    assert!(report.ignored.is_empty());
    assert!(report.to_string().starts_with(&format!(
        "loaded {} tensors; kept as initialised: `fc.weight`",
        in_file.len() - 2
    )));
    // the backbone is the file's: the embedding equals the 1000-class network's
    let mut reference = Arch::ResNeXt50_32x4d.build(&dev, 3, 1000).unwrap();
    reference.load_safetensors(&file).unwrap();
    let want = reference.embed(x.clone(), [1, 3, 32, 32]).unwrap();
    assert_eq!(net.embed(x, [1, 3, 32, 32]).unwrap(), want);
    assert_ne!(want, before);

    // another architecture or input-channel count stays an error with a new head
    let mut other = Arch::ResNet50.build(&dev, 3, 37).unwrap();
    let e = other
        .load_safetensors_with(&file, LoadMode::NewHead)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer1.0.conv1.weight"), "{e}");
    let mut grey = Arch::ResNeXt50_32x4d.build(&dev, 1, 37).unwrap();
    let e = grey
        .load_safetensors_with(&file, LoadMode::NewHead)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`conv1.weight` has shape [64, 3, 7, 7] in the file"),
        "{e}"
    );
    // lenient loads what fits and says what did not
    let report = grey
        .load_safetensors_with(&file, LoadMode::Lenient)
        .unwrap();
    let kept: Vec<&str> = report.kept.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(kept, ["conv1.weight", "fc.weight", "fc.bias"]);
}
