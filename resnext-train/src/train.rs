//! `resnext-train train`: the training loop, metrics, curves, checkpoints and resume.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use datasets::loader::{Loader, LoaderConfig};
use dfdx::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use resnext_core::backend::device::{DeviceSpec, Precision};
use resnext_core::ema::Ema;
use resnext_core::model::{Arch, Frozen, Network};
use resnext_core::ops::Targets;
use resnext_core::optim::{Algorithm, OptimConfig, Optimizer, ParamGroup, Schedule};
use resnext_core::weights::LoadMode;
use serde::{Deserialize, Serialize};

use crate::data::{self, Dataset};
use crate::device::Compute;
use crate::{curves, eval};

/// Arguments of `train` (also the keys of a `--config` TOML file and of a run's saved config).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainArgs {
    /// Architecture (see `info --arch help` for the list).
    #[arg(long, default_value = "resnext11_8x8d")]
    pub arch: String,
    /// Dataset (digits is embedded; folder reads train/<class>/* and val/<class>/*).
    #[arg(long, value_enum, default_value_t = Dataset::Digits)]
    pub dataset: Dataset,
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
    /// Update rule: `sgd` (momentum, Nesterov, L2 decay) or `adamw` (β = 0.9, 0.999,
    /// decoupled decay; give it a smaller --lr, e.g. 0.001).
    #[arg(long, value_enum, default_value_t = OptimizerName::Sgd)]
    #[serde(default)]
    pub optimizer: OptimizerName,
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
    /// Scale the gradients down together when their global L2 norm exceeds this.
    #[arg(long, value_name = "MAX")]
    #[serde(default)]
    pub clip_grad_norm: Option<f32>,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleName::Cosine)]
    pub schedule: ScheduleName,
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
    /// Start from these weights (a torchvision file or one of our runs' `.safetensors`):
    /// everything but a classifier of another class count is loaded, the classifier is
    /// re-initialised; what was loaded and what not is printed.
    #[arg(long, value_name = "FILE")]
    pub init_weights: Option<PathBuf>,
    /// With --init-weights: re-initialise the classifier even when the file's has the same
    /// class count (new classes that happen to be as many as the old ones).
    #[arg(long, requires = "init_weights")]
    #[serde(default)]
    pub reset_head: bool,
    /// Parts held fixed: comma-separated from stem, layer1 … layer4, head, backbone
    /// (their batch norms stay in eval mode and their parameters unchanged).
    #[arg(long, value_name = "PARTS", value_delimiter = ',')]
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Freeze everything but the classifier (linear probing; the same as --freeze backbone).
    #[arg(long)]
    #[serde(default)]
    pub freeze_backbone: bool,
    /// Learning-rate multiplier of the stem and the stages (the classifier keeps --lr).
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "one")]
    pub backbone_lr_scale: f32,
    /// Start each block's last batch norm at γ = 0, so every block starts as its shortcut.
    #[arg(long)]
    #[serde(default)]
    pub zero_init_residual: bool,
    /// Train and test on these classes only, relabelled in the order given
    /// (comma-separated indices or ranges: `5-9`, `0,2,4`).
    #[arg(long, value_name = "LIST")]
    #[serde(default)]
    pub class_subset: Option<String>,
    /// At most this many training images per class (the first ones): few-shot fine-tuning.
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub train_per_class: Option<usize>,
    /// Mixup's α: each batch blended with itself rolled by one, λ ~ Beta(α, α) (0: off).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub mixup_alpha: f32,
    /// Cutmix's α: a box of the rolled batch pasted in (0: off; with mixup on too, each
    /// batch gets one of the two).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub cutmix_alpha: f32,
    /// Per-image automatic augmentation of the training images.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub auto_augment: Option<AutoAugment>,
    /// Probability of random erasing per training image (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub random_erase: f64,
    /// Keep an exponential moving average of the weights: torchvision's
    /// --model-ema-decay (e.g. 0.99998), adjusted as torchvision does to the batch size,
    /// --ema-steps and --epochs. Evaluated each epoch and saved as `ema.safetensors`.
    #[arg(long, value_name = "DECAY")]
    #[serde(default)]
    pub ema_decay: Option<f32>,
    /// Update the moving average every this many steps.
    #[arg(long, default_value_t = 32)]
    #[serde(default = "ema_steps")]
    pub ema_steps: usize,
    /// Image folders: resize the evaluation images' shorter side to this [default: the
    /// crop · 256 / 224].
    #[arg(long)]
    #[serde(default)]
    pub val_resize: Option<usize>,
    /// Image folders: central crop of the evaluation images [default: --image-size].
    #[arg(long)]
    #[serde(default)]
    pub val_crop: Option<usize>,
    /// Data-parallel runs (`mpirun -np N`, the `mpi` feature): batch norm statistics over
    /// the whole group's batch instead of each process's (torch's SyncBatchNorm).
    #[arg(long)]
    #[serde(default)]
    pub sync_bn: bool,
    /// Data-parallel runs: multiply --lr by the number of processes (the linear scaling
    /// rule; the global batch is processes × --batch-size).
    #[arg(long)]
    #[serde(default)]
    pub lr_scale_with_world: bool,
    /// Data-parallel runs: gradient bucket size in MiB, 0 to 1024 (DistributedDataParallel's
    /// `bucket_cap_mb`). Each bucket's all-reduce starts as soon as the backward pass has
    /// filled it, while the layers below are still computed; 0 sums every gradient in one
    /// all-reduce after the backward pass.
    #[arg(long, default_value_t = 25.0, value_name = "MiB")]
    #[serde(default = "bucket_mb")]
    pub bucket_mb: f32,
    /// A preset of published hyper-parameters under the flags given (which still win):
    /// `torchvision-v2` is torchvision's recipe of its V2 ImageNet weights, the learning
    /// rate scaled from its global batch of 1024 to --batch-size.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub recipe: Option<Recipe>,
    /// Run folder [default: runs/<arch>-<dataset>-<unix time>].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Continue the run saved in this folder.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Start over in an --out-dir that holds a run: its files are removed first.
    #[arg(long, conflicts_with = "resume")]
    #[serde(skip)]
    pub overwrite: bool,
    /// Stop (with a checkpoint) after this many steps in total, for smoke runs.
    #[arg(long)]
    #[serde(skip)]
    pub max_steps: Option<usize>,
    /// TOML file whose keys are these flags' names; flags given on the command line win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where to compute: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`): the
    /// steps run on the GPU, the weights and optimiser state stay there between steps and
    /// are copied back for each checkpoint and evaluation. Under `mpirun`, process k of a
    /// machine takes GPU N + k and the gradients are averaged over the GPUs with NCCL.
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    #[serde(skip)]
    pub device: DeviceSpec,
    /// GPU number format: `fp32` (the default; the CPU's numbers), or `bf16` (mixed
    /// precision: bf16 activations and tensor-core convolutions, f32 weights, optimiser
    /// and batch-norm statistics).
    #[arg(long, default_value_t = Precision::Fp32)]
    #[serde(skip)]
    pub precision: Precision,
}

