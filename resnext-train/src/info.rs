//! `resnext-train info`.

use anyhow::{bail, Result};
use clap::Args;
use dfdx::prelude::*;
use resnext_core::model::Arch;

/// The largest input size `info` summarises (the multiply-accumulate counts stay exact).
const MAX_SIZE: usize = 8192;

/// Arguments of `info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Architecture (e.g. resnext50_32x4d, resnext29_8x64d).
    #[arg(long)]
    arch: String,
    /// Number of classes [default: 1000 for ImageNet layouts, 10 for CIFAR ones].
    #[arg(long)]
    classes: Option<usize>,
    /// Input height and width [default: 224 for ImageNet layouts, 32 for CIFAR ones].
    #[arg(long)]
    size: Option<usize>,
    /// Input channels (1 or 3).
    #[arg(long, default_value_t = 3)]
    in_channels: usize,
}

fn human(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints the summary; the last line is `params: N`.
pub fn run(a: InfoArgs) -> Result<()> {
    let arch: Arch = a.arch.parse()?;
    let classes = a.classes.unwrap_or(arch.default_classes());
    let size = a.size.unwrap_or(arch.default_size());
    if !(1..=MAX_SIZE).contains(&size) {
        bail!("--size {size} is out of range: 1 to {MAX_SIZE}");
    }
    let dev = Cpu::default();
    let net = arch.build(&dev, a.in_channels, classes)?;
    let rows = net.summary(size, size);
    println!(
        "{arch}: input {}x{size}x{size}, {classes} classes",
        a.in_channels
    );
    println!(
        "{:<8} {:>16} {:>14} {:>10}",
        "part", "output", "params", "MACs"
    );
    for r in &rows {
        let shape = r
            .out_shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        println!(
            "{:<8} {:>16} {:>14} {:>10}",
            r.name,
            shape,
            grouped(r.params),
            human(r.macs)
        );
    }
    let total_params: usize = rows.iter().map(|r| r.params).sum();
    let total_macs: usize = rows.iter().map(|r| r.macs).sum();
    debug_assert_eq!(total_params, net.num_params());
    println!(
        "{:<8} {:>16} {:>14} {:>10}",
        "total",
        "",
        grouped(total_params),
        human(total_macs)
    );
    println!("params: {total_params}");
    Ok(())
}
