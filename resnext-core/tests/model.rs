//! Network construction: parameter counts, shapes, names.

use dfdx::prelude::*;
use resnext_core::builders::*;
use resnext_core::model::Arch;
use resnext_core::params::Params;

#[test]
fn parameter_counts_match_torchvision() {
    let dev = Cpu::default();
    assert_eq!(
        dev.build_module::<ResNeXt50_32x4d<1000>, f32>()
            .num_params(),
        25_028_904
    );
    assert_eq!(
        dev.build_module::<ResNeXt50_32x4d<1000>, f32>()
            .num_trainable_params(),
        25_028_904
    );
    assert_eq!(
        dev.build_module::<ResNeXt101_32x8d<1000>, f32>()
            .num_params(),
        88_791_336
    );
    assert_eq!(
        dev.build_module::<ResNeXt101_64x4d<1000>, f32>()
            .num_params(),
        83_455_272
    );
    assert_eq!(
        dev.build_module::<ResNet50<1000>, f32>().num_params(),
        25_557_032
    );
}

#[test]
fn runtime_class_count_matches_typed_count() {
    let dev = Cpu::default();
    for arch in Arch::ALL {
        let n = arch.build(&dev, 3, 37).unwrap();
        assert_eq!(n.classes(), 37);
        assert_eq!(n.in_channels(), 3);
    }
    let typed = dev.build_module::<ResNeXt29_8x64d<37>, f32>().num_params();
    assert_eq!(
        Arch::ResNeXt29_8x64d
            .build(&dev, 3, 37)
            .unwrap()
            .num_params(),
        typed
    );
}

use resnext_core::kernels::conv::{conv2d_forward_ref, Conv2dGeom};
use resnext_core::ops::Act;
use resnext_core::params::{walk_mut, ParamKind, ParamVisitorMut};

/// Gives batch-norm layers non-trivial statistics and affine parameters.
pub(crate) struct RandomBn(pub u64);
impl ParamVisitorMut for RandomBn {
    type Error = resnext_core::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> resnext_core::Result<()> {
        if S::NUM_DIMS != 1 {
            return Ok(());
        }
        let n = t.shape().num_elements();
        self.0 += 1;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let u = (((i as u64 + 1) * 2654435761 + self.0 * 97) % 1000) as f32 / 1000.0;
                if name.ends_with("running_var") || name.ends_with("weight") {
                    0.5 + u
                } else {
                    u - 0.5
                }
            })
            .collect();
        t.copy_from(&v);
        Ok(())
    }
}

fn bn_eval_slice(
    x: &[f32],
    ch: std::ops::Range<usize>,
    bn: &resnext_core::nn::BatchNorm2d<8, f32, Cpu>,
    spatial: usize,
    relu: bool,
) -> Vec<f32> {
    let (g, b, m, v) = (
        bn.weight.as_vec(),
        bn.bias.as_vec(),
        bn.running_mean.as_vec(),
        bn.running_var.as_vec(),
    );
    let c = ch.len();
    x.iter()
        .enumerate()
        .map(|(i, &xv)| {
            let k = ch.start + (i / spatial) % c;
            let y = (xv - m[k]) / (v[k] + 1e-5).sqrt() * g[k] + b[k];
            if relu {
                y.max(0.0)
            } else {
                y
            }
        })
        .collect()
}

