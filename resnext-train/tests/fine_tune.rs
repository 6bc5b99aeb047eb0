//! Fine-tuning and feature extraction end to end: a backbone trained on the digits 0–4 is
//! fine-tuned on 5–9 from three images per class, against the same budget from scratch;
//! frozen parts stay bit-identical; `embed` writes the pooled features and labels.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::Path;

/// The f32 tensors of a safetensors file as raw bits: "unchanged" means bit-identical.
fn bits(path: &Path) -> BTreeMap<String, Vec<u32>> {
    tensors(path)
        .into_iter()
        .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// `train` on the digits 5–9 from three images per class, 15 epochs of one batch.
fn few_shot(out_dir: &str, seed: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "train",
        "--class-subset",
        "5-9",
        "--train-per-class",
        "3",
        "--batch-size",
        "15",
        "--epochs",
        "15",
        "--threads",
        "1",
        "--seed",
        seed,
        "--out-dir",
        out_dir,
    ];
    args.extend_from_slice(extra);
    ok(&bin(&args))
}

#[test]
fn a_backbone_from_other_digits_beats_the_same_budget_from_scratch() {
    let d = TempDir::new("fine-tune");
    let pre = d.s("pre");
    let out = ok(&bin(&[
        "train",
        "--class-subset",
        "0-4",
        "--epochs",
        "3",
        "--threads",
        "1",
        "--out-dir",
        &pre,
    ]));
    assert!(final_top1(&out) > 0.9, "pretraining on 0-4 failed:\n{out}");
    let weights = format!("{pre}/model.safetensors");

    // the head (5 classes either way) is reset on request, and the report says so
    let mut margins = Vec::new();
    for seed in ["1", "2"] {
        let tuned = few_shot(
            &d.s(&format!("tuned{seed}")),
            seed,
            &["--init-weights", &weights, "--reset-head"],
        );
        assert!(
            tuned.contains("loaded 78 tensors")
                && tuned.contains("`fc.weight` (the head is reset)")
                && tuned.contains("`fc.bias` (the head is reset)"),
            "{tuned}"
        );
        let scratch = few_shot(&d.s(&format!("scratch{seed}")), seed, &[]);
        assert!(!scratch.contains("init-weights"));
        margins.push((final_top1(&tuned), final_top1(&scratch)));
    }
    for &(tuned, scratch) in &margins {
        assert!(
            tuned > scratch + 0.2 && tuned > 0.45,
            "fine-tuned {tuned} against scratch {scratch} (all: {margins:?})"
        );
    }
}

#[test]
fn frozen_parts_stay_bit_identical_and_the_rest_trains() {
    let d = TempDir::new("freeze");
    let pre = d.s("pre");
    one_quick_epoch(&pre);
    let before = bits(&Path::new(&pre).join("model.safetensors"));
    let init = format!("{pre}/model.safetensors");
    let run = |name: &str, extra: &[&str]| {
        let dir = d.s(name);
        let mut args = vec![
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--out-dir",
            &dir,
            "--init-weights",
            &init,
        ];
        args.extend_from_slice(extra);
        let out = ok(&bin(&args));
        assert!(out.contains("loaded 80 tensors"), "{out}");
        bits(&Path::new(&dir).join("model.safetensors"))
    };
    let probe = run("probe", &["--freeze-backbone"]);
    let partial = run("partial", &["--freeze", "stem,layer1"]);
    for (name, bits) in &before {
        let head = name.starts_with("fc.");
        // batch norms of frozen parts run in eval mode: their running statistics stay too
        assert_eq!(
            &probe[name] == bits,
            !head,
            "--freeze-backbone: `{name}` {}",
            if head { "did not train" } else { "changed" }
        );
        let frozen =
            name.starts_with("conv1.") || name.starts_with("bn1.") || name.starts_with("layer1.");
        let trainable = !name.ends_with("num_batches_tracked");
        if frozen {
            assert_eq!(
                &partial[name], bits,
                "--freeze stem,layer1: `{name}` changed"
            );
        } else if trainable {
            assert_ne!(
                &partial[name], bits,
                "--freeze stem,layer1: `{name}` did not train"
            );
        }
    }
}

