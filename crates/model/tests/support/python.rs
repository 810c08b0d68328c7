//! The Python interpreter of the project's venv (`scripts/setup-python.sh`), shared by every
//! test that checks Ferrite against the Python stack. Other crates' tests include this file
//! with `#[path]`.

use std::path::{Path, PathBuf};

/// The venv's Python (`FERRITE_PY_VENV`, else `~/.cache/ferrite/py-venv`), or `None` after
/// saying why the caller skips.
pub fn venv_python() -> Option<PathBuf> {
    let venv = std::env::var_os("FERRITE_PY_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/ferrite/py-venv"))
        })?;
    let python = venv.join("bin/python");
    if python.exists() {
        Some(python)
    } else {
        eprintln!(
            "SKIPPED: no Python venv at {} (run scripts/setup-python.sh)",
            venv.display()
        );
        None
    }
}
