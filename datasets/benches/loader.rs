//! Loader throughput (images/s): CIFAR-style in-memory data with the standard augmentation,
//! and a 224×224 JPEG folder with ImageNet training augmentation (decode + random-resized
//! crop + flip + normalise), at 1 and 2 worker threads.
//!
//! `cargo bench -p datasets --bench loader`
#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datasets::folder::ImageFolder;
use datasets::loader::{Loader, LoaderConfig};
use datasets::transforms::constants::*;
use datasets::transforms::{
    Normalize, Pipeline, RandomCrop, RandomHorizontalFlip, RandomResizedCrop,
};
use datasets::{InMemory, Info, Source};

fn cifar_like(n: usize) -> Arc<dyn Source> {
    let info = Info {
        name: "cifar-like".into(),
        channels: 3,
        height: 32,
        width: 32,
        classes: (0..10).map(|i| i.to_string()).collect(),
        max_value: 255.0,
        mean: CIFAR10_MEAN.to_vec(),
        std: CIFAR10_STD.to_vec(),
    };
    Arc::new(InMemory::new(
        info,
        (0..n * 3072).map(|i| (i * 31 % 251) as u8).collect(),
        (0..n).map(|i| (i % 10) as u16).collect(),
    ))
}

fn jpeg_folder(n: usize) -> (std::path::PathBuf, Arc<dyn Source>) {
    let root = std::env::temp_dir().join(format!("loader-bench-{}", std::process::id()));
    for i in 0..n {
        let dir = root.join(format!("class{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let img = image::RgbImage::from_fn(256, 256, |x, y| {
            image::Rgb([
                (x + i as u32) as u8,
                (y * 3) as u8,
                ((x ^ y) + i as u32) as u8,
            ])
        });
        img.save(dir.join(format!("{i}.jpg"))).unwrap();
    }
    let src = ImageFolder::open(&root, None, false).unwrap();
    (root, Arc::new(src))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("loader");
    g.sample_size(10);
    let n = 4096;
    let src = cifar_like(n);
    for threads in [1, 2] {
        let pipe = || {
            Pipeline::new(255.0)
                .then(RandomCrop {
                    size: 32,
                    padding: 4,
                })
                .then(RandomHorizontalFlip { p: 0.5 })
                .then(Normalize {
                    mean: CIFAR10_MEAN.to_vec(),
                    std: CIFAR10_STD.to_vec(),
                })
        };
        let loader = Loader::new(
            src.clone(),
            pipe(),
            LoaderConfig {
                batch_size: 128,
                threads,
                ..Default::default()
            },
        );
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("cifar32_augment_{threads}threads_cpu"), |b| {
            b.iter(|| {
                loader
                    .epoch(0, 0)
                    .map(|b| b.unwrap().labels.len())
                    .sum::<usize>()
            })
        });
    }
    let (root, folder) = jpeg_folder(64);
    for threads in [1, 2] {
        let pipe = Pipeline::new(255.0)
            .then(RandomResizedCrop::new(224))
            .then(RandomHorizontalFlip { p: 0.5 })
            .then(Normalize {
                mean: IMAGENET_MEAN.to_vec(),
                std: IMAGENET_STD.to_vec(),
            });
        let loader = Loader::new(
            folder.clone(),
            pipe,
            LoaderConfig {
                batch_size: 16,
                threads,
                ..Default::default()
            },
        );
        g.throughput(Throughput::Elements(64));
        g.bench_function(format!("jpeg256_to_224_{threads}threads_cpu"), |b| {
            b.iter(|| {
                loader
                    .epoch(0, 0)
                    .map(|b| b.unwrap().labels.len())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(root);
}

criterion_group!(benches, bench);
criterion_main!(benches);