#[test]
fn fine_tuning_flags_are_checked() {
    let d = TempDir::new("ft-flags");
    let run = d.s("run");
    for (args, msg) in [
        (vec!["--reset-head"], "--init-weights"),
        (vec!["--freeze", "layer9"], "layer9"),
        (vec!["--freeze", "layer4"], "three stages"),
        (vec!["--freeze", "backbone,head"], "nothing would train"),
        (vec!["--backbone-lr-scale=-1"], "backbone-lr-scale"),
        (vec!["--backbone-lr-scale", "NaN"], "backbone-lr-scale"),
        (vec!["--train-per-class", "0"], "train-per-class"),
        (vec!["--class-subset", "3-x"], "class-subset"),
        (vec!["--class-subset", "9-3"], "class-subset"),
        (vec!["--class-subset", "4,12"], "class 12 is out of range"),
        (vec!["--class-subset", "4,4"], "class 4 is listed twice"),
        (
            vec!["--init-weights", "/nonexistent.safetensors"],
            "nonexistent",
        ),
    ] {
        let mut all = vec!["train", "--epochs", "1", "--out-dir", &run];
        all.extend_from_slice(&args);
        fails(&all, msg);
    }
}

#[test]
fn embed_writes_pooled_features_and_labels_of_a_split() {
    let d = TempDir::new("embed");
    let run = d.s("run");
    one_quick_epoch(&run);
    let weights = format!("{run}/model.safetensors");
    let out = d.s("test.npy");
    let o = ok(&bin(&[
        "embed",
        "--arch",
        "resnext11_8x8d",
        "--weights",
        &weights,
        "--dataset",
        "digits",
        "--batch-size",
        "100",
        "--out",
        &out,
    ]));
    assert!(o.contains("(360 x 512)"), "{o}");
    let emb = datasets::npy::read(&out).unwrap();
    assert_eq!(emb.shape, [360, 512]);
    // the pooled output of a ReLU: non-negative, finite, not all zero
    assert!(emb.data.iter().all(|v| v.is_finite() && *v >= 0.0));
    assert!(emb.data.iter().any(|v| *v > 0.0));
    // labels: int64, the test split's in order (sample i is test when i % 5 == 0)
    let bytes = std::fs::read(d.0.join("test.labels.npy")).unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY"));
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<i8'") && header.contains("(360,)"),
        "{header}"
    );
    let labels: Vec<i64> = bytes[10 + header_len..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let test = datasets::digits::load(datasets::Split::Test);
    use datasets::Source;
    let want: Vec<i64> = (0..test.len())
        .map(|i| test.label(i).unwrap() as i64)
        .collect();
    assert_eq!(labels, want);

    // the same rows from a .npy batch of the first inputs, and a batch size that splits it
    let x: Vec<f32> = (0..7 * 64)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    datasets::npy::write(d.0.join("x.npy"), &[7, 1, 8, 8], &x).unwrap();
    let rows = |batch: &str, name: &str| {
        ok(&bin(&[
            "embed",
            "--arch",
            "resnext11_8x8d",
            "--weights",
            &weights,
            "--npy-input",
            &d.s("x.npy"),
            "--batch-size",
            batch,
            "--out",
            &d.s(name),
        ]));
        datasets::npy::read(d.0.join(name)).unwrap()
    };
    let (whole, split) = (rows("64", "a.npy"), rows("3", "b.npy"));
    assert_eq!(whole.shape, [7, 512]);
    for (a, b) in whole.data.iter().zip(&split.data) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
    }
}

#[test]
fn embed_rejects_what_it_cannot_use() {
    let d = TempDir::new("embed-bad");
    let run = d.s("run");
    one_quick_epoch(&run);
    let weights = format!("{run}/model.safetensors");
    let out = d.s("e.npy");
    datasets::npy::write(d.0.join("rgb.npy"), &[2, 3, 8, 8], &[0.0; 384]).unwrap();
    let base = ["embed", "--arch", "resnext11_8x8d", "--weights", &weights];
    for (extra, msg) in [
        (vec!["--out", &out], "nothing to embed"),
        (
            vec!["--dataset", "digits", "--batch-size", "0", "--out", &out],
            "--batch-size 0",
        ),
        (
            vec![
                "--dataset",
                "cifar10",
                "--data-dir",
                "/nonexistent",
                "--out",
                &out,
            ],
            "nonexistent",
        ),
        (
            vec!["--npy-input", &d.s("rgb.npy"), "--out", &out],
            "3 channels",
        ),
        (
            vec!["--dataset", "digits", "--out", &out, "--labels-out", &out],
            "same file",
        ),
    ] {
        let mut all = base.to_vec();
        all.extend_from_slice(&extra);
        fails(&all, msg);
        assert!(!Path::new(&out).exists(), "{extra:?} left {out}");
    }
}
