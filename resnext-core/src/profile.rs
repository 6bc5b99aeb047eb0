//! Opt-in op-level profiling: with `RESNEXT_PROFILE=1` in the environment, every op's
//! forward and backward time is accumulated by name; [`report`] returns the totals.
//! Off by default (one relaxed atomic load per op).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RESNEXT_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty()))
}

fn table() -> &'static Mutex<BTreeMap<&'static str, (Duration, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (Duration, u64)>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Times a scope under `name` when profiling is on.
pub struct Scope(Option<(&'static str, Instant)>);

/// Starts timing `name`.
pub fn scope(name: &'static str) -> Scope {
    Scope(enabled().then(|| (name, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((name, t)) = self.0.take() {
            let mut tab = table().lock().unwrap_or_else(|e| e.into_inner());
            let e = tab.entry(name).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }
}

/// `(name, total time, calls)` sorted by time, longest first; empty when profiling is off.
pub fn report() -> Vec<(&'static str, Duration, u64)> {
    let tab = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = tab.iter().map(|(k, (d, n))| (*k, *d, *n)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}
