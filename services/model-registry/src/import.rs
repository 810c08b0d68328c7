//! The client side of an upload: a GGUF file turned into a Hugging Face folder, and a folder
//! packed as the tar archive `POST /v1/registry/models/{name}/uploads` takes.
//!
//! It lives here, beside the checks the upload route runs, so that the CLI (`ferrite model
//! import`) and this crate's tests produce exactly what the route accepts.

use std::path::{Path, PathBuf};

use ferrite_model::{checkpoint, gguf};

/// Why an import could not produce its folder or archive.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the GGUF file {path}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: Box<gguf::GgufError>,
    },
    #[error("cannot build or write the model from {path}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: Box<checkpoint::CheckpointError>,
    },
    #[error("cannot pack {path} as a tar archive")]
    Tar {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Converts a GGUF model (weights dequantised to f32, llama.cpp's rotary row order undone,
/// the tokenizer from its metadata) into a Hugging Face folder at `dir`.
pub fn gguf_to_folder(gguf_path: &Path, dir: &Path) -> Result<(), ImportError> {
    let imported = gguf::import(gguf_path).map_err(|source| ImportError::Gguf {
        path: gguf_path.to_path_buf(),
        source: Box::new(source),
    })?;
    let checkpoint_error = |source| ImportError::Checkpoint {
        path: gguf_path.to_path_buf(),
        source: Box::new(source),
    };
    let loaded = checkpoint::from_gguf(imported, tch::Device::Cpu).map_err(checkpoint_error)?;
    checkpoint::save(
        dir,
        &loaded.var_store,
        &loaded.config,
        loaded.tokenizer.as_ref(),
    )
    .map_err(checkpoint_error)
}

/// Packs the files of `dir` (not the folder itself) into a tar archive at `archive`.
pub fn tar_folder(dir: &Path, archive: &Path) -> Result<(), ImportError> {
    let tar_error = |source| ImportError::Tar {
        path: dir.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(archive).map_err(tar_error)?;
    let mut builder = tar::Builder::new(file);
    let files = crate::artifacts::files(dir).map_err(|e| tar_error(std::io::Error::other(e)))?;
    for file in files {
        builder
            .append_path_with_name(&file.path, &file.relative)
            .map_err(tar_error)?;
    }
    builder.into_inner().map_err(tar_error)?;
    Ok(())
}
