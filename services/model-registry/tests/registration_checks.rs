//! What registration refuses, on every way in (upload, registration in place, JobFinished):
//! a model whose sharded weights index is broken or hostile, and a version of another kind
//! than the model's versions so far.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;

use common::app::ADMIN_TOKEN;
use common::{SHARED_AMQP_URL, eventually, ready_messages, take_message};
use lapin::types::AMQPValue;
use reqwest::Method;
use serde_json::{Value, json};
use support::{PATIENCE, Registry, finished, tar_of, tiny_adapter_folder};

const INDEX: &str = "model.safetensors.index.json";
const FIRST: &str = "model-00001-of-00002.safetensors";
const SECOND: &str = "model-00002-of-00002.safetensors";

const EMBED: &str = "model.embed_tokens.weight";

/// The mini model's tensors: the embedding in the first shard, the rest in the second.
fn shard_tensors() -> (BTreeMap<String, Vec<i64>>, BTreeMap<String, Vec<i64>>) {
    ferrite_model::Llama::parameter_shapes(&support::mini_config())
        .into_iter()
        .partition(|(name, _)| name == EMBED)
}

/// The mini model whose weights are two shards (see [`shard_tensors`]), with an index holding
/// `weight_map`.
fn sharded(weight_map: Value) -> BTreeMap<String, Vec<u8>> {
    let (first, second) = shard_tensors();
    let mut folder = support::tiny_model_folder();
    folder.remove("model.safetensors");
    folder.insert(FIRST.into(), support::zeros_safetensors(&first));
    folder.insert(SECOND.into(), support::zeros_safetensors(&second));
    let index = json!({"metadata": {}, "weight_map": weight_map});
    folder.insert(INDEX.into(), index.to_string().into_bytes());
    folder
}

/// The index placing every tensor where it is, but `moved` in `file`.
fn placed_but(moved: &str, file: &str) -> Value {
    let (first, second) = shard_tensors();
    let mut map = serde_json::Map::new();
    for (tensors, shard) in [(first, FIRST), (second, SECOND)] {
        for name in tensors.into_keys() {
            map.insert(name, shard.into());
        }
    }
    if !moved.is_empty() {
        map.insert(moved.into(), file.into());
    }
    Value::Object(map)
}

fn placed() -> Value {
    placed_but("", "")
}

