//! Deployments: registry versions loaded into engines and served under a name.
//!
//! Creating one resolves the reference through the model registry's REST API, copies the
//! version's Hugging Face folder from object storage into a local cache (versions are
//! immutable, so a cached copy is reused), starts an engine on it and records it. At start-up
//! every recorded deployment is loaded again from storage alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use ferrite_platform::peers::{PeerError, Peers};
use ferrite_platform::storage::{ObjectKey, Storage, StorageError};
use ferrite_platform::{ApiError, metrics::Metrics};
use serde::Deserialize;
use uuid::Uuid;

use crate::engine::{Engine, EngineError, LocalEngine, LocalEngineConfig, ModelInfo};
use crate::metrics::EngineMetrics;
use crate::store::DeploymentRecord;

/// Why a deployment could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(
        "`name` must be 1 to 64 characters of lowercase letters, digits, `-`, `_` or `.`, \
         starting with a letter or digit"
    )]
    InvalidName,
    #[error("a deployment named `{0}` already exists")]
    NameTaken(String),
    #[error("the deployment `{0}` does not exist")]
    NotFound(String),
    #[error("the model registry has no version `{0}`")]
    VersionNotFound(String),
    #[error("the registry version is a {0}; only full models can be deployed")]
    UnsupportedKind(String),
    #[error("the adapter version `{0}` names no base model version")]
    AdapterWithoutBase(String),
    #[error("cannot ask the model registry: {0}")]
    Registry(#[source] PeerError),
    #[error("cannot copy the artifacts under {prefix}: {source}")]
    Download {
        prefix: String,
        #[source]
        source: DownloadError,
    },
    #[error("the artifacts under {0} are empty")]
    NoArtifacts(String),
    /// The version's folder is not one the engine can load (weights the config does not
    /// describe, no tokenizer, an adapter that does not fit its base): the version's fault,
    /// not the gateway's. The message names the files by their place in storage.
    #[error("the version cannot be served: {0}")]
    Unloadable(String),
    #[error(transparent)]
    Engine(#[from] Box<EngineError>),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A failure while copying artifacts to the local cache.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<DeploymentError> for ApiError {
    fn from(error: DeploymentError) -> Self {
        let message = error.to_string();
        match error {
            DeploymentError::InvalidName => {
                ApiError::invalid_request("invalid_value", message).with_param("name")
            }
            DeploymentError::NameTaken(_) => ApiError::conflict("deployment_exists", message),
            DeploymentError::NotFound(name) => ApiError::not_found("deployment", &name),
            DeploymentError::VersionNotFound(_) => ApiError::new(
                actix_web::http::StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                message,
            )
            .with_param("model"),
            DeploymentError::UnsupportedKind(_) => {
                ApiError::invalid_request("unsupported_model_kind", message).with_param("model")
            }
            DeploymentError::AdapterWithoutBase(_) => {
                ApiError::invalid_request("adapter_without_base", message).with_param("model")
            }
            DeploymentError::Registry(source) => {
                tracing::warn!(error = %source, "model registry unavailable");
                ApiError::unavailable("the model registry is unavailable; retry shortly")
            }
            DeploymentError::Download { .. } | DeploymentError::NoArtifacts(_) => {
                ApiError::internal(&error)
            }
            DeploymentError::Unloadable(_) => ApiError::new(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "model_unloadable",
                message,
            )
            .with_param("model"),
            DeploymentError::Engine(source) => ApiError::internal(source.as_ref()),
            DeploymentError::Database(source) => source.into(),
        }
    }
}

/// The model registry's answer to `GET /v1/registry/resolve/{reference}` (the fields used).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelVersion {
    pub id: Uuid,
    pub model_name: String,
    pub number: i64,
    pub kind: String,
    pub artifact_prefix: String,
    /// For an adapter, the model version it adapts.
    #[serde(default)]
    pub base_version_id: Option<Uuid>,
}

/// A deployment ready to serve.
pub struct Deployment {
    pub record: DeploymentRecord,
    pub engine: Arc<dyn Engine>,
    pub info: ModelInfo,
}

/// Where models come from and how engines are started.
#[derive(Clone)]
pub struct Loader {
    pub storage: Storage,
    pub peers: Peers,
    pub metrics: Metrics,
    /// Local copies of artifact folders, one sub-folder per version id.
    pub cache_dir: PathBuf,
    pub max_batch_sequences: usize,
}

