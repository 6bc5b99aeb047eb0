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
