//! Adapter versions: the gateway loads the base model, merges the PEFT adapter into it and
//! serves the result, which must decode as the base with the adapter attached does in-process.

mod support;

use ferrite_model::generate::{self, SamplingParams};
use ferrite_model::lora::{LoraAdapter, LoraConfig, TargetModules};
use ferrite_model::{adapter, checkpoint};
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, CHAIN, TestGateway, save_chain_model};
use uuid::Uuid;

const PROMPT: &str = "Hello";
const MAX_TOKENS: usize = 12;

/// Writes an adapter on the chain model's output projections (zero in the base, so a large
/// update changes the output) with a non-zero B, and returns the text the adapted model
/// decodes greedily after PROMPT, computed with the adapter attached and unmerged.
fn write_adapter(base_dir: &std::path::Path, adapter_dir: &std::path::Path) -> String {
    tch::manual_seed(21);
    let mut base = checkpoint::load(base_dir, tch::Device::Cpu).expect("the base loads");
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["o_proj".into()]),
        use_rslora: false,
    };
    let lora = LoraAdapter::attach(&mut base.model, config, 5).expect("attaches");
    lora.set_training(false);
    tch::no_grad(|| {
        for (name, mut tensor) in lora.named_tensors() {
            if name.contains("lora_B") {
                tensor.copy_(&(tensor.randn_like() * 50.0));
            }
        }
    });
    adapter::save(adapter_dir, &lora, "chain").expect("saves the PEFT folder");

    let tokenizer = base
        .tokenizer
        .as_ref()
        .expect("the chain model has a tokenizer");
    let params = SamplingParams {
        max_tokens: MAX_TOKENS,
        stop_token_ids: tokenizer.stop_ids(),
        ..SamplingParams::default()
    };
    let prompt = tokenizer.encode(PROMPT, true).expect("encodes");
    generate::generate(&base.model, tokenizer, &[(prompt, params)], |_| {})
        .expect("generates")
        .remove(0)
        .text
}

#[tokio::test]
async fn an_adapter_version_serves_its_base_with_the_adapter_merged() {
    let gateway = TestGateway::spawn().await;
    let base_dir = tempfile::tempdir().expect("a temp dir");
    let adapter_dir = tempfile::tempdir().expect("a temp dir");
    save_chain_model(base_dir.path());
    let expected = write_adapter(base_dir.path(), adapter_dir.path());
    assert!(
        !CHAIN.starts_with(&expected),
        "the adapter must change the output: {expected:?}"
    );

    let base = gateway.register_folder("chain", base_dir.path()).await;
    let base_id: Uuid = serde_json::from_value(base["id"].clone()).expect("an id");
    let tuned = gateway
        .register("tuned", adapter_dir.path(), "adapter", Some(base_id))
        .await;
    gateway.deploy("tuned").await;

    let body =
        json!({"model": "tuned", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0});
    let (status, headers, text) = gateway
        .send(
            reqwest::Method::POST,
            "/v1/completions",
            ADMIN_TOKEN,
            Some(&body),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        headers["x-ferrite-model-version"],
        tuned["id"].as_str().expect("an id")
    );
    let response: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(response["choices"][0]["text"], expected);
    gateway.stop().await;
}

#[tokio::test]
async fn an_adapter_without_a_base_version_is_refused() {
    let gateway = TestGateway::spawn().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("adapter_config.json"), "{}").expect("writes");
    gateway
        .register("orphan", dir.path(), "adapter", None)
        .await;
    let (status, body) = gateway
        .post(
            "/v1/deployments",
            ADMIN_TOKEN,
            &json!({"name": "orphan", "model": "orphan:1"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "adapter_without_base");
    gateway.stop().await;
}
