//! Checkpoint retention (`keep_checkpoints`) end to end: rows and objects beyond the newest N
//! are pruned as a job runs, and a retried attempt still resumes from the newest.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeSet;

use bytes::Bytes;

use ferrite_platform::storage::ObjectKey;
use reqwest::Method;
use support::jobs::{
    PATIENCE, corpus, finished_after_one_loss, first_loss_step, pretrain_spec, signal_first_worker,
    tokenizer,
};
use support::{RunnerApp, spawn_runner};

/// The step folders (`step-N`) holding objects under the job's checkpoint prefix.
async fn stored_steps(app: &RunnerApp, id: &str) -> BTreeSet<String> {
    let root = format!("jobs/{id}/checkpoints");
    let objects = app
        .storage
        .list(&ObjectKey::parse(&root).expect("a valid key"))
        .await
        .expect("the store lists");
    objects
        .iter()
        .map(|object| {
            let rest = object
                .key
                .strip_prefix(&format!("{root}/"))
                .expect("listed under the root");
            rest.split('/').next().unwrap_or(rest).to_owned()
        })
        .collect()
}

/// The steps of the job's checkpoint rows, in order.
async fn recorded_steps(app: &RunnerApp, id: &str) -> Vec<u64> {
    let checkpoints = app.get(&format!("/v1/jobs/{id}/checkpoints")).await;
    checkpoints["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect()
}

/// The job log's messages with the attempt that wrote each.
async fn log_lines(app: &RunnerApp, id: &str) -> Vec<(Option<i64>, String)> {
    let logs = app.get(&format!("/v1/jobs/{id}/logs")).await;
    logs["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|line| {
            let message = line["message"].as_str().expect("a message").to_owned();
            (line["attempt"].as_i64(), message)
        })
        .collect()
}

/// The steps named by the pruning lines of the log: `checkpoints of steps 1, 2 removed: ...`.
fn pruned_steps(lines: &[(Option<i64>, String)]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|(_, line)| line.strip_prefix("checkpoints of steps "))
        .filter_map(|rest| rest.split_once(" removed").map(|(steps, _)| steps))
        .flat_map(|steps| steps.split(", "))
        .map(|step| step.parse().expect("a step number"))
        .collect()
}

/// A tiny pretraining run of `steps` with a checkpoint every `interval`, keeping `keep`.
fn pretrain_keeping(steps: u64, interval: u64, keep: u32) -> serde_json::Value {
    let mut spec = pretrain_spec(steps, interval);
    spec["keep_checkpoints"] = keep.into();
    spec
}

fn step_folders(steps: impl IntoIterator<Item = u64>) -> BTreeSet<String> {
    steps
        .into_iter()
        .map(|step| format!("step-{step}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_keeps_only_its_newest_checkpoints_and_without_the_option_keeps_all() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    tokenizer(&app).await;

    // Both run at once (the runner's concurrency is 2). 12 steps with a checkpoint every step:
    // checkpoints at steps 1 to 11, none at 12 (the artifact is the end).
    let kept = app.submit(pretrain_keeping(12, 1, 2)).await;
    let all = app.submit(pretrain_spec(12, 1)).await;
    for id in [&kept, &all] {
        let job = app.wait_final(id, PATIENCE).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }

    // Keep 2 of 1..=11: the newest two, 10 and 11, in rows and in storage alike.
    assert_eq!(recorded_steps(&app, &kept).await, vec![10, 11]);
    assert_eq!(stored_steps(&app, &kept).await, step_folders([10, 11]));
    // From step 3 on, each checkpoint pushes out the one two below it: 3 prunes 1, ..., 11
    // prunes 9, each named in the log once.
    let lines = log_lines(&app, &kept).await;
    assert_eq!(
        pruned_steps(&lines),
        (1..=9).collect::<Vec<_>>(),
        "{lines:?}"
    );

    // Without the option every checkpoint stays, as with transformers' save_total_limit unset.
    assert_eq!(
        recorded_steps(&app, &all).await,
        (1..=11).collect::<Vec<_>>()
    );
    assert_eq!(stored_steps(&app, &all).await, step_folders(1..=11));
    assert_eq!(
        pruned_steps(&log_lines(&app, &all).await),
        Vec::<u64>::new()
    );

    // The job shows the option as submitted and as the worker reads it.
    let job = app.get(&format!("/v1/jobs/{kept}")).await;
    assert_eq!(job["spec"]["keep_checkpoints"], 2, "{job}");
    assert_eq!(job["resolved"]["keep_checkpoints"], 2, "{job}");
    let job = app.get(&format!("/v1/jobs/{all}")).await;
    assert!(job["spec"]["keep_checkpoints"].is_null(), "{job}");
    assert!(job["resolved"]["keep_checkpoints"].is_null(), "{job}");

    // The OpenAPI document is generated from JobSpec, so the field and its floor appear there.
    let (status, openapi) = app.call(Method::GET, "/openapi.json", None).await;
    assert_eq!(status, 200, "{openapi}");
    let field = &openapi["components"]["schemas"]["JobSpec"]["properties"]["keep_checkpoints"];
    assert_eq!(field["minimum"], 1, "{field}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_keeping_one_checkpoint_resumes_from_the_newest() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    tokenizer(&app).await;

    let (id, _) = signal_first_worker(&app, pretrain_keeping(400, 4, 1), "-KILL").await;
    // What a kill mid-upload, or between a pruning commit and its deletion, leaves: objects in
    // a step folder no row points at (step 3 is no multiple of 4, so no attempt writes it).
    let orphan = ObjectKey::parse(&format!("jobs/{id}/checkpoints/step-3/model.safetensors"))
        .expect("a valid key");
    app.storage
        .put(&orphan, Bytes::from_static(b"left by the killed worker"))
        .await
        .expect("plant the orphan");
    let job = finished_after_one_loss(&app, &id).await;
    let attempts = job["attempts"].as_array().expect("attempts");
    // The killed worker could not remove its scratch folder (its base, its datasets); the
    // runner did, once it saw the worker gone. The second attempt removed its own.
    for attempt in [1, 2] {
        let folder = app.scratch.join(format!("ferrite-job-{id}-{attempt}"));
        assert!(!folder.exists(), "{} is left behind", folder.display());
    }

    // The second attempt's own checkpoints pruned the first's rows, so the log says which
    // step the first attempt recorded last.
    let lines = log_lines(&app, &id).await;
    let last_of_first = lines
        .iter()
        .filter(|(attempt, _)| *attempt == Some(1))
        .filter_map(|(_, line)| line.strip_prefix("checkpoint of step "))
        .filter_map(|rest| rest.split_once(' ')?.0.parse::<i64>().ok())
        .max()
        .expect("the first attempt checkpointed");
    assert_eq!(
        attempts[1]["resumed_from_step"].as_i64(),
        Some(last_of_first),
        "{lines:?}"
    );
    // Its first loss is the step after that checkpoint.
    assert_eq!(first_loss_step(&app, &id, 2).await, Some(last_of_first + 1));

    // Checkpoints at the multiples of 4 below 400; keeping one leaves the newest, 396, and its
    // objects, and nothing else: each checkpoint of the second attempt deletes every older step
    // folder without a row, the planted one and any the kill itself left.
    assert_eq!(recorded_steps(&app, &id).await, vec![396]);
    assert_eq!(stored_steps(&app, &id).await, step_folders([396]));
    app.stop().await;
}
