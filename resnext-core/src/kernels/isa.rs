//! Which vector instruction set the kernels use: detected once per process, capped on
//! request to a lower level (the tests run every level the CPU has; a benchmark can ask
//! for AVX2 on an AVX-512 machine).
//!
//! The kernels never test CPU features themselves: they ask [`level`] and run the
//! [`super::simd`] implementation it names. A level above what the CPU has is never
//! returned, so the `unsafe` calls into `#[target_feature]` code behind it are sound.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A vector instruction set the kernels are written for, lowest first within an
/// architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// No vector instructions beyond what the compiler emits for plain loops.
    Scalar,
    /// aarch64 Advanced SIMD: 4 `f32` lanes, 32 registers.
    Neon,
    /// x86-64 AVX2 + FMA: 8 `f32` lanes, 16 registers.
    Avx2,
    /// x86-64 AVX-512F with VL: 16 `f32` lanes, 32 registers (for 256-bit vectors too), masks.
    Avx512,
}

impl Level {
    /// The name [`FromStr`] reads and `RESNEXT_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Level> {
        [Level::Scalar, Level::Neon, Level::Avx2, Level::Avx512]
            .into_iter()
            .find(|l| l.code() == c)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "portable" => Ok(Level::Scalar),
            "neon" => Ok(Level::Neon),
            "avx2" => Ok(Level::Avx2),
            "avx512" | "avx-512" => Ok(Level::Avx512),
            other => Err(format!(
                "unknown instruction set {other:?}: expected one of scalar, avx2, avx512, neon"
            )),
        }
    }
}

/// The best level this CPU has (detected once).
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // (VL: the 256-bit instructions with 32 registers; every AVX-512 CPU but the
            // Xeon Phi has it)
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Level::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Level::Neon;
            }
        }
        Level::Scalar
    })
}

/// Whether this CPU issues a 512-bit FMA as one operation on each of its FMA units (Intel's
/// AVX-512 cores, AMD from Zen 5) rather than as two 256-bit halves (AMD Zen 4, family
/// 0x19). Detected once; false without AVX-512.
pub fn full_width_avx512() -> bool {
    static FULL: OnceLock<bool> = OnceLock::new();
    *FULL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if detected() != Level::Avx512 {
                return false;
            }
            #[allow(unused_unsafe)]
            // SAFETY: CPUID leaves 0 and 1 exist on every x86-64 CPU.
            let (vendor, sig) = unsafe {
                use std::arch::x86_64::__cpuid;
                (__cpuid(0), __cpuid(1).eax)
            };
            let amd =
                (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
            // family = base + extended when the base is 0xF
            let family = ((sig >> 8) & 0xF)
                + if (sig >> 8) & 0xF == 0xF {
                    (sig >> 20) & 0xFF
                } else {
                    0
                };
            !(amd && family == 0x19)
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the level in use has multiply-adds that are cheap against the loads and stores
/// around them: full-width AVX-512 ([`full_width_avx512`]). There a direct kernel's
/// product can outrun a Winograd kernel's transforms; the convolution dispatch asks this.
pub fn wide_fma() -> bool {
    level() == Level::Avx512 && full_width_avx512()
}

/// Every level this CPU can run, best first (what the tests iterate over).
pub fn available() -> Vec<Level> {
    let best = detected();
    [Level::Avx512, Level::Avx2, Level::Neon, Level::Scalar]
        .into_iter()
        .filter(|&l| l == Level::Scalar || l == best || (best == Level::Avx512 && l == Level::Avx2))
        .collect()
}

/// 0: no cap set.
static CAP: AtomicU8 = AtomicU8::new(0);

/// The level the kernels use now: [`detected`], or the level set by [`set_level`] (or the
/// `RESNEXT_ISA` environment variable, read by [`init_from_env`]).
pub fn level() -> Level {
    Level::from_code(CAP.load(Ordering::Relaxed)).unwrap_or_else(detected)
}

/// Makes the kernels use `l` (process-wide) from now on; `None` goes back to the best the
/// CPU has. An error, and no change, when the CPU cannot run `l`.
pub fn set_level(l: Option<Level>) -> Result<(), String> {
    match l {
        None => CAP.store(0, Ordering::Relaxed),
        Some(l) if available().contains(&l) => CAP.store(l.code(), Ordering::Relaxed),
        Some(l) => {
            return Err(format!(
                "instruction set {l} is not available on this CPU (available: {})",
                names(&available())
            ))
        }
    }
    Ok(())
}

/// Applies `RESNEXT_ISA` (`avx512`, `avx2`, `neon` or `scalar`) when it is set: an error
/// naming the variable when its value is unknown or this CPU cannot run it.
pub fn init_from_env() -> Result<Option<Level>, String> {
    let Some(v) = std::env::var_os("RESNEXT_ISA") else {
        return Ok(None);
    };
    let v = v
        .into_string()
        .map_err(|v| format!("RESNEXT_ISA={v:?}: not UTF-8"))?;
    let l: Level = v.parse().map_err(|e| format!("RESNEXT_ISA={v}: {e}"))?;
    set_level(Some(l)).map_err(|e| format!("RESNEXT_ISA={v}: {e}"))?;
    Ok(Some(l))
}

fn names(ls: &[Level]) -> String {
    ls.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for l in [Level::Scalar, Level::Neon, Level::Avx2, Level::Avx512] {
            assert_eq!(l.name().parse::<Level>(), Ok(l));
        }
        let e = "sse9".parse::<Level>().unwrap_err();
        assert!(e.contains("sse9") && e.contains("avx2"), "{e}");
    }

    #[test]
    fn available_levels_start_with_the_detected_one_and_end_with_scalar() {
        let a = available();
        assert_eq!(a[0], detected());
        assert_eq!(*a.last().unwrap(), Level::Scalar);
        // a level of the other architecture is refused
        #[cfg(target_arch = "x86_64")]
        assert!(set_level(Some(Level::Neon))
            .unwrap_err()
            .contains("not available"));
        #[cfg(target_arch = "aarch64")]
        assert!(set_level(Some(Level::Avx2))
            .unwrap_err()
            .contains("not available"));
    }
}
