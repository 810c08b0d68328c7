//! Model folders as artifacts: unpacking an uploaded tar, checking the folder, storing it.
//!
//! An upload is spooled to a temporary folder and checked whole before anything reaches
//! object storage: `config.json` must be a Llama config Ferrite can load (or
//! `adapter_config.json` a PEFT adapter config), every `.safetensors` file must have a
//! readable header whose tensors fit in the file, and a model's weights must open as the
//! loader opens them (`model.safetensors`, or the shards `model.safetensors.index.json`
//! lists), holding every tensor the config requires in the shape it implies. Only then are
//! the files stored; if storing fails halfway, what was stored is deleted, so a failed upload
//! leaves nothing behind. A folder already in storage is checked the same way from its JSON
//! files and the headers of its `.safetensors` files alone.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use ferrite_model::checkpoint::{self, CheckpointError, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
use ferrite_model::config::ModelConfig;
use ferrite_model::safetensors::{MAX_HEADER_BYTES, SafetensorsError, Weights};
use ferrite_platform::storage::{ObjectKey, Storage};
use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{Map, Value};

use crate::domain::VersionKind;
use crate::error::RegistryError;

/// One file of a checked folder.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    /// `/`-separated path inside the folder, e.g. `model.safetensors`.
    pub relative: String,
    pub path: PathBuf,
}

fn bad(param: &str, message: impl Into<String>) -> RegistryError {
    RegistryError::BadArtifact {
        message: message.into(),
        param: param.to_owned(),
    }
}

/// Unpacks a tar archive into `dir`. Only regular files and folders are accepted, under
/// relative paths that stay inside `dir`; anything else fails naming the entry.
pub fn unpack_tar(archive: &Path, dir: &Path) -> Result<(), RegistryError> {
    let file =
        std::fs::File::open(archive).map_err(RegistryError::io("cannot reopen the upload"))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| bad("body", format!("the body is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| bad("body", format!("the tar archive is corrupt: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad("body", format!("a tar entry has an unreadable path: {e}")))?
            .into_owned();
        let shown = path.display().to_string();
        let safe = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !safe {
            return Err(bad(
                &shown,
                format!("the entry `{shown}` leaves the folder"),
            ));
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(bad(
                &shown,
                format!("the entry `{shown}` is not a regular file (links are refused)"),
            ));
        }
        let target = file_target(dir, &path, &shown)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(RegistryError::io("cannot unpack"))?;
        }
        let mut out = std::fs::File::create(&target).map_err(RegistryError::io("cannot unpack"))?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| bad(&shown, format!("the entry `{shown}` is truncated: {e}")))?;
    }
    Ok(())
}

