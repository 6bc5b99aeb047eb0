//! Feature extraction: the typed feature maps and the pooled embedding agree with each
//! other, with the logits, and across the typed and the runtime-chosen networks.

use dfdx::prelude::*;
use resnext_core::builders;
use resnext_core::model::{Arch, Features};
use resnext_core::ops::Act;
use resnext_core::params::walk_mut;

use crate::common::rel_err;
use crate::model::RandomBn;
use crate::parity::Tiny;

/// Global average of an `(n, c, h, w)` map, `(n, c)`.
fn pooled(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let hw = h * w;
    (0..n * c)
        .map(|i| x[i * hw..(i + 1) * hw].iter().sum::<f32>() / hw as f32)
        .collect()
}

#[test]
fn the_last_feature_map_pooled_is_the_embedding_and_the_head_of_it_the_logits() {
    let dev = Cpu::seed_from_u64(5);
    let mut net = dev.build_module::<Tiny, f32>();
    walk_mut(&mut net, "", &mut RandomBn(9)).unwrap();
    let x: Act<3> = dev.sample_normal_like(&(3, Const::<3>, 16, 16));
    // typed: the channel counts are in the types (a wrong annotation does not compile)
    let (stem, f1, f2, f3): (Act<16>, Act<64>, Act<128>, Act<256>) =
        net.features(x.clone()).unwrap();
    assert_eq!(stem.shape().2, 16, "the CIFAR stem keeps the resolution");
    assert_eq!((f1.shape().2, f2.shape().2, f3.shape().2), (16, 8, 4));
    let emb = net.embed::<256>(x.clone()).unwrap();
    assert_eq!(emb.shape(), &(3, Const::<256>));
    assert!(rel_err(&pooled(&f3.as_vec(), [3, 256, 4, 4]), &emb.as_vec()) < 1e-5);
    // the head applied to the embedding gives the network's logits
    let logits = net.forward(x.clone()).as_vec();
    let head = net.fc.forward(emb.clone()).as_vec();
    assert!(rel_err(&logits, &head) < 1e-5);
    // the stage outputs are what the stages compute from the previous map
    let again = net.layer3.forward(f2.clone()).as_vec();
    assert!(rel_err(&again, &f3.as_vec()) < 1e-5);
    // the erased form returns the same maps, named
    let maps = net.feature_maps(x).unwrap();
    let names: Vec<_> = maps.iter().map(|m| m.name).collect();
    assert_eq!(names, ["stem", "layer1", "layer2", "layer3"]);
    assert_eq!(maps[3].shape, [3, 256, 4, 4]);
    assert_eq!(maps[3].data, f3.as_vec());
    assert_eq!(net.embed_dim(), 256);
}

#[test]
fn imagenet_features_have_the_strides_and_widths_of_timm_features_only() {
    let dev = Cpu::seed_from_u64(6);
    let net = dev.build_module::<builders::ResNeXt50_32x4d<10>, f32>();
    let x: Act<3> = dev.sample_normal_like(&(1, Const::<3>, 64, 64));
    let (stem, c2, c3, c4, c5): (Act<64>, Act<256>, Act<512>, Act<1024>, Act<2048>) =
        net.features(x.clone()).unwrap();
    let sides: Vec<usize> = [
        stem.shape().2,
        c2.shape().2,
        c3.shape().2,
        c4.shape().2,
        c5.shape().2,
    ]
    .into();
    assert_eq!(sides, [32, 16, 8, 4, 2], "strides 2, 4, 8, 16, 32");
    let emb = net.embed::<2048>(x).unwrap();
    assert!(rel_err(&pooled(&c5.as_vec(), [1, 2048, 2, 2]), &emb.as_vec()) < 1e-5);
}

#[test]
fn runtime_networks_embed_what_their_head_classifies() {
    let dev = Cpu::seed_from_u64(7);
    let net = Arch::ResNeXt29_2x64d.build(&dev, 3, 7).unwrap();
    assert_eq!(net.embed_dim(), 1024);
    let x = resnext_core::testing::values(3, 2 * 3 * 8 * 8);
    let emb = net.embed(x.clone(), [2, 3, 8, 8]).unwrap();
    assert_eq!(emb.len(), 2 * 1024);
    let maps = net.feature_maps(x.clone(), [2, 3, 8, 8]).unwrap();
    assert_eq!(maps.len(), 4);
    assert_eq!(maps[3].shape, [2, 1024, 2, 2]);
    assert!(rel_err(&pooled(&maps[3].data, maps[3].shape), &emb) < 1e-5);
    let err = net.embed(x, [2, 1, 8, 8]).unwrap_err().to_string();
    assert!(err.contains("expects 3 input channels"), "{err}");
}

#[test]
fn a_nan_in_the_input_reaches_the_logits_instead_of_vanishing_in_a_relu() {
    // PyTorch's ReLU keeps NaN; a ReLU written as `max(x, 0)` turns it into a confident 0
    let dev = Cpu::seed_from_u64(8);
    let mut net = dev.build_module::<Tiny, f32>();
    walk_mut(&mut net, "", &mut RandomBn(4)).unwrap();
    let mut v = resnext_core::testing::values(2, 2 * 3 * 12 * 12);
    v[3 * 144 + 7] = f32::NAN; // image 1, channel 0
    let x: Act<3> = dev.tensor_from_vec(v, (2, Const::<3>, 12, 12));
    for (path, logits) in [
        ("buffers", net.forward(x.clone()).as_vec()),
        ("tape", net.forward(x.trace(Gradients::leaky())).as_vec()),
        (
            "train",
            net.forward_mut(x.trace(Gradients::leaky())).as_vec(),
        ),
    ] {
        assert!(
            logits[..10].iter().all(|l| l.is_finite()) || path == "train",
            "{path}: image 0 is clean in eval mode"
        );
        assert!(
            logits[10..].iter().all(|l| l.is_nan()),
            "{path}: image 1's NaN vanished: {:?}",
            &logits[10..]
        );
    }
    let mut y = [0.0f32; 3];
    resnext_core::kernels::elementwise::add_relu_forward(&[f32::NAN, -1.0, 2.0], &[0.0; 3], &mut y);
    assert!(y[0].is_nan() && y[1] == 0.0 && y[2] == 2.0, "{y:?}");
}
