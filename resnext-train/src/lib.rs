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

/// The one line a command prints for an error: its message and each cause's, joined by
/// `: ` (as `{:#}` does), leaving out a cause whose text the line already ends with (an
/// error that names its OS error in its own message and also gives it as its cause, as
/// `resnext_fs::FileError` does, would otherwise say it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;
    use anyhow::Context;

    #[test]
    fn an_error_line_names_each_cause_once() {
        let missing = std::path::Path::new("/no/such/dir/w.safetensors");
        let e = anyhow::Error::from(resnext_fs::read(missing).unwrap_err());
        let line = error_line(&e);
        assert!(
            line.starts_with("cannot read `/no/such/dir/w.safetensors`: "),
            "{line}"
        );
        assert_eq!(line.matches("No such file").count(), 1, "{line}");
        // a context above it keeps the whole chain
        let e = e.context("loading the weights");
        let line = error_line(&e);
        assert!(
            line.starts_with("loading the weights: cannot read `/no/such/dir/"),
            "{line}"
        );
        assert_eq!(line.matches("No such file").count(), 1, "{line}");
        // causes that say something new are all kept
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("inner")).context("outer");
        assert_eq!(error_line(&e.unwrap_err()), "outer: inner");
    }
}
