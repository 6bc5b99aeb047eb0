//! Smoke runs of `train --max-steps` and `eval` on each dataset format, from small files
//! the test writes in the publishers' formats.

mod common;
use common::*;

use std::io::Write;
use std::path::Path;

fn smoke(dataset: &str, data: &Path, extra: &[&str], out: &TempDir) {
    let run = out.s(&format!("run-{dataset}"));
    let mut args = vec![
        "train",
        "--dataset",
        dataset,
        "--data-dir",
        data.to_str().unwrap(),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--out-dir",
        &run,
    ];
    args.extend_from_slice(extra);
    let o = bin(&args);
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{dataset}: {so}\n{se}");
    assert!(so.contains("--max-steps reached"), "{so}");
    let model = format!("{run}/checkpoint/model-2.safetensors");
    let mut eargs = vec![
        "eval",
        "--dataset",
        dataset,
        "--data-dir",
        data.to_str().unwrap(),
        "--weights",
        &model,
    ];
    eargs.extend_from_slice(
        extra
            .iter()
            .filter(|a| {
                a.starts_with("--arch")
                    || a.starts_with("resnext")
                    || a.starts_with("--image")
                    || a.parse::<usize>().is_ok()
            })
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
    );
    let o = bin(&eargs);
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{dataset} eval: {so}\n{se}");
    assert!(so.lines().last().unwrap().starts_with("top1: "), "{so}");
}

fn records(head: usize, n: usize, classes: u8) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let mut r = vec![(i as u8) % classes; head];
            r.extend((0..3072).map(|p| ((p * (i + 1)) % 256) as u8));
            r
        })
        .collect()
}

#[test]
fn cifar10_and_cifar100() {
    let d = TempDir::new("cifar");
    let c10 = d.0.join("c10/cifar-10-batches-bin");
    std::fs::create_dir_all(&c10).unwrap();
    for f in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        std::fs::write(c10.join(f), records(1, 4, 10)).unwrap();
    }
    smoke("cifar10", &d.0.join("c10"), &[], &d);
    let c100 = d.0.join("c100/cifar-100-binary");
    std::fs::create_dir_all(&c100).unwrap();
    std::fs::write(c100.join("train.bin"), records(2, 12, 20)).unwrap();
    std::fs::write(c100.join("test.bin"), records(2, 5, 20)).unwrap();
    smoke("cifar100", &d.0.join("c100"), &[], &d);
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    dims.iter()
        .for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
    v.extend_from_slice(data);
    v
}

#[test]
fn mnist_and_fashion_mnist_gz() {
    let d = TempDir::new("mnist");
    for name in ["mnist", "fashion"] {
        let dir = d.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (prefix, n) in [("train", 10u32), ("t10k", 6)] {
            let px: Vec<u8> = (0..n as usize * 784).map(|i| (i % 253) as u8).collect();
            let labels: Vec<u8> = (0..n as u8).map(|i| i % 10).collect();
            for (file, bytes) in [
                (
                    format!("{prefix}-images-idx3-ubyte.gz"),
                    idx(0x803, &[n, 28, 28], &px),
                ),
                (
                    format!("{prefix}-labels-idx1-ubyte.gz"),
                    idx(0x801, &[n], &labels),
                ),
            ] {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&bytes).unwrap();
                std::fs::write(dir.join(file), e.finish().unwrap()).unwrap();
            }
        }
    }
    smoke("mnist", &d.0.join("mnist"), &[], &d);
    smoke("fashion-mnist", &d.0.join("fashion"), &[], &d);
}

#[test]
fn image_folder_with_a_runtime_class_count() {
    let d = TempDir::new("folder");
    for split in ["train", "val"] {
        for (k, class) in ["cat", "dog", "emu"].iter().enumerate() {
            let dir = d.0.join("imgs").join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..3u32 {
                let img = image::RgbImage::from_fn(20 + i, 18, |x, y| {
                    image::Rgb([(k * 80) as u8, (x * 9) as u8, (y * 9) as u8])
                });
                img.save(dir.join(format!("{i}.{}", if i % 2 == 0 { "png" } else { "jpg" })))
                    .unwrap();
            }
        }
    }
    // a PNG whose header reads but whose pixels do not: found only when decoded, in a
    // batch, where it is left out with a warning instead of stopping the run (eval reads
    // every validation image)
    let bad = d.0.join("imgs/val/dog/bad.png");
    image::RgbImage::from_pixel(20, 18, image::Rgb([1, 2, 3]))
        .save(&bad)
        .unwrap();
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 20]).unwrap();
    smoke("folder", &d.0.join("imgs"), &["--image-size", "16"], &d);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("run-folder/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 2);
    let names = std::process::Command::new(env!("CARGO_BIN_EXE_resnext-train"))
        .args([
            "predict",
            "--arch",
            "resnext11_8x8d",
            "--weights",
            &d.s("run-folder/checkpoint/model-2.safetensors"),
            "--npy-input",
            "/nonexistent.npy",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&names.stderr).contains("cannot read"));
}

#[test]
fn missing_data_says_how_to_get_it() {
    let d = TempDir::new("missing");
    let o = bin(&[
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        &d.s("nothing"),
        "--max-steps",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("add --download") && !err.contains("panicked"),
        "{err}"
    );
}
