//! Token counts of a version under the tokenizer of a registered model version.
//!
//! The model is resolved through the model registry's REST API, its `tokenizer.json` and
//! `tokenizer_config.json` are read from its artifact prefix, and every row's texts (joined
//! by newlines, without special tokens) are counted off the async workers in batches.

use std::path::Path;
use std::sync::Arc;

use ferrite_model::tokenizer::{Tokenizer, TokenizerError};
use ferrite_platform::storage::ObjectKey;
use futures::StreamExt;
use serde::Deserialize;
use uuid::Uuid;

use crate::content;
use crate::domain::DatasetKind;
use crate::domain::stats::LengthHistogram;
use crate::error::RegistryError;
use crate::routes::State;
use crate::scan::{Problem, RecordSink};
use crate::store::{self, DatasetVersion, TokenStats};
use crate::validate::row_texts;

/// Rows tokenized per blocking task.
const BATCH_ROWS: usize = 512;

/// The part of the model registry's ModelVersion this needs.
#[derive(Debug, Deserialize)]
struct ModelVersion {
    id: Uuid,
    artifact_prefix: String,
}

pub async fn count(
    state: &State,
    version: &DatasetVersion,
    reference: &str,
) -> Result<TokenStats, RegistryError> {
    // URLs resolve `.` and `..` segments even percent-encoded, so those never leave here.
    if reference.is_empty() || reference.chars().all(|c| c == '.') {
        return Err(RegistryError::Tokenizer {
            reference: reference.to_owned(),
            message: "it is not a model reference".into(),
        });
    }
    let path = format!("/v1/registry/resolve/{}", path_segment(reference));
    let model: ModelVersion = state.peers.get_json(&path).await?;
    let tokenizer = Arc::new(load_tokenizer(state, reference, &model.artifact_prefix).await?);

    let mut content = content::open(state, version).await?;
    let mut rows = RowTexts {
        kind: content.kind,
        batch: Vec::new(),
    };
    let mut counts = LengthHistogram::new();
    while let Some(chunk) = content.chunks.next().await {
        content.scanner.push(&chunk?, &mut rows);
        if rows.batch.len() >= BATCH_ROWS {
            for count in tokenize(&tokenizer, std::mem::take(&mut rows.batch)).await? {
                counts.add(count);
            }
        }
    }
    content.scanner.finish(&mut rows);
    for count in tokenize(&tokenizer, std::mem::take(&mut rows.batch)).await? {
        counts.add(count);
    }

    let stats = counts.stats();
    let stats = serde_json::to_value(stats).map_err(|e| RegistryError::Internal {
        context: "cannot encode token statistics",
        source: Box::new(e),
    })?;
    Ok(store::save_token_stats(&state.pool, version.id, model.id, reference, stats).await?)
}

async fn load_tokenizer(
    state: &State,
    reference: &str,
    prefix: &str,
) -> Result<Tokenizer, RegistryError> {
    let unusable = |message: String| RegistryError::Tokenizer {
        reference: reference.to_owned(),
        message,
    };
    let prefix = ObjectKey::parse(prefix.trim_end_matches('/'))?;
    let dir = tempfile::tempdir().map_err(|e| RegistryError::Internal {
        context: "cannot create a folder for the tokenizer",
        source: Box::new(e),
    })?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let bytes = match state.storage.get(&prefix.join(file)?).await {
            Ok(bytes) => bytes,
            Err(ferrite_platform::storage::StorageError::NotFound(key)) => {
                return Err(unusable(format!("its artifacts have no {file} (`{key}`)")));
            }
            Err(e) => return Err(e.into()),
        };
        tokio::fs::write(dir.path().join(file), &bytes)
            .await
            .map_err(|e| RegistryError::Internal {
                context: "cannot write the tokenizer to a temporary folder",
                source: Box::new(e),
            })?;
    }
    let path = dir.path().to_owned();
    let loaded = tokio::task::spawn_blocking(move || Tokenizer::load(path))
        .await
        .map_err(|e| RegistryError::Internal {
            context: "the tokenizer loading task failed",
            source: Box::new(e),
        })?;
    loaded.map_err(|error| unusable(stored_file_error(error, &prefix)))
}

/// What is wrong with the model's tokenizer, naming a file by its key in storage: the
/// temporary folder it was loaded from means nothing to the caller.
fn stored_file_error(error: TokenizerError, prefix: &ObjectKey) -> String {
    let stored = |path: &Path| match path.file_name().and_then(|name| name.to_str()) {
        Some(name) => format!("{prefix}/{name}"),
        None => "a tokenizer file".to_owned(),
    };
    match error {
        TokenizerError::InvalidFile { path, reason } => format!("`{}`: {reason}", stored(&path)),
        TokenizerError::Io { path, source } => format!("cannot read `{}`: {source}", stored(&path)),
        other => other.to_string(),
    }
}

async fn tokenize(
    tokenizer: &Arc<Tokenizer>,
    texts: Vec<String>,
) -> Result<Vec<u64>, RegistryError> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    let tokenizer = tokenizer.clone();
    let counted = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|text| tokenizer.encode(text, false).map(|ids| ids.len() as u64))
            .collect::<Result<Vec<u64>, _>>()
    })
    .await
    .map_err(|e| RegistryError::Internal {
        context: "the tokenizing task failed",
        source: Box::new(e),
    })?;
    counted.map_err(|e| RegistryError::Internal {
        context: "cannot tokenize a row",
        source: Box::new(e),
    })
}

/// `reference` as one path segment: every byte outside the characters references use is
/// percent-encoded, so a reference cannot reach another path of the peer API.
fn path_segment(reference: &str) -> String {
    reference
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b':' | b'@' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Collects each row's texts, joined by newlines.
struct RowTexts {
    kind: DatasetKind,
    batch: Vec<String>,
}

impl RecordSink for RowTexts {
    fn record(&mut self, _line: u64, bytes: &[u8]) {
        // Stored rows were valid at upload; a row that no longer parses counts as empty.
        let texts = row_texts(self.kind, bytes).unwrap_or_default();
        self.batch.push(texts.join("\n"));
    }

    fn problem(&mut self, _problem: Problem) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_stays_one_path_segment() {
        assert_eq!(path_segment("smol@champion"), "smol@champion");
        assert_eq!(path_segment("smol:2"), "smol:2");
        assert_eq!(path_segment("../../v1/jobs?x"), "..%2F..%2Fv1%2Fjobs%3Fx");
    }
}