impl Loader {
    /// Asks the model registry which version `reference` names.
    pub async fn resolve(&self, reference: &str) -> Result<ModelVersion, DeploymentError> {
        let path = format!("/v1/registry/resolve/{}", encode_segment(reference));
        match self.peers.get_json::<ModelVersion>(&path).await {
            Ok(version) => Ok(version),
            Err(error) if error.status() == Some(404) => {
                Err(DeploymentError::VersionNotFound(reference.to_owned()))
            }
            Err(error) => Err(DeploymentError::Registry(error)),
        }
    }

    /// The folders serving `version` needs: its own and, for an adapter, its base model's.
    /// Refuses what cannot be served before anything is downloaded.
    pub async fn artifacts(
        &self,
        version: &ModelVersion,
    ) -> Result<(String, Option<String>), DeploymentError> {
        match version.kind.as_str() {
            "model" => Ok((version.artifact_prefix.clone(), None)),
            "adapter" => {
                let base_id = version
                    .base_version_id
                    .ok_or_else(|| DeploymentError::AdapterWithoutBase(version.id.to_string()))?;
                let base = self.resolve(&base_id.to_string()).await?;
                if base.kind != "model" {
                    return Err(DeploymentError::UnsupportedKind(format!(
                        "adapter over a {}",
                        base.kind
                    )));
                }
                Ok((version.artifact_prefix.clone(), Some(base.artifact_prefix)))
            }
            other => Err(DeploymentError::UnsupportedKind(other.to_owned())),
        }
    }

    /// Copies the artifacts and starts an engine for `record`.
    pub async fn load(
        &self,
        record: DeploymentRecord,
        metrics: EngineMetrics,
    ) -> Result<Deployment, DeploymentError> {
        // A full model's folder is its own; an adapter's base is the model folder.
        let (model_prefix, adapter_prefix) = match &record.base_artifact_prefix {
            Some(base) => (base.as_str(), Some(record.artifact_prefix.as_str())),
            None => (record.artifact_prefix.as_str(), None),
        };
        let mut fetched = Vec::new();
        let started = self
            .start(model_prefix, adapter_prefix, metrics, &mut fetched)
            .await;
        let (engine, info) = match started {
            Ok(started) => started,
            Err(error) => {
                // A folder this load copied is of no use to anyone: the version it holds
                // does not load, and a later try downloads it afresh.
                for dir in fetched {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                }
                return Err(error);
            }
        };
        tracing::info!(
            deployment = %record.name,
            model.version_id = %record.version_id,
            "deployment loaded"
        );
        Ok(Deployment {
            record,
            engine: Arc::new(engine),
            info,
        })
    }

    /// Copies the folders and starts an engine on them, adding each folder it downloads (not
    /// those it found cached) to `fetched`.
    async fn start(
        &self,
        model_prefix: &str,
        adapter_prefix: Option<&str>,
        metrics: EngineMetrics,
        fetched: &mut Vec<PathBuf>,
    ) -> Result<(LocalEngine, ModelInfo), DeploymentError> {
        let checkpoint_dir = self.fetch(model_prefix, fetched).await?;
        let adapter_dir = match adapter_prefix {
            Some(prefix) => Some(self.fetch(prefix, fetched).await?),
            None => None,
        };
        let shown = [
            (checkpoint_dir.clone(), model_prefix),
            (
                adapter_dir.clone().unwrap_or_default(),
                adapter_prefix.unwrap_or_default(),
            ),
        ];
        LocalEngine::start(LocalEngineConfig {
            checkpoint_dir,
            adapter_dir,
            max_batch_sequences: self.max_batch_sequences,
            metrics,
        })
        .await
        .map_err(|error| match error {
            EngineError::Load { .. }
            | EngineError::NoTokenizer(_)
            | EngineError::Adapter { .. } => {
                DeploymentError::Unloadable(in_storage_terms(&error.to_string(), &shown))
            }
            other => DeploymentError::Engine(Box::new(other)),
        })
    }

