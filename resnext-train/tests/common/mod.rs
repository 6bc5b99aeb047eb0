//! Helpers shared by the binary's integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `resnext-train` with `args`.
pub fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resnext-train"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "failed:\n{out}\n{err}");
    out.into_owned()
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `resnext-<tag>-<pid>`, emptied first.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("resnext-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    /// The path of `name` inside, as a string.
    pub fn s(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `resnext-train` with `args` and asserts that it fails with an error message
/// containing `want` and no panic; returns stderr.
pub fn fails(args: &[&str], want: &str) -> String {
    let o = bin(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(
        err.contains(want) && !err.contains("panicked"),
        "{args:?}: {err}"
    );
    err
}

/// Trains one epoch in 5 big batches into `run`.
pub fn one_quick_epoch(run: &str) -> String {
    ok(&bin(&[
        "train",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--out-dir",
        run,
    ]))
}

/// The lines of a run folder's `metrics.jsonl`.
pub fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// X of the last line `final test_top1: X` of a training run's output.
pub fn final_top1(out: &str) -> f64 {
    out.lines()
        .last()
        .and_then(|l| l.strip_prefix("final test_top1: "))
        .unwrap_or_else(|| panic!("no final line:\n{out}"))
        .parse()
        .unwrap()
}

/// The f32 tensors of a safetensors file, by name.
pub fn tensors(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, vals)
        })
        .collect()
}
