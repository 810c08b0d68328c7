//! The model registry against real Postgres, RabbitMQ and s3s-fs: registration from
//! JobFinished, uploads, aliases and their events, references and lineage.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{HttpResponse, web};
use common::app::ADMIN_TOKEN;
use common::{eventually, take_message};
use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use ferrite_proto::{AliasMoved, Event};
use prost::Message as _;
use reqwest::Method;
use serde_json::json;
use sqlx::migrate::Migrator;
use support::{PATIENCE, finished, safetensors, tar_of, tiny_adapter_folder, tiny_model_folder};
use uuid::Uuid;

#[tokio::test]
async fn a_finished_job_registers_its_output_once_even_when_delivered_twice() {
    let registry = support::spawn().await;
    let base = registry.upload_tiny_as("smol-base").await;
    let base_id = base["id"].as_str().expect("an id").to_owned();
    let datasets = [Uuid::now_v7(), Uuid::now_v7()];
    let event = finished("sft", "smol-sft", Some(&base_id), &datasets);

    // The same message twice (a redelivery), then the same job under a new message id (the
    // runner's relay publishing again after a crash): one version in the end.
    let first = Uuid::now_v7();
    let second = Uuid::now_v7();
    let prefix = event.artifact_prefix.as_deref().expect("set");
    registry.store_folder(prefix, &tiny_model_folder()).await;
    registry.publish(first, &event).await;
    registry.publish(first, &event).await;
    registry.publish(second, &event).await;

    // With prefetch 1 the queue is handled in order, so once the last message id is in the
    // inbox, the two before it were handled too.
    let pool = registry.registry_pool().await;
    eventually(PATIENCE, "the last delivery to be handled", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox WHERE message_id = $1")
                .bind(second)
                .fetch_one(&pool)
                .await
                .expect("query the inbox")
                == 1
        }
    })
    .await;

    let (status, versions) = registry.get("/v1/registry/models/smol-sft/versions").await;
    assert_eq!(status, 200, "{versions}");
    let versions = versions.as_array().expect("a list");
    assert_eq!(versions.len(), 1, "one job, one version: {versions:?}");
    let version = &versions[0];
    assert_eq!(version["number"], 1);
    assert_eq!(version["kind"], "model");
    assert_eq!(version["source_job_id"], event.job_id.as_str());
    assert_eq!(version["parent_version_id"], base_id.as_str());
    assert_eq!(
        version["artifact_prefix"],
        event.artifact_prefix.as_deref().expect("set")
    );
    assert_eq!(version["metrics"], json!({"loss": 1.25}));
    let expected: Vec<String> = datasets.iter().map(Uuid::to_string).collect();
    assert_eq!(version["dataset_version_ids"], json!(expected));

    // Two registrations in all (the base and the job's output), so two events in the outbox.
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE routing_key = $1")
        .bind(ferrite_proto::ModelVersionRegistered::ROUTING_KEY)
        .fetch_one(&pool)
        .await
        .expect("query the outbox");
    assert_eq!(registered, 2);
    pool.close().await;
    registry.stop().await;
}

#[tokio::test]
async fn a_lora_job_registers_an_adapter_on_its_base_and_a_failed_job_nothing() {
    let registry = support::spawn().await;
    let base = registry.upload_tiny_as("smol").await;
    let base_id = base["id"].as_str().expect("an id");
    let mut failed = finished("sft", "smol-failed", Some(base_id), &[]);
    failed.outcome = ferrite_proto::JobOutcome::Failed as i32;
    let lora = finished("lora", "smol-lora", Some(base_id), &[]);
    registry.publish(Uuid::now_v7(), &failed).await;
    registry.finish_job(&lora, &tiny_adapter_folder()).await;

    eventually(PATIENCE, "the adapter to be registered", || async {
        registry.get("/v1/registry/resolve/smol-lora").await.0 == 200
    })
    .await;
    let (_, adapter) = registry.get("/v1/registry/resolve/smol-lora").await;
    assert_eq!(adapter["kind"], "adapter");
    assert_eq!(adapter["base_version_id"], base_id);
    // The failed job came first in the queue, so it was handled by now, and made nothing.
    assert_eq!(registry.get("/v1/registry/models/smol-failed").await.0, 404);
    registry.stop().await;
}

