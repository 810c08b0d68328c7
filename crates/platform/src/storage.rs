//! Object storage: a local folder by default, any S3-compatible store when configured.
//!
//! Every key is an [`ObjectKey`], validated at the edge, so no path can escape the store's root.
//! Large objects go up in parts, and a failed multipart upload is aborted so nothing half
//! written stays behind.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

use crate::settings::{StoreLocation, StoreSettings};

/// Longest key accepted, in bytes (S3's own limit).
const MAX_KEY_BYTES: usize = 1024;

/// A validated object key: relative, `/`-separated, no empty, `.` or `..` segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn parse(key: &str) -> Result<Self, StorageError> {
        let refuse = |reason: &str| {
            Err(StorageError::InvalidKey {
                key: key.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if key.is_empty() {
            return refuse("it is empty");
        }
        if key.len() > MAX_KEY_BYTES {
            return refuse("it is longer than 1024 bytes");
        }
        if key.starts_with('/') {
            return refuse("it is an absolute path");
        }
        if key.contains('\\') {
            return refuse("it contains a backslash");
        }
        if key.chars().any(char::is_control) {
            return refuse("it contains a control character");
        }
        for segment in key.split('/') {
            match segment {
                "" => return refuse("it has an empty segment"),
                "." | ".." => return refuse("it has a `.` or `..` segment"),
                _ => {}
            }
        }
        Ok(Self(key.to_owned()))
    }

    /// A key under this one, e.g. `checkpoints/7` joined with `model.safetensors`.
    pub fn join(&self, child: &str) -> Result<Self, StorageError> {
        Self::parse(&format!("{}/{child}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn path(&self) -> StorePath {
        StorePath::from(self.0.as_str())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("object `{0}` does not exist")]
    NotFound(String),
    #[error("cannot configure object storage: {0}")]
    Config(String),
    #[error("object storage failed on `{key}`: {source}")]
    Store {
        key: String,
        source: object_store::Error,
    },
    #[error("the upload of `{key}` failed while reading its body: {source}")]
    Body { key: String, source: std::io::Error },
}

impl StorageError {
    fn store(key: &ObjectKey, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Self::NotFound(key.to_string()),
            source => Self::Store {
                key: key.to_string(),
                source,
            },
        }
    }
}

/// A stored object's key and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size_bytes: u64,
}

/// A handle to the configured store; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    part_bytes: usize,
    description: String,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("store", &self.description)
            .finish()
    }
}

impl Storage {
    /// Opens the store the settings name, creating a local folder when needed.
    pub fn from_settings(settings: &StoreSettings) -> Result<Self, StorageError> {
        let (store, description): (Arc<dyn ObjectStore>, String) = match &settings.location {
            StoreLocation::Local(path) => {
                std::fs::create_dir_all(path).map_err(|e| {
                    StorageError::Config(format!("cannot create {}: {e}", path.display()))
                })?;
                // S3 has no folders, so deleting the last object under a prefix leaves nothing;
                // a local folder would keep the empty directories (one per pruned checkpoint)
                // unless the store removes them, which it does up to, never including, `path`.
                let store = LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| StorageError::Config(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(store), format!("local folder {}", path.display()))
            }
            StoreLocation::S3 { bucket } => {
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(&settings.s3_region);
                if let Some(endpoint) = &settings.s3_endpoint {
                    // S3-compatible servers are usually addressed by path, often over HTTP.
                    builder = builder
                        .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                        .with_allow_http(endpoint.scheme() == "http")
                        .with_virtual_hosted_style_request(false);
                }
                if let (Some(key), Some(secret)) =
                    (&settings.s3_access_key, &settings.s3_secret_key)
                {
                    builder = builder
                        .with_access_key_id(key.expose())
                        .with_secret_access_key(secret.expose());
                }
                let store = builder
                    .build()
                    .map_err(|e| StorageError::Config(e.to_string()))?;
                (Arc::new(store), format!("s3://{bucket}"))
            }
        };
        Ok(Self {
            store,
            part_bytes: settings.multipart_part_bytes,
            description,
        })
    }

