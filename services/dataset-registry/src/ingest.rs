//! Streams a body into storage while validating and hashing it, in one pass.
//!
//! The body goes up in parts under a temporary key (`uploads/<uuid>`); nothing is held but
//! the record being parsed. When the body is too large, unreadable or invalid, the stream
//! handed to storage fails, so the multipart upload is aborted and no object remains.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use ferrite_platform::storage::{ObjectKey, Storage, StorageError};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::domain::stats::LengthStats;
use crate::domain::{DataFormat, DatasetKind};
use crate::scan::Scanner;
use crate::validate::{Report, Validator};

/// What an ingest checks against.
#[derive(Debug, Clone, Copy)]
pub struct IngestSpec {
    pub kind: DatasetKind,
    /// `None`: `json` if the body starts with `[`, else `jsonl` (text kinds always give one).
    pub format: Option<DataFormat>,
    pub max_line_bytes: usize,
    pub max_bytes: u64,
}

/// A validated body, stored under `temp_key` until it is registered.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub temp_key: ObjectKey,
    pub sha256: String,
    pub format: DataFormat,
    pub bytes: u64,
    pub rows: u64,
    pub stats: LengthStats,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the upload is larger than the limit of {limit} bytes (after decompression)")]
    TooLarge { limit: u64 },
    #[error("the upload has {} problem(s)", .0.total)]
    Invalid(Report),
    #[error("the request body could not be read: {0}")]
    Body(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why the stream given to storage stopped early.
enum Stop {
    TooLarge,
    Body(String),
    Invalid(Report),
}

struct Progress {
    spec: IngestSpec,
    hasher: Sha256,
    bytes: u64,
    scanner: Scanner,
    validator: Option<Validator>,
    result: Option<(u64, LengthStats)>,
    stop: Option<Stop>,
}

impl Progress {
    fn chunk<E: std::fmt::Display>(
        &mut self,
        chunk: Result<Bytes, E>,
    ) -> Result<Bytes, std::io::Error> {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => return Err(self.halt(Stop::Body(e.to_string()))),
        };
        self.bytes += chunk.len() as u64;
        if self.bytes > self.spec.max_bytes {
            return Err(self.halt(Stop::TooLarge));
        }
        self.hasher.update(&chunk);
        if let Some(validator) = self.validator.as_mut() {
            self.scanner.push(&chunk, validator);
        }
        Ok(chunk)
    }

    /// Called once the body has ended: an error here aborts the upload.
    fn end(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        let mut validator = self.validator.take()?;
        self.scanner.finish(&mut validator);
        match validator.finish() {
            Ok(result) => {
                self.result = Some(result);
                None
            }
            Err(report) => Some(Err(self.halt(Stop::Invalid(report)))),
        }
    }

    fn halt(&mut self, stop: Stop) -> std::io::Error {
        self.stop = Some(stop);
        std::io::Error::other("the upload was stopped")
    }
}

/// Validates, hashes and stores `body` under a fresh temporary key.
#[tracing::instrument(skip_all, fields(dataset.kind = spec.kind.as_str()))]
pub async fn ingest<S, E>(
    storage: &Storage,
    spec: IngestSpec,
    body: S,
) -> Result<Ingested, IngestError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let temp_key = ObjectKey::parse(&format!("uploads/{}", uuid::Uuid::now_v7()))?;
    let progress = Rc::new(RefCell::new(Progress {
        spec,
        hasher: Sha256::new(),
        bytes: 0,
        scanner: Scanner::new(spec.format, spec.max_line_bytes),
        validator: Some(Validator::new(spec.kind)),
        result: None,
        stop: None,
    }));
    let feeding = progress.clone();
    let ending = progress.clone();
    let checked = body
        .map(move |chunk| feeding.borrow_mut().chunk(chunk))
        .chain(futures::stream::poll_fn(move |_| {
            std::task::Poll::Ready(ending.borrow_mut().end())
        }));
    let stored = storage.put_stream(&temp_key, checked).await;

    let (stop, result) = {
        let mut progress = progress.borrow_mut();
        (progress.stop.take(), progress.result.take())
    };
    if let Err(e) = stored {
        // An aborted multipart upload leaves nothing; the delete covers stores that finished
        // a part-less upload before failing.
        if let Err(cleanup) = storage.delete(&temp_key).await {
            tracing::warn!(object.key = %temp_key, error = %cleanup, "cannot remove a failed upload");
        }
        return Err(match stop {
            Some(Stop::TooLarge) => IngestError::TooLarge {
                limit: spec.max_bytes,
            },
            Some(Stop::Body(message)) => IngestError::Body(message),
            Some(Stop::Invalid(report)) => IngestError::Invalid(report),
            None => IngestError::Storage(e),
        });
    }
    let (rows, stats) =
        result.ok_or_else(|| IngestError::Body("the body ended before validation ended".into()))?;
    let mut progress = progress.borrow_mut();
    let sha256 = hex::encode(std::mem::take(&mut progress.hasher).finalize());
    Ok(Ingested {
        temp_key,
        sha256,
        format: progress.scanner.format(),
        bytes: progress.bytes,
        rows,
        stats,
    })
}