/// Where the file entry `path` (already known to stay inside `dir`) is unpacked. An entry
/// with no name (`.`, `./`), one where an earlier entry made a folder, and one under a name an
/// earlier entry made a file are refused naming the entry: they cannot be unpacked, and are no
/// folder the loader could read.
fn file_target(dir: &Path, path: &Path, shown: &str) -> Result<PathBuf, RegistryError> {
    let parts: Vec<_> = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    if parts.is_empty() {
        return Err(bad(
            shown,
            format!("the entry `{shown}` is a file with no name"),
        ));
    }
    let mut target = dir.to_path_buf();
    for (index, part) in parts.iter().enumerate() {
        target.push(part);
        let last = index + 1 == parts.len();
        match std::fs::symlink_metadata(&target) {
            Ok(found) if last && found.is_dir() => {
                return Err(bad(
                    shown,
                    format!("the entry `{shown}` is a file where an earlier entry made a folder"),
                ));
            }
            Ok(found) if !last && !found.is_dir() => {
                let file = target.strip_prefix(dir).unwrap_or(&target).display();
                return Err(bad(
                    shown,
                    format!(
                        "the entry `{shown}` lies under `{file}`, which an earlier entry made a file"
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(target)
}

/// The folder's root: `dir` itself, or its only sub-folder when an archive wrapped the files
/// in one (`tar cf m.tar my-model/`).
pub fn model_root(dir: &Path) -> Result<PathBuf, RegistryError> {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(RegistryError::io("cannot read the unpacked folder"))?
        .collect::<Result<_, _>>()
        .map_err(RegistryError::io("cannot read the unpacked folder"))?;
    match entries.as_slice() {
        [only] if only.path().is_dir() => Ok(only.path()),
        _ => Ok(dir.to_path_buf()),
    }
}

/// Every file under `root`, sorted by relative path.
pub fn files(root: &Path) -> Result<Vec<ArtifactFile>, RegistryError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<ArtifactFile>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if let Ok(relative) = path.strip_prefix(root) {
                let parts: Vec<_> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(ArtifactFile {
                    relative: parts.join("/"),
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out).map_err(RegistryError::io("cannot list the unpacked folder"))?;
    out.sort_by(|a, b| a.relative.cmp(&b.relative));
    Ok(out)
}

/// The JSON files the check reads. Any other file is stored as it came, unread.
const READ_JSON_FILES: [&str; 5] = [
    "config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    WEIGHTS_INDEX_FILE,
];

/// The largest JSON file the check reads: the tokenizer loader's own cap, so that nothing
/// registers that a deployment or a token count would refuse to load. It bounds what one
/// upload can make the registry hold while it parses (the file's bytes, as nothing is parsed
/// into a tree).
pub use ferrite_model::tokenizer::MAX_JSON_BYTES;

/// Refuses a JSON file the check would read when it is over [`MAX_JSON_BYTES`], before a byte
/// of it is read.
fn check_json_size(relative: &str, size_bytes: u64) -> Result<(), RegistryError> {
    if READ_JSON_FILES.contains(&relative) && size_bytes > MAX_JSON_BYTES {
        return Err(bad(
            relative,
            format!(
                "`{relative}` is {size_bytes} bytes, more than the {MAX_JSON_BYTES} a model's \
                 JSON file may hold"
            ),
        ));
    }
    Ok(())
}

/// Checks that `files`, the folder at `root`, make a usable artifact of `kind`.
pub fn check_folder(
    root: &Path,
    files: &[ArtifactFile],
    kind: VersionKind,
) -> Result<(), RegistryError> {
    for file in files {
        let size_bytes = std::fs::metadata(&file.path)
            .map_err(RegistryError::io("cannot read an unpacked file"))?
            .len();
        check_json_size(&file.relative, size_bytes)?;
    }
    let find = |name: &str| files.iter().find(|f| f.relative == name);
    let weights: Vec<&ArtifactFile> = files
        .iter()
        .filter(|f| f.relative.ends_with(".safetensors"))
        .collect();
    for file in &weights {
        check_safetensors(&file.path, &file.relative)?;
    }
    let require = |name: &str| {
        find(name).ok_or_else(|| bad(name, format!("a {} needs `{name}`", kind.as_str())))
    };
    match kind {
        VersionKind::Model | VersionKind::RewardModel => {
            let config = check_model_config(require("config.json")?)?;
            let weights = check_weights(root, find(WEIGHTS_INDEX_FILE).is_some(), kind)?;
            // TODO: a reward model's folder format is not settled (a score head beside or in
            // place of `lm_head`), so only its weights' readability is checked; a reward model
            // whose backbone tensors are missing or misshapen registers and fails when loaded.
            if kind == VersionKind::Model {
                checkpoint::check_tensors(&config, &weights)
                    .map_err(|error| tensors_error(root, error))?;
            }
        }
        VersionKind::Adapter => {
            check_adapter_config(require("adapter_config.json")?)?;
            require("adapter_model.safetensors")?;
        }
        VersionKind::Tokenizer => {
            check_json_object(require("tokenizer.json")?)?;
        }
    }
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        if let Some(file) = find(name) {
            check_json_object(file)?;
        }
    }
    Ok(())
}

/// Reads `file` (already known to be within [`MAX_JSON_BYTES`]) as a `T`. Each `T` names only
/// the fields the check looks at; serde skips the rest without building them, so parsing costs
/// the file's bytes and not a tree many times their size. `shape` says what the file should be
/// when it is valid JSON of another shape.
fn read_json<T: DeserializeOwned>(file: &ArtifactFile, shape: &str) -> Result<T, RegistryError> {
    let shown = &file.relative;
    let bytes =
        std::fs::read(&file.path).map_err(RegistryError::io("cannot read an unpacked file"))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let problem = if e.is_data() {
            format!("is not {shape}")
        } else {
            "is not valid JSON".to_owned()
        };
        bad(shown, format!("`{shown}` {problem}: {e}"))
    })
}

/// A file that must be a JSON object, whatever it holds.
fn check_json_object(file: &ArtifactFile) -> Result<(), RegistryError> {
    read_json::<BTreeMap<String, IgnoredAny>>(file, "a JSON object").map(drop)
}

fn check_model_config(file: &ArtifactFile) -> Result<ModelConfig, RegistryError> {
    let bytes =
        std::fs::read(&file.path).map_err(RegistryError::io("cannot read an unpacked file"))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        bad(
            &file.relative,
            format!("`config.json` is not UTF-8 text: {e}"),
        )
    })?;
    ModelConfig::from_json_str(text).map_err(|e| {
        bad(
            &file.relative,
            format!("`config.json` is not a Llama config: {e}"),
        )
    })
}

/// What the check reads of a PEFT `adapter_config.json`; the rest is skipped unread.
#[derive(Deserialize)]
struct AdapterConfig {
    peft_type: String,
    r: u64,
}

/// A PEFT LoRA config names its type and a positive rank.
fn check_adapter_config(file: &ArtifactFile) -> Result<(), RegistryError> {
    let needs = "a PEFT config with `peft_type` and a positive rank `r`";
    let config: AdapterConfig = read_json(file, needs)?;
    if config.peft_type.is_empty() || config.r == 0 {
        return Err(bad(
            &file.relative,
            format!("`adapter_config.json` is not {needs}"),
        ));
    }
    Ok(())
}

/// Opens the weights of the model at `root` as the loader will: the shards the index lists
/// when there is one, else `model.safetensors`. A broken or hostile index (not JSON, a shard
/// path that leaves the folder, a shard that is missing, a tensor placed in a shard that
/// does not hold it) is refused here, naming the file, rather than when a job or a
/// deployment first loads the version.
fn check_weights(root: &Path, indexed: bool, kind: VersionKind) -> Result<Weights, RegistryError> {
    let weights = Weights::open(root, WEIGHTS_FILE, WEIGHTS_INDEX_FILE)
        .map_err(|error| weights_error(root, indexed, kind, error))?;
    if weights.names().next().is_none() {
        let file = if indexed {
            WEIGHTS_INDEX_FILE
        } else {
            WEIGHTS_FILE
        };
        return Err(bad(file, format!("`{file}` holds no tensor")));
    }
    Ok(weights)
}

/// `path` as the user knows it: inside the folder, not the registry's scratch space.
fn relative_to(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A tensor the config requires and the weights lack or misshape, or one the model has no
/// place for, as the user's mistake naming the file and the tensor.
fn tensors_error(root: &Path, error: CheckpointError) -> RegistryError {
    match error {
        CheckpointError::MissingTensor { path, name } => {
            let file = relative_to(root, &path);
            bad(
                &file,
                format!("`{file}` has no tensor `{name}`, which `config.json` requires"),
            )
        }
        CheckpointError::ShapeMismatch {
            path,
            name,
            expected,
            found,
        } => {
            let file = relative_to(root, &path);
            bad(
                &file,
                format!(
                    "`{file}`: tensor `{name}` has shape {found:?}, but `config.json` implies \
                     {expected:?}"
                ),
            )
        }
        CheckpointError::UnexpectedTensor { path, name } => {
            let file = relative_to(root, &path);
            bad(
                &file,
                format!(
                    "`{file}` has tensor `{name}`, which a Llama model with this `config.json` \
                     does not have"
                ),
            )
        }
        // The check reads headers only: nothing else can come of it.
        other => RegistryError::io("cannot check the weights")(std::io::Error::other(other)),
    }
}

/// A weights error as the user's mistake, naming the file by its path in the folder rather
/// than in the registry's scratch space.
fn weights_error(
    root: &Path,
    indexed: bool,
    kind: VersionKind,
    error: SafetensorsError,
) -> RegistryError {
    let relative = |path: &str| relative_to(root, Path::new(path));
    match error {
        SafetensorsError::Io { path, source } => {
            let file = relative(&path);
            if file == WEIGHTS_INDEX_FILE {
                bad(&file, format!("`{file}` is not UTF-8 text: {source}"))
            } else if indexed {
                // Every `.safetensors` file of the folder is on disk here (an upload is
                // unpacked whole, a stored folder's are fetched), so a shard that cannot be
                // opened is none of them.
                bad(
                    WEIGHTS_INDEX_FILE,
                    format!(
                        "`{WEIGHTS_INDEX_FILE}` lists the shard `{file}`, which is not a \
                         `.safetensors` file in the folder"
                    ),
                )
            } else {
                bad(
                    WEIGHTS_FILE,
                    format!(
                        "a {} needs its weights in `{WEIGHTS_FILE}`, or in shards listed by \
                         `{WEIGHTS_INDEX_FILE}`",
                        kind.as_str()
                    ),
                )
            }
        }
        SafetensorsError::Corrupt { path, problem } => {
            let file = relative(&path);
            let what = if file == WEIGHTS_INDEX_FILE {
                "a usable shard index"
            } else {
                "safetensors Ferrite can load"
            };
            bad(&file, format!("`{file}` is not {what}: {problem}"))
        }
        SafetensorsError::UnsupportedDtype { path, name, dtype } => {
            let file = relative(&path);
            bad(
                &file,
                format!("`{file}`: tensor `{name}` has dtype {dtype}, which Ferrite cannot load"),
            )
        }
        // Opening reads headers only; libtorch is not involved until a tensor is read.
        error @ SafetensorsError::Torch { .. } => {
            RegistryError::io("cannot check the weights")(std::io::Error::other(error))
        }
    }
}

/// Reads a safetensors header (an 8-byte little-endian length, then JSON) without reading the
/// tensors, and checks that every tensor's byte range lies inside the file.
fn check_safetensors(path: &Path, shown: &str) -> Result<(), RegistryError> {
    let corrupt = |problem: String| bad(shown, format!("`{shown}` is not safetensors: {problem}"));
    let mut file = std::fs::File::open(path).map_err(RegistryError::io("cannot open weights"))?;
    let size = file
        .metadata()
        .map_err(RegistryError::io("cannot read weights"))?
        .len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|_| corrupt(format!("{size} bytes is too short for a header")))?;
    let header_bytes = u64::from_le_bytes(length);
    if header_bytes > MAX_HEADER_BYTES || header_bytes > size - 8 {
        return Err(corrupt(format!(
            "the header claims {header_bytes} bytes of a {size}-byte file"
        )));
    }
    let mut header = vec![0u8; usize::try_from(header_bytes).unwrap_or_default()];
    file.read_exact(&mut header)
        .map_err(|e| corrupt(format!("the header cannot be read: {e}")))?;
    let header: Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("the header is not a JSON object: {e}")))?;
    let data_bytes = size - 8 - header_bytes;
    for (name, tensor) in header.iter().filter(|(name, _)| *name != "__metadata__") {
        let offsets = tensor
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|pair| pair.iter().filter_map(Value::as_u64).collect::<Vec<_>>());
        match offsets.as_deref() {
            Some([start, end]) if start <= end && *end <= data_bytes => {}
            _ => {
                return Err(corrupt(format!(
                    "tensor `{name}` lies outside the file's {data_bytes} data bytes"
                )));
            }
        }
    }
    Ok(())
}

