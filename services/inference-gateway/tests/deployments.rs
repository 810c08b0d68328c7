//! Deploying a version the engine cannot load: refused as the version's fault, leaving
//! nothing in the gateway's cache of model folders.

mod support;

use std::collections::BTreeMap;

use serde_json::json;
use support::{ADMIN_TOKEN, TestGateway, save_chain_model};

#[tokio::test]
async fn a_version_whose_weights_lack_what_the_config_requires_is_a_422_and_leaves_no_copy() {
    // The attack's weights: one tensor `x`, where the config requires the whole model.
    let dir = tempfile::tempdir().expect("a temp dir");
    save_chain_model(dir.path());
    let lone = BTreeMap::from([(
        "x".to_owned(),
        tch::Tensor::zeros([2], tch::kind::FLOAT_CPU),
    )]);
    ferrite_model::safetensors::save(
        &dir.path().join("model.safetensors"),
        &lone,
        &BTreeMap::new(),
    )
    .expect("writes");
    let gateway = TestGateway::spawn().await;
    let version = gateway.register_folder("broken", dir.path()).await;

    let (status, body) = gateway
        .post(
            "/v1/deployments",
            ADMIN_TOKEN,
            &json!({"name": "broken", "model": "broken:1"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "model_unloadable", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    let prefix = version["artifact_prefix"].as_str().expect("a prefix");
    let file = format!("{prefix}model.safetensors");
    assert!(
        message.contains(&file),
        "names the file in storage: {message}"
    );
    assert!(message.contains("which the config requires"), "{message}");
    let cache = std::path::PathBuf::from(&gateway.env["FERRITE_WORKER_SCRATCH_DIR"])
        .join("ferrite-gateway-models");
    assert!(
        !message.contains(&cache.display().to_string()),
        "the gateway's own disk is not the client's business: {message}"
    );
    let left: Vec<_> = std::fs::read_dir(&cache)
        .map(|entries| entries.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the failed copy is removed: {left:?}");

    let (status, _, body) = gateway
        .send(reqwest::Method::GET, "/v1/deployments", ADMIN_TOKEN, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["data"], json!([]), "nothing is recorded");
    gateway.stop().await;
}