fn one() -> f32 {
    1.0
}

fn ema_steps() -> usize {
    32
}

fn bucket_mb() -> f32 {
    25.0
}

fn one_process() -> usize {
    1
}

/// The automatic augmentations `--auto-augment` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum AutoAugment {
    /// TrivialAugmentWide (Müller & Hutter 2021), torchvision's `ta_wide`.
    #[value(name = "ta_wide")]
    #[serde(rename = "ta_wide")]
    TaWide,
}

/// The presets `--recipe` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// torchvision's recipe of its V2 weights (ResNet-50 / ResNeXt-50 IMAGENET1K_V2):
    /// 600 epochs, SGD lr 0.5 at batch 1024 with 5 warm-up epochs and cosine decay, weight
    /// decay 2e-5 (none on BN and biases), label smoothing 0.1, mixup 0.2, cutmix 1.0,
    /// TrivialAugmentWide, random erasing 0.1, EMA 0.99998 every 32 steps, training crop
    /// 176, evaluation resize 232 and crop 224. (Its repeated-augmentation sampler is not
    /// reproduced.)
    TorchvisionV2,
}

impl Recipe {
    /// The recipe's flags for a run of `batch` images per step.
    fn layer(self, batch: usize) -> serde_json::Map<String, serde_json::Value> {
        match self {
            Recipe::TorchvisionV2 => serde_json::json!({
                "epochs": 600,
                "optimizer": "sgd",
                "lr": 0.5 * batch as f64 / 1024.0,
                "momentum": 0.9,
                "nesterov": false,
                "schedule": "cosine",
                "warmup-epochs": 5.0,
                "weight-decay": 2e-5,
                "decay-bn-and-bias": false,
                "label-smoothing": 0.1,
                "mixup-alpha": 0.2,
                "cutmix-alpha": 1.0,
                "auto-augment": "ta_wide",
                "random-erase": 0.1,
                "ema-decay": 0.99998,
                "ema-steps": 32,
                "image-size": 176,
                "val-resize": 232,
                "val-crop": 224,
            })
            .as_object()
            .expect("an object")
            .clone(),
        }
    }
}