/// Stores `files` under `prefix`; on any failure deletes what it stored and fails.
pub async fn store_files(
    storage: &Storage,
    prefix: &ObjectKey,
    files: &[ArtifactFile],
) -> Result<(), RegistryError> {
    let mut stored = Vec::new();
    for file in files {
        let result = store_file(storage, prefix, file).await;
        match result {
            Ok(key) => stored.push(key),
            Err(error) => {
                delete_all(storage, &stored).await;
                return Err(error);
            }
        }
    }
    Ok(())
}

async fn store_file(
    storage: &Storage,
    prefix: &ObjectKey,
    file: &ArtifactFile,
) -> Result<ObjectKey, RegistryError> {
    let key = prefix
        .join(&file.relative)
        .map_err(|e| bad(&file.relative, format!("unusable file name: {e}")))?;
    let opened = tokio::fs::File::open(&file.path)
        .await
        .map_err(RegistryError::io("cannot reopen an unpacked file"))?;
    storage
        .put_stream(&key, tokio_util::io::ReaderStream::new(opened))
        .await?;
    Ok(key)
}

/// Checks that the folder already stored at `prefix` (registered in place, or a training job's
/// output) is a usable artifact of `kind`, as [`check_folder`] checks an upload.
pub async fn check_stored(
    storage: &Storage,
    prefix: &ObjectKey,
    kind: VersionKind,
) -> Result<(), RegistryError> {
    let scratch = tempfile::tempdir().map_err(RegistryError::io("cannot make a scratch folder"))?;
    let files = fetch_folder(storage, prefix, scratch.path()).await?;
    tokio::task::spawn_blocking(move || check_folder(scratch.path(), &files, kind))
        .await
        .map_err(|e| RegistryError::io("the artifact check failed")(std::io::Error::other(e)))?
}