    /// A store kept in memory, for unit tests of code that only needs some store.
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(object_store::memory::InMemory::new()),
            part_bytes: 5 * 1024 * 1024,
            description: "memory".into(),
        }
    }

    #[tracing::instrument(skip_all, fields(object.key = %key, object.size_bytes = bytes.len()))]
    pub async fn put(&self, key: &ObjectKey, bytes: Bytes) -> Result<(), StorageError> {
        if bytes.len() > self.part_bytes {
            return self
                .put_stream(key, futures::stream::once(async { Ok(bytes) }))
                .await
                .map(|_| ());
        }
        self.store
            .put(&key.path(), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| StorageError::store(key, e))
    }

    /// Uploads a stream in parts of the configured size. On any failure the upload is aborted,
    /// so the key holds either the whole object or nothing. Returns the bytes written.
    #[tracing::instrument(skip_all, fields(object.key = %key))]
    pub async fn put_stream<S>(&self, key: &ObjectKey, body: S) -> Result<u64, StorageError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>>,
    {
        let upload = self
            .store
            .put_multipart(&key.path())
            .await
            .map_err(|e| StorageError::store(key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_bytes);
        let mut written = 0u64;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(source) => {
                    abort(key, writer).await;
                    return Err(StorageError::Body {
                        key: key.to_string(),
                        source,
                    });
                }
            };
            // Bounds the parts in flight, so a fast reader cannot fill memory.
            if let Err(e) = writer.wait_for_capacity(4).await {
                abort(key, writer).await;
                return Err(StorageError::store(key, e));
            }
            written += chunk.len() as u64;
            writer.put(chunk);
        }
        writer
            .finish()
            .await
            .map_err(|e| StorageError::store(key, e))?;
        tracing::debug!(object.size_bytes = written, "uploaded in parts");
        Ok(written)
    }

    #[tracing::instrument(skip_all, fields(object.key = %key))]
    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        let result = self
            .store
            .get(&key.path())
            .await
            .map_err(|e| StorageError::store(key, e))?;
        result
            .bytes()
            .await
            .map_err(|e| StorageError::store(key, e))
    }

    /// Bytes `range` of the object (one ranged GET on S3), for reading a file's header
    /// without its body. The range must lie inside the object.
    #[tracing::instrument(skip_all, fields(object.key = %key, object.range = ?range))]
    pub async fn get_range(
        &self,
        key: &ObjectKey,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StorageError> {
        self.store
            .get_range(&key.path(), range)
            .await
            .map_err(|e| StorageError::store(key, e))
    }

    /// The object as a stream of chunks, for downloads that should not sit in memory.
    pub async fn get_stream(
        &self,
        key: &ObjectKey,
    ) -> Result<impl Stream<Item = Result<Bytes, StorageError>> + use<>, StorageError> {
        let result = self
            .store
            .get(&key.path())
            .await
            .map_err(|e| StorageError::store(key, e))?;
        let key = key.clone();
        Ok(result
            .into_stream()
            .map_err(move |e| StorageError::store(&key, e)))
    }

    /// Moves an object to a new key, replacing what was there; on S3 a copy then a delete.
    #[tracing::instrument(skip_all, fields(object.from = %from, object.to = %to))]
    pub async fn rename(&self, from: &ObjectKey, to: &ObjectKey) -> Result<(), StorageError> {
        self.store
            .rename(&from.path(), &to.path())
            .await
            .map_err(|e| StorageError::store(from, e))
    }

    pub async fn exists(&self, key: &ObjectKey) -> Result<bool, StorageError> {
        match self.store.head(&key.path()).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StorageError::store(key, e)),
        }
    }

    /// Every object under `prefix`, sorted by key.
    pub async fn list(&self, prefix: &ObjectKey) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut objects: Vec<ObjectInfo> = self
            .store
            .list(Some(&prefix.path()))
            .map_ok(|meta| ObjectInfo {
                key: meta.location.to_string(),
                size_bytes: meta.size,
            })
            .try_collect()
            .await
            .map_err(|e| StorageError::store(prefix, e))?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Deletes the object; deleting a missing object succeeds, as in S3.
    #[tracing::instrument(skip_all, fields(object.key = %key))]
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        match self.store.delete(&key.path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StorageError::store(key, e)),
        }
    }

    /// Whether the store takes writes; `/readyz` calls this. It writes and deletes a small
    /// probe object, because a store that only answers lookups (a vanished or read-only
    /// folder, a bucket without write rights) is not ready for uploads.
    pub async fn check(&self) -> Result<(), StorageError> {
        let probe = ObjectKey::parse(".ferrite-readiness-probe")?;
        self.store
            .put(&probe.path(), PutPayload::from_static(b"ok"))
            .await
            .map_err(|e| StorageError::store(&probe, e))?;
        self.delete(&probe).await
    }
}

async fn abort(key: &ObjectKey, writer: WriteMultipart) {
    if let Err(e) = writer.abort().await {
        tracing::warn!(object.key = %key, error = %e, "could not abort a failed multipart upload");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_the_root_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\nb",
        ] {
            assert!(ObjectKey::parse(bad).is_err(), "{bad:?} must be refused");
        }
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(ObjectKey::parse(&long).is_err());
    }

    #[test]
    fn ordinary_keys_are_accepted_and_joined() {
        let key = ObjectKey::parse("datasets/ab12").expect("valid");
        assert_eq!(
            key.join("data.jsonl").expect("valid").as_str(),
            "datasets/ab12/data.jsonl"
        );
        assert!(key.join("../x").is_err());
    }

    #[tokio::test]
    async fn a_range_reads_only_its_bytes() {
        let storage = Storage::in_memory();
        let key = ObjectKey::parse("models/m/model.safetensors").expect("valid");
        storage
            .put(&key, Bytes::from_static(b"0123456789"))
            .await
            .expect("stored");
        // Bytes 2, 3 and 4: the end is exclusive, as in `Range`.
        let part = storage.get_range(&key, 2..5).await.expect("read");
        assert_eq!(part.as_ref(), b"234");
    }

    #[tokio::test]
    async fn a_stream_that_fails_midway_leaves_nothing_behind() {
        let storage = Storage::in_memory();
        let key = ObjectKey::parse("uploads/broken").expect("valid");
        let body = futures::stream::iter(vec![
            Ok(Bytes::from(vec![0u8; 1024])),
            Err(std::io::Error::other("client went away")),
        ]);
        assert!(storage.put_stream(&key, body).await.is_err());
        assert!(!storage.exists(&key).await.expect("head works"));
    }
}
