//! `resnext-train train`: the training loop, metrics, curves, checkpoints and resume.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use datasets::loader::{Loader, LoaderConfig};
use dfdx::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use resnext_core::model::{Arch, Network};
use resnext_core::optim::{Schedule, Sgd, SgdConfig};
use resnext_core::weights::write_atomic;
use serde::{Deserialize, Serialize};

use crate::{curves, data, eval};

/// Arguments of `train` (also the keys of a `--config` TOML file and of a run's saved config).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainArgs {
    /// Architecture (see `info --arch help` for the list).
    #[arg(long, default_value = "resnext11_8x8d")]
    pub arch: String,
    /// Dataset: digits (embedded), cifar10, cifar100, mnist, fashion-mnist, folder.
    #[arg(long, default_value = "digits")]
    pub dataset: String,
    /// Folder holding the dataset's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Download the dataset into --data-dir when it is missing.
    #[arg(long)]
    pub download: bool,
    /// Training crop size for image folders [default: the architecture's, 224 or 32].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Epochs to train.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Images per training batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// L2 weight decay (not applied to batch-norm parameters and biases unless --decay-bn-and-bias).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,
    /// Also apply weight decay to batch-norm parameters and biases.
    #[arg(long)]
    pub decay_bn_and_bias: bool,
    /// Learning-rate schedule: cosine or step (x0.1 at 50% and 75% of the epochs).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Epochs of linear warm-up.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f32,
    /// Label smoothing ε.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Run folder [default: runs/<arch>-<dataset>-<unix time>].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Continue the run saved in this folder.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many steps in total, for smoke runs.
    #[arg(long)]
    #[serde(skip)]
    pub max_steps: Option<usize>,
    /// TOML file whose keys are these flags' names; flags given on the command line win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Overlays `layer` (a JSON object of flag names) onto `args`, except flags given on the
/// command line.
fn overlay(
    args: &TrainArgs,
    layer: &serde_json::Map<String, serde_json::Value>,
    matches: &ArgMatches,
    what: &str,
) -> Result<TrainArgs> {
    let mut base = serde_json::to_value(args)?;
    let obj = base
        .as_object_mut()
        .expect("struct serialises to an object");
    let valid: Vec<String> = obj.keys().cloned().collect();
    for (k, v) in layer {
        let key = k.replace('_', "-");
        if !valid.contains(&key) {
            bail!(
                "{what}: unknown key `{k}`; valid keys: {}",
                valid.join(", ")
            );
        }
        let id = key.replace('-', "_");
        if matches.value_source(&id) == Some(ValueSource::CommandLine) {
            continue;
        }
        obj.insert(key, v.clone());
    }
    serde_json::from_value(base).map_err(|e| anyhow!("{what}: {e}"))
}

/// Applies `--config` and, with `--resume`, the saved run's configuration.
pub fn resolve(mut args: TrainArgs, matches: &ArgMatches) -> Result<TrainArgs> {
    let (resume, config) = (args.resume.clone(), args.config.clone());
    if let Some(dir) = &resume {
        let state = State::read(dir)?;
        args = overlay(
            &args,
            state
                .config
                .as_object()
                .ok_or_else(|| anyhow!("`{}`: config is not an object", dir.display()))?,
            matches,
            &format!("`{}`", dir.join("state.json").display()),
        )?;
        args.out_dir = Some(dir.clone());
    }
    if let Some(path) = &config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("`{}` is not valid TOML", path.display()))?;
        let json = serde_json::to_value(table)?;
        args = overlay(
            &args,
            json.as_object().expect("a table"),
            matches,
            &format!("`{}`", path.display()),
        )?;
    }
    args.resume = resume;
    args.config = config;
    Ok(args)
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training top-1 accuracy (fraction, training-mode forward on augmented images).
    pub train_top1: f64,
    /// Mean test loss.
    pub test_loss: f64,
    /// Test top-1 accuracy (fraction).
    pub test_top1: f64,
    /// Test top-5 accuracy (fraction).
    pub test_top5: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Training throughput.
    pub images_per_s: f64,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
}

/// Running sums of the current epoch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Partial {
    loss_sum: f64,
    correct: usize,
    seen: usize,
    seconds: f64,
}

/// `state.json`: everything needed to continue a run exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    /// Completed epochs.
    epoch: usize,
    /// Steps done inside the current epoch.
    step_in_epoch: usize,
    /// Steps done in total.
    global_step: usize,
    best_top1: f64,
    partial: Partial,
    history: Vec<EpochRecord>,
    /// Checkpoint files (inside `checkpoint/`) this state belongs to.
    model_file: String,
    optimizer_file: String,
    config: serde_json::Value,
}