/// Fetches into `dir` what [`check_folder`] reads of the folder at `prefix`: the JSON files it
/// reads whole (refusing one over [`MAX_JSON_BYTES`] before it is downloaded), and of each `.safetensors` file only its header, written at the start of a sparse file of
/// the object's size so the header's byte ranges are still checked against the real length.
/// Other files are not fetched, so checking a model of many gigabytes costs a few small
/// requests per file. An empty prefix is refused, naming `artifact_prefix`.
async fn fetch_folder(
    storage: &Storage,
    prefix: &ObjectKey,
    dir: &Path,
) -> Result<Vec<ArtifactFile>, RegistryError> {
    let objects = storage.list(prefix).await?;
    if objects.is_empty() {
        return Err(bad(
            "artifact_prefix",
            format!("nothing is stored under `{prefix}/`"),
        ));
    }
    let mut files = Vec::new();
    for object in objects {
        let Some(relative) = relative_key(prefix, &object.key) else {
            continue;
        };
        let header_only = relative.ends_with(".safetensors");
        if !header_only && !READ_JSON_FILES.contains(&relative.as_str()) {
            continue;
        }
        check_json_size(&relative, object.size_bytes)?;
        let key = ObjectKey::parse(&object.key)?;
        let path = dir.join(&relative);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(RegistryError::io("cannot make a scratch folder"))?;
        }
        if header_only {
            fetch_header(storage, &key, object.size_bytes, &path).await?;
        } else {
            fetch_whole(storage, &key, &path).await?;
        }
        files.push(ArtifactFile { relative, path });
    }
    Ok(files)
}

