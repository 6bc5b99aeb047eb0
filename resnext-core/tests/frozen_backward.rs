//! A frozen stem and first stage cost no backward work: the training step's backward pass
//! stops at the first trainable part. Counted with the op profiler, which is process-wide,
//! so this is a test binary of its own with a single test.

use std::collections::BTreeMap;

use dfdx::prelude::*;
use resnext_core::model::{Arch, Frozen};
use resnext_core::optim::{OptimConfig, Optimizer, ParamGroup};
use resnext_core::profile::{report, Label};

/// Calls per label so far.
fn calls() -> BTreeMap<Label, u64> {
    report().into_iter().map(|(l, _, n)| (l, n)).collect()
}

/// The calls one training step of `resnext29_2x64d` (stem and three stages of three blocks)
/// makes, per label, with `frozen` parts.
fn one_step(frozen: Frozen) -> BTreeMap<Label, u64> {
    let dev = Cpu::seed_from_u64(3);
    let mut net = Arch::ResNeXt29_2x64d.build(&dev, 3, 5).unwrap();
    net.set_frozen(frozen);
    let mut opt = Optimizer::new(OptimConfig {
        lr: 0.01,
        groups: vec![ParamGroup {
            prefixes: frozen.prefixes(),
            lr_scale: 0.0,
        }],
        ..Default::default()
    });
    let x = resnext_core::testing::values(5, 2 * 3 * 8 * 8);
    let before = calls();
    net.train_step(x, [2, 3, 8, 8], &[0, 1], 0.0, &mut opt)
        .unwrap();
    let after = calls();
    after
        .into_iter()
        .map(|(l, n)| (l, n - before.get(&l).copied().unwrap_or(0)))
        .collect()
}

#[test]
fn frozen_leading_parts_have_no_backward_pass() {
    // SAFETY of the test: set before any op runs, in the only test of this binary
    std::env::set_var("RESNEXT_PROFILE", "1");
    let all = one_step(Frozen::NONE);
    let part = one_step(Frozen::parse(["stem", "layer1"]).unwrap());
    let get = |m: &BTreeMap<Label, u64>, l| m.get(&l).copied().unwrap_or(0);
    eprintln!("unfrozen: {all:?}\nstem+layer1 frozen: {part:?}");
    // the stem's convolution has a backward pass only when it trains
    assert!(get(&all, Label::ConvKxkBwd) >= 1, "{all:?}");
    assert_eq!(get(&part, Label::ConvKxkBwd), 0, "{part:?}");
    // the grouped convolutions of layer1 (3 of 9 blocks) have none either
    let (g_all, g_part) = (
        get(&all, Label::ConvGroupedBwd),
        get(&part, Label::ConvGroupedBwd),
    );
    assert!(g_all >= 9, "{all:?}");
    assert_eq!(g_part * 9, g_all * 6, "{g_part} of {g_all}");
    // while the forward passes are the same
    assert_eq!(
        get(&all, Label::ConvGroupedFwd) + get(&all, Label::ConvGroupedBnEval),
        get(&part, Label::ConvGroupedFwd) + get(&part, Label::ConvGroupedBnEval),
    );
}
