//! Moving folders and datasets between object storage and the worker's scratch disk, and
//! deleting folders the job no longer needs.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bytes::Bytes;
use ferrite_platform::storage::{ObjectKey, Storage};
use futures::StreamExt as _;
use tokio::io::AsyncWriteExt as _;

use crate::domain::ResolvedDataset;
use crate::worker::Attempt;

/// A prefix such as `jobs/x/output/` as a key (object keys have no trailing slash).
pub(crate) fn prefix_key(prefix: &str) -> anyhow::Result<ObjectKey> {
    Ok(ObjectKey::parse(prefix.trim_end_matches('/'))?)
}

/// Uploads every file under `dir` to `prefix` + its relative path; returns the bytes sent.
pub async fn upload_dir(attempt: &Attempt, dir: &Path, prefix: &str) -> anyhow::Result<u64> {
    let root = prefix_key(prefix)?;
    let mut total = 0;
    for (path, relative) in files_under(dir)? {
        let key = root.join(&relative)?;
        total += upload_file(attempt, &path, &key).await?;
    }
    Ok(total)
}

async fn upload_file(attempt: &Attempt, path: &Path, key: &ObjectKey) -> anyhow::Result<u64> {
    let size = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size <= attempt.part_bytes as u64 {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        attempt
            .storage
            .put(key, Bytes::from(bytes))
            .await
            .with_context(|| format!("cannot upload {key}"))?;
        return Ok(size);
    }
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let stream = tokio_util::io::ReaderStream::new(file);
    attempt
        .storage
        .put_stream(key, stream)
        .await
        .with_context(|| format!("cannot upload {key}"))
}

/// Every file below `dir` with its `/`-separated path relative to `dir`, sorted.
fn files_under(dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder)
            .with_context(|| format!("cannot list {}", folder.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(dir)
                .with_context(|| format!("{} is outside {}", path.display(), dir.display()))?;
            let parts: Vec<_> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push((path, parts.join("/")));
        }
    }
    files.sort();
    Ok(files)
}

/// Nothing in storage under a registered artifact's prefix. Registered artifacts are never
/// rewritten, so another attempt would find the same; the worker fails the job at once.
#[derive(Debug, thiserror::Error)]
#[error(
    "no objects under {0}: the artifact is missing from this store (is the runner configured with the store it was registered in?)"
)]
pub struct NothingUnder(pub String);

/// Downloads every object under `prefix` into `dir`, keeping relative paths.
pub async fn download_prefix(storage: &Storage, prefix: &str, dir: &Path) -> anyhow::Result<u64> {
    let root = prefix_key(prefix)?;
    let objects = storage
        .list(&root)
        .await
        .with_context(|| format!("cannot list {prefix}"))?;
    if objects.is_empty() {
        return Err(NothingUnder(prefix.to_owned()).into());
    }
    let mut total = 0;
    for object in objects {
        let relative = object
            .key
            .strip_prefix(root.as_str())
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or(&object.key);
        let key = ObjectKey::parse(&object.key)?;
        // ObjectKey already refused `..` segments, so the path stays inside `dir`.
        let path = dir.join(relative);
        total += download_object(storage, &key, &path).await?;
    }
    Ok(total)
}

/// Deletes every object under `prefix` and returns how many there were. Stops at the first
/// failure, which the caller logs once; what was not deleted stays as it was.
pub async fn delete_prefix(storage: &Storage, prefix: &str) -> anyhow::Result<usize> {
    let root = prefix_key(prefix)?;
    let objects = storage
        .list(&root)
        .await
        .with_context(|| format!("cannot list {prefix}"))?;
    for object in &objects {
        let key = ObjectKey::parse(&object.key)?;
        storage
            .delete(&key)
            .await
            .with_context(|| format!("cannot delete {key}"))?;
    }
    Ok(objects.len())
}

