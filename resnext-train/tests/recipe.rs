//! The modern training recipe end to end on the embedded digits: AdamW, gradient clipping,
//! mixup/cutmix, TrivialAugmentWide, random erasing, the moving average of the weights and
//! the `torchvision-v2` preset.

mod common;
use common::*;

use resnext_train::train::{parse_config, AutoAugment, OptimizerName};

/// Every augmentation and the weight average on, 2 epochs of 22 steps.
fn augmented<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&AUGMENTED[..], extra].concat()
}

const AUGMENTED: [&str; 16] = [
    "train",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--mixup-alpha",
    "0.2",
    "--cutmix-alpha",
    "1.0",
    "--auto-augment",
    "ta_wide",
    "--random-erase",
    "0.25",
    "--ema-decay",
    "0.999",
    "--ema-steps=4",
];

#[test]
fn an_augmented_run_with_a_weight_average_resumes_exactly_and_eval_reports_the_average() {
    let d = TempDir::new("recipe-resume");
    let (whole, split) = (d.s("whole"), d.s("split"));
    let out = ok(&bin(&augmented(&["--out-dir", &whole])));
    assert!(out.contains("final test_top1_ema: "), "{out}");
    // stopped mid-epoch, then resumed: the same batches, mixes, augmentations and average
    ok(&bin(&augmented(&[
        "--out-dir",
        &split,
        "--max-steps",
        "30",
    ])));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("split/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["ema_file"], "ema-30.safetensors");
    assert!(d.0.join("split/checkpoint/ema-30.safetensors").is_file());
    ok(&bin(&["train", "--resume", &split]));
    for f in ["model.safetensors", "ema.safetensors", "best.safetensors"] {
        assert_eq!(
            std::fs::read(d.0.join("whole").join(f)).unwrap(),
            std::fs::read(d.0.join("split").join(f)).unwrap(),
            "{f} differs after a resume"
        );
    }
    let (a, b) = (metrics(&d.0.join("whole")), metrics(&d.0.join("split")));
    for (ra, rb) in a.iter().zip(&b) {
        for key in ["train_loss", "test_top1", "test_top1_ema", "test_loss_ema"] {
            assert_eq!(ra[key], rb[key], "{key}");
        }
    }
    // the average differs from the weights, and eval finds and scores it
    let (ema, raw) = (
        std::fs::read(d.0.join("whole/ema.safetensors")).unwrap(),
        std::fs::read(d.0.join("whole/model.safetensors")).unwrap(),
    );
    assert_ne!(ema, raw);
    let ev = ok(&bin(&[
        "eval",
        "--weights",
        &format!("{whole}/model.safetensors"),
    ]));
    let line = ev.lines().find(|l| l.starts_with("ema (")).expect(&ev);
    let top1: f64 = line
        .split("top1: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let recorded = a.last().unwrap()["test_top1_ema"].as_f64().unwrap();
    assert!((top1 - recorded).abs() < 5e-5, "{top1} vs {recorded}");
}

#[test]
fn adamw_and_gradient_clipping_train_the_digits() {
    let d = TempDir::new("adamw");
    let out = ok(&bin(&[
        "train",
        "--epochs",
        "2",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--weight-decay",
        "0.05",
        "--clip-grad-norm",
        "2.0",
        "--out-dir",
        &d.s("run"),
    ]));
    let top1 = final_top1(&out);
    assert!(top1 > 0.85, "AdamW reached only {top1}:\n{out}");
    // its state holds AdamW's moments and the step count, which SGD cannot resume from
    let bytes = std::fs::read(
        std::fs::read_dir(d.0.join("run/checkpoint"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("optimizer-"))
            .unwrap()
            .path(),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(names.iter().any(|n| n.starts_with("exp_avg_sq.")));
    assert!(names.iter().any(|n| *n == "step"));
    assert!(!names.iter().any(|n| n.starts_with("momentum.")));
    let state_path = d.0.join("run/state.json");
    let text = std::fs::read_to_string(&state_path).unwrap();
    std::fs::write(&state_path, text.replace("\"adamw\"", "\"sgd\"")).unwrap();
    let o = bin(&["train", "--resume", &d.s("run"), "--epochs", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("optimizer state") && err.contains("exp_avg"),
        "{err}"
    );
}

#[test]
fn the_torchvision_v2_recipe_sits_under_the_flags_given() {
    let a = parse_config("recipe = \"torchvision-v2\"\nbatch-size = 256\n").unwrap();
    assert_eq!(a.epochs, 600);
    assert_eq!(a.lr, 0.125);
    assert_eq!(a.optimizer, OptimizerName::Sgd);
    assert_eq!((a.mixup_alpha, a.cutmix_alpha), (0.2, 1.0));
    assert_eq!(a.auto_augment, Some(AutoAugment::TaWide));
    assert_eq!(a.random_erase, 0.1);
    assert_eq!((a.ema_decay, a.ema_steps), (Some(0.99998), 32));
    assert_eq!(a.label_smoothing, 0.1);
    assert_eq!(a.weight_decay, 2e-5);
    assert!(!a.decay_bn_and_bias);
    assert_eq!(a.warmup_epochs, 5.0);
    assert_eq!(
        (a.image_size, a.val_resize, a.val_crop),
        (Some(176), Some(232), Some(224))
    );
    // the file's own keys win over the recipe
    let b = parse_config("recipe = \"torchvision-v2\"\nepochs = 90\nlr = 0.2\n").unwrap();
    assert_eq!((b.epochs, b.lr), (90, 0.2));
    // and the command line over both: one step of the recipe on an ImageNet network
    let d = TempDir::new("recipe");
    ok(&bin(&[
        "train",
        "--recipe",
        "torchvision-v2",
        "--arch",
        "resnet50",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--max-steps",
        "1",
        "--out-dir",
        &d.s("run"),
    ]));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("run/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["config"]["epochs"], 1);
    assert_eq!(state["config"]["lr"], 0.125);
    assert_eq!(state["config"]["auto-augment"], "ta_wide");
    assert_eq!(state["ema_file"], "ema-1.safetensors");
}

#[test]
fn recipe_flags_are_checked() {
    let d = TempDir::new("recipe-flags");
    let run = d.s("run");
    for (args, msg) in [
        (vec!["--mixup-alpha=-0.1"], "mixup-alpha"),
        (vec!["--cutmix-alpha", "NaN"], "cutmix-alpha"),
        (vec!["--random-erase", "1.5"], "random-erase"),
        (vec!["--ema-decay", "1"], "ema-decay"),
        (vec!["--ema-decay", "0.9", "--ema-steps", "0"], "ema-steps"),
        (vec!["--clip-grad-norm", "0"], "clip-grad-norm"),
        (vec!["--optimizer", "lamb"], "lamb"),
        (vec!["--auto-augment", "ra"], "ra"),
        (vec!["--val-resize", "0"], "val-resize"),
        (
            vec!["--recipe", "torchvision-v2", "--arch", "resnext29_2x64d"],
            "CIFAR network",
        ),
    ] {
        let mut all = vec!["train", "--epochs", "1", "--out-dir", &run];
        all.extend_from_slice(&args);
        fails(&all, msg);
    }
}