#[tokio::test]
async fn every_reference_form_resolves_to_its_version() {
    let registry = support::spawn().await;
    let first = registry.upload_tiny_as("smol").await;
    let second = registry.upload_tiny_as("smol").await;
    let (status, _) = registry
        .call(
            Method::PUT,
            "/v1/registry/models/smol/aliases/candidate",
            ADMIN_TOKEN,
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(status, 200);

    let resolved = |reference: String| {
        let registry = &registry;
        async move {
            let (status, body) = registry
                .get(&format!("/v1/registry/resolve/{reference}"))
                .await;
            assert_eq!(status, 200, "{reference}: {body}");
            body["id"].as_str().expect("an id").to_owned()
        }
    };
    let first_id = first["id"].as_str().expect("an id");
    let second_id = second["id"].as_str().expect("an id");
    assert_eq!(resolved(second_id.to_owned()).await, second_id);
    assert_eq!(resolved("smol:1".into()).await, first_id);
    assert_eq!(resolved("smol@candidate".into()).await, first_id);
    assert_eq!(
        resolved("smol".into()).await,
        second_id,
        "the latest is number 2"
    );

    let (status, body) = registry.get("/v1/registry/resolve/smol:0").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "reference");
    for missing in [
        "smol:3",
        "smol@champion",
        "nobody",
        &Uuid::now_v7().to_string(),
    ] {
        let (status, body) = registry
            .get(&format!("/v1/registry/resolve/{missing}"))
            .await;
        assert_eq!(status, 404, "{missing}: {body}");
    }
    registry.stop().await;
}

#[tokio::test]
async fn protected_aliases_need_an_admin_and_every_move_emits_alias_moved() {
    let mut registry = support::spawn().await;
    let moves = registry.watch(AliasMoved::ROUTING_KEY).await;
    let v1 = registry.upload_tiny_as("smol").await;
    let v2 = registry.upload_tiny_as("smol").await;
    let engineer = registry.token("engineer").await;
    let put = |alias: &str, token: &str, body: serde_json::Value| {
        let path = format!("/v1/registry/models/smol/aliases/{alias}");
        let token = token.to_owned();
        let registry = &registry;
        async move { registry.call(Method::PUT, &path, &token, Some(body)).await }
    };

    assert_eq!(
        put("candidate", &engineer, json!({"version": 1})).await.0,
        200
    );
    let (status, body) = put("champion", &engineer, json!({"version": 1})).await;
    assert_eq!(status, 403, "champion is protected by name: {body}");
    let (status, body) = put("prod", &engineer, json!({"version": 1, "protected": true})).await;
    assert_eq!(status, 403, "protecting needs an admin: {body}");
    assert_eq!(
        put("champion", ADMIN_TOKEN, json!({"version": 1})).await.0,
        200
    );
    let v2_id = v2["id"].as_str().expect("an id");
    let (status, alias) = put("champion", ADMIN_TOKEN, json!({"version": v2_id})).await;
    assert_eq!(status, 200, "{alias}");
    assert_eq!(alias["version_number"], 2);
    assert_eq!(alias["protected"], true);
    let (status, _) = registry
        .call(
            Method::DELETE,
            "/v1/registry/models/smol/aliases/champion",
            &engineer,
            None,
        )
        .await;
    assert_eq!(status, 403);
    // Pointing an alias at the version it already has moves nothing.
    assert_eq!(
        put("candidate", &engineer, json!({"version": 1})).await.0,
        200
    );

    // Three moves: candidate -> 1, champion -> 1, champion 1 -> 2; the refused ones and the
    // repeat emit nothing.
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while events.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {events:?} arrived"
        );
        match take_message(common::SHARED_AMQP_URL, &moves).await {
            Some(message) => {
                events.push(AliasMoved::decode(message.data.as_slice()).expect("an AliasMoved"));
            }
            None => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    // Anything a fourth move would have sent was written in the same transaction as the
    // repeat's response, so it would be in the outbox by now.
    let pool = registry.registry_pool().await;
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE routing_key = $1")
        .bind(AliasMoved::ROUTING_KEY)
        .fetch_one(&pool)
        .await
        .expect("query the outbox");
    assert_eq!(written, 3);
    pool.close().await;
    assert_eq!(events.len(), 3, "{events:?}");
    let v1_id = v1["id"].as_str().expect("an id");
    let last = &events[2];
    assert_eq!(
        (last.alias.as_str(), last.version_id.as_str()),
        ("champion", v2_id)
    );
    assert_eq!(last.previous_version_id.as_deref(), Some(v1_id));
    assert_eq!(last.moved_by, "bootstrap-admin");
    assert_eq!(events[0].previous_version_id, None);
    registry.stop().await;
}

