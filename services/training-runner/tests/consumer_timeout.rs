//! A job that outlives RabbitMQ's consumer timeout still finishes.
//!
//! A private broker runs with `consumer_timeout` at one second. RabbitMQ checks the timeout
//! once a minute per channel, so a control consumer that holds one delivery unacknowledged has
//! its channel closed about a minute in: that is the proof, in this very run, that the broker
//! enforces the timeout. The training job runs across that moment (its length is sized from a
//! short job measured first) and must finish in one attempt, because the runner acknowledged
//! its JobRequested as soon as the job was recorded.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use support::{RunnerApp, corpus_sample, spawn_runner};

/// Bounds a hung test; never what a test measures.
const PATIENCE: Duration = Duration::from_secs(900);

/// How long the long job should train: past the broker's first timeout check (at most a
/// minute after the control's delivery) with a wide margin for a slower machine.
const LONG_JOB: Duration = Duration::from_secs(100);

fn pretrain(steps: u64) -> serde_json::Value {
    json!({
        "kind": "pretrain", "base_model": "tok:1", "datasets": [{"reference": "corpus"}],
        "hyper_parameters": {
            "preset": "tiny", "batch_size": 2, "sequence_length": 16, "total_steps": steps,
            "warmup_steps": 2, "eval_interval": 0, "threads": 1, "checkpoint_interval": 0,
        },
        "output_model_name": "outlives-timeout",
    })
}

/// Seconds per optimizer step, from the times the loss series was written (in batches about
/// a second apart, so a long sample keeps the error small).
async fn seconds_per_step(app: &RunnerApp, id: &str) -> f64 {
    let metrics = app.get(&format!("/v1/jobs/{id}/metrics?names=loss")).await;
    let points = metrics["series"]["loss"].as_array().expect("a loss series");
    let at = |point: &serde_json::Value| -> (f64, f64) {
        let time: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(point["time"].clone()).expect("a timestamp");
        let step = point["step"].as_f64().expect("a step");
        (time.timestamp_micros() as f64 / 1e6, step)
    };
    let (first, last) = (
        at(points.first().expect("points")),
        at(points.last().expect("points")),
    );
    (last.0 - first.0) / (last.1 - first.1).max(1.0)
}

/// Holds one delivery of a queue of its own unacknowledged; resolves once the broker closes
/// the channel for it.
async fn control_consumer(url: &str) -> tokio::task::JoinHandle<()> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to the private broker");
    let channel = connection.create_channel().await.expect("a channel");
    let queue = "control.held-delivery";
    channel
        .queue_declare(queue, QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
    channel
        .basic_publish(
            "",
            queue,
            BasicPublishOptions::default(),
            b"held",
            Default::default(),
        )
        .await
        .expect("publish");
    let mut consumer = channel
        .basic_consume(
            queue,
            "control",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = consumer
        .next()
        .await
        .expect("a delivery")
        .expect("a good delivery");
    tokio::spawn(async move {
        let _held = delivery;
        let _connection = connection;
        while channel.status().connected() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

async fn prepare(app: &RunnerApp) {
    app.put("datasets/corpus-sample", corpus_sample(900_000))
        .await;
    app.registries
        .add_dataset("corpus", "text", "text", "datasets/corpus-sample");
    let id = app
        .submit(json!({
            "kind": "tokenizer", "datasets": [{"reference": "corpus"}],
            "hyper_parameters": {"vocab_size": 512},
        }))
        .await;
    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let prefix = job["artifact_prefix"].as_str().expect("an artifact");
    app.registries.add_model("tok:1", prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_consumer_timeout_finishes_in_one_attempt() {
    let mut rabbit = common::PrivateRabbit::start().await;
    rabbit.stop().await;
    let config = rabbit.dir().join("rabbitmq.conf");
    let mut text = std::fs::read_to_string(&config).expect("the node's config");
    text.push_str("consumer_timeout = 1000\n");
    std::fs::write(&config, text).expect("write the config");
    rabbit.start_again().await;

    let url = rabbit.url();
    let app = spawn_runner(&[("FERRITE_AMQP_URL", &url)]).await;
    prepare(&app).await;

    // The step rate on this machine, now: a short run of the same shape.
    let id = app.submit(pretrain(1500)).await;
    let sample = app.wait_final(&id, PATIENCE).await;
    assert_eq!(sample["state"], "succeeded", "{sample}");
    let per_step = seconds_per_step(&app, &id).await;
    let steps = (LONG_JOB.as_secs_f64() / per_step.max(1e-4)).ceil() as u64;

    let control = control_consumer(&url).await;
    let id = app.submit(pretrain(steps)).await;
    tokio::time::timeout(PATIENCE, control)
        .await
        .expect("the broker closes the control's channel within the patience")
        .expect("the control task ends cleanly");
    let during = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        during["state"], "running",
        "the job must be mid-run when the broker enforces the timeout: {during}"
    );

    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    // One consumer timed out, the control; the runner's consumer never held a delivery that
    // long.
    let log = std::fs::read_to_string(rabbit.dir().join("server.log")).expect("the node's log");
    let timeouts = log
        .lines()
        .filter(|line| line.contains("timed out waiting for delivery acknowledgement"))
        .count();
    assert_eq!(timeouts, 1, "only the control times out:\n{log}");
    app.stop().await;
}
