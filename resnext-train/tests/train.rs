//! `resnext-train train` / `eval` end to end on the embedded digits.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The keys of a `metrics.jsonl` line that depend only on the training itself (not on the
/// machine's speed).
const LEARNED: [&str; 6] = [
    "epoch",
    "train_loss",
    "train_top1",
    "test_loss",
    "test_top1",
    "lr",
];

#[test]
fn a_short_run_writes_metrics_curves_and_checkpoints_that_eval_reads() {
    let d = TempDir::new("short");
    let run = d.s("run");
    let out = ok(&bin(&["train", "--epochs", "2", "--out-dir", &run]));
    let top1 = final_top1(&out);
    let m = metrics(Path::new(&run));
    assert_eq!(m.len(), 2);
    for key in LEARNED.into_iter().chain(["images_per_s", "seconds"]) {
        assert!(
            m[1].get(key).is_some_and(|v| v.is_number()),
            "metrics lack {key}: {}",
            m[1]
        );
    }
    assert!((m[1]["test_top1"].as_f64().unwrap() - top1).abs() < 1e-4);
    assert!(top1 > 0.5, "two epochs on digits learn something: {top1}");
    let svg = std::fs::read_to_string(Path::new(&run).join("curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));

    // eval of the best checkpoint reproduces the best epoch's test accuracy
    let best = m
        .iter()
        .map(|r| r["test_top1"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let out = ok(&bin(&[
        "eval",
        "--weights",
        &format!("{run}/best.safetensors"),
    ]));
    let last = out.lines().last().unwrap();
    let parts: Vec<&str> = last.split_whitespace().collect();
    assert_eq!((parts[0], parts[2]), ("top1:", "top5:"), "{last}");
    assert!(
        (parts[1].parse::<f64>().unwrap() - best).abs() < 1e-4,
        "{last} vs {best}"
    );
    assert!(parts[3].parse::<f64>().unwrap() >= best);

    // predict on image files, preprocessed as the run was trained (grey 8x8 digits)
    let img = image::GrayImage::from_fn(40, 40, |x, y| {
        image::Luma([if (x as i32 - 20).abs() < 4 || (y as i32 - 20).abs() < 4 {
            255
        } else {
            0
        }])
    });
    let png = d.0.join("plus.png");
    img.save(&png).unwrap();
    let out = ok(&bin(&[
        "predict",
        "--arch",
        "resnext11_8x8d",
        "--weights",
        &format!("{run}/best.safetensors"),
        png.to_str().unwrap(),
        "--topk",
        "3",
    ]));
    let line = out.lines().next().unwrap();
    assert!(
        line.starts_with(png.to_str().unwrap()) && line.matches('(').count() == 3,
        "{out}"
    );
}

#[test]
fn resuming_an_interrupted_run_ends_with_the_same_metrics() {
    let d = TempDir::new("resume");
    let (a, b) = (d.s("a"), d.s("b"));
    ok(&bin(&[
        "train",
        "--epochs",
        "2",
        "--seed",
        "5",
        "--out-dir",
        &a,
    ]));
    // 44 steps per epoch: stop inside the second epoch, then resume
    let out = ok(&bin(&[
        "train",
        "--epochs",
        "2",
        "--seed",
        "5",
        "--out-dir",
        &b,
        "--max-steps",
        "50",
    ]));
    assert!(out.contains("--max-steps reached"), "{out}");
    assert_eq!(metrics(Path::new(&b)).len(), 1);
    ok(&bin(&["train", "--resume", &b]));
    let (ma, mb) = (metrics(Path::new(&a)), metrics(Path::new(&b)));
    assert_eq!(ma.len(), mb.len());
    for (ra, rb) in ma.iter().zip(&mb) {
        for key in LEARNED {
            assert_eq!(ra[key], rb[key], "{key} differs: {ra} vs {rb}");
        }
    }
}

#[test]
fn a_config_file_sets_flags_and_command_line_flags_win() {
    let d = TempDir::new("config");
    let cfg = d.0.join("c.toml");
    std::fs::write(&cfg, "epochs = 5\nbatch-size = 64\nmax_steps_typo = 3\n").unwrap();
    let o = bin(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out-dir",
        &d.s("r"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("unknown key `max_steps_typo`")
            && err.contains("batch-size"),
        "{err}"
    );
    std::fs::write(&cfg, "epochs = 5\nbatch_size = 64\nlr = 0.02\n").unwrap();
    let out = ok(&bin(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--epochs",
        "1",
        "--out-dir",
        &d.s("r"),
    ]));
    assert!(out.contains("for 1 epochs"), "{out}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("r/state.json")).unwrap()).unwrap();
    assert_eq!(state["config"]["batch-size"], 64);
    assert_eq!(state["config"]["epochs"], 1);
    assert!((state["config"]["lr"].as_f64().unwrap() - 0.02).abs() < 1e-6);
}

#[test]
fn bad_input_is_a_clear_error_and_a_nonzero_exit() {
    let d = TempDir::new("bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["train".into(), "--dataset".into(), "imagenet21k".into()],
            "invalid value 'imagenet21k' for '--dataset <DATASET>'",
        ),
        (
            vec!["train".into(), "--arch".into(), "resnext9".into()],
            "unknown architecture `resnext9`",
        ),
        (
            vec!["train".into(), "--schedule".into(), "linear".into()],
            "invalid value 'linear' for '--schedule <SCHEDULE>'",
        ),
        (
            vec!["train".into(), "--resume".into(), d.s("nothing-here")],
            "cannot resume",
        ),
        (
            vec!["train".into(), "--lr=-0.1".into()],
            "--lr -0.1 is out of range",
        ),
        (
            vec!["train".into(), "--momentum".into(), "1".into()],
            "--momentum 1 is out of range: 0 to 1, 1 excluded",
        ),
        (
            vec!["train".into(), "--weight-decay=-1".into()],
            "--weight-decay -1 is out of range",
        ),
        (
            vec!["train".into(), "--max-steps".into(), "0".into()],
            "--max-steps 0 is out of range: at least 1",
        ),
        (
            vec!["train".into(), "--threads".into(), "100000".into()],
            "--threads 100000 is out of range",
        ),
        (
            vec!["train".into(), "--bucket-mb".into(), "NaN".into()],
            "--bucket-mb NaN is out of range: 0 to 1024",
        ),
        (
            vec!["train".into(), "--image-size".into(), "0".into()],
            "--image-size 0 is out of range",
        ),
        (
            vec![
                "eval".into(),
                "--weights".into(),
                d.s("w.safetensors"),
                "--image-size".into(),
                "100000".into(),
            ],
            "--image-size 100000 is out of range: 8 to 2048",
        ),
        (
            vec![
                "info".into(),
                "--arch".into(),
                "resnext50_32x4d".into(),
                "--classes".into(),
                "1000000000".into(),
            ],
            "class count 1000000000 is out of range",
        ),
        (
            vec![
                "info".into(),
                "--arch".into(),
                "resnext50_32x4d".into(),
                "--size".into(),
                "4294967296".into(),
            ],
            "--size 4294967296 is out of range",
        ),
        (
            vec![
                "eval".into(),
                "--weights".into(),
                d.s("missing.safetensors"),
            ],
            "cannot read",
        ),
        // files named on the command line are read with a size bound: an endless device
        // is refused instead of filling memory
        (
            vec!["train".into(), "--config".into(), "/dev/zero".into()],
            "`/dev/zero` is larger than 1048576 bytes",
        ),
    ];
    for (args, want) in cases {
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), want);
    }
}

#[test]
fn a_checkpoint_of_another_architecture_is_rejected_naming_the_tensor() {
    let d = TempDir::new("otherarch");
    let run = d.s("r");
    ok(&bin(&["train", "--max-steps", "1", "--out-dir", &run]));
    let o = bin(&[
        "eval",
        "--arch",
        "resnext29_2x64d",
        "--weights",
        &format!("{run}/checkpoint/model-1.safetensors"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tensor `conv1.weight` has shape [32, 1, 3, 3] in the file, the model expects [64, 1, 3, 3]"), "{err}");
}

#[test]
fn a_diverging_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let d = TempDir::new("nan");
    let run = d.s("r");
    let o = bin(&[
        "train",
        "--lr",
        "1e12",
        "--warmup-epochs",
        "0",
        "--out-dir",
        &run,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("training stopped at epoch") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn killing_the_process_at_any_moment_leaves_a_readable_checkpoint() {
    let d = TempDir::new("kill");
    let run = d.s("r");
    // big batches: 5 steps per epoch, so checkpoints are written every fraction of a second
    // and the kills land before, during and after writes
    one_quick_epoch(&run);
    for ms in [150u64, 400, 650, 900, 1200, 1500, 1900, 2400] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_resnext-train"))
            .args(["train", "--resume", &run, "--epochs", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let state = Path::new(&run).join("state.json");
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap())
            .expect("state.json is complete");
        let model = Path::new(&run)
            .join("checkpoint")
            .join(s["model_file"].as_str().unwrap());
        let out = ok(&bin(&["eval", "--weights", model.to_str().unwrap()]));
        assert!(out.lines().last().unwrap().starts_with("top1: "));
    }
}

#[test]
fn sigint_and_sigterm_finish_the_step_and_write_a_checkpoint() {
    // SIGTERM is what schedulers and container runtimes send before they kill a job
    for signal in ["-INT", "-TERM"] {
        let d = TempDir::new(&format!("signal{signal}"));
        let run = d.s("r");
        let child = Command::new(env!("CARGO_BIN_EXE_resnext-train"))
            .args(["train", "--epochs", "30", "--out-dir", &run])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let o = child.wait_with_output().unwrap();
        let out = ok(&o);
        assert!(
            out.contains("interrupted: checkpoint written"),
            "{signal}: {out}"
        );
        let state = std::fs::read_to_string(Path::new(&run).join("state.json")).unwrap();
        let s: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert!(s["global_step"].as_u64().unwrap() > 0, "{signal}");
    }
}

#[test]
fn max_steps_holds_on_resume_and_in_a_config_file() {
    let d = TempDir::new("maxsteps");
    let run = d.s("r");
    let cfg = d.0.join("c.toml");
    std::fs::write(&cfg, "max-steps = 3\nepochs = 2\n").unwrap();
    let out = ok(&bin(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out-dir",
        &run,
    ]));
    assert!(out.contains("--max-steps reached"), "{out}");
    let step = |run: &str| -> u64 {
        let s = std::fs::read_to_string(Path::new(run).join("state.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&s).unwrap()["global_step"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(step(&run), 3);
    let out = ok(&bin(&["train", "--resume", &run, "--max-steps", "7"]));
    assert!(out.contains("--max-steps reached"), "{out}");
    assert_eq!(step(&run), 7);
}

/// Rewrites the safetensors file `from` into `to` with `edit` applied to tensor `name`'s
/// f32 values.
fn edit_weights(from: &Path, to: &Path, name: &str, edit: impl Fn(&mut [f32])) {
    rewrite_tensors(from, to, |n, v| {
        if n == name {
            edit(v);
        }
        true
    });
}

/// Rewrites the safetensors file `from` into `to`, keeping the tensors for which `keep`
/// (which may edit an f32 tensor's values) returns true; an f32 tensor whose length
/// changed becomes 1-D, everything else keeps its dtype and shape.
fn rewrite_tensors(from: &Path, to: &Path, keep: impl Fn(&str, &mut Vec<f32>) -> bool) {
    use safetensors::tensor::{SafeTensors, TensorView};
    use safetensors::Dtype;
    let bytes = std::fs::read(from).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let (mut shape, mut data) = (view.shape().to_vec(), view.data().to_vec());
        if view.dtype() == Dtype::F32 {
            let mut v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let len = v.len();
            if !keep(&name, &mut v) {
                continue;
            }
            if v.len() != len {
                shape = vec![v.len()];
            }
            data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
        kept.push((name, view.dtype(), shape, data));
    }
    let views: Vec<(String, TensorView<'_>)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(to, safetensors::tensor::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn a_broken_model_never_scores_and_broken_weights_are_refused() {
    let d = TempDir::new("broken");
    let run = d.s("r");
    ok(&bin(&["train", "--max-steps", "1", "--out-dir", &run]));
    let trained = Path::new(&run).join("checkpoint/model-1.safetensors");
    let eval = |w: &Path| bin(&["eval", "--weights", w.to_str().unwrap()]);
    // a classifier of zeros gives every class the same logit: a tie is not a win
    let zeros = d.0.join("zeros.safetensors");
    edit_weights(&trained, &zeros, "fc.weight", |v| v.fill(0.0));
    edit_weights(&zeros, &zeros, "fc.bias", |v| v.fill(0.0));
    let out = ok(&eval(&zeros));
    assert_eq!(
        out.lines().last().unwrap(),
        "top1: 0.0000 top5: 0.0000",
        "{out}"
    );
    for (name, value, want) in [
        ("fc.bias", f32::NAN, "holds a non-finite value (NaN)"),
        (
            "layer1.0.conv2.weight",
            f32::INFINITY,
            "holds a non-finite value (inf)",
        ),
        ("bn1.running_var", -1.0, "holds a negative variance (-1)"),
    ] {
        let bad = d.0.join("bad.safetensors");
        edit_weights(&trained, &bad, name, |v| v[0] = value);
        let o = eval(&bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: accepted");
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    // finite weights that overflow float32 on an input: predict names where it happens
    let huge = d.0.join("huge.safetensors");
    edit_weights(&trained, &huge, "layer2.0.conv1.weight", |v| v.fill(3e38));
    let x = d.0.join("x.npy");
    let values = resnext_core::testing::values(1, 28 * 28);
    datasets::npy::write(&x, &[1, 1, 28, 28], &values).unwrap();
    let o = bin(&[
        "predict",
        "--arch",
        "resnext11_8x8d",
        "--weights",
        huge.to_str().unwrap(),
        "--npy-input",
        x.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "overflowing weights predicted: {err}");
    assert!(
        err.contains("non-finite logit") && err.contains("come out of `layer2`"),
        "{err}"
    );
    let o = bin(&[
        "predict",
        "--arch",
        "resnext11_8x8d",
        "--weights",
        trained.to_str().unwrap(),
        "--npy-input",
        x.to_str().unwrap(),
    ]);
    ok(&o);
}

fn state_of(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap()
}

/// Every file of the run folder agrees with `state.json`: the checkpoint files it names
/// exist and are the only ones, the model copies equal the files they copy, the metrics
/// are its history, and no temporary file is left.
fn assert_consistent(run: &Path) {
    let s = state_of(run);
    let named: Vec<&str> = [
        "model_file",
        "optimizer_file",
        "epoch_model_file",
        "best_file",
    ]
    .iter()
    .map(|k| s[k].as_str().unwrap())
    .filter(|f| !f.is_empty())
    .collect();
    let mut in_ck: Vec<String> = std::fs::read_dir(run.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_ck.sort();
    let mut want: Vec<String> = named.iter().map(|f| f.to_string()).collect();
    want.sort();
    want.dedup();
    assert_eq!(
        in_ck, want,
        "checkpoint/ holds exactly what state.json names"
    );
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for (key, copy) in [
        ("epoch_model_file", "model.safetensors"),
        ("best_file", "best.safetensors"),
    ] {
        let f = s[key].as_str().unwrap();
        assert_eq!(
            read(run.join(copy)),
            read(run.join("checkpoint").join(f)),
            "{copy}"
        );
    }
    let history = s["history"].as_array().unwrap();
    assert_eq!(
        &metrics(run),
        history,
        "metrics.jsonl is the state's history"
    );
    let best = history
        .iter()
        .map(|r| r["test_top1"].as_f64().unwrap())
        .fold(-1.0, f64::max);
    assert_eq!(s["best_top1"].as_f64().unwrap(), best);
    for dir in [run.to_path_buf(), run.join("checkpoint")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "temporary file {name} left");
        }
    }
}

#[test]
fn a_crash_between_any_two_writes_resumes_to_the_uninterrupted_run() {
    let d = TempDir::new("crash");
    let args = |run: &str| {
        vec![
            "train".to_string(),
            "--epochs".into(),
            "2".into(),
            "--batch-size".into(),
            "256".into(),
            "--out-dir".into(),
            run.into(),
        ]
    };
    let reference = d.s("reference");
    ok(&bin(&args(&reference)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()));
    assert_consistent(Path::new(&reference));
    let want = metrics(Path::new(&reference));
    // 2 epochs write 14 files: checkpoint model (also the best one), optimizer, state, the
    // two copies, metrics and curves at each epoch's end
    for n in 1..=14 {
        let run = d.s(&format!("run{n}"));
        let crashed = Command::new(env!("CARGO_BIN_EXE_resnext-train"))
            .args(args(&run))
            .env("RESNEXT_TEST_CRASH_AFTER_WRITES", n.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!crashed.success(), "write {n}: the run should have crashed");
        let again = if Path::new(&run).join("state.json").exists() {
            vec!["train".to_string(), "--resume".into(), run.clone()]
        } else {
            args(&run)
        };
        ok(&bin(&again.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_consistent(Path::new(&run));
        let got = metrics(Path::new(&run));
        assert_eq!(got.len(), want.len(), "write {n}");
        for (a, b) in got.iter().zip(&want) {
            for key in LEARNED {
                assert_eq!(a[key], b[key], "write {n}: {key}");
            }
        }
    }
}

#[test]
fn a_finished_run_is_neither_overwritten_nor_resumed_with_a_foreign_optimizer() {
    let d = TempDir::new("existing");
    let run = d.s("r");
    one_quick_epoch(&run);
    assert!(Path::new(&run).join("metrics.jsonl").exists());
    let o = bin(&["train", "--max-steps", "2", "--out-dir", &run]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("holds a run already"),
        "{err}"
    );
    ok(&bin(&[
        "train",
        "--max-steps",
        "1",
        "--out-dir",
        &run,
        "--overwrite",
    ]));
    assert_eq!(state_of(Path::new(&run))["global_step"], 1);
    assert_consistent_checkpoint_only(Path::new(&run));
    // an optimizer state with a truncated buffer, then one without a buffer
    let s = state_of(Path::new(&run));
    let opt = Path::new(&run)
        .join("checkpoint")
        .join(s["optimizer_file"].as_str().unwrap());
    let original = std::fs::read(&opt).unwrap();
    for (edit, want) in [
        (truncate_buffer as fn(&Path), "has shape [9] in the file"),
        (drop_buffer, "missing tensor `momentum.fc.bias`"),
    ] {
        std::fs::write(&opt, &original).unwrap();
        edit(&opt);
        let o = bin(&["train", "--resume", &run, "--max-steps", "2"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "accepted: {err}");
        assert!(
            err.contains("optimizer state") && err.contains(want),
            "{err}"
        );
    }
}

/// Checks that none of the files of a completed epoch are in the folder (a run stopped by
/// `--max-steps` in its first epoch writes only the checkpoint and `state.json`).
fn assert_consistent_checkpoint_only(run: &Path) {
    for f in [
        "metrics.jsonl",
        "model.safetensors",
        "best.safetensors",
        "curves.svg",
    ] {
        assert!(!run.join(f).exists(), "{f} of the overwritten run is left");
    }
}

/// Rewrites a momentum file with `momentum.fc.bias` cut to 9 values.
fn truncate_buffer(path: &Path) {
    rewrite_tensors(path, path, |name, v| {
        if name == "momentum.fc.bias" {
            v.truncate(9);
        }
        true
    });
}

/// Rewrites a momentum file without `momentum.fc.bias`.
fn drop_buffer(path: &Path) {
    rewrite_tensors(path, path, |name, _| name != "momentum.fc.bias");
}
