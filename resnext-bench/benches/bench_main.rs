//! Criterion benchmarks: each op at the four stage shapes of `resnext50_32x4d` (forward
//! and backward), one block (eval, and a training forward + backward), whole networks (eval at batch 1 and 8, one training step at
//! batch 8) at 224×224, a CIFAR-size network, and ResNeXt-50 against ResNet-50 built from
//! the same blocks; the grouped 3×3 convolutions again at every instruction-set level the
//! CPU has (`conv_isa/`). Names carry the device (`cpu`) or the level (`avx2`, …).
//!
//! `cargo bench -p resnext-bench` (all), or e.g. `cargo bench -p resnext-bench -- conv/`.
#![allow(missing_docs)] // criterion_group! generates an undocumented function

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dfdx::prelude::*;
use resnext_bench::{grouped3x3, pointwise, stage_size, stage_width, values, BnCase};
use resnext_core::kernels::batchnorm::{self, BnGeom};
use resnext_core::kernels::{conv, isa};
use resnext_core::model::Arch;
use resnext_core::optim::{OptimConfig, Optimizer};

const BATCH: usize = 8;

/// The forward and the backward pass of one convolution, named `name` with `{}` replaced
/// by `fwd` / `bwd`, at `stage`.
fn bench_conv(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    stage: usize,
    geom: &conv::Conv2dGeom,
) {
    let x = values(1, geom.input_len());
    let w = values(2, geom.weight_len());
    let dy = values(3, geom.output_len());
    let mut y = vec![0.0; geom.output_len()];
    g.throughput(Throughput::Elements(2 * geom.macs() as u64));
    g.bench_function(
        BenchmarkId::new(name.replace("{}", "fwd"), format!("stage{stage}")),
        |b| b.iter(|| conv::conv2d_forward(geom, &x, &w, &mut y)),
    );
    let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
    g.throughput(Throughput::Elements(4 * geom.macs() as u64));
    g.bench_function(
        BenchmarkId::new(name.replace("{}", "bwd"), format!("stage{stage}")),
        |b| b.iter(|| conv::conv2d_backward(geom, &x, &w, &dy, Some(&mut dx), &mut dw)),
    );
}

fn ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv");
    g.sample_size(10);
    for stage in 1..=4 {
        // the block's first 1×1 convolution: 2 × width → width
        let (width, inp) = (stage_width(stage), 2 * stage_width(stage));
        let shapes = [
            ("grouped3x3", grouped3x3(stage, BATCH, 1)),
            ("1x1", pointwise(stage, BATCH, inp, width)),
        ];
        for (name, geom) in shapes {
            bench_conv(&mut g, &format!("{name}_{{}}_cpu"), stage, &geom);
        }
    }
    g.finish();

    let mut g = c.benchmark_group("batchnorm_relu");
    g.sample_size(10);
    for stage in 1..=4 {
        let geom = BnGeom {
            batch: BATCH,
            channels: stage_width(stage),
            spatial: stage_size(stage) * stage_size(stage),
        };
        bench_bn(&mut g, "cpu", stage, &geom, true);
    }
    g.finish();
}

/// The grouped 3×3 convolutions at every instruction-set level this CPU has (the level
/// set process-wide for the duration of each measurement): `conv_isa/grouped3x3_fwd_avx2`.
fn conv_isa(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv_isa");
    g.sample_size(10);
    for level in isa::available() {
        isa::set_level(Some(level)).expect("an available level");
        for stage in 1..=4 {
            let geom = grouped3x3(stage, BATCH, 1);
            bench_conv(&mut g, &format!("grouped3x3_{{}}_{level}"), stage, &geom);
        }
    }
    isa::set_level(None).expect("back to the detected level");
    g.finish();
}

fn block(c: &mut Criterion) {
    let dev = Cpu::default();
    let blk = dev.build_module::<resnext_core::builders::Bottleneck<256, 128, 256, 1, 32>, f32>();
    let x: resnext_core::ops::Act<256> = dev.tensor_from_vec(
        values(6, BATCH * 256 * 56 * 56),
        (BATCH, Const::<256>, 56, 56),
    );
    let mut g = c.benchmark_group("block");
    g.sample_size(10);
    g.bench_function("layer1_eval_b8_cpu", |b| b.iter(|| blk.forward(x.clone())));
    // training: the fused conv + batch norm (+ residual + ReLU) ops, forward and backward
    let mut train_blk = blk.clone();
    g.bench_function("layer1_train_fwd_bwd_b8_cpu", |b| {
        b.iter(|| {
            let y = train_blk.forward_mut(x.trace(Gradients::leaky()));
            y.sum().backward()
        })
    });
    g.finish();
}

