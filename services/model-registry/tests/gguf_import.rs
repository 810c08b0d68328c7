//! A real model through the registry: SmolLM2-135M-Instruct converted from GGUF into a Hugging
//! Face folder, packed and uploaded, then read back. Skips, saying so, when
//! `scripts/fetch-data.sh` has not fetched the model.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};

use common::app::ADMIN_TOKEN;
use ferrite_model::config::ModelConfig;
use ferrite_model_registry::import::{gguf_to_folder, tar_folder};

fn model_path() -> PathBuf {
    let data = std::env::var_os("FERRITE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    data.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[tokio::test]
async fn smollm2_from_gguf_uploads_as_a_version_with_its_published_shape() {
    let gguf = model_path();
    if !gguf.exists() {
        eprintln!(
            "SKIPPED: {} is missing (run scripts/fetch-data.sh)",
            gguf.display()
        );
        return;
    }
    tch::set_num_threads(1);
    let scratch = tempfile::tempdir().expect("temp dir");
    let folder = scratch.path().join("smollm2");
    let archive = scratch.path().join("smollm2.tar");
    let (folder_for_task, archive_for_task) = (folder.clone(), archive.clone());
    tokio::task::spawn_blocking(move || {
        gguf_to_folder(&gguf, &folder_for_task).expect("SmolLM2 converts");
        tar_folder(&folder_for_task, &archive_for_task).expect("the folder packs");
    })
    .await
    .expect("the conversion task joins");

    let registry = support::spawn().await;
    assert_eq!(registry.create_model("smollm2-135m-instruct").await, 201);
    let body = tokio::fs::File::open(&archive)
        .await
        .expect("the archive opens");
    let response = registry
        .client
        .post(registry.url("/v1/registry/models/smollm2-135m-instruct/uploads"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/x-tar")
        .body(reqwest::Body::from(body))
        .send()
        .await
        .expect("the registry answers");
    assert_eq!(response.status(), 201);
    let version: serde_json::Value = response.json().await.expect("a version");
    let id = version["id"].as_str().expect("an id");

    let (status, files) = registry
        .get(&format!("/v1/registry/versions/{id}/files"))
        .await;
    assert_eq!(status, 200, "{files}");
    let size_of = |name: &str| {
        files
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["path"] == name)
            .and_then(|f| f["size_bytes"].as_u64())
    };
    assert!(size_of("tokenizer.json").is_some(), "{files}");

    let config = registry
        .client
        .get(registry.url(&format!("/v1/registry/versions/{id}/files/config.json")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("a body");
    let config = ModelConfig::from_json_str(&config).expect("a Llama config");
    // The published shape of SmolLM2-135M (see DATA.md): 30 layers, hidden 576, 9 heads with
    // 3 key/value heads, MLP 1536, vocabulary 49,152.
    assert_eq!(
        (
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads
        ),
        (30, 576, 9)
    );
    assert_eq!(
        (
            config.kv_heads(),
            config.intermediate_size,
            config.vocab_size
        ),
        (3, 1536, 49152)
    );
    // Every parameter is stored dequantised as f32: four bytes each, plus the header.
    let weights = size_of("model.safetensors").expect("weights are stored");
    let parameters = u64::try_from(config.parameter_count()).expect("positive");
    assert!(
        weights >= parameters * 4,
        "{weights} bytes for {parameters} parameters"
    );
    registry.stop().await;
}
