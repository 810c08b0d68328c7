//! Token statistics through a model registry peer, against real Postgres, RabbitMQ and s3s-fs.
//!
//! The model registry is another service; this test mounts a stand-in that answers only
//! `GET /v1/registry/resolve/{reference}` with the two fields the dataset registry reads, so
//! the peer call, the artifact read from storage and the counting are all real.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
use ferrite_platform::app::Mounted;
use ferrite_platform::storage::{ObjectKey, Storage};
use ferrite_platform::{ApiError, ServiceContext, ServiceModule, Settings};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::migrate::Migrator;

const MODEL_VERSION_ID: &str = "0190c2a4-0000-7000-8000-00000000000a";
const ARTIFACT_PREFIX: &str = "models/tiny-tokenizer/";

struct StandInModelRegistry;

#[async_trait::async_trait]
impl ServiceModule for StandInModelRegistry {
    fn name(&self) -> &'static str {
        "model-registry-stand-in"
    }

    fn schema(&self) -> &'static str {
        "model_registry_stand_in"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        Ok(Mounted::routes(
            Arc::new(|cfg| {
                cfg.route("/v1/registry/resolve/{reference}", web::get().to(resolve));
            }),
            utoipa::openapi::OpenApi::default(),
        ))
    }
}

async fn resolve(reference: web::Path<String>) -> Result<HttpResponse, ApiError> {
    if reference.as_str() != "tiny:1" {
        return Err(ApiError::not_found("model_version", &reference));
    }
    Ok(HttpResponse::Ok().json(json!({
        "id": MODEL_VERSION_ID,
        "artifact_prefix": ARTIFACT_PREFIX,
    })))
}

const LINES: [&str; 4] = [
    "the cat sat on the mat",
    "a dog ran",
    "the bird and the cat and the dog met on the mat today",
    "cat",
];

#[tokio::test]
async fn token_counts_come_from_the_named_models_tokenizer() {
    let registry = support::spawn_with(&[], vec![Box::new(StandInModelRegistry)]).await;

    // A tiny BPE trained on the rows themselves, stored where the model's artifacts would be.
    let config = TrainConfig {
        vocab_size: 300,
        min_frequency: 2,
    };
    let tokenizer = Tokenizer::train(&config, LINES.iter()).expect("trains");
    let folder = tempfile::tempdir().expect("temp folder");
    tokenizer.save(folder.path()).expect("saves");
    let settings = Settings::load(None, &registry.app.settings_env).expect("valid");
    let storage = Storage::from_settings(&settings.store).expect("store");
    let prefix = ObjectKey::parse(ARTIFACT_PREFIX.trim_end_matches('/')).expect("valid");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let bytes = std::fs::read(folder.path().join(file)).expect("saved");
        storage
            .put(&prefix.join(file).expect("valid"), bytes.into())
            .await
            .expect("stored");
    }

    let body = format!("{}\n", LINES.join("\n\n")).into_bytes();
    let (status, version) = registry.upload("animals", "kind=text", body, false).await;
    assert_eq!(status, StatusCode::CREATED, "{version}");
    let path = format!(
        "/v1/datasets/versions/{}/stats",
        version["id"].as_str().unwrap_or_default()
    );
    let (status, stats) = registry
        .call(Method::POST, &path, Some(json!({"tokenizer": "tiny:1"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["tokenizer_version_id"], MODEL_VERSION_ID);

    // The reference: the same tokenizer encoding each row without special tokens.
    let mut counts: Vec<u64> = LINES
        .iter()
        .map(|line| tokenizer.encode(line, false).expect("encodes").len() as u64)
        .collect();
    counts.sort_unstable();
    let total: u64 = counts.iter().sum();
    // Nearest rank over 4 rows: p50 is the 2nd smallest, p90 the 4th.
    assert_eq!(stats["stats"]["min"], counts[0]);
    assert_eq!(stats["stats"]["p50"], counts[1]);
    assert_eq!(stats["stats"]["p90"], counts[3]);
    assert_eq!(stats["stats"]["max"], counts[3]);
    assert_eq!(stats["stats"]["total"], total);
    assert!(
        counts[0] < counts[3],
        "rows of different lengths tell rows apart"
    );

    let (status, recorded) = registry.get(&path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        recorded[0]["stats"], stats["stats"],
        "the counts were recorded"
    );

    // A config that does not load is named by its key under the model's artifacts, not by
    // the temporary folder it was read from.
    let config_key = prefix.join("tokenizer_config.json").expect("valid");
    storage
        .put(&config_key, br#"{"bos_token": 1}"#.to_vec().into())
        .await
        .expect("stored");
    let (status, body) = registry
        .call(Method::POST, &path, Some(json!({"tokenizer": "tiny:1"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("`{config_key}`")), "{message}");
    assert!(
        !message.contains(std::env::temp_dir().to_str().unwrap_or("/tmp")),
        "{message}"
    );

    let (status, body) = registry
        .call(Method::POST, &path, Some(json!({"tokenizer": "missing:1"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "tokenizer");
    registry.stop().await;
}
