//! The parts of the `resnext-train` program: one module per subcommand, the data sources
//! they share, and the `--config` parser. `src/main.rs` is the command line around them;
//! the library exists so that tests and the fuzz targets can reach the parsers directly.

pub mod curves;
pub mod data;
pub mod device;
pub mod dist;
pub mod embed;
pub mod eval;
pub mod info;
pub mod predict;
pub mod train;