/// Indexes the loader refuses, each wrong in one way, with words its refusal must hold.
fn hostile_indexes() -> Vec<(BTreeMap<String, Vec<u8>>, &'static str)> {
    let mut not_json = sharded(placed());
    not_json.insert(INDEX.into(), br#"{"weight_map": {"a": "#.to_vec());
    vec![
        (not_json, "not JSON"),
        (
            sharded(placed_but(EMBED, "../model.safetensors")),
            "\"../model.safetensors\" is not a file name",
        ),
        (
            sharded(placed_but(EMBED, "/etc/passwd")),
            "\"/etc/passwd\" is not a file name",
        ),
        (
            sharded(placed_but(EMBED, "model-00003-of-00003.safetensors")),
            "the shard `model-00003-of-00003.safetensors`, which is not",
        ),
        // The norm is in the second shard.
        (
            sharded(placed_but("model.norm.weight", FIRST)),
            "puts model.norm.weight in",
        ),
        // Every tensor listed is where the index says, but the config requires the rest.
        (
            sharded(json!({ EMBED: FIRST })),
            "has no tensor `lm_head.weight`, which `config.json` requires",
        ),
    ]
}

/// Asserts a 4xx `status`/`body` names `param` with `code`, and its message holds `words`.
fn assert_refused(
    (status, body): (reqwest::StatusCode, Value),
    expected: (u16, &str, &str),
    words: &[&str],
) {
    let (expected_status, code, param) = expected;
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for word in words {
        assert!(message.contains(word), "`{word}` missing: {body}");
    }
}

async fn register_in_place(
    registry: &Registry,
    model: &str,
    body: Value,
) -> (reqwest::StatusCode, Value) {
    let path = format!("/v1/registry/models/{model}/versions");
    registry
        .call(Method::POST, &path, ADMIN_TOKEN, Some(body))
        .await
}

async fn version_count(registry: &Registry, model: &str) -> usize {
    let (status, versions) = registry
        .get(&format!("/v1/registry/models/{model}/versions"))
        .await;
    assert_eq!(status, 200, "{versions}");
    versions.as_array().map_or(0, Vec::len)
}

/// Waits until the JobFinished queue's dead-letter queue holds `count` messages and returns
/// why the broker dead-lettered each: `rejected` is a handler's permanent failure, unlike
/// `delivery_limit`, which would mean the registry retried something that cannot succeed.
async fn dead_letter_reasons(registry: &Registry, count: u32) -> Vec<String> {
    let queue = ferrite_model_registry::consumers::job_finished::queue_name(
        &registry.settings.amqp.exchange,
    );
    let dlq = ferrite_platform::amqp::dead_letter_queue(&queue);
    eventually(PATIENCE, "the dead-lettered JobFinished", || async {
        ready_messages(SHARED_AMQP_URL, &dlq).await >= count
    })
    .await;
    let mut reasons = Vec::new();
    while let Some(message) = take_message(SHARED_AMQP_URL, &dlq).await {
        let headers = message.delivery.properties.headers().clone();
        let reason = headers
            .as_ref()
            .and_then(|headers| headers.inner().get("x-death"))
            .and_then(|deaths| match deaths {
                AMQPValue::FieldArray(deaths) => deaths.as_slice().first().cloned(),
                _ => None,
            })
            .and_then(|death| match death {
                AMQPValue::FieldTable(death) => death.inner().get("reason").cloned(),
                _ => None,
            });
        reasons.push(match reason {
            Some(AMQPValue::LongString(reason)) => reason.to_string(),
            other => format!("{other:?}"),
        });
    }
    reasons
}

#[tokio::test]
async fn a_sharded_model_registers_and_a_broken_or_hostile_index_is_refused_by_name() {
    let registry = support::spawn().await;
    assert_eq!(registry.create_model("smol").await, 201);
    let (status, good) = registry
        .upload("smol", "", tar_of(&sharded(placed())))
        .await;
    assert_eq!(status, 201, "{good}");
    let stored = registry.s3.files();

    for (folder, words) in hostile_indexes() {
        let refused = registry.upload("smol", "", tar_of(&folder)).await;
        assert_refused(refused, (400, "invalid_artifact", INDEX), &[INDEX, words]);
    }
    assert_eq!(registry.s3.files(), stored, "refused uploads store nothing");

    // The same folders already in storage, registered in place: read through ranged reads of
    // the shard headers, so a shard whose header points past its end must still be caught.
    let prefix = good["artifact_prefix"].as_str().expect("a prefix");
    let (status, again) = register_in_place(
        &registry,
        "smol",
        json!({"kind": "model", "artifact_prefix": prefix}),
    )
    .await;
    assert_eq!(
        status, 201,
        "the stored sharded model passes in place: {again}"
    );
    for (number, (folder, words)) in hostile_indexes().into_iter().enumerate() {
        let prefix = format!("models/smol/hostile-{number}/");
        registry.store_folder(&prefix, &folder).await;
        let body = json!({"kind": "model", "artifact_prefix": prefix});
        let refused = register_in_place(&registry, "smol", body).await;
        assert_refused(refused, (400, "invalid_artifact", INDEX), &[INDEX, words]);
    }
    let mut truncated = sharded(placed());
    // The embedding's last 4 bytes cut off: its header points past the end.
    let first = truncated.get_mut(FIRST).expect("the first shard");
    first.truncate(first.len() - 4);
    registry
        .store_folder("models/smol/truncated/", &truncated)
        .await;
    let body = json!({"kind": "model", "artifact_prefix": "models/smol/truncated/"});
    let refused = register_in_place(&registry, "smol", body).await;
    assert_refused(refused, (400, "invalid_artifact", FIRST), &[FIRST]);

    assert_eq!(
        version_count(&registry, "smol").await,
        2,
        "the good upload and its registration in place"
    );
    registry.stop().await;
}

#[tokio::test]
async fn a_job_output_that_fails_the_check_is_dead_lettered_at_once_and_registers_nothing() {
    let registry = support::spawn().await;
    let base = registry.upload_tiny_as("smol-base").await;
    let base_id = base["id"].as_str().expect("an id");

    let hostile = finished("sft", "smol-hostile", Some(base_id), &[]);
    let (folder, _) = hostile_indexes().remove(1);
    registry.finish_job(&hostile, &folder).await;
    // Nothing stored at all: the runner stores the output before it publishes, so the folder
    // will not appear later.
    let missing = finished("sft", "smol-missing", Some(base_id), &[]);
    registry.publish(uuid::Uuid::now_v7(), &missing).await;

    assert_eq!(
        dead_letter_reasons(&registry, 2).await,
        ["rejected", "rejected"],
        "refused on the first delivery, not retried"
    );
    for model in ["smol-hostile", "smol-missing"] {
        let (status, body) = registry.get(&format!("/v1/registry/models/{model}")).await;
        assert_eq!(
            status, 404,
            "no model is created for a refused output: {body}"
        );
    }
    registry.stop().await;
}

#[tokio::test]
async fn a_version_of_another_kind_is_refused_naming_the_model_and_both_kinds() {
    let registry = support::spawn().await;
    let base = registry.upload_tiny_as("smol").await;
    let base_id = base["id"].as_str().expect("an id");
    let stored = registry.s3.files();
    let words = ["`smol`", "`model`", "`adapter`"];
    let conflict = (409, "kind_mismatch", "kind");

    let refused = registry
        .upload(
            "smol",
            "kind=adapter&base_version=smol:1",
            tar_of(&tiny_adapter_folder()),
        )
        .await;
    assert_refused(refused, conflict, &words);
    assert_eq!(
        registry.s3.files(),
        stored,
        "the refused upload's files are deleted"
    );

    registry
        .store_folder("adapters/smol-lora/", &tiny_adapter_folder())
        .await;
    let body = json!({
        "kind": "adapter", "artifact_prefix": "adapters/smol-lora/", "base_version": "smol:1"
    });
    assert_refused(
        register_in_place(&registry, "smol", body).await,
        conflict,
        &words,
    );

    // A LoRA job whose output_model_name is the model: its adapter is refused for good. The
    // SFT job after it adds a model, as the model holds; with prefetch 1 the queue is handled
    // in order, so once that version is in, the LoRA's message was handled too.
    let lora = finished("lora", "smol", Some(base_id), &[]);
    registry.finish_job(&lora, &tiny_adapter_folder()).await;
    let sft = finished("sft", "smol", Some(base_id), &[]);
    registry
        .finish_job(&sft, &support::tiny_model_folder())
        .await;
    eventually(PATIENCE, "the SFT output to be registered", || async {
        version_count(&registry, "smol").await == 2
    })
    .await;
    assert_eq!(dead_letter_reasons(&registry, 1).await, ["rejected"]);
    let (_, latest) = registry.get("/v1/registry/resolve/smol").await;
    assert_eq!(latest["kind"], "model");
    assert_eq!(latest["source_job_id"], sft.job_id.as_str());
    registry.stop().await;
}

#[tokio::test]
async fn a_stored_json_file_over_the_cap_is_refused_in_place_without_being_read() {
    // One byte past the cap, of zeros: were it downloaded and parsed, the refusal would call
    // it invalid JSON rather than give its size.
    let registry = support::spawn().await;
    assert_eq!(registry.create_model("smol").await, 201);
    let too_big = ferrite_model_registry::artifacts::MAX_JSON_BYTES + 1;
    let mut folder = support::tiny_model_folder();
    folder.insert(
        "tokenizer.json".into(),
        vec![0; usize::try_from(too_big).expect("fits")],
    );
    registry.store_folder("models/smol/huge/", &folder).await;
    let body = json!({"kind": "model", "artifact_prefix": "models/smol/huge/"});
    let refused = register_in_place(&registry, "smol", body).await;
    assert_refused(
        refused,
        (400, "invalid_artifact", "tokenizer.json"),
        &["`tokenizer.json`", &too_big.to_string()],
    );
    assert_eq!(version_count(&registry, "smol").await, 0);
    registry.stop().await;
}