async fn download_object(storage: &Storage, key: &ObjectKey, path: &Path) -> anyhow::Result<u64> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut stream = std::pin::pin!(
        storage
            .get_stream(key)
            .await
            .with_context(|| format!("cannot download {key}"))?
    );
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("cannot download {key}"))?;
        total += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(total)
}

/// Downloads a dataset to `path` in the layout trainers read: JSON Lines for structured kinds
/// (a top-level JSON array is rewritten one element per line), the bytes as they are otherwise.
pub async fn download_dataset(
    storage: &Storage,
    dataset: &ResolvedDataset,
    path: &Path,
) -> anyhow::Result<()> {
    let key = ObjectKey::parse(&dataset.object_key)?;
    if dataset.format != "json" {
        download_object(storage, &key, path).await?;
        return Ok(());
    }
    let bytes = storage
        .get(&key)
        .await
        .with_context(|| format!("cannot download {key}"))?;
    let lines = json_array_to_lines(&bytes)
        .with_context(|| format!("dataset version {} is not a JSON array", dataset.version_id))?;
    tokio::fs::write(path, lines)
        .await
        .with_context(|| format!("cannot write {}", path.display()))
}

fn json_array_to_lines(bytes: &[u8]) -> anyhow::Result<String> {
    let rows: Vec<serde_json::Value> = serde_json::from_slice(bytes)?;
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(&row)?);
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_array_becomes_one_line_per_element() {
        let array =
            br#"[{"instruction": "a\nb", "output": "c"}, {"instruction": "d", "output": "e"}]"#;
        let lines = json_array_to_lines(array).expect("an array");
        assert_eq!(
            lines,
            "{\"instruction\":\"a\\nb\",\"output\":\"c\"}\n{\"instruction\":\"d\",\"output\":\"e\"}\n"
        );
    }

    #[tokio::test]
    async fn deleting_a_step_folder_leaves_the_step_whose_name_it_begins() {
        // `step-1/` is a string prefix of `step-10/`; only the folder itself may go.
        let storage = Storage::in_memory();
        let keys = [
            "jobs/j/checkpoints/step-1/model.safetensors",
            "jobs/j/checkpoints/step-1/nested/trainer_state.json",
            "jobs/j/checkpoints/step-10/model.safetensors",
        ];
        for key in keys {
            let key = ObjectKey::parse(key).expect("a valid key");
            storage
                .put(&key, Bytes::from_static(b"x"))
                .await
                .expect("put");
        }
        let deleted = delete_prefix(&storage, "jobs/j/checkpoints/step-1/")
            .await
            .expect("deletes");
        assert_eq!(deleted, 2, "the two objects under step-1/");
        let left: Vec<String> = storage
            .list(&ObjectKey::parse("jobs/j/checkpoints").expect("a valid key"))
            .await
            .expect("lists")
            .into_iter()
            .map(|object| object.key)
            .collect();
        assert_eq!(left, vec![keys[2].to_owned()]);
    }

    #[tokio::test]
    async fn an_empty_prefix_is_reported_as_missing_artifacts() {
        let storage = Storage::in_memory();
        let dir = tempfile::tempdir().expect("temp dir");
        let error = download_prefix(&storage, "models/gone/", dir.path())
            .await
            .expect_err("nothing is stored");
        // The worker tells this error from a storage hiccup by its type.
        assert!(error.downcast_ref::<NothingUnder>().is_some(), "{error:#}");
    }

    #[test]
    fn files_are_listed_with_relative_slash_paths() {
        let dir = std::env::temp_dir().join(format!("ferrite-files-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("nested")).expect("create");
        std::fs::write(dir.join("config.json"), "{}").expect("write");
        std::fs::write(dir.join("nested/model.safetensors"), "x").expect("write");
        let files: Vec<String> = files_under(&dir)
            .expect("lists")
            .into_iter()
            .map(|(_, relative)| relative)
            .collect();
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert_eq!(files, vec!["config.json", "nested/model.safetensors"]);
    }
}
