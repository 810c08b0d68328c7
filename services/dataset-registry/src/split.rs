//! Train/eval splits: an exact share of rows, chosen by a seed, written as two derived versions.
//!
//! Row `i` goes to eval when its key, the first 8 bytes of `sha256(seed || i)` (both
//! little-endian u64), is among the `round(rows * eval_fraction)` smallest. The choice depends
//! only on the seed and the row count, so a split is reproducible anywhere, and splitting the
//! same version with the same seed again returns the same two versions.

use bytes::Bytes;
use ferrite_platform::storage::StorageError;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::content::{self, StoredContent};
use crate::domain::{DataFormat, DatasetName};
use crate::error::RegistryError;
use crate::ingest::{self, IngestSpec};
use crate::register::{self, Provenance, Registration};
use crate::routes::State;
use crate::scan::{Problem, RecordSink};
use crate::store::DatasetVersion;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct SplitRequest {
    /// Share of rows for eval, strictly between 0 and 1.
    pub eval_fraction: f64,
    pub seed: u64,
    /// Dataset for the train rows; `<name>-train` by default.
    pub train_name: Option<String>,
    /// Dataset for the eval rows; `<name>-eval` by default.
    pub eval_name: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SplitResult {
    pub train: DatasetVersion,
    pub eval: DatasetVersion,
}

/// Which rows go to eval: exactly `eval_rows` of `rows`, chosen by `seed`.
pub fn eval_rows(rows: u64, eval_rows: u64, seed: u64) -> Vec<bool> {
    let mut keys: Vec<(u64, u64)> = (0..rows).map(|i| (row_key(seed, i), i)).collect();
    keys.sort_unstable();
    let mut chosen = vec![false; usize::try_from(rows).unwrap_or(usize::MAX)];
    for (_, i) in keys
        .into_iter()
        .take(usize::try_from(eval_rows).unwrap_or(usize::MAX))
    {
        chosen[i as usize] = true;
    }
    chosen
}

fn row_key(seed: u64, row: u64) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(row.to_le_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

pub async fn split(
    state: &State,
    source: &DatasetVersion,
    request: &SplitRequest,
    requested_by: &str,
) -> Result<SplitResult, RegistryError> {
    let invalid = |field, message: String| RegistryError::Invalid { field, message };
    if !(request.eval_fraction > 0.0 && request.eval_fraction < 1.0) {
        return Err(invalid(
            "eval_fraction",
            "eval_fraction must be strictly between 0 and 1".into(),
        ));
    }
    let rows = u64::try_from(source.rows).unwrap_or(0);
    let eval_count = (rows as f64 * request.eval_fraction).round() as u64;
    if eval_count == 0 || eval_count >= rows {
        return Err(invalid(
            "eval_fraction",
            format!(
                "{} of {rows} rows leaves one side empty",
                request.eval_fraction
            ),
        ));
    }
    let train_name = DatasetName::parse(
        request
            .train_name
            .as_deref()
            .unwrap_or(&format!("{}-train", source.dataset_name)),
    )?;
    let eval_name = DatasetName::parse(
        request
            .eval_name
            .as_deref()
            .unwrap_or(&format!("{}-eval", source.dataset_name)),
    )?;
    let chosen = std::sync::Arc::new(eval_rows(rows, eval_count, request.seed));
    let mut parts = Vec::new();
    for (name, eval) in [(train_name, false), (eval_name, true)] {
        let part = Part {
            chosen: chosen.clone(),
            eval,
        };
        parts.push(write_part(state, source, request, requested_by, &name, part).await?);
    }
    let eval = parts.pop();
    let train = parts.pop();
    match (train, eval) {
        (Some(train), Some(eval)) => Ok(SplitResult { train, eval }),
        _ => Err(invalid(
            "eval_fraction",
            "the split produced no parts".into(),
        )),
    }
}

/// One side of a split.
#[derive(Clone)]
struct Part {
    chosen: std::sync::Arc<Vec<bool>>,
    eval: bool,
}

async fn write_part(
    state: &State,
    source: &DatasetVersion,
    request: &SplitRequest,
    requested_by: &str,
    name: &DatasetName,
    part: Part,
) -> Result<DatasetVersion, RegistryError> {
    let content = content::open(state, source).await?;
    let kind = content.kind;
    let format = match content.format {
        DataFormat::Text => DataFormat::Text,
        DataFormat::Json | DataFormat::Jsonl => DataFormat::Jsonl,
    };
    let spec = IngestSpec {
        kind,
        format: Some(format),
        max_line_bytes: state.limits.max_line_bytes,
        max_bytes: state.limits.max_upload_bytes,
    };
    let side = if part.eval { "eval" } else { "train" };
    let ingested = ingest::ingest(&state.storage, spec, part_stream(content, part)).await?;
    let provenance = Provenance {
        created_by: requested_by.to_owned(),
        derived_from: Some(source.id),
        derivation: Some(serde_json::json!({
            "split": side,
            "eval_fraction": request.eval_fraction,
            "seed": request.seed,
        })),
        campaign_id: None,
    };
    let registered = register::register(Registration {
        pool: &state.pool,
        storage: &state.storage,
        name,
        kind,
        ingested: &ingested,
        provenance: &provenance,
    })
    .await?;
    Ok(registered.version)
}

/// The rows of one part, one per line (JSON array elements rewritten compactly).
fn part_stream(
    content: StoredContent,
    part: Part,
) -> impl Stream<Item = Result<Bytes, StorageError>> {
    let selector = Selector {
        part,
        row: 0,
        json: content.format == DataFormat::Json,
        out: Vec::new(),
    };
    futures::stream::unfold(Some((content, selector)), |state| async move {
        let (mut content, mut selector) = state?;
        match content.chunks.next().await {
            Some(Ok(chunk)) => {
                content.scanner.push(&chunk, &mut selector);
                let out = Bytes::from(std::mem::take(&mut selector.out));
                Some((Ok(out), Some((content, selector))))
            }
            Some(Err(e)) => Some((Err(e), None)),
            None => {
                content.scanner.finish(&mut selector);
                Some((Ok(Bytes::from(selector.out)), None))
            }
        }
    })
}

struct Selector {
    part: Part,
    row: usize,
    json: bool,
    out: Vec<u8>,
}

impl RecordSink for Selector {
    fn record(&mut self, _line: u64, bytes: &[u8]) {
        let row = self.row;
        self.row += 1;
        if self.part.chosen.get(row).copied().unwrap_or(false) != self.part.eval {
            return;
        }
        let compact = self
            .json
            .then(|| serde_json::from_slice::<serde_json::Value>(bytes).ok())
            .flatten()
            .and_then(|value| serde_json::to_vec(&value).ok());
        self.out
            .extend_from_slice(compact.as_deref().unwrap_or(bytes));
        self.out.push(b'\n');
    }

    // A stored version was valid when it was uploaded; a problem here would show up as a
    // different row count in the parts, which their validation reports.
    fn problem(&mut self, _problem: Problem) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_picks_exactly_the_asked_number_of_rows_and_the_same_ones_again() {
        let first = eval_rows(1000, 100, 7);
        assert_eq!(first.iter().filter(|e| **e).count(), 100);
        assert_eq!(first, eval_rows(1000, 100, 7));
        assert_ne!(
            first,
            eval_rows(1000, 100, 8),
            "another seed, another choice"
        );
    }
}
