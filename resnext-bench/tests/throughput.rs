//! The `throughput` program's command line: a flag out of range is a one-line error naming
//! the flag and its range, never a panic, and a small run reports its figures.

use std::process::{Command, Output};

fn throughput(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_throughput"))
        .args(args)
        .output()
        .expect("throughput runs")
}

#[test]
fn flags_out_of_range_are_one_line_errors() {
    for (args, expected) in [
        (
            &["--batch", "0"][..],
            "--batch 0 is out of range: 1 to 65536",
        ),
        (&["--iters", "0"], "--iters 0 is out of range: 1 to 100000"),
        (&["--size", "4"], "--size 4 is out of range: 8 to 2048"),
        (
            &["--threads", "5000"],
            "--threads 5000 is out of range: 0 to 1024",
        ),
        (&["--classes", "0"], "class count 0 is out of range"),
        (&["--arch", "resnext7"], "unknown architecture `resnext7`"),
        (&["--precision", "bf16"], "bf16"),
    ] {
        let out = throughput(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // clap's own errors (an unknown mode) exit with 2 and list the valid values
    let out = throughput(&["--mode", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("eval, train"));
}

#[test]
fn a_small_run_reports_its_throughput() {
    for mode in ["eval", "train"] {
        let out = throughput(&[
            "--arch",
            "resnext11_8x8d",
            "--batch",
            "2",
            "--size",
            "32",
            "--iters",
            "1",
            "--classes",
            "10",
            "--mode",
            mode,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = text.lines().last().unwrap_or_default();
        let rate: f64 = last
            .strip_prefix("img/s: ")
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("{mode}: last line `{last}`"));
        assert!(rate.is_finite() && rate > 0.0, "{mode}: {rate}");
        assert!(
            text.contains(&format!("resnext11_8x8d {mode} batch 2 size 32")),
            "{text}"
        );
    }
}

/// Whether the kernel refuses an allocation larger than memory and swap at once
/// (`vm.overcommit_memory` 0, heuristic, or 2, strict). Under 1 it grants any size and the
/// pages fault in later, so the run below would fill memory instead of failing.
fn refuses_oversized_allocations() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
        .is_ok_and(|mode| matches!(mode.trim(), "0" | "2"))
}

#[test]
fn running_out_of_memory_is_a_one_line_error_naming_the_flags() {
    if !refuses_oversized_allocations() {
        eprintln!("skipped: this kernel grants any allocation (vm.overcommit_memory 1)");
        return;
    }
    // 65536 inputs of 3×2048×2048 floats: 3 TiB for the input batch alone
    let out = throughput(&["--batch", "65536", "--size", "2048", "--iters", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: out of memory: could not allocate 3.0 TiB while timing"),
        "{err}"
    );
    assert!(err.contains("--batch 65536 and --size 2048"), "{err}");
}
