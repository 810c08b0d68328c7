//! Jobs end to end against real Postgres, RabbitMQ and s3s-fs, with real worker processes.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use ferrite_proto::JobOutcome;
use reqwest::Method;
use serde_json::json;
use support::jobs::{
    PATIENCE, corpus, first_loss_step, killed_once, pretrain_spec, signal_first_worker, tokenizer,
    tokenizer_spec,
};
use support::spawn_runner;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_through_the_queue_and_publish_their_lineage() {
    let app = spawn_runner(&[]).await;
    let dataset_version = corpus(&app).await;

    let (tokenizer_job, tokenizer_version) = tokenizer(&app).await;
    let objects = app
        .storage
        .list(
            &ferrite_platform::storage::ObjectKey::parse(&format!("jobs/{tokenizer_job}/output"))
                .expect("key"),
        )
        .await
        .expect("lists");
    assert!(
        objects.iter().any(|o| o.key.ends_with("/tokenizer.json")),
        "the tokenizer's artifact is in storage: {objects:?}"
    );

    // 12 steps with a checkpoint every 5: checkpoints at 5 and 10, none at the end (the
    // artifact is the end).
    let id = app.submit(pretrain_spec(12, 5)).await;
    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["progress"]["step"], 12);
    assert_eq!(job["progress"]["total_steps"], 12);
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(job["artifact_prefix"], format!("jobs/{id}/output/"));
    assert!(
        job["final_metrics"]["eval_loss"].as_f64().is_some(),
        "{job}"
    );

    let metrics = app
        .get(&format!("/v1/jobs/{id}/metrics?names=loss,eval_loss"))
        .await;
    let loss_steps: Vec<u64> = metrics["series"]["loss"]
        .as_array()
        .expect("a loss series")
        .iter()
        .filter_map(|point| point["step"].as_u64())
        .collect();
    assert_eq!(
        loss_steps,
        (1..=12).collect::<Vec<_>>(),
        "one loss per step"
    );
    assert!(
        !metrics["series"]["eval_loss"]
            .as_array()
            .expect("eval")
            .is_empty(),
        "eval_interval 10 evaluates at step 10"
    );

    let checkpoints = app.get(&format!("/v1/jobs/{id}/checkpoints")).await;
    let steps: Vec<u64> = checkpoints["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect();
    assert_eq!(steps, vec![5, 10]);

    let logs = app.get(&format!("/v1/jobs/{id}/logs")).await;
    let lines: Vec<&str> = logs["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|line| line["message"].as_str())
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("succeeded")),
        "{lines:?}"
    );

    // The model registry's side of the contract: JobFinished with the lineage.
    let finished = {
        let mut found = Vec::new();
        common::eventually(PATIENCE, "JobFinished to arrive", || {
            found = app.registries.finished_for(&id);
            let done = !found.is_empty();
            async move { done }
        })
        .await;
        found.remove(0)
    };
    assert_eq!(finished.outcome, JobOutcome::Succeeded as i32);
    assert_eq!(finished.kind, "pretrain");
    assert_eq!(
        finished.artifact_prefix.as_deref(),
        Some(format!("jobs/{id}/output/").as_str())
    );
    assert_eq!(
        finished.base_model_version_id.as_deref(),
        Some(tokenizer_version.as_str())
    );
    assert_eq!(finished.dataset_version_ids, vec![dataset_version]);
    assert_eq!(finished.output_model_name, "tiny-lm");

    let listed = app.get("/v1/jobs?state=succeeded&kind=pretrain").await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|job| job["id"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_naming_the_field_and_store_nothing() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    app.registries.add_model("tok:1", "models/nowhere/");
    app.registries
        .add_version("chat-lora:1", "adapter", "models/nowhere-lora/");
    // `chat-lora` resolves (as a bare name, its latest version) to an adapter.
    app.registries
        .add_version("chat-lora", "adapter", "models/nowhere-lora/");
    app.registries
        .add_dataset("chats", "chat", "jsonl", "datasets/corpus-sample");
    let many: Vec<_> = (0..17).map(|_| json!({"reference": "corpus"})).collect();
    let cases = [
        (
            json!({"kind": "distill", "datasets": [{"reference": "corpus"}]}),
            "kind",
            "invalid_value",
        ),
        (
            json!({"kind": "ppo", "datasets": [{"reference": "corpus"}]}),
            "kind",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}],
                   "hyper_parameters": {"vocab_size": 10}}),
            "hyper_parameters.vocab_size",
            "invalid_value",
        ),
        (
            json!({"kind": "pretrain", "datasets": [{"reference": "corpus"}],
                   "hyper_parameters": {"preset": "enormous"}}),
            "hyper_parameters.preset",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}, {"reference": "nope:3"}]}),
            "datasets[1].reference",
            "dataset_not_found",
        ),
        (
            json!({"kind": "pretrain", "base_model": "missing@champion",
                   "datasets": [{"reference": "corpus"}]}),
            "base_model",
            "model_not_found",
        ),
        (
            json!({"kind": "tokenizer", "datasets": []}),
            "datasets",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}], "max_attempts": 99}),
            "max_attempts",
            "invalid_value",
        ),
        // Keeping no checkpoint would delete the one a retried attempt resumes from.
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}], "keep_checkpoints": 0}),
            "keep_checkpoints",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}],
                   "resources": {"node_selector": {"gpu type": "h100"}}}),
            "resources.node_selector.gpu type",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}], "epochs": 3}),
            "epochs",
            "invalid_value",
        ),
        // The model registry refuses upper case; the runner must refuse it first.
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}],
                   "output_model_name": "MyModel"}),
            "output_model_name",
            "invalid_value",
        ),
        // 101 bytes: one over the registry's limit of 100.
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}],
                   "output_model_name": "a".repeat(101)}),
            "output_model_name",
            "invalid_value",
        ),
        // Pretraining loads its tokenizer from the base model.
        (
            json!({"kind": "pretrain", "datasets": [{"reference": "corpus"}]}),
            "base_model",
            "invalid_value",
        ),
        (
            json!({"kind": "sft", "datasets": [{"reference": "chats"}]}),
            "base_model",
            "invalid_value",
        ),
        // A tokenizer reads `text`; `chat` is the second dataset's kind.
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "chats"}]}),
            "datasets[0]",
            "invalid_value",
        ),
        // Fine-tuning reads `sft` or `chat`, not `text`.
        (
            json!({"kind": "lora", "base_model": "tok:1", "datasets": [{"reference": "corpus"}]}),
            "datasets[0]",
            "invalid_value",
        ),
        // Exactly one train dataset: the second is the one too many.
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}, {"reference": "corpus"}]}),
            "datasets[1]",
            "invalid_value",
        ),
        (
            json!({"kind": "sft", "base_model": "tok:1",
                   "datasets": [{"reference": "chats", "role": "eval"}]}),
            "datasets",
            "invalid_value",
        ),
        // Regression: an adapter as the base was accepted and failed only in the worker.
        // Fine-tuning starts from a whole model; an adapter holds only its low-rank weights.
        (
            json!({"kind": "sft", "base_model": "chat-lora:1", "datasets": [{"reference": "chats"}]}),
            "base_model",
            "invalid_value",
        ),
        // Regression: a tokenizer job took an adapter as its base, downloaded it for nothing
        // and recorded it as the tokenizer's parent. A tokenizer job takes no base at all.
        (
            json!({"kind": "tokenizer", "base_model": "chat-lora:1",
                   "datasets": [{"reference": "corpus"}]}),
            "base_model",
            "invalid_value",
        ),
        // 17 references, one over the cap of 16, refused before any is resolved.
        (
            json!({"kind": "tokenizer", "datasets": many}),
            "datasets",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}], "hyper_parameters": []}),
            "hyper_parameters",
            "invalid_value",
        ),
        // 1e9 windows per step once made a worker allocate a terabyte; the cap is 4096.
        (
            json!({"kind": "pretrain", "base_model": "tok:1", "datasets": [{"reference": "corpus"}],
                   "hyper_parameters": {"batch_size": 1_000_000_000u64}}),
            "hyper_parameters.batch_size",
            "invalid_value",
        ),
        (
            json!({"kind": "tokenizer", "datasets": [{"reference": "corpus"}],
                   "resources": {"gpus": 100_000}}),
            "resources.gpus",
            "invalid_value",
        ),
    ];
    for (spec, field, code) in cases {
        let (status, body) = app.call(Method::POST, "/v1/jobs", Some(spec.clone())).await;
        assert_eq!(status, 400, "{spec} -> {body}");
        assert_eq!(body["error"]["param"], field, "{spec} -> {body}");
        assert_eq!(body["error"]["code"], code, "{spec} -> {body}");
    }
    // A base of the wrong kind is named by its reference, with its kind and the one wanted.
    let adapter_base = json!({"kind": "sft", "base_model": "chat-lora:1",
                              "datasets": [{"reference": "chats"}]});
    let (_, body) = app.call(Method::POST, "/v1/jobs", Some(adapter_base)).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for word in ["`chat-lora:1`", "`adapter`", "`model`"] {
        assert!(message.contains(word), "`{word}` missing: {body}");
    }
    // Regression: full fine-tuning into a model of adapters ran, then the registry refused its
    // output (a 409 there, the JobFinished dead-lettered). Now the same 409 comes at once.
    let into_adapters = json!({"kind": "sft", "base_model": "tok:1",
                               "datasets": [{"reference": "chats"}],
                               "output_model_name": "chat-lora"});
    let (status, body) = app
        .call(Method::POST, "/v1/jobs", Some(into_adapters))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "kind_mismatch", "{body}");
    assert_eq!(body["error"]["param"], "output_model_name", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for word in [
        "`chat-lora`",
        "adapter versions",
        "sft job produces model versions",
    ] {
        assert!(message.contains(word), "`{word}` missing: {body}");
    }

    let pool = app.runner_pool().await;
    let (jobs, outbox): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM outbox)")
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!(
        (jobs, outbox),
        (0, 0),
        "a refused spec leaves nothing behind"
    );
    pool.close().await;

    let (status, body) = app
        .call(
            Method::GET,
            &format!("/v1/jobs/{}", uuid::Uuid::now_v7()),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "job_not_found");
    // Like `state`, an unknown `kind` filter is a mistake, not an empty list.
    let (status, body) = app.call(Method::GET, "/v1/jobs?kind=bogus", None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "kind", "{body}");
    let unauthenticated = app
        .app
        .client
        .get(app.app.url("/v1/jobs"))
        .send()
        .await
        .expect("answers");
    assert_eq!(unauthenticated.status(), 401);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_job_requested_runs_the_job_once() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    let id = app.submit(tokenizer_spec()).await;

    // The same JobRequested again under a new message id, as a second publisher (or a replayed
    // outbox) would send it: the inbox cannot catch it, only the job row can.
    let pool = app.runner_pool().await;
    sqlx::query(
        "INSERT INTO outbox (message_id, routing_key, body, headers)
         SELECT gen_random_uuid(), routing_key, body, headers FROM outbox
         WHERE routing_key = 'job.requested'",
    )
    .execute(&pool)
    .await
    .expect("duplicate the event");
    let queue = ferrite_training_runner::consumer::queue_name(&app.exchange);
    common::eventually(PATIENCE, "both deliveries to be consumed", || {
        let pool = pool.clone();
        let queue = queue.clone();
        async move {
            let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = $1")
                .bind(queue)
                .fetch_one(&pool)
                .await
                .expect("count");
            handled == 2
        }
    })
    .await;

    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    // A scheduler round runs at least every second; two more rounds would have started a
    // second attempt if the duplicate had queued the job again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    assert_eq!(job["state"], "succeeded");
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_resumes_from_its_last_checkpoint_in_a_new_attempt() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    tokenizer(&app).await;

    let (id, job) = killed_once(&app, pretrain_spec(400, 4)).await;
    let path = format!("/v1/jobs/{id}");
    assert_eq!(job["progress"]["step"], 400);
    let attempts = job["attempts"].as_array().expect("attempts");

    // The second attempt continued from the newest checkpoint the first one recorded.
    let checkpoints = app.get(&format!("{path}/checkpoints")).await;
    let last_of_first = checkpoints["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|c| c["attempt"] == 1)
        .filter_map(|c| c["step"].as_i64())
        .max()
        .expect("the first attempt checkpointed");
    assert_eq!(
        attempts[1]["resumed_from_step"].as_i64(),
        Some(last_of_first)
    );

    // Never two at once: the first ended before the second started.
    let ended: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(attempts[0]["ended_at"].clone()).expect("the first ended");
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(attempts[1]["started_at"].clone()).expect("the second started");
    assert!(
        ended <= started,
        "attempt 1 ended {ended}, attempt 2 started {started}"
    );

    // The second attempt's first loss is the step after the checkpoint.
    assert_eq!(first_loss_step(&app, &id, 2).await, Some(last_of_first + 1));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_message_is_acknowledged_before_training_runs() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    tokenizer(&app).await;
    let id = app.submit(pretrain_spec(400, 100)).await;
    let path = format!("/v1/jobs/{id}");
    common::eventually(PATIENCE, "training to be under way", || async {
        let job = app.get(&path).await;
        job["state"] == "running" && job["progress"]["step"].as_i64().unwrap_or(0) > 0
    })
    .await;

    // Mid-run: the delivery is already recorded as handled (the framework acknowledges right
    // after that commit) and nothing waits in the queue, so no consumer timeout can reach it.
    let pool = app.runner_pool().await;
    let queue = ferrite_training_runner::consumer::queue_name(&app.exchange);
    let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = $1")
        .bind(&queue)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        handled, 2,
        "the tokenizer's and the pretraining job's JobRequested"
    );
    assert_eq!(
        common::ready_messages(common::SHARED_AMQP_URL, &queue).await,
        0
    );

    let (status, body) = app
        .call(Method::POST, &format!("{path}/cancel"), None)
        .await;
    assert_eq!(status, 202, "{body}");
    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["attempts"][0]["state"], "cancelled");
    let (status, _) = app
        .call(Method::POST, &format!("{path}/cancel"), None)
        .await;
    assert_eq!(status, 409, "a cancelled job cannot be cancelled again");
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_attempts_are_retried_up_to_the_limit_and_bad_inputs_fail_at_once() {
    let app = spawn_runner(&[]).await;
    // Registered, but its bytes were never stored: every attempt fails while downloading, and
    // another attempt might succeed (storage could come back), so the runner retries.
    app.registries
        .add_dataset("vanished", "text", "text", "datasets/never-uploaded");
    let mut spec = tokenizer_spec();
    spec["datasets"] = json!([{"reference": "vanished"}]);
    spec["max_attempts"] = json!(2);
    let id = app.submit(spec).await;
    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "failed", "{job}");
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "max_attempts is 2: {job}");
    assert!(attempts.iter().all(|a| a["state"] == "failed"), "{job}");
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("datasets/never-uploaded")),
        "the error names the missing object: {job}"
    );

    // A GPU this machine cannot load will not load on a second attempt either: one attempt,
    // failed, no retry (the local backend's workers have no CUDA here).
    corpus(&app).await;
    let mut spec = tokenizer_spec();
    spec["resources"] = json!({"gpus": 1});
    spec["max_attempts"] = json!(3);
    let wrong = app.submit(spec).await;
    let job = app.wait_final(&wrong, PATIENCE).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");

    for id in [&id, &wrong] {
        let mut finished = Vec::new();
        common::eventually(PATIENCE, "JobFinished to arrive", || {
            finished = app.registries.finished_for(id);
            let done = !finished.is_empty();
            async move { done }
        })
        .await;
        assert_eq!(finished.len(), 1, "one JobFinished per job");
        assert_eq!(finished[0].outcome, JobOutcome::Failed as i32);
        assert_eq!(finished[0].artifact_prefix, None);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_loses_its_lease_and_is_stopped_before_the_next_attempt() {
    let app = spawn_runner(&[]).await;
    corpus(&app).await;
    tokenizer(&app).await;
    // SIGSTOP: the process lives on but never heartbeats, as a hung worker would. Only the
    // lease can catch it; the runner must kill it before starting attempt 2.
    let (id, pid) = signal_first_worker(&app, pretrain_spec(300, 4), "-STOP").await;

    let job = app.wait_final(&id, PATIENCE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["state"], "lost");
    assert!(
        attempts[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("lease expired")),
        "{job}"
    );
    assert!(attempts[1]["resumed_from_step"].as_i64() > Some(0), "{job}");
    // `kill -0` fails once the frozen process is gone: the runner stopped it.
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run kill");
    assert!(!alive.success(), "the frozen worker {pid} was killed");
    app.stop().await;
}
