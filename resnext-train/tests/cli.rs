//! The `resnext-train` binary, run as a user runs it.

mod common;
use common::*;

use std::process::Output;

use dfdx::prelude::*;
use resnext_core::model::Arch;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn info_ends_with_the_parameter_count() {
    let o = bin(&["info", "--arch", "resnext50_32x4d"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert_eq!(out.lines().last(), Some("params: 25028904"));
    assert!(out.contains("layer4") && out.contains("2048x7x7"), "{out}");
    let (out, _) = text(&bin(&["info", "--arch", "resnext101_32x8d"]));
    assert_eq!(out.lines().last(), Some("params: 88791336"));
    let (out, _) = text(&bin(&["info", "--arch", "resnext101_64x4d"]));
    assert_eq!(out.lines().last(), Some("params: 83455272"));
    let (out, _) = text(&bin(&[
        "info",
        "--arch",
        "resnext29_8x64d",
        "--classes",
        "100",
        "--size",
        "64",
    ]));
    assert!(
        out.starts_with("resnext29_8x64d: input 3x64x64, 100 classes"),
        "{out}"
    );
    assert!(out.contains("1024x16x16"), "{out}");
}

#[test]
fn resnext_isa_picks_a_level_and_refuses_unknown_or_missing_ones() {
    let run = |v: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_resnext-train"))
            .args(["info", "--arch", "resnext29_8x64d"])
            .env("RESNEXT_ISA", v)
            .output()
            .expect("binary runs")
    };
    // the plain level runs on every CPU
    let o = run("scalar");
    assert!(o.status.success(), "{}", text(&o).1);
    let (_, err) = text(&run("sse9"));
    assert!(
        err.contains("RESNEXT_ISA=sse9") && err.contains("avx2") && !err.contains("panicked"),
        "{err}"
    );
    // a level of the other architecture
    let other = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx2"
    };
    let o = run(other);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("not available"),
        "{err}"
    );
}