impl State {
    fn read(dir: &Path) -> Result<State> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot resume: cannot read `{}`", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "cannot resume: `{}` is not a valid run state",
                path.display()
            )
        })
    }
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&i, &j| row[i].total_cmp(&row[j]).then(j.cmp(&i)))
        .unwrap_or(0)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write `{}`", path.display()))
}

/// Writes model, optimizer and state; `state.json` is written last and names the files,
/// so a kill at any moment leaves the previous complete checkpoint readable.
fn checkpoint(dir: &Path, net: &dyn Network, opt: &Sgd, state: &mut State) -> Result<()> {
    let ck = dir.join("checkpoint");
    std::fs::create_dir_all(&ck).with_context(|| format!("cannot create `{}`", ck.display()))?;
    let old = (state.model_file.clone(), state.optimizer_file.clone());
    state.model_file = format!("model-{}.safetensors", state.global_step);
    state.optimizer_file = format!("optimizer-{}.safetensors", state.global_step);
    net.save_safetensors(&ck.join(&state.model_file))?;
    opt.save_state(&ck.join(&state.optimizer_file))?;
    write_text(
        &dir.join("state.json"),
        &serde_json::to_string_pretty(state)?,
    )?;
    for f in [old.0, old.1] {
        if !f.is_empty() && f != state.model_file && f != state.optimizer_file {
            let _ = std::fs::remove_file(ck.join(f));
        }
    }
    Ok(())
}

