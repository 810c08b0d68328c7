//! Ferrite checkpoints load in Hugging Face `transformers` and give the same logits and the
//! same greedy continuation. Needs the venv from `scripts/setup-python.sh`; without it each
//! test prints why it skipped and passes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ferrite_model::checkpoint;
use ferrite_model::generate::{self, SamplingParams, TextDecoder};
use ferrite_model::llama::{ForwardOptions, Llama};
use ferrite_model::{ModelConfig, safetensors};
use tch::{Device, Tensor, nn};

#[path = "support/python.rs"]
mod python_venv;

struct NoText;

impl TextDecoder for NoText {
    fn decode(&self, _ids: &[u32]) -> String {
        String::new()
    }
}

fn compare(python: &Path, folder: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/compare_llama.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(folder)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "transformers disagrees:\n{stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("json report")
}

fn tensor_of(rows: &[Vec<i64>]) -> Tensor {
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, rows[0].len() as i64])
}

fn check_config(config: ModelConfig) {
    let Some(python) = python_venv::venv_python() else {
        return;
    };
    tch::manual_seed(3);
    let var_store = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&var_store.root(), &config);
    let dir = tempfile::tempdir().expect("temp dir");
    checkpoint::save(dir.path(), &var_store, &config, None).expect("saves");

    // One full row and one left-padded row, so masks and position ids are compared too.
    let ids = tensor_of(&[
        vec![1, 50, 600, 7, 1999, 42, 8, 9],
        vec![0, 0, 0, 5, 6, 7, 300, 301],
    ]);
    let mask = tensor_of(&[vec![1; 8], vec![0, 0, 0, 1, 1, 1, 1, 1]]);
    let positions = tensor_of(&[(0..8).collect(), vec![0, 0, 0, 0, 1, 2, 3, 4]]);
    let options = ForwardOptions {
        attention_mask: Some(&mask),
        position_ids: Some(&positions),
    };
    let logits = tch::no_grad(|| model.forward(&ids, &options, None));

    let prompt: Vec<u32> = vec![1, 17, 33, 250];
    let params = SamplingParams {
        max_tokens: 12,
        ..SamplingParams::default()
    };
    let greedy = generate::generate(&model, &NoText, &[(prompt.clone(), params)], |_| {})
        .expect("generates");
    let greedy: Vec<i64> = greedy[0].tokens.iter().map(|&t| i64::from(t)).collect();
    let prompt: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let outputs = BTreeMap::from([
        ("input_ids".to_string(), ids),
        ("attention_mask".to_string(), mask),
        ("position_ids".to_string(), positions),
        ("logits".to_string(), logits),
        (
            "prompt".to_string(),
            Tensor::from_slice(&prompt).view([1, -1]),
        ),
        ("greedy".to_string(), Tensor::from_slice(&greedy)),
    ]);
    safetensors::save(
        &dir.path().join("ferrite_outputs.safetensors"),
        &outputs,
        &BTreeMap::new(),
    )
    .expect("writes");

    let report = compare(&python, dir.path());
    let difference = report["max_abs_logit_diff"].as_f64().expect("a difference");
    // The brief's bar for f32: the same math in two implementations agrees to 1e-4.
    assert!(difference <= 1e-4, "max |logit difference| {difference}");
    assert_eq!(report["greedy_equal"], true);
}

#[test]
fn transformers_reproduces_the_logits_of_tiny_with_tied_embeddings_and_grouped_queries() {
    check_config(ModelConfig::preset("tiny").expect("tiny preset exists"));
}

#[test]
fn transformers_reproduces_the_logits_of_a_model_with_a_separate_head() {
    let mut config = ModelConfig::preset("tiny").expect("tiny preset exists");
    config.tie_word_embeddings = false;
    config.num_key_value_heads = Some(4);
    config.rope_theta = 500_000.0;
    check_config(config);
}
