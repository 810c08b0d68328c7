//! The whole chain with the real registries: datasets uploaded to the dataset registry, jobs
//! through the runner, outputs registered by the model registry from JobFinished, and the
//! lineage of the final model from one call.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use support::{Peers, RunnerApp, corpus_sample, spawn_runner_with};

/// Bounds a hung test; never what a test measures.
const PATIENCE: Duration = Duration::from_secs(600);

/// Uploads `body` as the next version of dataset `name`; returns the version id.
async fn upload(app: &RunnerApp, name: &str, kind: &str, body: Vec<u8>) -> String {
    let response = app
        .app
        .client
        .post(
            app.app
                .url(&format!("/v1/datasets/{name}/versions?kind={kind}")),
        )
        .bearer_auth(common::app::ADMIN_TOKEN)
        .body(body)
        .send()
        .await
        .expect("the registry answers");
    let status = response.status();
    let version: serde_json::Value = response.json().await.expect("a JSON version");
    assert_eq!(status, 201, "upload of {name}: {version}");
    version["id"].as_str().expect("a version id").to_owned()
}

/// Alpaca records `range` of the bundled demo file, as a JSON array.
fn alpaca(range: std::ops::Range<usize>) -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/sft/alpaca_en_demo.json"
    );
    let text = std::fs::read_to_string(path).expect("data/sft/alpaca_en_demo.json is fetched");
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON array");
    serde_json::to_vec(&records[range]).expect("serialises")
}

/// Runs a job to success and returns the model registry's version of its output, once the
/// JobFinished consumer has registered it.
async fn registered_output(
    app: &RunnerApp,
    spec: serde_json::Value,
) -> (String, serde_json::Value) {
    let name = spec["output_model_name"]
        .as_str()
        .expect("the spec names its output")
        .to_owned();
    let id = app.submit(spec).await;
    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let path = format!("/v1/registry/resolve/{name}");
    common::eventually(PATIENCE, "the output to be registered", || async {
        app.call(Method::GET, &path, None).await.0 == 200
    })
    .await;
    (id, app.get(&path).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sft_job_registers_its_model_with_lineage_to_both_datasets_and_the_base() {
    let app = spawn_runner_with(Peers::Real, &[]).await;
    upload(&app, "corpus", "text", corpus_sample(900_000)).await;
    let train = upload(&app, "alpaca-train", "sft", alpaca(0..48)).await;
    let eval = upload(&app, "alpaca-eval", "sft", alpaca(48..64)).await;

    let (_, tokenizer) = registered_output(
        &app,
        json!({
            "kind": "tokenizer", "datasets": [{"reference": "corpus:1"}],
            "hyper_parameters": {"vocab_size": 512}, "output_model_name": "tok",
        }),
    )
    .await;
    let (_, base) = registered_output(
        &app,
        json!({
            "kind": "pretrain", "base_model": "tok", "datasets": [{"reference": "corpus"}],
            "hyper_parameters": {
                "preset": "tiny", "batch_size": 4, "sequence_length": 32, "total_steps": 6,
                "warmup_steps": 2, "eval_interval": 3, "eval_windows": 2, "threads": 1,
                "checkpoint_interval": 0,
            },
            "output_model_name": "tiny-base",
        }),
    )
    .await;
    assert_eq!(base["parent_version_id"], tokenizer["id"]);

    let (sft_job, sft) = registered_output(
        &app,
        json!({
            "kind": "sft", "base_model": "tiny-base:1",
            "datasets": [
                {"reference": "alpaca-train"},
                {"reference": "alpaca-eval:1", "role": "eval"},
            ],
            "hyper_parameters": {
                "batch_size": 4, "max_length": 64, "total_steps": 6, "warmup_steps": 1,
                "eval_interval": 3, "checkpoint_interval": 3, "threads": 1,
            },
            "output_model_name": "tiny-sft",
        }),
    )
    .await;
    assert_eq!(sft["source_job_id"], sft_job);

    let lineage = app
        .get(&format!(
            "/v1/registry/versions/{}/lineage",
            sft["id"].as_str().expect("id")
        ))
        .await;
    let chain = lineage["chain"].as_array().expect("a chain");
    let ids: Vec<&str> = chain
        .iter()
        .filter_map(|step| step["version"]["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![
            sft["id"].as_str().expect("id"),
            base["id"].as_str().expect("id"),
            tokenizer["id"].as_str().expect("id"),
        ],
        "the SFT model, its base, the base's tokenizer: {lineage}"
    );
    let mut datasets: Vec<&str> = chain[0]["datasets"]
        .as_array()
        .expect("datasets")
        .iter()
        .filter_map(|dataset| dataset["id"].as_str())
        .collect();
    datasets.sort_unstable();
    let mut expected = vec![train.as_str(), eval.as_str()];
    expected.sort_unstable();
    assert_eq!(datasets, expected, "{lineage}");
    assert_eq!(chain[0]["source_job_id"], sft_job);
    app.stop().await;
}