/// Trains; prints `final test_top1: X` last.
pub fn run(args: TrainArgs, interrupted: Arc<AtomicBool>) -> Result<()> {
    let arch: Arch = args.arch.parse()?;
    if args.batch_size == 0 || args.epochs == 0 {
        bail!("--batch-size and --epochs must be positive");
    }
    let schedule = match args.schedule.as_str() {
        "cosine" => Schedule::Cosine,
        "step" => Schedule::Step { gamma: 0.1 },
        s => bail!("unknown schedule `{s}`; valid: cosine, step"),
    };
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .context("cannot set up the thread pool")?;
    }
    let data = data::prepare(
        &args.dataset,
        args.data_dir.as_deref(),
        args.download,
        args.image_size.unwrap_or(arch.default_size()),
    )?;
    let classes = data.info.classes.len();
    let dir = match &args.out_dir {
        Some(d) => d.clone(),
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!("{}-{}-{t}", arch, args.dataset))
        }
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the run folder `{}`", dir.display()))?;

    let dev = Cpu::seed_from_u64(args.seed);
    let mut net = arch.build(&dev, data.info.channels, classes)?;
    let mut opt = Sgd::new(SgdConfig {
        lr: args.lr,
        momentum: args.momentum,
        nesterov: args.nesterov,
        weight_decay: args.weight_decay,
        decay_vectors: args.decay_bn_and_bias,
    });
    let mut state = State {
        epoch: 0,
        step_in_epoch: 0,
        global_step: 0,
        best_top1: -1.0,
        partial: Partial::default(),
        history: Vec::new(),
        model_file: String::new(),
        optimizer_file: String::new(),
        config: serde_json::to_value(&args)?,
    };
    if args.resume.is_some() {
        let saved = State::read(&dir)?;
        let ck = dir.join("checkpoint");
        net.load_safetensors(&ck.join(&saved.model_file)).context(
            "cannot resume: the checkpoint does not fit this architecture and class count",
        )?;
        opt.load_state(&ck.join(&saved.optimizer_file))?;
        state = State {
            config: state.config,
            ..saved
        };
        eprintln!(
            "resuming {} at epoch {} step {}",
            dir.display(),
            state.epoch + 1,
            state.step_in_epoch
        );
    }

    let loader_threads = 1;
    let train = Loader::new(
        data.train.clone(),
        data.train_pipeline,
        LoaderConfig {
            batch_size: args.batch_size,
            shuffle: true,
            drop_last: true,
            seed: args.seed,
            threads: loader_threads,
            prefetch: 4,
        },
    );
    let test = Loader::new(
        data.test.clone(),
        data.test_pipeline,
        LoaderConfig {
            batch_size: 256,
            shuffle: false,
            drop_last: false,
            seed: args.seed,
            threads: loader_threads,
            prefetch: 2,
        },
    );
    let steps = train.batches_per_epoch();
    if steps == 0 {
        bail!(
            "the training set has {} images, fewer than one batch of {}",
            data.train.len(),
            args.batch_size
        );
    }
    let tty = std::io::stderr().is_terminal();
    println!("training {arch} on {} ({} train / {} test images, {classes} classes) for {} epochs; run folder {}", args.dataset, data.train.len(), data.test.len(), args.epochs, dir.display());

    while state.epoch < args.epochs {
        let epoch = state.epoch;
        let bar = if tty {
            ProgressBar::new(steps as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, args.epochs));
        bar.set_position(state.step_in_epoch as u64);
        let mut lr = args.lr;
        for batch in train.epoch(epoch as u64, state.step_in_epoch) {
            let batch = batch?;
            let t0 = Instant::now();
            let progress = epoch as f32 + state.step_in_epoch as f32 / steps as f32;
            lr = schedule.lr(args.lr, progress, args.epochs, args.warmup_epochs);
            opt.cfg.lr = lr;
            let n = batch.labels.len();
            let out = net.train_step(batch.data, batch.shape, &batch.labels, args.label_smoothing, &mut opt).map_err(|e| {
                anyhow!(
                    "training stopped at epoch {} step {} (global step {}): {e}; the last good checkpoint in `{}` is kept",
                    epoch + 1,
                    state.step_in_epoch + 1,
                    state.global_step + 1,
                    dir.display()
                )
            })?;
            let p = &mut state.partial;
            p.seconds += t0.elapsed().as_secs_f64();
            p.loss_sum += out.loss as f64 * n as f64;
            p.correct += out
                .logits
                .chunks(classes)
                .zip(&batch.labels)
                .filter(|(row, &l)| argmax(row) == l)
                .count();
            p.seen += n;
            state.step_in_epoch += 1;
            state.global_step += 1;
            bar.set_position(state.step_in_epoch as u64);
            bar.set_message(format!(
                "loss {:.4} | {:.0} img/s",
                p.loss_sum / p.seen as f64,
                p.seen as f64 / p.seconds.max(1e-9)
            ));
            if !tty
                && state.step_in_epoch.is_multiple_of((steps / 4).max(1))
                && state.step_in_epoch < steps
            {
                println!(
                    "  epoch {} step {}/{steps} loss {:.4}",
                    epoch + 1,
                    state.step_in_epoch,
                    p.loss_sum / p.seen as f64
                );
            }
            let stop_steps = args.max_steps.is_some_and(|m| state.global_step >= m);
            if interrupted.load(Ordering::SeqCst) || stop_steps {
                bar.abandon();
                checkpoint(&dir, net.as_ref(), &opt, &mut state)?;
                let why = if stop_steps {
                    "--max-steps reached"
                } else {
                    "interrupted"
                };
                println!(
                    "{why}: checkpoint written at epoch {} step {}; continue with --resume {}",
                    epoch + 1,
                    state.step_in_epoch,
                    dir.display()
                );
                return Ok(());
            }
        }
        bar.finish_and_clear();
        let ev = eval::evaluate(net.as_ref(), &test)?;
        let p = std::mem::take(&mut state.partial);
        let rec = EpochRecord {
            epoch: epoch + 1,
            train_loss: p.loss_sum / p.seen.max(1) as f64,
            train_top1: p.correct as f64 / p.seen.max(1) as f64,
            test_loss: ev.loss,
            test_top1: ev.top1,
            test_top5: ev.top5,
            lr: lr as f64,
            images_per_s: p.seen as f64 / p.seconds.max(1e-9),
            seconds: p.seconds,
        };
        println!(
            "epoch {}/{}: train_loss {:.4} train_top1 {:.4} test_loss {:.4} test_top1 {:.4} lr {:.4} {:.0} img/s {:.1}s",
            rec.epoch, args.epochs, rec.train_loss, rec.train_top1, rec.test_loss, rec.test_top1, rec.lr, rec.images_per_s, rec.seconds
        );
        state.history.push(rec.clone());
        state.epoch += 1;
        state.step_in_epoch = 0;
        checkpoint(&dir, net.as_ref(), &opt, &mut state)?;
        net.save_safetensors(&dir.join("model.safetensors"))?;
        if rec.test_top1 > state.best_top1 {
            state.best_top1 = rec.test_top1;
            net.save_safetensors(&dir.join("best.safetensors"))?;
            write_text(
                &dir.join("state.json"),
                &serde_json::to_string_pretty(&state)?,
            )?;
        }
        let lines: String = state
            .history
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        write_text(&dir.join("metrics.jsonl"), &lines)?;
        let pts: Vec<curves::Point> = state
            .history
            .iter()
            .map(|r| curves::Point {
                epoch: r.epoch as f64,
                train_loss: r.train_loss,
                test_loss: r.test_loss,
                train_top1: r.train_top1,
                test_top1: r.test_top1,
            })
            .collect();
        write_text(&dir.join("curves.svg"), &curves::render(&pts))?;
        if interrupted.load(Ordering::SeqCst) {
            println!(
                "interrupted: checkpoint written after epoch {}; continue with --resume {}",
                epoch + 1,
                dir.display()
            );
            return Ok(());
        }
    }
    let last = state.history.last().map(|r| r.test_top1).unwrap_or(0.0);
    println!("final test_top1: {last:.4}");
    Ok(())
}