    /// The local folder of the artifacts under `prefix`, downloaded unless already cached
    /// (then also added to `fetched`). Registered artifacts never change, so a prefix names
    /// its content for good.
    async fn fetch(
        &self,
        prefix: &str,
        fetched: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, DeploymentError> {
        let folder = encode_segment(prefix.trim_end_matches('/'));
        let dir = self.cache_dir.join(&folder);
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            return Ok(dir);
        }
        let failed = |source: DownloadError| DeploymentError::Download {
            prefix: prefix.to_owned(),
            source,
        };
        // Download beside the final folder and rename, so a crash never leaves a partial
        // folder that a later load would take for complete.
        let partial = self
            .cache_dir
            .join(format!("{folder}.partial-{}", Uuid::new_v4().simple()));
        let copied = copy_prefix(&self.storage, prefix, &partial).await;
        let count = match copied {
            Ok(count) => count,
            Err(error) => {
                let _ = tokio::fs::remove_dir_all(&partial).await;
                return Err(failed(error));
            }
        };
        if count == 0 {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(DeploymentError::NoArtifacts(prefix.to_owned()));
        }
        if let Err(source) = tokio::fs::rename(&partial, &dir).await {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            // Another load of the same version may have finished first; its copy is as good.
            if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
                return Err(failed(DownloadError::Io { path: dir, source }));
            }
            return Ok(dir);
        }
        fetched.push(dir.clone());
        Ok(dir)
    }
}

/// `message` with each local folder in `shown` replaced by the storage prefix it was copied
/// from: the cache's place on the gateway's disk is nobody's business, the prefix is the
/// version's.
fn in_storage_terms(message: &str, shown: &[(PathBuf, &str); 2]) -> String {
    let mut message = message.to_owned();
    for (dir, prefix) in shown {
        if !prefix.is_empty() {
            let local = dir.display().to_string();
            message = message.replace(&local, prefix.trim_end_matches('/'));
        }
    }
    message
}

/// Copies every object under `prefix` into `dir`, keeping relative paths; returns the count.
async fn copy_prefix(storage: &Storage, prefix: &str, dir: &Path) -> Result<usize, DownloadError> {
    let prefix = prefix.trim_end_matches('/');
    let key = ObjectKey::parse(prefix)?;
    let objects = storage.list(&key).await?;
    for object in &objects {
        let relative = object
            .key
            .strip_prefix(prefix)
            .unwrap_or(&object.key)
            .trim_start_matches('/');
        // Keys are validated (no `..`, not absolute), so the path stays inside `dir`.
        let path = dir.join(relative);
        let io = |source| DownloadError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        // TODO: objects are read whole into memory; a multi-gigabyte model would want
        // get_stream into the file.
        let bytes = storage.get(&ObjectKey::parse(&object.key)?).await?;
        tokio::fs::write(&path, &bytes).await.map_err(io)?;
    }
    Ok(objects.len())
}

/// Percent-encodes what a path segment cannot hold (`/`, `?`, `#`, `%`, spaces, ...).
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~:@".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A deployment name clients can type in `model`.
pub fn validate_name(name: &str) -> Result<(), DeploymentError> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(DeploymentError::InvalidName)
    }
}

/// The deployments this process serves, by name.
#[derive(Default)]
pub struct Deployments {
    serving: RwLock<HashMap<String, Arc<Deployment>>>,
    /// Metrics outlive a deployment: a name deployed again reuses its registered series.
    metrics: Mutex<HashMap<String, EngineMetrics>>,
}

impl Deployments {
    pub fn get(&self, name: &str) -> Option<Arc<Deployment>> {
        self.serving
            .read()
            .ok()
            .and_then(|serving| serving.get(name).cloned())
    }

    /// Every served deployment, by name.
    pub fn all(&self) -> Vec<Arc<Deployment>> {
        let mut all: Vec<Arc<Deployment>> = self
            .serving
            .read()
            .map(|serving| serving.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        all
    }

    pub fn insert(&self, deployment: Deployment) {
        if let Ok(mut serving) = self.serving.write() {
            serving.insert(deployment.record.name.clone(), Arc::new(deployment));
        }
    }

    /// Stops serving `name`; requests already running finish on the engine they hold.
    pub fn remove(&self, name: &str) -> Option<Arc<Deployment>> {
        self.serving
            .write()
            .ok()
            .and_then(|mut serving| serving.remove(name))
    }

    /// The metric series of `name`, registered on first use.
    pub fn metrics_for(&self, registry: &Metrics, name: &str) -> EngineMetrics {
        let Ok(mut known) = self.metrics.lock() else {
            return EngineMetrics::register(&Metrics::new(), name);
        };
        known
            .entry(name.to_owned())
            .or_insert_with(|| EngineMetrics::register(registry, name))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_words_clients_can_type() {
        for good in ["chat", "smollm2-135m", "a.b_c", "7b"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Chat", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_reference_is_encoded_as_one_path_segment() {
        assert_eq!(encode_segment("chat@prod"), "chat@prod");
        assert_eq!(encode_segment("chat:3"), "chat:3");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