/// Parses `--class-subset`: comma-separated indices and inclusive ranges (`5-9`).
pub fn parse_class_list(list: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim) {
        let num = |t: &str| -> Result<usize> {
            t.trim()
                .parse()
                .map_err(|_| anyhow!("--class-subset `{list}`: `{t}` is not a class index"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a >= 100_000 {
                    bail!("--class-subset `{list}`: range `{part}` is empty or too long");
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// The most compute threads `--threads` accepts.
const MAX_THREADS: usize = 1024;

impl TrainArgs {
    /// Every hyper-parameter against its valid range; the error names the flag and the range.
    fn validate(&self) -> Result<()> {
        fn within<T: PartialOrd + std::fmt::Display>(
            flag: &str,
            v: T,
            ok: bool,
            range: &str,
        ) -> Result<()> {
            if !ok {
                bail!("--{flag} {v} is out of range: {range}");
            }
            Ok(())
        }
        let finite = |v: f32| v.is_finite();
        within("epochs", self.epochs, self.epochs >= 1, "at least 1")?;
        within(
            "batch-size",
            self.batch_size,
            (1..=65_536).contains(&self.batch_size),
            "1 to 65536",
        )?;
        within(
            "lr",
            self.lr,
            finite(self.lr) && self.lr > 0.0,
            "a positive number",
        )?;
        within(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "0 to 1, 1 excluded",
        )?;
        within(
            "weight-decay",
            self.weight_decay,
            finite(self.weight_decay) && self.weight_decay >= 0.0,
            "0 or more",
        )?;
        if let Some(c) = self.clip_grad_norm {
            within(
                "clip-grad-norm",
                c,
                finite(c) && c > 0.0,
                "a positive number",
            )?;
        }
        within(
            "warmup-epochs",
            self.warmup_epochs,
            finite(self.warmup_epochs) && self.warmup_epochs >= 0.0,
            "0 or more",
        )?;
        within(
            "label-smoothing",
            self.label_smoothing,
            (0.0..1.0).contains(&self.label_smoothing),
            "0 to 1, 1 excluded",
        )?;
        crate::dist::bucket_bytes(self.bucket_mb)?;
        within(
            "threads",
            self.threads,
            self.threads <= MAX_THREADS,
            &format!("0 (one per core) to {MAX_THREADS}"),
        )?;
        data::check_image_size(self.image_size)?;
        within(
            "backbone-lr-scale",
            self.backbone_lr_scale,
            finite(self.backbone_lr_scale) && (0.0..=10.0).contains(&self.backbone_lr_scale),
            "0 to 10",
        )?;
        if let Some(n) = self.train_per_class {
            within("train-per-class", n, n >= 1, "at least 1")?;
        }
        self.mix().validate().map_err(|e| anyhow!(e))?;
        within(
            "random-erase",
            self.random_erase,
            (0.0..=1.0).contains(&self.random_erase),
            "0 to 1",
        )?;
        if let Some(d) = self.ema_decay {
            within(
                "ema-decay",
                d,
                (0.0..1.0).contains(&d),
                "0 to 1, 1 excluded",
            )?;
        }
        within(
            "ema-steps",
            self.ema_steps,
            (1..=1_000_000).contains(&self.ema_steps),
            "1 to 1000000",
        )?;
        data::check_size("val-resize", self.val_resize)?;
        data::check_size("val-crop", self.val_crop)?;
        self.frozen()?;
        if let Some(list) = &self.class_subset {
            parse_class_list(list)?;
        }
        if let Some(m) = self.max_steps {
            within("max-steps", m, m >= 1, "at least 1")?;
        }
        Ok(())
    }
}

impl TrainArgs {
    /// The batch mixes of `--mixup-alpha` / `--cutmix-alpha`.
    fn mix(&self) -> datasets::mix::MixConfig {
        datasets::mix::MixConfig {
            mixup_alpha: self.mixup_alpha,
            cutmix_alpha: self.cutmix_alpha,
        }
    }

    /// The per-image augmentation and evaluation resize flags.
    fn augment(&self) -> data::Augment {
        data::Augment {
            trivial_augment: self.auto_augment == Some(AutoAugment::TaWide),
            random_erase: self.random_erase,
            val_resize: self.val_resize,
            val_crop: self.val_crop,
        }
    }

    /// The parts `--freeze` / `--freeze-backbone` hold fixed.
    fn frozen(&self) -> Result<Frozen> {
        let mut f = Frozen::parse(self.freeze.iter().map(String::as_str))
            .map_err(|e| anyhow!("--freeze: {e}"))?;
        if self.freeze_backbone {
            f.stem = true;
            f.stages = [true; 4];
        }
        Ok(f)
    }

    /// The optimiser's parameter groups: frozen parts at 0, the backbone at
    /// `--backbone-lr-scale`.
    fn groups(&self) -> Result<Vec<ParamGroup>> {
        let frozen = self.frozen()?;
        let mut groups = vec![ParamGroup {
            prefixes: frozen.prefixes(),
            lr_scale: 0.0,
        }];
        if self.backbone_lr_scale != 1.0 {
            groups.push(ParamGroup {
                prefixes: ["conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."]
                    .map(String::from)
                    .to_vec(),
                lr_scale: self.backbone_lr_scale,
            });
        }
        Ok(groups)
    }
}

/// The update rules `--optimizer` accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerName {
    /// SGD with momentum (torch.optim.SGD).
    #[default]
    Sgd,
    /// AdamW with PyTorch's defaults (torch.optim.AdamW).
    Adamw,
}

/// The learning-rate schedules `--schedule` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleName {
    /// Cosine decay to zero over the run.
    Cosine,
    /// ×0.1 at 50% and at 75% of the epochs.
    Step,
}

impl ScheduleName {
    fn schedule(self) -> Schedule {
        match self {
            ScheduleName::Cosine => Schedule::Cosine,
            ScheduleName::Step => Schedule::Step { gamma: 0.1 },
        }
    }
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

/// The largest `state.json` read (a run's state grows by about 300 bytes an epoch).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// The largest `--config` file read (a configuration is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Parses a `--config` TOML text into its keys (flag names) and its `max-steps` (which is not
/// part of a run's saved configuration); `what` names the file in errors.
fn config_layer(
    text: &str,
    what: &str,
) -> Result<(serde_json::Map<String, serde_json::Value>, Option<usize>)> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{what} is not valid TOML"))?;
    let mut json = serde_json::to_value(table)?;
    let keys = json.as_object_mut().expect("a TOML table is an object");
    for key in ["resume", "config"] {
        if keys.contains_key(key) {
            bail!("{what}: `{key}` is a command-line flag only (--{key} …)");
        }
    }
    let steps = match keys
        .remove("max-steps")
        .or_else(|| keys.remove("max_steps"))
    {
        Some(v) => Some(serde_json::from_value(v).map_err(|e| anyhow!("{what}: max-steps: {e}"))?),
        None => None,
    };
    Ok((std::mem::take(keys), steps))
}

/// Overlays the `--config` keys, then the recipe's values under them (the keys are applied
/// again over the recipe; flags on the command line win over both). A resumed run's saved
/// configuration holds the recipe's values already: no recipe layer then.
fn with_config(
    args: TrainArgs,
    keys: &serde_json::Map<String, serde_json::Value>,
    what: &str,
    matches: &ArgMatches,
    resumed: bool,
) -> Result<TrainArgs> {
    // no layer, no round trip through JSON (which cannot carry a NaN flag to its range check)
    let mut args = if keys.is_empty() {
        args
    } else {
        overlay(&args, keys, matches, what)?
    };
    if let (Some(recipe), false) = (args.recipe, resumed) {
        args = overlay(&args, &recipe.layer(args.batch_size), matches, "--recipe")?;
        if !keys.is_empty() {
            args = overlay(&args, keys, matches, what)?;
        }
    }
    Ok(args)
}

/// The arguments a `--config` text gives on its own (every other flag at its default),
/// validated: what `train --config FILE` would run with. Used by the config fuzz target.
pub fn parse_config(text: &str) -> Result<TrainArgs> {
    let matches = TrainArgs::augment_args(clap::Command::new("train")).get_matches_from(["train"]);
    let defaults = TrainArgs::from_arg_matches(&matches)?;
    let (keys, steps) = config_layer(text, "config")?;
    let mut args = with_config(defaults, &keys, "config", &matches, false)?;
    args.max_steps = steps;
    args.validate()?;
    Ok(args)
}

/// Applies `--config` and, with `--resume`, the saved run's configuration.
pub fn resolve(mut args: TrainArgs, matches: &ArgMatches) -> Result<TrainArgs> {
    // not part of a run's saved configuration: kept from the command line (or --config)
    let (resume, config, mut max_steps) =
        (args.resume.clone(), args.config.clone(), args.max_steps);
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
    let (keys, what) = match &config {
        Some(path) => {
            let what = format!("`{}`", path.display());
            let text = resnext_fs::read_at_most(path, MAX_CONFIG_BYTES)?;
            let text = String::from_utf8(text).map_err(|_| anyhow!("{what} is not UTF-8 text"))?;
            let (keys, steps) = config_layer(&text, &what)?;
            if steps.is_some()
                && matches.value_source("max_steps") != Some(ValueSource::CommandLine)
            {
                max_steps = steps;
            }
            (keys, what)
        }
        None => (serde_json::Map::new(), String::new()),
    };
    args = with_config(args, &keys, &what, matches, resume.is_some())?;
    args.resume = resume;
    args.config = config;
    args.max_steps = max_steps;
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
    /// Test loss of the moving average of the weights (runs with --ema-decay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_loss_ema: Option<f64>,
    /// Test top-1 of the moving average of the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_top1_ema: Option<f64>,
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
    /// The weights at the end of the last completed epoch (`model.safetensors` is a copy).
    #[serde(default)]
    epoch_model_file: String,
    /// The weights of the best epoch so far (`best.safetensors` is a copy); a checkpoint
    /// model file kept while it is the best.
    #[serde(default)]
    best_file: String,
    /// The moving average of the weights at this state (runs with --ema-decay).
    #[serde(default)]
    ema_file: String,
    /// The moving average at the end of the last completed epoch (`ema.safetensors` is a
    /// copy).
    #[serde(default)]
    epoch_ema_file: String,
    /// Updates of the average since its last reset.
    #[serde(default)]
    ema_n_averaged: u64,
    /// Processes of the run (1 without MPI).
    #[serde(default = "one_process")]
    world: usize,
    config: serde_json::Value,
}

impl State {
    fn read(dir: &Path) -> Result<State> {
        let path = dir.join("state.json");
        let text = resnext_fs::read_at_most(&path, MAX_STATE_BYTES).context("cannot resume")?;
        serde_json::from_slice(&text).with_context(|| {
            format!(
                "cannot resume: `{}` is not a valid run state",
                path.display()
            )
        })
    }
}

/// Counts the run folder's file writes; with `RESNEXT_TEST_CRASH_AFTER_WRITES=N` in the
/// environment the process aborts right after the N-th (as a `kill -9` would), so the
/// tests can stop a run between any two files of a checkpoint.
fn wrote() {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static LIMIT: OnceLock<Option<usize>> = OnceLock::new();
    let limit = LIMIT.get_or_init(|| {
        std::env::var("RESNEXT_TEST_CRASH_AFTER_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(limit) = limit {
        if COUNT.fetch_add(1, Ordering::SeqCst) + 1 >= *limit {
            std::process::abort();
        }
    }
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    resnext_fs::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    wrote();
    Ok(())
}

fn save_model(net: &dyn Network, path: &Path) -> Result<()> {
    net.save_safetensors(path)?;
    wrote();
    Ok(())
}

/// The files a run folder holds besides `checkpoint/`; all but `state.json` are derived
/// from it ([`Trainer::write_derived`]).
const RUN_FILES: [&str; 6] = [
    "state.json",
    "metrics.jsonl",
    "curves.svg",
    "model.safetensors",
    "best.safetensors",
    "ema.safetensors",
];

/// A run's moving average of the weights: the average, a network to evaluate and save it
/// with, and how often it is updated.
struct EmaRun {
    ema: Ema,
    net: Box<dyn Network>,
    every: usize,
}

/// The checkpoint file of the model after `step` steps.
fn model_file(step: usize) -> String {
    format!("model-{step}.safetensors")
}

/// The checkpoint file of the weight average after `step` steps.
fn ema_file(step: usize) -> String {
    format!("ema-{step}.safetensors")
}

/// Writes model, optimizer and weight average, then `state.json`, which names them:
/// `state.json` is the commit point, so a kill at any moment leaves the previous complete
/// checkpoint. Then removes the checkpoint files the new state does not name.
fn checkpoint(
    dir: &Path,
    net: &dyn Network,
    opt: &Optimizer,
    ema: Option<&mut EmaRun>,
    state: &mut State,
) -> Result<()> {
    let ck = dir.join("checkpoint");
    std::fs::create_dir_all(&ck).with_context(|| format!("cannot create `{}`", ck.display()))?;
    state.model_file = model_file(state.global_step);
    state.optimizer_file = format!("optimizer-{}.safetensors", state.global_step);
    save_model(net, &ck.join(&state.model_file))?;
    opt.save_state(&ck.join(&state.optimizer_file))?;
    wrote();
    if let Some(e) = ema {
        state.ema_file = ema_file(state.global_step);
        state.ema_n_averaged = e.ema.n_averaged();
        e.net.ema_write(&e.ema)?;
        save_model(e.net.as_ref(), &ck.join(&state.ema_file))?;
    }
    write_text(
        &dir.join("state.json"),
        &serde_json::to_string_pretty(state)?,
    )?;
    remove_unnamed(dir, state);
    Ok(())
}

/// Removes what a killed write may have left: temporary files, and checkpoint files that
/// `state` does not name.
fn remove_unnamed(dir: &Path, state: &State) {
    let named = [
        &state.model_file,
        &state.optimizer_file,
        &state.epoch_model_file,
        &state.best_file,
        &state.ema_file,
        &state.epoch_ema_file,
    ];
    let ck = dir.join("checkpoint");
    for (folder, is_ck) in [(dir, false), (ck.as_path(), true)] {
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let temporary = name.starts_with('.') && name.contains(".tmp-");
            let stale = is_ck && !named.iter().any(|n| **n == name);
            if (temporary || stale) && e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Trains with `args`; prints `final test_top1: X` last. `interrupted` is set by the
/// Ctrl-C handler: the current step finishes and a checkpoint is written.
pub fn run(args: TrainArgs, interrupted: Arc<AtomicBool>) -> Result<()> {
    let compute = Compute::open_in_group(args.device, args.precision, args.sync_bn)?;
    let mut trainer = Trainer::new(args, interrupted, compute)?;
    if trainer.args.resume.is_some() {
        trainer.resume()?;
    }
    trainer.announce();
    while trainer.state.epoch < trainer.args.epochs {
        match trainer.train_epoch()? {
            Flow::Stopped => return Ok(()),
            Flow::EpochDone { lr } => trainer.end_epoch(lr)?,
        }
        if crate::dist::any(trainer.interrupted.load(Ordering::SeqCst)) {
            if trainer.leader {
                println!(
                    "interrupted: checkpoint written after epoch {}; continue with --resume {}",
                    trainer.state.epoch,
                    trainer.dir.display()
                );
            }
            return Ok(());
        }
    }
    if !trainer.leader {
        return Ok(());
    }
    let last = trainer.state.history.last();
    if let Some(ema) = last.and_then(|r| r.test_top1_ema) {
        println!("final test_top1_ema: {ema:.4}");
    }
    println!(
        "final test_top1: {:.4}",
        last.map(|r| r.test_top1).unwrap_or(0.0)
    );
    Ok(())
}

/// How an epoch's training steps ended.
enum Flow {
    /// Every step ran; the learning rate of the last one.
    EpochDone { lr: f32 },
    /// Interrupted or `--max-steps` reached: a checkpoint is written, the run ends.
    Stopped,
}

/// One training run: the model, the optimiser, the data and the run folder.
struct Trainer {
    args: TrainArgs,
    arch: Arch,
    schedule: Schedule,
    dir: PathBuf,
    classes: usize,
    net: Box<dyn Network>,
    opt: Optimizer,
    /// Where the steps run (the weights stay there between steps: [`Trainer::sync`]).
    compute: Compute,
    ema: Option<EmaRun>,
    /// The peak learning rate (--lr, times the processes with --lr-scale-with-world).
    base_lr: f32,
    /// Rank 0 of a data-parallel run (or the only process): writes and prints.
    leader: bool,
    state: State,
    train: Loader,
    test: Loader,
    /// Training batches per epoch.
    steps: usize,
    /// Training and test images.
    images: (usize, usize),
    interrupted: Arc<AtomicBool>,
}

impl Trainer {
    /// Checks the arguments, loads the data, creates the run folder and builds the model.
    fn new(args: TrainArgs, interrupted: Arc<AtomicBool>, compute: Compute) -> Result<Self> {
        let arch: Arch = args.arch.parse()?;
        args.validate()?;
        if args.threads > 0 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(args.threads)
                .build_global()
                .context("cannot set up the thread pool")?;
        }
        let size = args.image_size.unwrap_or(arch.default_size());
        resnext_core::oom::set_context(format!(
            "training {arch} at --batch-size {} on {size}×{size} images: lower --batch-size \
             (or --image-size)",
            args.batch_size
        ));
        if args.recipe.is_some() && arch.is_cifar() {
            bail!("--recipe torchvision-v2 is the ImageNet networks' recipe; {arch} is a CIFAR network");
        }
        let mut data = data::prepare(
            args.dataset,
            args.data_dir.as_deref(),
            args.download,
            size,
            &args.augment(),
        )?;
        if args.class_subset.is_some() || args.train_per_class.is_some() {
            let all: Vec<usize> = (0..data.info.classes.len()).collect();
            let classes = match &args.class_subset {
                Some(list) => parse_class_list(list)?,
                None => all,
            };
            let subset = |source, per_class| -> Result<Arc<dyn datasets::Source>> {
                Ok(Arc::new(
                    datasets::Subset::new(source, &classes, per_class)
                        .map_err(|e| anyhow!("--class-subset: {e}"))?,
                ))
            };
            data.train = subset(data.train.clone(), args.train_per_class)?;
            data.test = subset(data.test.clone(), None)?;
            data.info.classes = data.train.info().classes.clone();
        }
        let classes = data.info.classes.len();
        let dir = args.out_dir.clone().unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!("{}-{}-{t}", arch, args.dataset))
        });
        let (rank, world) = crate::dist::rank_world();
        let leader = rank == 0;
        if args.resume.is_none() && dir.join("state.json").exists() {
            if !args.overwrite {
                bail!(
                    "`{}` holds a run already: continue it with --resume {}, or start over with --overwrite",
                    dir.display(),
                    dir.display()
                );
            }
            if leader {
                for f in RUN_FILES {
                    let _ = std::fs::remove_file(dir.join(f));
                }
                let _ = std::fs::remove_dir_all(dir.join("checkpoint"));
            }
        }
        if leader {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the run folder `{}`", dir.display()))?;
        }

        let dev = Cpu::seed_from_u64(args.seed);
        let mut net = arch.build(&dev, data.info.channels, classes)?;
        if args.zero_init_residual {
            net.zero_init_residual();
        }
        // a resumed run loads its checkpoint instead
        if let (Some(file), None) = (&args.init_weights, &args.resume) {
            let mode = if args.reset_head {
                LoadMode::Backbone
            } else {
                LoadMode::NewHead
            };
            let report = net
                .load_safetensors_with(file, mode)
                .context("--init-weights")?;
            println!("init-weights `{}`: {report}", file.display());
        }
        let mut frozen = args.frozen()?;
        if arch.is_cifar() {
            if args.freeze.iter().any(|p| p.trim() == "layer4") {
                bail!("--freeze: {arch} has three stages, layer1 to layer3");
            }
            frozen.stages[3] = false;
        }
        if frozen.head
            && frozen.stem
            && frozen.stages[..3].iter().all(|&s| s)
            && (arch.is_cifar() || frozen.stages[3])
        {
            bail!("--freeze: every part is frozen, nothing would train");
        }
        net.set_frozen(frozen);
        let base_lr = if args.lr_scale_with_world {
            args.lr * world as f32
        } else {
            args.lr
        };
        let opt = Optimizer::new(OptimConfig {
            lr: base_lr,
            algorithm: match args.optimizer {
                OptimizerName::Sgd => Algorithm::Sgd,
                OptimizerName::Adamw => Algorithm::ADAMW,
            },
            clip_grad_norm: args.clip_grad_norm,
            momentum: args.momentum,
            nesterov: args.nesterov,
            weight_decay: args.weight_decay,
            decay_vectors: args.decay_bn_and_bias,
            groups: args.groups()?,
        });
        let state = State {
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            best_top1: -1.0,
            partial: Partial::default(),
            history: Vec::new(),
            model_file: String::new(),
            optimizer_file: String::new(),
            epoch_model_file: String::new(),
            best_file: String::new(),
            ema_file: String::new(),
            epoch_ema_file: String::new(),
            ema_n_averaged: 0,
            world,
            config: serde_json::to_value(&args)?,
        };
        let ema = match args.ema_decay {
            Some(decay) => Some(EmaRun {
                ema: Ema::new(Ema::adjusted_decay(
                    decay,
                    args.batch_size,
                    args.ema_steps,
                    args.epochs,
                )),
                net: arch.build(&dev, data.info.channels, classes)?,
                every: args.ema_steps,
            }),
            None => None,
        };
        let loader = |source, pipeline, batch_size, shuffle, prefetch| {
            Loader::new(
                source,
                pipeline,
                LoaderConfig {
                    batch_size,
                    shuffle,
                    drop_last: shuffle,
                    seed: args.seed,
                    threads: 1,
                    prefetch,
                },
            )
        };
        let train = loader(
            data.train.clone(),
            data.train_pipeline,
            args.batch_size,
            true,
            4,
        )
        .sharded(rank, world);
        let test =
            loader(data.test.clone(), data.test_pipeline, 256, false, 2).sharded(rank, world);
        let steps = train.batches_per_epoch();
        if steps == 0 {
            bail!(
                "the training set has {} images, fewer than one batch of {} ({world} process(es) × --batch-size {})",
                data.train.len(),
                args.batch_size * world,
                args.batch_size
            );
        }
        Ok(Trainer {
            schedule: args.schedule.schedule(),
            base_lr,
            leader,
            args,
            arch,
            dir,
            classes,
            net,
            opt,
            compute,
            ema,
            state,
            train,
            test,
            steps,
            images: (data.train.len(), data.test.len()),
            interrupted,
        })
    }

    /// Continues from the run folder's `state.json` and the checkpoint it names.
    fn resume(&mut self) -> Result<()> {
        let saved = State::read(&self.dir)?;
        if saved.world != self.state.world {
            bail!(
                "cannot resume: `{}` was trained by {} process(es) and this run has {}; resume with the same number (its batches and shards depend on it)",
                self.dir.display(),
                saved.world,
                self.state.world
            );
        }
        let ck = self.dir.join("checkpoint");
        self.net
            .load_safetensors(&ck.join(&saved.model_file))
            .context(
                "cannot resume: the checkpoint does not fit this architecture and class count",
            )?;
        self.net
            .load_optimizer_state(&mut self.opt, &ck.join(&saved.optimizer_file))
            .context("cannot resume: the optimizer state does not fit the model")?;
        if let Some(e) = &mut self.ema {
            if saved.ema_file.is_empty() {
                bail!(
                    "cannot resume: `{}` names no weight average although the run keeps one",
                    self.dir.join("state.json").display()
                );
            }
            e.net
                .load_safetensors(&ck.join(&saved.ema_file))
                .context("cannot resume: the weight average does not fit the model")?;
            e.net.ema_copy(&mut e.ema);
            e.ema.set_n_averaged(saved.ema_n_averaged);
        }
        self.state = State {
            config: std::mem::take(&mut self.state.config),
            ..saved
        };
        if !self.leader {
            // the saved running sums are the group's: rank 0 carries them on
            self.state.partial = Partial::default();
            return Ok(());
        }
        // a kill during the last writes may have left derived files older or newer than
        // the state, temporary files, or unnamed checkpoint files
        remove_unnamed(&self.dir, &self.state);
        self.write_derived()?;
        eprintln!(
            "resuming {} at epoch {} step {}",
            self.dir.display(),
            self.state.epoch + 1,
            self.state.step_in_epoch
        );
        Ok(())
    }

    fn announce(&self) {
        if !self.leader {
            return;
        }
        let (_, world) = crate::dist::rank_world();
        if world > 1 {
            println!(
                "{world} processes × batch {} = global batch {}; batch norm {}",
                self.args.batch_size,
                world * self.args.batch_size,
                if self.args.sync_bn {
                    "synchronised"
                } else {
                    "per process"
                }
            );
        }
        println!(
            "training {} on {} ({} train / {} test images, {} classes) for {} epochs; run folder {}",
            self.arch,
            self.args.dataset,
            self.images.0,
            self.images.1,
            self.classes,
            self.args.epochs,
            self.dir.display()
        );
    }

    /// The remaining training steps of the current epoch, with a progress bar on a terminal
    /// (plain lines otherwise).
    fn train_epoch(&mut self) -> Result<Flow> {
        let (epoch, steps) = (self.state.epoch, self.steps);
        let tty = std::io::stderr().is_terminal();
        let (_, world) = crate::dist::rank_world();
        let bar = if tty && self.leader {
            ProgressBar::new(steps as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, self.args.epochs));
        bar.set_position(self.state.step_in_epoch as u64);
        let mut lr = self.base_lr;
        for batch in self.train.epoch(epoch as u64, self.state.step_in_epoch) {
            let batch = batch?;
            if world > 1 && (batch.labels.is_empty() || (self.args.sync_bn && batch.skipped > 0)) {
                bail!(
                    "epoch {} step {}: {} unreadable image(s) in this process's batch; a data-parallel run needs every batch whole (remove the unreadable files)",
                    epoch + 1,
                    self.state.step_in_epoch + 1,
                    batch.skipped
                );
            }
            if batch.labels.is_empty() {
                // every image of this batch was unreadable (and left out, with a warning)
                self.state.step_in_epoch += 1;
                self.state.global_step += 1;
                continue;
            }
            let t0 = Instant::now();
            let progress = epoch as f32 + self.state.step_in_epoch as f32 / steps as f32;
            lr = self.schedule.lr(
                self.base_lr,
                progress,
                self.args.epochs,
                self.args.warmup_epochs,
            );
            self.opt.cfg.lr = lr;
            let n = batch.labels.len();
            let mut x = batch.data;
            // seeded by the step, so a resumed run mixes as the uninterrupted one does
            let mut rng = StdRng::seed_from_u64(
                self.args.seed
                    ^ (self.state.global_step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let mixed = self
                .args
                .mix()
                .apply(&mut x, batch.shape, &batch.labels, &mut rng);
            let targets = Targets {
                labels: &batch.labels,
                mixed: mixed.as_ref().map(|m| (m.second.as_slice(), m.lam)),
                label_smoothing: self.args.label_smoothing,
            };
            let out = self
                .compute
                .train_step(self.net.as_mut(), x, batch.shape, targets, &mut self.opt)
                .map_err(|e| {
                    anyhow!(
                        "training stopped at epoch {} step {} (global step {}): {e}; the last good checkpoint in `{}` is kept",
                        epoch + 1,
                        self.state.step_in_epoch + 1,
                        self.state.global_step + 1,
                        self.dir.display()
                    )
                })?;
            let p = &mut self.state.partial;
            p.seconds += t0.elapsed().as_secs_f64();
            p.loss_sum += out.loss as f64 * n as f64;
            p.correct += out
                .logits
                .chunks(self.classes)
                .zip(&batch.labels)
                .filter(|(row, &l)| eval::rank(row, l) == Some(0))
                .count();
            p.seen += n;
            let (mean_loss, rate) = (
                p.loss_sum / p.seen as f64,
                p.seen as f64 / p.seconds.max(1e-9),
            );
            if let Some(e) = &mut self.ema {
                // torchvision: after the steps i = 0, k, 2k, … of each epoch; reset (so the
                // next update copies) during the warm-up
                if self.state.step_in_epoch.is_multiple_of(e.every) {
                    self.compute.sync(self.net.as_mut(), None)?;
                    self.net.ema_update(&mut e.ema);
                    if (epoch as f32) < self.args.warmup_epochs {
                        e.ema.reset();
                    }
                }
            }
            self.state.step_in_epoch += 1;
            self.state.global_step += 1;
            bar.set_position(self.state.step_in_epoch as u64);
            bar.set_message(format!("loss {mean_loss:.4} | {rate:.0} img/s"));
            if !tty
                && self.leader
                && self.state.step_in_epoch.is_multiple_of((steps / 4).max(1))
                && self.state.step_in_epoch < steps
            {
                println!(
                    "  epoch {} step {}/{steps} loss {mean_loss:.4}",
                    epoch + 1,
                    self.state.step_in_epoch,
                );
            }
            let stop_steps = self
                .args
                .max_steps
                .is_some_and(|m| self.state.global_step >= m);
            // every process stops at the same step: an interrupt may reach them apart
            let interrupted = crate::dist::any(self.interrupted.load(Ordering::SeqCst));
            if interrupted || stop_steps {
                bar.abandon();
                self.reduce_partial();
                if !self.leader {
                    return Ok(Flow::Stopped);
                }
                self.compute.sync(self.net.as_mut(), Some(&mut self.opt))?;
                checkpoint(
                    &self.dir,
                    self.net.as_ref(),
                    &self.opt,
                    self.ema.as_mut(),
                    &mut self.state,
                )?;
                let why = if stop_steps {
                    "--max-steps reached"
                } else {
                    "interrupted"
                };
                println!(
                    "{why}: checkpoint written at epoch {} step {}; continue with --resume {}",
                    epoch + 1,
                    self.state.step_in_epoch,
                    self.dir.display()
                );
                return Ok(Flow::Stopped);
            }
        }
        bar.finish_and_clear();
        Ok(Flow::EpochDone { lr })
    }

    /// Replaces this process's running sums by the group's (rank 0's time kept): before a
    /// checkpoint or the epoch's record. Nothing in a single process.
    fn reduce_partial(&mut self) {
        let (_, world) = crate::dist::rank_world();
        if world < 2 {
            return;
        }
        let p = &mut self.state.partial;
        let mut v = [p.loss_sum, p.correct as f64, p.seen as f64];
        crate::dist::sum_f64(&mut v);
        p.loss_sum = v[0];
        p.correct = v[1] as usize;
        p.seen = v[2] as usize;
    }

    /// Evaluates, records the epoch, writes the checkpoint and the run's artifacts.
    fn end_epoch(&mut self, lr: f32) -> Result<()> {
        self.compute.sync(self.net.as_mut(), Some(&mut self.opt))?;
        let ev = eval::evaluate_on(&self.compute, self.net.as_ref(), &self.test).with_context(|| {
            format!(
                "epoch {} ended with a model that cannot be evaluated; the checkpoint of the previous epoch in `{}` is kept",
                self.state.epoch + 1,
                self.dir.display()
            )
        })?;
        self.reduce_partial();
        let p = std::mem::take(&mut self.state.partial);
        let rec = EpochRecord {
            epoch: self.state.epoch + 1,
            train_loss: p.loss_sum / p.seen.max(1) as f64,
            train_top1: p.correct as f64 / p.seen.max(1) as f64,
            test_loss: ev.loss,
            test_top1: ev.top1,
            test_top5: ev.top5,
            lr: lr as f64,
            images_per_s: p.seen as f64 / p.seconds.max(1e-9),
            seconds: p.seconds,
            test_loss_ema: None,
            test_top1_ema: None,
        };
        let mut rec = rec;
        if let Some(e) = &mut self.ema {
            e.net.ema_write(&e.ema)?;
            let ev = eval::evaluate_on(&self.compute, e.net.as_ref(), &self.test)
                .context("the moving average of the weights cannot be evaluated")?;
            rec.test_loss_ema = Some(ev.loss);
            rec.test_top1_ema = Some(ev.top1);
        }
        if self.leader {
            println!(
            "epoch {}/{}: train_loss {:.4} train_top1 {:.4} test_loss {:.4} test_top1 {:.4} lr {:.4} {:.0} img/s {:.1}s",
            rec.epoch, self.args.epochs, rec.train_loss, rec.train_top1, rec.test_loss, rec.test_top1, rec.lr, rec.images_per_s, rec.seconds
        );
            if let (Some(loss), Some(top1)) = (rec.test_loss_ema, rec.test_top1_ema) {
                println!(
                    "epoch {}/{}: ema test_loss {loss:.4} test_top1 {top1:.4}",
                    rec.epoch, self.args.epochs
                );
            }
        }
        self.state.history.push(rec.clone());
        self.state.epoch += 1;
        self.state.step_in_epoch = 0;
        // the checkpoint's model file is also the last epoch's and, when it improved, the
        // best one: state.json names it in each role, so it is written once
        let model_file = model_file(self.state.global_step);
        if rec.test_top1 > self.state.best_top1 {
            self.state.best_top1 = rec.test_top1;
            self.state.best_file = model_file.clone();
        }
        self.state.epoch_model_file = model_file;
        if self.ema.is_some() {
            self.state.epoch_ema_file = ema_file(self.state.global_step);
        }
        if !self.leader {
            return Ok(());
        }
        checkpoint(
            &self.dir,
            self.net.as_ref(),
            &self.opt,
            self.ema.as_mut(),
            &mut self.state,
        )?;
        self.write_derived()
    }

    /// The files derived from `state.json`: `model.safetensors` and `best.safetensors`
    /// (copies of the checkpoint files it names), `metrics.jsonl` and `curves.svg` (from
    /// its history). Rewritten after each epoch and on resume, so they always agree with it.
    fn write_derived(&self) -> Result<()> {
        let ck = self.dir.join("checkpoint");
        for (file, copy) in [
            (&self.state.epoch_model_file, "model.safetensors"),
            (&self.state.best_file, "best.safetensors"),
            (&self.state.epoch_ema_file, "ema.safetensors"),
        ] {
            if !file.is_empty() {
                let bytes = resnext_fs::read(&ck.join(file))?;
                resnext_fs::write(&self.dir.join(copy), &bytes)?;
                wrote();
            }
        }
        let history = &self.state.history;
        let lines: String = history
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        write_text(&self.dir.join("metrics.jsonl"), &lines)?;
        let pts: Vec<curves::Point> = history
            .iter()
            .map(|r| curves::Point {
                epoch: r.epoch as f64,
                train_loss: r.train_loss,
                test_loss: r.test_loss,
                train_top1: r.train_top1,
                test_top1: r.test_top1,
            })
            .collect();
        write_text(&self.dir.join("curves.svg"), &curves::render(&pts))
    }
}
