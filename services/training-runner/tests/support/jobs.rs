//! The jobs the end-to-end tests run: a corpus sample, a tokenizer trained on it, tiny
//! pretraining runs on that tokenizer, and a worker interrupted mid-run.

use std::time::Duration;

use serde_json::json;

use super::{RunnerApp, corpus_sample};

/// Bounds a hung test; never what a test measures.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// Enough text for a held-out block: pretraining holds out every 50th block of 4,096 tokens.
const CORPUS_BYTES: usize = 900_000;

/// Puts a corpus sample in the store and registers it as the text dataset `corpus`.
pub async fn corpus(app: &RunnerApp) -> String {
    app.put("datasets/corpus-sample", corpus_sample(CORPUS_BYTES))
        .await;
    app.registries
        .add_dataset("corpus", "text", "text", "datasets/corpus-sample")
}

pub fn tokenizer_spec() -> serde_json::Value {
    json!({
        "kind": "tokenizer",
        "datasets": [{"reference": "corpus"}],
        "hyper_parameters": {"vocab_size": 512},
        "output_model_name": "test-tokenizer",
    })
}

/// A tiny pretraining run: one thread, short windows, a checkpoint every `interval` steps.
pub fn pretrain_spec(steps: u64, interval: u64) -> serde_json::Value {
    json!({
        "kind": "pretrain",
        "base_model": "tok:1",
        "datasets": [{"reference": "corpus"}],
        "hyper_parameters": {
            "preset": "tiny", "batch_size": 4, "sequence_length": 32, "total_steps": steps,
            "warmup_steps": 2, "eval_interval": 10, "eval_windows": 4, "threads": 1,
            "checkpoint_interval": interval,
        },
        "output_model_name": "tiny-lm",
    })
}

/// Runs a tokenizer job and registers its output as the model version `tok:1`.
pub async fn tokenizer(app: &RunnerApp) -> (String, String) {
    let id = app.submit(tokenizer_spec()).await;
    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let prefix = job["artifact_prefix"]
        .as_str()
        .expect("an artifact")
        .to_owned();
    let version = app.registries.add_model("tok:1", &prefix);
    (id, version)
}

/// Submits `spec`, a job that checkpoints, and, once its first worker has written a checkpoint
/// and while the job still runs, sends that worker `signal`. Returns the job id and the
/// worker's pid.
pub async fn signal_first_worker(
    app: &RunnerApp,
    spec: serde_json::Value,
    signal: &str,
) -> (String, i64) {
    let id = app.submit(spec).await;
    let path = format!("/v1/jobs/{id}");
    let waited = tokio::time::timeout(PATIENCE, async {
        loop {
            let checkpoints = app.get(&format!("{path}/checkpoints")).await;
            let job = app.get(&path).await;
            let pid = job["attempts"][0]["worker_pid"].as_i64().unwrap_or(0);
            if !checkpoints["data"].as_array().expect("a list").is_empty() && pid > 0 {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let pid = waited.expect("a first checkpoint within the patience");
    // The signal must interrupt training, not a finished job.
    let before = app.get(&path).await;
    assert_eq!(before["state"], "running", "{before}");
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
    (id, pid)
}

/// SIGKILLs the first worker of `spec` after its first checkpoint and waits for the job to
/// succeed in a second attempt; returns the job id and the finished job.
pub async fn killed_once(app: &RunnerApp, spec: serde_json::Value) -> (String, serde_json::Value) {
    let (id, _) = signal_first_worker(app, spec, "-KILL").await;
    let job = finished_after_one_loss(app, &id).await;
    (id, job)
}

/// Waits for job `id`, whose first worker was killed, to succeed in a second attempt; returns
/// the finished job.
pub async fn finished_after_one_loss(app: &RunnerApp, id: &str) -> serde_json::Value {
    let job = app.wait_final(id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let states: Vec<&str> = job["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|attempt| attempt["state"].as_str())
        .collect();
    assert_eq!(states, ["lost", "succeeded"], "{job}");
    job
}

/// The first step at which attempt `attempt` of job `id` measured a loss.
pub async fn first_loss_step(app: &RunnerApp, id: &str, attempt: i64) -> Option<i64> {
    let metrics = app.get(&format!("/v1/jobs/{id}/metrics?names=loss")).await;
    metrics["series"]["loss"]
        .as_array()
        .expect("a loss series")
        .iter()
        .filter(|point| point["attempt"] == attempt)
        .filter_map(|point| point["step"].as_i64())
        .min()
}