#[test]
fn unknown_arch_lists_the_valid_names() {
    let o = bin(&["info", "--arch", "resnext51"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("unknown architecture `resnext51`")
            && err.contains("resnext50_32x4d")
            && err.contains("resnext29_16x64d"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn predict_matches_the_library_and_writes_logits() {
    let dir = TempDir::new("predict");
    let dev = Cpu::seed_from_u64(4);
    let net = Arch::ResNeXt29_2x64d.build(&dev, 3, 37).unwrap();
    net.save_safetensors(dir.0.join("w.safetensors").as_path())
        .unwrap();
    let x: Vec<f32> = (0..2 * 3 * 16 * 16)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    datasets::npy::write(dir.0.join("x.npy"), &[2, 3, 16, 16], &x).unwrap();
    let want = net.forward_eval(x, [2, 3, 16, 16]).unwrap();

    let o = bin(&[
        "predict",
        "--arch",
        "resnext29_2x64d",
        "--weights",
        &dir.s("w.safetensors"),
        "--npy-input",
        &dir.s("x.npy"),
        "--logits-out",
        &dir.s("y.npy"),
        "--topk",
        "3",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let y = datasets::npy::read(dir.0.join("y.npy")).unwrap();
    assert_eq!(y.shape, vec![2, 37]);
    assert_eq!(y.data, want);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let best = (0..37)
        .max_by(|&i, &j| want[i].total_cmp(&want[j]))
        .unwrap();
    assert!(
        lines[0].starts_with(&format!("0: {best} {best} (")),
        "{out}"
    );
    assert_eq!(lines[0].matches('(').count(), 3);
}

#[test]
fn predict_rejects_bad_input_with_clear_errors() {
    let dir = TempDir::new("bad");
    let dev = Cpu::default();
    Arch::ResNeXt29_2x64d
        .build(&dev, 3, 10)
        .unwrap()
        .save_safetensors(dir.0.join("w.safetensors").as_path())
        .unwrap();
    datasets::npy::write(dir.0.join("x1.npy"), &[1, 1, 8, 8], &[0.0; 64]).unwrap();
    datasets::npy::write(dir.0.join("x3.npy"), &[1, 3, 8, 8], &[0.0; 192]).unwrap();
    std::fs::write(dir.0.join("junk.npy"), b"hello").unwrap();
    let mut nan = vec![0.0f32; 2 * 192];
    nan[200] = f32::NAN;
    datasets::npy::write(dir.0.join("nan.npy"), &[2, 3, 8, 8], &nan).unwrap();
    datasets::npy::write(dir.0.join("empty.npy"), &[0, 3, 8, 8], &[]).unwrap();
    // no data, but dims whose product overflows: must not size anything from them
    datasets::npy::write(dir.0.join("huge.npy"), &[0, 3, 1 << 40, 1 << 40], &[]).unwrap();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--arch".into(),
                "resnext29_4x64d".into(),
                "--npy-input".into(),
                dir.s("x3.npy"),
            ],
            "layer1.0.conv1.weight",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("x1.npy"),
            ],
            "1 channels",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("junk.npy"),
            ],
            "junk.npy",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("missing.npy"),
            ],
            "cannot read",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("nan.npy"),
            ],
            "input 1 holds a non-finite value (NaN) at index 200",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("empty.npy"),
            ],
            "the input batch is empty",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("huge.npy"),
            ],
            "is too large",
        ),
        (
            vec![
                "--arch".into(),
                "resnext29_2x64d".into(),
                "--npy-input".into(),
                dir.s("x3.npy"),
                "--classes".into(),
                "/dev/zero".into(),
            ],
            "`/dev/zero` is larger than 16777216 bytes",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "predict".to_string(),
            "--weights".into(),
            dir.s("w.safetensors"),
        ];
        args.extend(extra);
        let o = bin(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = bin(&[
        "predict",
        "--arch",
        "resnext29_2x64d",
        "--weights",
        &dir.s("x3.npy"),
        "--npy-input",
        &dir.s("x3.npy"),
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

/// `--device cuda` where it cannot run: one line saying why, a non-zero exit, nothing
/// written. Without the `cuda` feature the line says how to build it; with it, on a
/// machine without the NVIDIA driver (CI's), that no driver was found.
#[test]
fn device_cuda_without_a_gpu_is_a_one_line_error() {
    let dir = TempDir::new("device-cuda");
    let out = dir.0.join("run");
    let cuda_build = cfg!(feature = "cuda");
    if cuda_build && std::path::Path::new("/proc/driver/nvidia/version").exists() {
        eprintln!("skipped: this machine has the NVIDIA driver");
        return;
    }
    let want = if cuda_build {
        "error: no CUDA driver found"
    } else {
        "error: this build has no CUDA support"
    };
    for args in [
        vec![
            "train",
            "--device",
            "cuda",
            "--out-dir",
            out.to_str().unwrap(),
        ],
        vec![
            "eval",
            "--device",
            "cuda:0",
            "--weights",
            "none.safetensors",
        ],
        vec![
            "predict",
            "--device",
            "cuda",
            "--arch",
            "resnext11_8x8d",
            "--weights",
            "x",
            "y.png",
        ],
    ] {
        let o = bin(&args);
        let (stdout, err) = text(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with(want), "{args:?}: {err}");
    }
    assert!(!out.exists(), "nothing is written");
    let o = bin(&["train", "--device", "cuda:x"]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("cuda:N"), "{err}");
}

/// `--precision`: bf16 on the CPU is a one-line error saying it needs a GPU; an unknown
/// precision names the valid ones; nothing is written either way.
#[test]
fn mixed_precision_on_the_cpu_is_a_one_line_error() {
    let dir = TempDir::new("precision");
    let out = dir.0.join("run");
    let out = out.to_str().unwrap();
    for args in [
        vec!["train", "--precision", "bf16", "--out-dir", out],
        vec![
            "eval",
            "--precision",
            "bf16",
            "--weights",
            "none.safetensors",
        ],
    ] {
        let o = bin(&args);
        let (stdout, err) = text(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("--precision bf16") && err.contains("--device cuda"),
            "{args:?}: {err}"
        );
    }
    let o = bin(&["train", "--precision", "fp16", "--out-dir", out]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("`fp16`") && err.contains("bf16"),
        "{err}"
    );
    assert!(!std::path::Path::new(out).exists(), "nothing is written");
}