#[tokio::test]
async fn a_corrupt_upload_is_refused_naming_the_file_and_leaves_nothing() {
    let registry = support::spawn().await;
    assert_eq!(registry.create_model("smol").await, 201);

    let mut truncated = tiny_model_folder();
    truncated.insert("model.safetensors".into(), safetensors(4096));
    let mut not_llama = tiny_model_folder();
    not_llama.insert("config.json".into(), br#"{"model_type": "bert"}"#.to_vec());
    let mut no_config = tiny_model_folder();
    no_config.remove("config.json");
    let cases = [
        ("model.safetensors", tar_of(&truncated)),
        ("config.json", tar_of(&not_llama)),
        ("config.json", tar_of(&no_config)),
        ("body", b"this is not a tar archive at all".repeat(40)),
    ];
    for (param, tar) in cases {
        let (status, body) = registry.upload("smol", "", tar).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    let (status, body) = registry.upload("smol", "", tar_with_link()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["param"], "tokenizer.json",
        "the link is named: {body}"
    );
    let (status, body) = registry
        .upload("smol", "kind=adapter", tar_of(&tiny_model_folder()))
        .await;
    assert_eq!(status, 400, "an adapter needs its config: {body}");
    // A valid archive labelled gzip was read as raw tar and called corrupt; the label is what
    // the server cannot honour, so it is a 415 naming the encoding.
    let response = registry
        .client
        .post(registry.url("/v1/registry/models/smol/uploads"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/x-tar")
        .header("content-encoding", "gzip")
        .body(tar_of(&tiny_model_folder()))
        .send()
        .await
        .expect("the registry answers");
    assert_eq!(response.status(), 415);
    let body: serde_json::Value = response.json().await.expect("an error body");
    assert_eq!(body["error"]["code"], "unsupported_encoding");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("gzip")),
        "{body}"
    );

    assert_eq!(
        registry.s3.files(),
        Vec::<String>::new(),
        "storage holds nothing"
    );
    let (_, versions) = registry.get("/v1/registry/models/smol/versions").await;
    assert_eq!(versions, json!([]), "the database holds no version");
    registry.stop().await;
}

#[tokio::test]
async fn an_upload_refused_at_registration_removes_its_stored_files() {
    let registry = support::spawn().await;
    assert_eq!(registry.create_model("smol").await, 201);
    // The folder is fine, but the base it names does not exist: that is found only after the
    // files were stored, which must then be deleted.
    let query = format!("kind=model&base_version={}", Uuid::now_v7());
    let (status, body) = registry
        .upload("smol", &query, tar_of(&tiny_model_folder()))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "base_version");
    assert_eq!(registry.s3.files(), Vec::<String>::new());
    registry.stop().await;
}

#[tokio::test]
async fn a_version_lists_and_serves_its_files() {
    let registry = support::spawn().await;
    let version = registry.upload_tiny_as("smol").await;
    let id = version["id"].as_str().expect("an id");
    let folder = tiny_model_folder();

    let (status, files) = registry
        .get(&format!("/v1/registry/versions/{id}/files"))
        .await;
    assert_eq!(status, 200, "{files}");
    let listed: BTreeMap<String, u64> = files
        .as_array()
        .expect("a list")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("a path").to_owned(),
                f["size_bytes"].as_u64().expect("a size"),
            )
        })
        .collect();
    let expected: BTreeMap<String, u64> = folder
        .iter()
        .map(|(name, bytes)| (name.clone(), bytes.len() as u64))
        .collect();
    assert_eq!(listed, expected);

    let response = registry
        .client
        .get(registry.url(&format!("/v1/registry/versions/{id}/files/config.json")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.bytes().await.expect("a body").as_ref(),
        folder["config.json"].as_slice()
    );
    let (status, _) = registry
        .get(&format!("/v1/registry/versions/{id}/files/nothing.bin"))
        .await;
    assert_eq!(status, 404);

    // The same folder registered in place, from where the upload stored it.
    let prefix = version["artifact_prefix"].as_str().expect("a prefix");
    let (status, again) = registry
        .call(
            Method::POST,
            "/v1/registry/models/smol/versions",
            ADMIN_TOKEN,
            Some(
                json!({"kind": "model", "artifact_prefix": prefix, "metrics": {"eval_loss": 2.5}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["number"], 2);

    // A quantised variant names its source and how it was quantised, both or neither.
    let register = |body: serde_json::Value| {
        registry.call(
            Method::POST,
            "/v1/registry/models/smol/versions",
            ADMIN_TOKEN,
            Some(body),
        )
    };
    let (status, body) = register(json!({
        "kind": "model", "artifact_prefix": prefix, "source_version": "smol:1"
    }))
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "quantization");
    let (status, variant) = register(json!({
        "kind": "model", "artifact_prefix": prefix, "source_version": "smol:1",
        "quantization": "nf4"
    }))
    .await;
    assert_eq!(status, 201, "{variant}");
    assert_eq!(variant["source_version_id"], id);
    assert_eq!(variant["quantization"], "nf4");
    assert_eq!(
        variant["parent_version_id"], id,
        "the source is the parent when none is named"
    );
    let (status, body) = registry
        .call(
            Method::POST,
            "/v1/registry/models/smol/versions",
            ADMIN_TOKEN,
            Some(json!({"kind": "model", "artifact_prefix": "models/smol/nothing-here"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "artifact_prefix");
    registry.stop().await;
}

/// A stand-in for the dataset registry's two lineage routes, which can be switched off. The
/// real service is tested in its own crate; this one pins what the model registry asks.
struct Datasets {
    down: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl ServiceModule for Datasets {
    fn name(&self) -> &'static str {
        "datasets-stand-in"
    }

    fn schema(&self) -> &'static str {
        "datasets_stand_in"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let down = web::Data::from(self.down.clone());
        Ok(Mounted::routes(
            Arc::new(move |cfg| {
                cfg.app_data(down.clone())
                    .route("/v1/datasets/resolve/{id}", web::get().to(dataset_version))
                    .route(
                        "/v1/datasets/versions/{id}/lineage",
                        web::get().to(dataset_lineage),
                    );
            }),
            utoipa::openapi::OpenApi::default(),
        ))
    }
}

async fn dataset_version(down: web::Data<AtomicBool>, id: web::Path<Uuid>) -> HttpResponse {
    if down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    HttpResponse::Ok()
        .json(json!({"id": *id, "dataset_name": "alpaca", "number": 1, "kind": "sft"}))
}

async fn dataset_lineage(down: web::Data<AtomicBool>, id: web::Path<Uuid>) -> HttpResponse {
    if down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    HttpResponse::Ok().json(json!({"id": *id, "derived_from_version_id": null}))
}

#[tokio::test]
async fn lineage_follows_parents_with_dataset_details_and_degrades_when_datasets_are_down() {
    let down = Arc::new(AtomicBool::new(false));
    let registry = support::spawn_with(vec![Box::new(Datasets { down: down.clone() })]).await;
    let base = registry.upload_tiny_as("smol").await;
    let base_id = base["id"].as_str().expect("an id").to_owned();
    let sft_data = Uuid::now_v7();
    let sft = finished("sft", "smol-sft", Some(&base_id), &[sft_data]);
    registry.finish_job(&sft, &tiny_model_folder()).await;
    eventually(PATIENCE, "the SFT output", || async {
        registry.get("/v1/registry/resolve/smol-sft").await.0 == 200
    })
    .await;
    let (_, sft_version) = registry.get("/v1/registry/resolve/smol-sft").await;
    let sft_id = sft_version["id"].as_str().expect("an id").to_owned();
    let lora_data = Uuid::now_v7();
    let lora = finished("lora", "smol-lora", Some(&sft_id), &[lora_data]);
    registry.finish_job(&lora, &tiny_adapter_folder()).await;
    eventually(PATIENCE, "the adapter", || async {
        registry.get("/v1/registry/resolve/smol-lora").await.0 == 200
    })
    .await;
    let (_, adapter) = registry.get("/v1/registry/resolve/smol-lora").await;
    let adapter_id = adapter["id"].as_str().expect("an id");

    let (status, report) = registry
        .get(&format!("/v1/registry/versions/{adapter_id}/lineage"))
        .await;
    assert_eq!(status, 200, "{report}");
    let chain: Vec<&str> = report["chain"]
        .as_array()
        .expect("a chain")
        .iter()
        .map(|step| step["version"]["id"].as_str().expect("an id"))
        .collect();
    assert_eq!(chain, [adapter_id, sft_id.as_str(), base_id.as_str()]);
    assert_eq!(report["chain"][0]["source_job_id"], lora.job_id.as_str());
    assert_eq!(report["chain"][1]["source_job_id"], sft.job_id.as_str());
    assert_eq!(
        report["chain"][1]["datasets"][0]["id"],
        sft_data.to_string()
    );
    assert_eq!(
        report["chain"][1]["datasets"][0]["version"]["dataset_name"],
        "alpaca"
    );
    assert_eq!(
        report["chain"][0]["datasets"][0]["lineage"]["id"],
        lora_data.to_string()
    );
    // No gateway is mounted: its part is left out with a note, not an error.
    assert_eq!(report["deployments"], json!(null));
    let notes = report["notes"].to_string();
    assert!(notes.contains("deployments left out"), "{notes}");
    assert!(!notes.contains("dataset"), "datasets answered: {notes}");

    down.store(true, Ordering::SeqCst);
    let (status, report) = registry
        .get(&format!("/v1/registry/versions/{adapter_id}/lineage"))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["chain"].as_array().map(Vec::len), Some(3));
    assert_eq!(report["chain"][1]["datasets"][0]["version"], json!(null));
    assert!(
        report["notes"]
            .to_string()
            .contains("dataset details left out"),
        "{report}"
    );
    registry.stop().await;
}

/// A valid folder plus `tokenizer.json` as a symbolic link to a file outside it.
fn tar_with_link() -> Vec<u8> {
    let mut builder = support::tar_builder(&tiny_model_folder());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_cksum();
    builder
        .append_link(&mut header, "tokenizer.json", "/etc/passwd")
        .expect("append a link");
    builder.into_inner().expect("finish the tar")
}