/// Writes the safetensors header of the object at `key` (`size_bytes` long) to `path`, padded
/// with a hole to the object's size. A length that claims more than the cap or the object
/// holds is written alone, for the check to refuse with the numbers.
async fn fetch_header(
    storage: &Storage,
    key: &ObjectKey,
    size_bytes: u64,
    path: &Path,
) -> Result<(), RegistryError> {
    use tokio::io::AsyncWriteExt as _;

    let mut head = Vec::new();
    if size_bytes > 0 {
        head.extend_from_slice(&storage.get_range(key, 0..size_bytes.min(8)).await?);
    }
    if let Ok(length) = <[u8; 8]>::try_from(head.as_slice()) {
        let header_bytes = u64::from_le_bytes(length);
        let fits = header_bytes <= MAX_HEADER_BYTES && header_bytes <= size_bytes - 8;
        if header_bytes > 0 && fits {
            head.extend_from_slice(&storage.get_range(key, 8..8 + header_bytes).await?);
        }
    }
    let scratch = || RegistryError::io("cannot write a scratch file");
    let mut file = tokio::fs::File::create(path).await.map_err(scratch())?;
    file.write_all(&head).await.map_err(scratch())?;
    file.flush().await.map_err(scratch())?;
    file.set_len(size_bytes).await.map_err(scratch())
}

async fn fetch_whole(storage: &Storage, key: &ObjectKey, path: &Path) -> Result<(), RegistryError> {
    use futures::TryStreamExt as _;
    use tokio::io::AsyncWriteExt as _;

    let mut out = tokio::fs::File::create(path)
        .await
        .map_err(RegistryError::io("cannot write a scratch file"))?;
    let mut chunks = std::pin::pin!(storage.get_stream(key).await?);
    while let Some(chunk) = chunks.try_next().await? {
        out.write_all(&chunk)
            .await
            .map_err(RegistryError::io("cannot write a scratch file"))?;
    }
    out.flush()
        .await
        .map_err(RegistryError::io("cannot write a scratch file"))
}

/// The path of `key` inside the folder at `prefix`, or `None` when it is not inside it.
pub fn relative_key(prefix: &ObjectKey, key: &str) -> Option<String> {
    key.strip_prefix(prefix.as_str())?
        .strip_prefix('/')
        .filter(|rest| !rest.is_empty())
        .map(str::to_owned)
}

/// Deletes every object under `prefix`, logging (not failing) what cannot be deleted.
pub async fn delete_prefix(storage: &Storage, prefix: &ObjectKey) {
    match storage.list(prefix).await {
        Ok(objects) => {
            let keys: Vec<ObjectKey> = objects
                .iter()
                .filter_map(|o| ObjectKey::parse(&o.key).ok())
                .collect();
            delete_all(storage, &keys).await;
        }
        Err(error) => {
            tracing::warn!(object.prefix = %prefix, error = %error, "cannot list a failed upload to delete it");
        }
    }
}

