//! Dataset formats and tensor files for resnext-rs.
//!
//! So far: NumPy `.npy` arrays of `float32` (read and written), the exchange format of
//! `resnext-train predict`.

pub mod npy;