#[test]
fn block_residual_equals_the_sum_of_its_cardinality_paths() {
    // Xie et al. eq. (2): F(x) = Σ_i T_i(x), each T_i a 1x1 → 3x3 → 1x1 path of width d.
    const G: usize = 4;
    const D: usize = 2;
    let dev = Cpu::seed_from_u64(3);
    let mut blk = dev.build_module::<Bottleneck<8, 8, 16, 2, 4>, f32>();
    walk_mut(&mut blk, "", &mut RandomBn(0)).unwrap();
    let (n, h) = (2, 6);
    let x: Act<8> = dev.sample_normal_like(&(n, Const::<8>, h, h));
    let got = blk.residual(x.clone()).unwrap().as_vec();

    let (w1, w2, w3) = (
        blk.conv1.weight.as_vec(),
        blk.conv2.weight.as_vec(),
        blk.conv3.weight.as_vec(),
    );
    let xv = x.as_vec();
    let oh = 3;
    let mut sum = vec![0.0f32; n * 16 * oh * oh];
    for path in 0..G {
        let g1 = Conv2dGeom {
            batch: n,
            in_channels: 8,
            out_channels: D,
            in_h: h,
            in_w: h,
            kernel: 1,
            stride: 1,
            padding: 0,
            groups: 1,
        };
        let mut y1 = vec![0.0; g1.output_len()];
        conv2d_forward_ref(&g1, &xv, &w1[path * D * 8..(path + 1) * D * 8], &mut y1);
        let y1 = bn_eval_slice(&y1, path * D..(path + 1) * D, &blk.bn1, h * h, true);
        let g2 = Conv2dGeom {
            in_channels: D,
            out_channels: D,
            kernel: 3,
            stride: 2,
            padding: 1,
            ..g1
        };
        let mut y2 = vec![0.0; g2.output_len()];
        conv2d_forward_ref(
            &g2,
            &y1,
            &w2[path * D * D * 9..(path + 1) * D * D * 9],
            &mut y2,
        );
        let y2 = bn_eval_slice(&y2, path * D..(path + 1) * D, &blk.bn2, oh * oh, true);
        let w3p: Vec<f32> = (0..16)
            .flat_map(|o| w3[o * 8 + path * D..o * 8 + (path + 1) * D].to_vec())
            .collect();
        let g3 = Conv2dGeom {
            in_channels: D,
            out_channels: 16,
            in_h: oh,
            in_w: oh,
            kernel: 1,
            stride: 1,
            padding: 0,
            ..g1
        };
        let mut y3 = vec![0.0; g3.output_len()];
        conv2d_forward_ref(&g3, &y2, &w3p, &mut y3);
        for (s, v) in sum.iter_mut().zip(&y3) {
            *s += v;
        }
    }
    let (g, b, m, v) = (
        blk.bn3.weight.as_vec(),
        blk.bn3.bias.as_vec(),
        blk.bn3.running_mean.as_vec(),
        blk.bn3.running_var.as_vec(),
    );
    let want: Vec<f32> = sum
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let k = (i / (oh * oh)) % 16;
            (s - m[k]) / (v[k] + 1e-5).sqrt() * g[k] + b[k]
        })
        .collect();
    assert!(crate::common::rel_err(&got, &want) <= 1e-5);
}

#[test]
fn a_correctly_wired_chain_compiles_and_runs_at_any_spatial_size() {
    let dev = Cpu::default();
    type Chain = (
        Bottleneck<64, 128, 256, 1, 32>,
        Bottleneck<256, 128, 256, 1, 32>,
        Bottleneck<256, 256, 512, 2, 32>,
    );
    let chain = dev.build_module::<Chain, f32>();
    assert!(
        chain.1.downsample.is_none()
            && chain.0.downsample.is_some()
            && chain.2.downsample.is_some()
    );
    for size in [7, 32] {
        let x: Act<64> = dev.sample_normal_like(&(1, Const::<64>, size, size));
        let y: Act<512> = chain.forward(x);
        assert_eq!(
            y.shape(),
            &(1, Const::<512>, size.div_ceil(2), size.div_ceil(2))
        );
    }
}

#[test]
fn the_same_network_runs_at_32_and_224() {
    let dev = Cpu::default();
    let net = dev.build_module::<ResNeXt50_32x4d<10>, f32>();
    for size in [32, 224] {
        let logits = net.forward(dev.sample_normal_like(&(1, Const::<3>, size, size)));
        assert_eq!(logits.shape(), &(1, Const::<10>));
        assert!(logits.as_vec().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn torchvision_names_are_used() {
    let dev = Cpu::default();
    let net = Arch::ResNeXt50_32x4d.build(&dev, 3, 1000).unwrap();
    let dir = std::env::temp_dir().join(format!("resnext-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    net.save_safetensors(&path).unwrap();
    let names = resnext_core::weights::inspect(&path).unwrap();
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv2.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.2.bn3.weight",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(names.contains_key(key), "missing {key}");
    }
    assert!(!names.contains_key("layer1.1.downsample.0.weight"));
    assert_eq!(names["layer1.0.conv2.weight"].1, vec![128, 4, 3, 3]);
    assert_eq!(names["bn1.num_batches_tracked"].0, "I64");
    // 320 tensors in torchvision's resnext50_32x4d state_dict
    assert_eq!(names.len(), 320);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fused_inference_path_equals_the_differentiable_eval_path() {
    // Without a tape, blocks and stages fold batch norm into the convolutions and pass plain
    // buffers; with a tape they compose the separate ops. Both are eval mode.
    let dev = Cpu::seed_from_u64(9);
    let mut stage = dev.build_module::<Stage<16, 32, 64, 2, 8, 3>, f32>();
    walk_mut(&mut stage, "", &mut RandomBn(5)).unwrap();
    let x: Act<16> = dev.sample_normal_like(&(3, Const::<16>, 9, 9));
    let fused = stage.forward(x.clone()).as_vec();
    let composed = stage.forward(x.trace(Gradients::leaky())).as_vec();
    assert!(crate::common::rel_err(&fused, &composed) <= 1e-5);
}
