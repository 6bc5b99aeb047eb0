//! Fine-tuning: frozen parts stay bit-identical, learning-rate groups, zero-init residual.

use std::collections::BTreeMap;

use dfdx::prelude::*;
use resnext_core::model::{Arch, Frozen, Network};
use resnext_core::optim::{OptimConfig, Optimizer, ParamGroup};
use safetensors::SafeTensors;

/// Every tensor of `net` by name, as raw bytes.
fn tensors(net: &dyn Network) -> BTreeMap<String, Vec<u8>> {
    let path = std::env::temp_dir().join(format!(
        "resnext-fine-tune-{}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ));
    net.save_safetensors(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

fn steps(net: &mut dyn Network, opt: &mut Optimizer, n: usize) -> Vec<f32> {
    let shape = [4, 3, 16, 16];
    let x = resnext_core::testing::values(9, 4 * 3 * 16 * 16);
    (0..n)
        .map(|_| {
            net.train_step(x.clone(), shape, &[0, 1, 2, 3], 0.0, opt)
                .unwrap()
                .loss
        })
        .collect()
}

#[test]
fn frozen_parts_stay_bit_identical_and_the_rest_trains() {
    let dev = Cpu::seed_from_u64(1);
    for frozen in [
        Frozen::NONE,
        Frozen::parse(["stem", "layer1"]).unwrap(),
        Frozen::parse(["layer2"]).unwrap(),
        Frozen::BACKBONE,
    ] {
        let mut net = Arch::ResNeXt29_2x64d.build(&dev, 3, 5).unwrap();
        let before = tensors(net.as_ref());
        net.set_frozen(frozen);
        let mut opt = Optimizer::new(OptimConfig {
            lr: 0.01,
            groups: vec![ParamGroup {
                prefixes: frozen.prefixes(),
                lr_scale: 0.0,
            }],
            ..Default::default()
        });
        let losses = steps(net.as_mut(), &mut opt, 3);
        assert!(losses[2] < losses[0], "{frozen:?}: {losses:?}");
        let after = tensors(net.as_ref());
        for (name, b) in &before {
            let is_frozen = frozen
                .prefixes()
                .iter()
                .any(|p| name.starts_with(p.as_str()));
            let same = after[name] == *b;
            if is_frozen {
                // weights, running statistics and batch counters alike
                assert!(same, "{frozen:?}: frozen `{name}` changed");
            } else if name.ends_with(".weight") && !name.contains("bn") {
                assert!(!same, "{frozen:?}: trainable `{name}` did not change");
            }
        }
    }
}

#[test]
fn a_learning_rate_group_scales_the_step() {
    // with momentum 0 and no decay the first step is -lr·g: halving a group's rate halves
    // its change and leaves the others' as they were
    let run = |scale: f32| {
        let dev = Cpu::seed_from_u64(2);
        let mut net = Arch::ResNeXt29_2x64d.build(&dev, 3, 5).unwrap();
        let before = tensors(net.as_ref());
        let mut opt = Optimizer::new(OptimConfig {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            groups: vec![ParamGroup {
                prefixes: vec!["layer1.".into()],
                lr_scale: scale,
            }],
            ..Default::default()
        });
        steps(net.as_mut(), &mut opt, 1);
        let after = tensors(net.as_ref());
        let delta = |name: &str| -> Vec<f32> {
            let f = |b: &[u8]| -> Vec<f32> {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            };
            f(&after[name])
                .iter()
                .zip(f(&before[name]))
                .map(|(a, b)| a - b)
                .collect()
        };
        (
            delta("layer1.0.conv2.weight"),
            delta("layer3.0.conv2.weight"),
        )
    };
    let (full1, full3) = run(1.0);
    assert!(full1.iter().any(|d| d.abs() > 1e-5), "layer1 moved");
    let (half1, half3) = run(0.5);
    for (f, h) in full1.iter().zip(&half1) {
        // the deltas are differences of f32 weights near 0.1: exact to about 1e-8
        assert!((f * 0.5 - h).abs() <= 5e-8 + 1e-3 * f.abs(), "{f} vs {h}");
    }
    assert_eq!(full3, half3, "another group's step is unchanged");
}

#[test]
fn zero_init_residual_makes_every_block_start_as_its_shortcut() {
    let dev = Cpu::seed_from_u64(3);
    let mut net = Arch::ResNeXt29_2x64d.build(&dev, 3, 5).unwrap();
    net.zero_init_residual();
    let t = tensors(net.as_ref());
    let zeroed: Vec<&String> = t
        .iter()
        .filter(|(_, v)| v.iter().all(|&b| b == 0))
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".weight"))
        .collect();
    assert_eq!(zeroed.len(), 9, "one bn3.weight per block: {zeroed:?}");
    assert!(zeroed.iter().all(|n| n.ends_with(".bn3.weight")));
}
