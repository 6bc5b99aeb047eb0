//! Data-parallel training over MPI, 2 ranks (`mpirun`; the `mpi` feature): equivalence
//! with one process on the doubled batch, the digits job, a kill of one rank and a resume,
//! and the errors of a distributed run. `.ci/run` installs Open MPI and runs these with
//! `cargo test -p resnext-train --features mpi --test mpi`.
#![cfg(feature = "mpi")]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mpirun_cmd(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_resnext-train"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

/// Runs `resnext-train args` on `np` ranks; fails the test if it takes over 5 minutes
/// (a hang).
fn mpirun(np: usize, args: &[&str]) -> Output {
    let mut child = mpirun_cmd(np, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun runs (install openmpi-bin)");
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("mpirun {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn assert_close(a: &Path, b: &Path, tol: f32) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    // relative to each tensor's largest value: near-zero entries of a tensor carry the
    // rounding of its large ones
    for (name, x) in &a {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        for (i, (p, q)) in x.iter().zip(&b[name]).enumerate() {
            assert!(
                (p - q).abs() <= tol * scale,
                "`{name}`[{i}]: {p} vs {q} (largest {scale})"
            );
        }
    }
}

#[test]
fn two_ranks_with_sync_bn_equal_one_process_with_twice_the_batch() {
    let d = TempDir::new("mpi-equal");
    let common = ["train", "--threads", "1", "--max-steps", "3"];
    let two = d.s("two");
    ok(&mpirun(
        2,
        &[
            &common[..],
            // buckets of 100 KiB: many all-reduces in flight during the backward pass,
            // beside the synchronised batch norms' blocking ones
            &[
                "--batch-size",
                "16",
                "--sync-bn",
                "--bucket-mb",
                "0.1",
                "--out-dir",
                &two,
            ],
        ]
        .concat(),
    ));
    let one = d.s("one");
    ok(&bin(&[
        &common[..],
        &["--batch-size", "32", "--out-dir", &one],
    ]
    .concat()));
    // weights, running statistics and momentum after 3 steps, to 1e-5 relative
    for f in ["model-3.safetensors", "optimizer-3.safetensors"] {
        assert_close(
            &d.0.join("two/checkpoint").join(f),
            &d.0.join("one/checkpoint").join(f),
            1e-5,
        );
    }
    // per-rank batch norm is another model: the running statistics differ
    let per_rank = d.s("per-rank");
    ok(&mpirun(
        2,
        &[&common[..], &["--batch-size", "16", "--out-dir", &per_rank]].concat(),
    ));
    let (a, b) = (
        tensors(&d.0.join("per-rank/checkpoint/model-3.safetensors")),
        tensors(&d.0.join("one/checkpoint/model-3.safetensors")),
    );
    assert_ne!(a["bn1.running_mean"], b["bn1.running_mean"]);
}

#[test]
fn the_digits_job_on_two_ranks_trains_and_resumes_exactly_after_a_kill() {
    let d = TempDir::new("mpi-digits");
    let run = |dir: &str| {
        vec![
            "train",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--out-dir",
        ]
        .into_iter()
        .chain([dir])
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let whole = d.s("whole");
    let args = run(&whole);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&mpirun(2, &args));
    let last = out.lines().last().unwrap();
    let top1: f64 = last
        .strip_prefix("final test_top1: ")
        .expect(&out)
        .parse()
        .unwrap();
    assert!(top1 > 0.9, "{out}");
    // one header line and one line per epoch: only rank 0 prints
    assert_eq!(out.matches("epoch 3/3").count(), 1, "{out}");
    assert!(
        out.contains("2 processes × batch 16 = global batch 32"),
        "{out}"
    );

    // kill -9 rank 1 once the first epoch's checkpoint is committed: the job ends
    let killed = d.s("killed");
    let args = run(&killed);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = mpirun_cmd(2, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = d.0.join("killed/state.json");
    let t = Instant::now();
    while !state.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    // the ranks are the processes running the binary with this run folder; kill the newest
    let pids = String::from_utf8(
        Command::new("pgrep")
            .args(["-f", &format!("resnext-train train .*--out-dir {killed}$")])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let victim = pids.lines().last().expect("a rank is running");
    Command::new("kill").args(["-9", victim]).status().unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the job did not end after a rank was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!child.wait().unwrap().success());
    let out = ok(&mpirun(2, &["train", "--resume", &killed]));
    assert_eq!(out.lines().last(), Some(last), "{out}");
    let metrics =
        |dir: &str| std::fs::read_to_string(Path::new(dir).join("metrics.jsonl")).unwrap();
    let strip = |m: String| -> Vec<(String, String)> {
        m.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["train_loss"].to_string(), v["test_top1"].to_string())
            })
            .collect()
    };
    assert_eq!(strip(metrics(&whole)), strip(metrics(&killed)));
    assert_eq!(
        std::fs::read(d.0.join("whole/model.safetensors")).unwrap(),
        std::fs::read(d.0.join("killed/model.safetensors")).unwrap()
    );
}

#[test]
fn a_distributed_run_refuses_another_world_size_and_ends_every_rank_on_an_error() {
    let d = TempDir::new("mpi-errors");
    let run = d.s("run");
    ok(&mpirun(
        2,
        &[
            "train",
            "--threads",
            "1",
            "--max-steps",
            "2",
            "--out-dir",
            &run,
        ],
    ));
    let t = Instant::now();
    let o = mpirun(3, &["train", "--resume", &run]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("trained by 2 process(es) and this run has 3"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60));
    // a batch larger than the data: every rank stops with the message, none hangs
    let o = mpirun(
        2,
        &["train", "--batch-size", "1000", "--out-dir", &d.s("big")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("fewer than one batch of 2000"), "{err}");
}