async fn delete_all(storage: &Storage, keys: &[ObjectKey]) {
    for key in keys {
        if let Err(error) = storage.delete(key).await {
            tracing::warn!(object.key = %key, error = %error, "cannot delete part of a failed upload");
        }
    }
}

#[cfg(test)]
#[path = "../tests/support/weights.rs"]
mod test_weights;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> ArtifactFile {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        ArtifactFile {
            relative: name.to_owned(),
            path,
        }
    }

    /// A safetensors file holding one f32 tensor `w` of 2 elements: 8 data bytes.
    fn safetensors(data_end: u64) -> Vec<u8> {
        tensor_file("w", data_end)
    }

    /// A safetensors file holding one f32 tensor `name` of 2 elements, its header claiming
    /// `data_end` as the end of its bytes (8 is right).
    fn tensor_file(name: &str, data_end: u64) -> Vec<u8> {
        let header =
            format!(r#"{{"{name}":{{"dtype":"F32","shape":[2],"data_offsets":[0,{data_end}]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 8]);
        bytes
    }

    #[test]
    fn a_tensor_that_fits_passes_and_one_past_the_end_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let good = write(dir.path(), "good.safetensors", &safetensors(8));
        assert!(check_safetensors(&good.path, "good.safetensors").is_ok());
        // 9 > the 8 data bytes written after the header.
        let bad = write(dir.path(), "bad.safetensors", &safetensors(9));
        assert!(check_safetensors(&bad.path, "bad.safetensors").is_err());
    }

    #[test]
    fn a_header_length_past_the_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let file = write(dir.path(), "x.safetensors", &bytes);
        assert!(check_safetensors(&file.path, "x.safetensors").is_err());
    }

    #[test]
    fn an_adapter_needs_a_rank_and_its_weights() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write(
            dir.path(),
            "adapter_config.json",
            br#"{"peft_type":"LORA","r":8,"target_modules":["q_proj"]}"#,
        );
        assert!(
            check_folder(
                dir.path(),
                std::slice::from_ref(&config),
                VersionKind::Adapter
            )
            .is_err()
        );
        let weights = write(dir.path(), "adapter_model.safetensors", &safetensors(8));
        assert!(check_folder(dir.path(), &[config, weights.clone()], VersionKind::Adapter).is_ok());
        let rankless = write(
            dir.path(),
            "adapter_config.json",
            br#"{"peft_type":"LORA"}"#,
        );
        assert!(check_folder(dir.path(), &[rankless, weights], VersionKind::Adapter).is_err());
    }

    /// A tar of regular files named as given, written into the header as they are (the tar
    /// crate's own path setter would refuse or tidy some of them).
    fn raw_tar(names: &[&str]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for name in names {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_size(2);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            builder.append(&header, &b"{}"[..]).expect("append");
        }
        builder.into_inner().expect("finish")
    }

    #[test]
    fn a_file_entry_with_no_name_or_clashing_with_an_earlier_entry_is_refused_naming_it() {
        // Each made unpacking fail with an I/O error (a 500): a file named `.` is the folder
        // itself, and a path cannot be both a file and a folder.
        let cases: [(&[&str], &str, &str); 4] = [
            (&["."], ".", "no name"),
            (&["./"], "./", "no name"),
            (
                &["config.json", "config.json/x"],
                "config.json/x",
                "made a file",
            ),
            (&["a/x", "a"], "a", "made a folder"),
        ];
        for (names, entry, words) in cases {
            let scratch = tempfile::tempdir().expect("temp dir");
            let archive = scratch.path().join("upload.tar");
            std::fs::write(&archive, raw_tar(names)).expect("write");
            let unpacked = scratch.path().join("folder");
            std::fs::create_dir(&unpacked).expect("mkdir");
            match unpack_tar(&archive, &unpacked) {
                Err(RegistryError::BadArtifact { message, param }) => {
                    assert_eq!(param, entry, "{names:?}: {message}");
                    assert!(message.contains(words), "{names:?}: {message}");
                }
                other => panic!("{names:?} was not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn a_json_file_over_the_cap_is_refused_naming_it_before_it_is_read() {
        // A sparse file of zeros one byte past the cap: were it read, the refusal would say
        // it is not JSON instead of giving its size.
        let dir = tempfile::tempdir().expect("temp dir");
        let tokenizer = write(dir.path(), "tokenizer.json", b"");
        std::fs::File::options()
            .write(true)
            .open(&tokenizer.path)
            .and_then(|file| file.set_len(MAX_JSON_BYTES + 1))
            .expect("a sparse file");
        match check_folder(dir.path(), &[tokenizer], VersionKind::Tokenizer) {
            Err(RegistryError::BadArtifact { message, param }) => {
                assert_eq!(param, "tokenizer.json");
                assert!(
                    message.contains(&(MAX_JSON_BYTES + 1).to_string()),
                    "{message}"
                );
            }
            other => panic!("expected a refused artifact, got {other:?}"),
        }
    }

    #[test]
    fn a_json_file_under_the_cap_is_parsed_for_what_it_must_be() {
        // Valid JSON of nested arrays, the shape that built a tree many times the file's size:
        // fine where any JSON object will do, refused where a config's fields are needed.
        let dir = tempfile::tempdir().expect("temp dir");
        let nested = br#"{"model": [[[0], [1]], [[2]]], "added_tokens": []}"#;
        let tokenizer = write(dir.path(), "tokenizer.json", nested);
        check_folder(dir.path(), &[tokenizer], VersionKind::Tokenizer).expect("an object");
        let array = write(dir.path(), "tokenizer.json", b"[[0], [1]]");
        assert!(check_folder(dir.path(), &[array], VersionKind::Tokenizer).is_err());
        let weights = write(dir.path(), "adapter_model.safetensors", &safetensors(8));
        let adapter = write(dir.path(), "adapter_config.json", nested);
        assert!(check_folder(dir.path(), &[adapter, weights], VersionKind::Adapter).is_err());
    }

    #[test]
    fn a_model_config_that_is_not_llama_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let weights = write(dir.path(), "model.safetensors", &safetensors(8));
        let config = write(dir.path(), "config.json", br#"{"model_type":"gpt2"}"#);
        assert!(check_folder(dir.path(), &[config, weights], VersionKind::Model).is_err());
    }

    use super::test_weights as weights;
    use weights::mini_config;

    /// A safetensors file of f32 zeros in `shapes`.
    fn zeros_file(dir: &Path, name: &str, shapes: &BTreeMap<String, Vec<i64>>) -> ArtifactFile {
        write(dir, name, &weights::zeros_safetensors(shapes))
    }

    /// A single-file model: the mini config and `model.safetensors` holding `tensors`.
    fn single_file_model(dir: &Path, tensors: &BTreeMap<String, Vec<i64>>) -> Vec<ArtifactFile> {
        let config = mini_config().to_json_string();
        vec![
            write(dir, "config.json", config.as_bytes()),
            zeros_file(dir, WEIGHTS_FILE, tensors),
        ]
    }

    /// The mini model in two shards, `model.embed_tokens.weight` in `model-1` and the rest in
    /// `model-2`, with the index `weight_map` gives (nothing is written for it when `None`).
    fn sharded_model(dir: &Path, weight_map: Option<&str>) -> Vec<ArtifactFile> {
        let config = mini_config();
        let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) =
            ferrite_model::Llama::parameter_shapes(&config)
                .into_iter()
                .partition(|(name, _)| name == "model.embed_tokens.weight");
        let mut files = vec![
            write(dir, "config.json", config.to_json_string().as_bytes()),
            zeros_file(dir, "model-1.safetensors", &first),
            zeros_file(dir, "model-2.safetensors", &second),
        ];
        if let Some(weight_map) = weight_map {
            let index = format!(r#"{{"metadata": {{}}, "weight_map": {weight_map}}}"#);
            files.push(write(dir, WEIGHTS_INDEX_FILE, index.as_bytes()));
        }
        files
    }

    /// The index placing every tensor of [`sharded_model`] where it is, but `moved` in `file`.
    fn weight_map_moving(moved: &str, file: &str) -> String {
        let mut map: BTreeMap<String, String> =
            ferrite_model::Llama::parameter_shapes(&mini_config())
                .into_keys()
                .map(|name| {
                    let shard = if name == "model.embed_tokens.weight" {
                        1
                    } else {
                        2
                    };
                    (name, format!("model-{shard}.safetensors"))
                })
                .collect();
        if !moved.is_empty() {
            map.insert(moved.to_owned(), file.to_owned());
        }
        serde_json::to_string(&map).expect("a map serialises")
    }

    /// The file a refusal names and its message; panics when the folder passes.
    fn refusal(dir: &Path, files: &[ArtifactFile]) -> (String, String) {
        match check_folder(dir, files, VersionKind::Model) {
            Err(RegistryError::BadArtifact { message, param }) => (param, message),
            other => panic!("expected a refused artifact, got {other:?}"),
        }
    }

    #[test]
    fn a_sharded_model_passes_when_its_index_places_every_tensor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = sharded_model(dir.path(), Some(&weight_map_moving("", "")));
        check_folder(dir.path(), &files, VersionKind::Model).expect("a valid sharded model");
    }

    #[test]
    fn a_broken_or_hostile_shard_index_is_refused_naming_the_index() {
        // Each index is wrong in one way; the words each message must hold say which.
        let embed = "model.embed_tokens.weight";
        let cases = [
            (
                r#"{"model.norm.weight": "model-2.safetensors""#.to_owned(),
                "not a usable shard index",
            ),
            (
                r#"["model-1.safetensors"]"#.to_owned(),
                "not a name-to-file map",
            ),
            (
                weight_map_moving(embed, "../model-1.safetensors"),
                r#""../model-1.safetensors" is not a file name"#,
            ),
            (
                weight_map_moving(embed, "/etc/passwd"),
                r#""/etc/passwd" is not a file name"#,
            ),
            (
                weight_map_moving(embed, "model-3.safetensors"),
                "the shard `model-3.safetensors`, which is not",
            ),
            // The norm is in the second shard, not the first.
            (
                weight_map_moving("model.norm.weight", "model-1.safetensors"),
                "puts model.norm.weight in model-1",
            ),
            (r#"{}"#.to_owned(), "holds no tensor"),
            // Every listed tensor is where the index says, but the config needs the rest.
            (
                format!(r#"{{"{embed}": "model-1.safetensors"}}"#),
                "has no tensor `lm_head.weight`, which `config.json` requires",
            ),
        ];
        for (weight_map, expected) in cases {
            let dir = tempfile::tempdir().expect("temp dir");
            let files = sharded_model(dir.path(), Some(&weight_map));
            let (param, message) = refusal(dir.path(), &files);
            assert_eq!(param, WEIGHTS_INDEX_FILE, "{weight_map}: {message}");
            assert!(message.contains(expected), "{weight_map}: {message}");
            assert!(
                message.contains(WEIGHTS_INDEX_FILE),
                "{weight_map}: {message}"
            );
            assert!(
                !message.contains(&dir.path().display().to_string()),
                "the scratch folder is not the user's business: {message}"
            );
        }
    }

    #[test]
    fn weights_the_config_does_not_describe_are_refused_naming_the_file_and_tensor() {
        // Each single-file model the loader refuses, with the tensor the refusal must name:
        // the attack's lone `x`, an embedding of shape [1] (the config implies [16, 8]: vocab
        // by hidden), and a model whole but for one extra tensor.
        let config = mini_config();
        let shapes = ferrite_model::Llama::parameter_shapes(&config);
        let lone = BTreeMap::from([("x".to_owned(), vec![2])]);
        let mut misshapen = shapes.clone();
        misshapen.insert("model.embed_tokens.weight".into(), vec![1]);
        let mut extra = shapes.clone();
        extra.insert("model.layers.9.mlp.up_proj.weight".into(), vec![16, 8]);
        let cases = [
            (
                lone,
                "no tensor `lm_head.weight`, which `config.json` requires",
            ),
            (
                misshapen,
                "`model.embed_tokens.weight` has shape [1], but `config.json` implies [16, 8]",
            ),
            (
                extra,
                "tensor `model.layers.9.mlp.up_proj.weight`, which a Llama model",
            ),
        ];
        for (tensors, expected) in cases {
            let dir = tempfile::tempdir().expect("temp dir");
            let files = single_file_model(dir.path(), &tensors);
            let (param, message) = refusal(dir.path(), &files);
            assert_eq!(param, WEIGHTS_FILE, "{message}");
            assert!(message.contains(expected), "{message}");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let whole = single_file_model(dir.path(), &shapes);
        check_folder(dir.path(), &whole, VersionKind::Model).expect("the weights the config needs");
    }

    #[test]
    fn a_model_whose_weights_the_loader_would_not_find_is_refused() {
        // Shards without their index: the loader reads `model.safetensors` and finds none.
        let dir = tempfile::tempdir().expect("temp dir");
        let files = sharded_model(dir.path(), None);
        let (param, message) = refusal(dir.path(), &files);
        assert_eq!(param, WEIGHTS_FILE, "{message}");
    }
}
