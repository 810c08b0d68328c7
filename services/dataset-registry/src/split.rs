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

/// Which rows go to eval: exactly `eval_rows` of `rows`, those with the smallest
/// `(key, row)` pairs, told apart from the rest by the largest chosen pair.
///
/// Finding that pair keeps no per-row state: a first pass counts keys by their top 16 bits, a
/// second collects only the keys in the bucket where the cut falls (about `rows / 65536`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalCut {
    seed: u64,
    last: (u64, u64),
}

const CUT_BUCKET_SHIFT: u32 = 48;

impl EvalCut {
    /// `None` when `eval_rows` is 0 or more than `rows`.
    pub fn new(rows: u64, eval_rows: u64, seed: u64) -> Option<Self> {
        if eval_rows == 0 || eval_rows > rows {
            return None;
        }
        let mut counts = vec![0u64; 1 << (64 - CUT_BUCKET_SHIFT)];
        for row in 0..rows {
            counts[(row_key(seed, row) >> CUT_BUCKET_SHIFT) as usize] += 1;
        }
        let mut below = 0u64;
        let mut bucket = 0u64;
        for (index, count) in counts.iter().enumerate() {
            if below + count >= eval_rows {
                bucket = index as u64;
                break;
            }
            below += count;
        }
        let mut inside: Vec<(u64, u64)> = (0..rows)
            .map(|row| (row_key(seed, row), row))
            .filter(|(key, _)| key >> CUT_BUCKET_SHIFT == bucket)
            .collect();
        inside.sort_unstable();
        let last = *inside.get(usize::try_from(eval_rows - below - 1).ok()?)?;
        Some(Self { seed, last })
    }

    pub fn is_eval(&self, row: u64) -> bool {
        (row_key(self.seed, row), row) <= self.last
    }
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
    check_part_names(&source.dataset_name, &train_name, &eval_name)?;
    let cut = EvalCut::new(rows, eval_count, request.seed).ok_or_else(|| {
        invalid(
            "eval_fraction",
            format!("{eval_count} eval rows cannot be chosen from {rows}"),
        )
    })?;
    let mut parts = Vec::new();
    for (name, eval) in [(train_name, false), (eval_name, true)] {
        let part = Part { cut, eval };
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

/// The two parts need datasets of their own: writing both into one, or into the source,
/// would make that dataset's latest version one half and hide the other.
fn check_part_names(
    source: &str,
    train: &DatasetName,
    eval: &DatasetName,
) -> Result<(), RegistryError> {
    let invalid = |field, message: String| Err(RegistryError::Invalid { field, message });
    for (field, name) in [("train_name", train), ("eval_name", eval)] {
        if name.as_str() == source {
            return invalid(
                field,
                format!("{field} `{name}` is the dataset being split; name another dataset"),
            );
        }
    }
    if train == eval {
        return invalid(
            "eval_name",
            format!("eval_name `{eval}` is also train_name; the parts need two datasets"),
        );
    }
    Ok(())
}

/// One side of a split.
#[derive(Clone, Copy)]
struct Part {
    cut: EvalCut,
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
    row: u64,
    json: bool,
    out: Vec<u8>,
}

impl RecordSink for Selector {
    fn record(&mut self, _line: u64, bytes: &[u8]) {
        let row = self.row;
        self.row += 1;
        if self.part.cut.is_eval(row) != self.part.eval {
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

    /// The reference: sort every `(key, row)` pair and take the first `eval_rows`.
    fn chosen_by_sorting(rows: u64, eval_rows: u64, seed: u64) -> Vec<bool> {
        let mut keys: Vec<(u64, u64)> = (0..rows).map(|i| (row_key(seed, i), i)).collect();
        keys.sort_unstable();
        let mut chosen = vec![false; rows as usize];
        for (_, i) in keys.into_iter().take(eval_rows as usize) {
            chosen[i as usize] = true;
        }
        chosen
    }

    fn chosen_by_cut(rows: u64, eval_rows: u64, seed: u64) -> Vec<bool> {
        let cut = EvalCut::new(rows, eval_rows, seed).expect("a cut");
        (0..rows).map(|row| cut.is_eval(row)).collect()
    }

    #[test]
    fn a_seed_picks_exactly_the_asked_number_of_rows_and_the_same_ones_again() {
        let first = chosen_by_cut(1000, 100, 7);
        assert_eq!(first.iter().filter(|e| **e).count(), 100);
        assert_eq!(first, chosen_by_cut(1000, 100, 7));
        assert_ne!(
            first,
            chosen_by_cut(1000, 100, 8),
            "another seed, another choice"
        );
    }

    #[test]
    fn the_cut_chooses_the_rows_a_full_sort_chooses() {
        // The cut replaced sorting all keys; splits made before must stay the same.
        for (rows, eval, seed) in [(1000, 100, 7), (10, 1, 3), (10, 9, 3), (5000, 2500, 42)] {
            assert_eq!(
                chosen_by_cut(rows, eval, seed),
                chosen_by_sorting(rows, eval, seed),
                "{rows} rows, {eval} eval, seed {seed}"
            );
        }
    }

    #[test]
    fn no_cut_for_an_empty_or_overfull_side() {
        assert_eq!(EvalCut::new(10, 0, 1), None);
        assert_eq!(EvalCut::new(10, 11, 1), None);
    }
}
