//! Upload throughput: validate + hash + store in one pass, against a plain copy into the same
//! store, in the same run.
//!
//! `cargo bench -p ferrite-dataset-registry --bench upload` reads the fetched chat and SFT
//! data (`scripts/fetch-data.sh`) when present and a generated SFT file otherwise, streams each
//! in 64 KiB chunks, and prints MB/s and rows/s of both paths and their ratio. The store is a
//! temp folder unless the `FERRITE_STORE` settings (with `FERRITE_S3_*`) name another, such as
//! an s3s-fs on loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrite_dataset_registry::domain::DatasetKind;
use ferrite_dataset_registry::ingest::{self, IngestSpec};
use ferrite_platform::Settings;
use ferrite_platform::storage::{ObjectKey, Storage};

const CHUNK_BYTES: usize = 64 * 1024;
const ROUNDS: usize = 5;

struct Input {
    label: String,
    kind: DatasetKind,
    bytes: Bytes,
}

fn inputs() -> Vec<Input> {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let mut inputs = Vec::new();
    for (path, kind) in [
        ("chat/chitchat.jsonl", DatasetKind::Chat),
        ("sft/alpaca_en_demo.json", DatasetKind::Sft),
    ] {
        if let Ok(bytes) = std::fs::read(data.join(path)) {
            inputs.push(Input {
                label: path.to_owned(),
                kind,
                bytes: Bytes::from(bytes),
            });
        }
    }
    let generated: String = (0..200_000)
        .map(|i| {
            format!(
                "{{\"instruction\": \"Add {i} and 1.\", \"output\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    inputs.push(Input {
        label: "generated sft jsonl".into(),
        kind: DatasetKind::Sft,
        bytes: Bytes::from(generated),
    });
    inputs
}

fn chunks(bytes: &Bytes) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + use<> {
    let pieces: Vec<Result<Bytes, std::io::Error>> = (0..bytes.len())
        .step_by(CHUNK_BYTES)
        .map(|start| Ok(bytes.slice(start..(start + CHUNK_BYTES).min(bytes.len()))))
        .collect();
    futures::stream::iter(pieces)
}

async fn validated(storage: &Storage, input: &Input) -> anyhow::Result<(Duration, u64)> {
    let spec = IngestSpec {
        kind: input.kind,
        format: None,
        max_line_bytes: 1 << 20,
        max_bytes: u64::MAX,
    };
    let started = Instant::now();
    let ingested = ingest::ingest(storage, spec, chunks(&input.bytes)).await?;
    let elapsed = started.elapsed();
    storage.delete(&ingested.temp_key).await?;
    Ok((elapsed, ingested.rows))
}

async fn plain(storage: &Storage, input: &Input) -> anyhow::Result<Duration> {
    let key = ObjectKey::parse("bench/plain-copy")?;
    let started = Instant::now();
    storage.put_stream(&key, chunks(&input.bytes)).await?;
    let elapsed = started.elapsed();
    storage.delete(&key).await?;
    Ok(elapsed)
}

async fn run() -> anyhow::Result<()> {
    let folder = tempfile::tempdir()?;
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("FERRITE_"))
        .collect();
    env.entry("FERRITE_STORE".to_owned())
        .or_insert_with(|| folder.path().display().to_string());
    let settings = Settings::load(None, &env)?;
    let storage = Storage::from_settings(&settings.store)?;
    println!("store: {storage:?}");

    println!(
        "{:<26} {:>9} {:>10} {:>12} {:>10} {:>8}",
        "input", "MB", "rows", "validated", "plain", "ratio"
    );
    for input in inputs() {
        // Alternate the two paths and keep each one's best, so neither gets a warmer cache.
        let mut best_validated = (Duration::MAX, 0);
        let mut best_plain = Duration::MAX;
        for _ in 0..ROUNDS {
            let (elapsed, rows) = validated(&storage, &input).await?;
            if elapsed < best_validated.0 {
                best_validated = (elapsed, rows);
            }
            best_plain = best_plain.min(plain(&storage, &input).await?);
        }
        let megabytes = input.bytes.len() as f64 / 1e6;
        let (validated_time, rows) = best_validated;
        println!(
            "{:<26} {:>9.2} {:>10} {:>7.1} MB/s {:>5.1} MB/s {:>7.2}x",
            input.label,
            megabytes,
            rows,
            megabytes / validated_time.as_secs_f64(),
            megabytes / best_plain.as_secs_f64(),
            validated_time.as_secs_f64() / best_plain.as_secs_f64(),
        );
        println!(
            "{:<26} {:>9} {:>10} {:>7.0} rows/s  (ratio: validated time / plain copy time)",
            "",
            "",
            "",
            rows as f64 / validated_time.as_secs_f64()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