fn networks(c: &mut Criterion) {
    let dev = Cpu::seed_from_u64(0);
    let mut g = c.benchmark_group("network");
    g.sample_size(10);
    for (arch, batch, size, classes) in [
        (Arch::ResNeXt50_32x4d, 1, 224, 1000),
        (Arch::ResNeXt50_32x4d, 8, 224, 1000),
        (Arch::ResNet50, 8, 224, 1000),
        (Arch::ResNeXt29_8x64d, 32, 32, 10),
    ] {
        let net = arch.build(&dev, 3, classes).expect("builds");
        let x = values(7, batch * 3 * size * size);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("{arch}_eval_b{batch}_{size}_cpu"), |b| {
            b.iter(|| {
                net.forward_eval(x.clone(), [batch, 3, size, size])
                    .expect("runs")
            })
        });
    }
    for arch in [Arch::ResNeXt50_32x4d, Arch::ResNet50] {
        let mut net = arch.build(&dev, 3, 1000).expect("builds");
        let x = values(8, BATCH * 3 * 224 * 224);
        let labels: Vec<usize> = (0..BATCH).collect();
        let mut opt = Optimizer::new(OptimConfig {
            lr: 1e-4,
            ..Default::default()
        });
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(format!("{arch}_train_step_b8_224_cpu"), |b| {
            b.iter(|| {
                net.train_step(x.clone(), [BATCH, 3, 224, 224], &labels, 0.0, &mut opt)
                    .expect("runs")
            })
        });
    }
    g.finish();
}

/// The training batch norm + ReLU at `geom`: forward (`train_fwd_{suffix}`), the in-place
/// backward the fused block runs (`train_bwd_in_place_{suffix}`) and, with `separate`,
/// the backward into a separate buffer (`train_bwd_{suffix}`).
fn bench_bn(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    suffix: &str,
    stage: usize,
    geom: &BnGeom,
    separate: bool,
) {
    let case = BnCase::new(*geom);
    let (x, dy, ch) = (&case.x, &case.dy, case.channels());
    let mut y = vec![0.0; geom.len()];
    let id = |what: &str| BenchmarkId::new(format!("{what}_{suffix}"), format!("stage{stage}"));
    g.throughput(Throughput::Elements(geom.len() as u64));
    g.bench_function(id("train_fwd"), |b| b.iter(|| case.forward(&mut y)));
    let (mut d, mut dg, mut db) = (
        dy.clone(),
        vec![0.0; geom.channels],
        vec![0.0; geom.channels],
    );
    if separate {
        g.bench_function(id("train_bwd"), |b| {
            b.iter(|| {
                batchnorm::bn_backward(geom, x, &ch, true, dy, Some(&mut d), &mut dg, &mut db)
            })
        });
    }
    g.bench_function(id("train_bwd_in_place"), |b| {
        b.iter(|| {
            d.copy_from_slice(dy); // (includes this copy: the pass overwrites its input)
            batchnorm::bn_backward_in_place(geom, x, &ch, &mut d, &mut dg, &mut db)
        })
    });
}

/// The training batch norm + ReLU (forward, and the in-place backward the fused block
/// runs) at every instruction-set level this CPU has, at the expansion's `2 × width`
/// channels: `norm_isa/train_bwd_in_place_avx2/stage1`.
fn norm_isa(c: &mut Criterion) {
    let mut g = c.benchmark_group("norm_isa");
    g.sample_size(10);
    for level in isa::available() {
        isa::set_level(Some(level)).expect("an available level");
        for stage in 1..=4 {
            let geom = BnGeom {
                batch: BATCH,
                channels: 2 * stage_width(stage),
                spatial: stage_size(stage) * stage_size(stage),
            };
            bench_bn(&mut g, &level.to_string(), stage, &geom, false);
        }
    }
    isa::set_level(None).expect("back to the detected level");
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = ops, conv_isa, norm_isa, block, networks
}
criterion_main!(benches);
