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

#[cfg(test)]
mod tests {
    use anyhow::Context;

    /// An error that names its OS error in its message does not also give it as its
    /// cause, so the one line a command prints (`{:#}`, the whole chain) says it once.
    #[test]
    fn an_error_line_names_each_cause_once() {
        let missing = std::path::Path::new("/no/such/dir/w.safetensors");
        let file_error = || resnext_fs::read(missing).unwrap_err();
        for e in [
            anyhow::Error::from(file_error()),
            anyhow::Error::from(datasets::DataError::from(file_error())),
        ] {
            let line = format!("{e:#}");
            assert!(
                line.starts_with("cannot read `/no/such/dir/w.safetensors`: "),
                "{line}"
            );
            assert_eq!(line.matches("No such file").count(), 1, "{line}");
            // a context above it keeps the whole chain
            let e = e.context("loading the weights");
            let line = format!("{e:#}");
            assert!(
                line.starts_with("loading the weights: cannot read `/no/such/dir/"),
                "{line}"
            );
            assert_eq!(line.matches("No such file").count(), 1, "{line}");
        }
        // causes that say something new are all kept
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("inner")).context("outer");
        assert_eq!(format!("{:#}", e.unwrap_err()), "outer: inner");
    }
}
