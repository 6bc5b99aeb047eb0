//! Wiring mistakes fail at compile time: a block fed the wrong channel count, a network fed
//! the wrong input channels (type errors, checked with trybuild), and a group count that
//! does not divide the width (a const assertion, which rustc reports when it instantiates
//! the block: trybuild only runs `cargo check`, so that case runs a real `cargo build`).

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn channel_mismatches_do_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
}

fn build(project: &Path, target: &Path, main: &str) -> (bool, String) {
    std::fs::write(project.join("src/main.rs"), main).unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(project.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target)
        .output()
        .expect("cargo runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BLOCK: &str = r#"
use dfdx::prelude::*;
fn main() {
    let dev = Cpu::default();
    let block = dev.build_module::<resnext_core::builders::Bottleneck<64, WIDTH, 256, 1, 32>, f32>();
    let x: resnext_core::ops::Act<64> = dev.zeros_like(&(1, Const::<64>, 4, 4));
    println!("{:?}", block.forward(x).shape());
}
"#;

#[test]
fn groups_that_do_not_divide_the_width_do_not_compile() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let workspace = root.parent().unwrap();
    let project = workspace.join("target/compile-fail-build/project");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(
        project.join("Cargo.toml"),
        format!(
            "[package]\nname = \"groups-check\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n[workspace]\n\n\
             [dependencies]\nresnext-core = {{ path = {:?} }}\ndfdx = {{ version = \"0.13\", default-features = false, features = [\"std\", \"fast-alloc\", \"cpu\"] }}\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    // same dependency versions as the workspace, no resolution needed
    std::fs::copy(workspace.join("Cargo.lock"), project.join("Cargo.lock")).unwrap();
    let target = workspace.join("target/compile-fail-build/target");

    // control: 32 groups over 128 channels builds, so a failure below is the check's doing
    let (ok, err) = build(&project, &target, &BLOCK.replace("WIDTH", "128"));
    assert!(ok, "the control case must build:\n{err}");

    let (ok, err) = build(&project, &target, &BLOCK.replace("WIDTH", "100"));
    assert!(!ok, "32 groups over 100 channels must not compile");
    assert!(
        err.contains("GROUPS must divide WIDTH"),
        "unexpected compiler output:\n{err}"
    );
}
