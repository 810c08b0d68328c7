//! End to end on a real model: SmolLM2-135M-Instruct imported from GGUF answers a question
//! under greedy decoding, and `transformers` loading Ferrite's export continues identically.
//! Skips, saying so, when `scripts/fetch-data.sh` has not fetched the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferrite_model::checkpoint::{self, Checkpoint};
use ferrite_model::generate::{self, SamplingParams};
use ferrite_model::tokenizer::{ChatMessage, Role, Tokenizer};
use ferrite_model::{gguf, safetensors};
use tch::{Device, Tensor};

#[path = "support/python.rs"]
mod python_venv;

fn model_path() -> PathBuf {
    let data = std::env::var_os("FERRITE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    data.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn import() -> Option<(Checkpoint, Tokenizer)> {
    let path = model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: {} is missing (run scripts/fetch-data.sh)",
            path.display()
        );
        return None;
    }
    let imported = gguf::import(&path).expect("SmolLM2 imports");
    let mut loaded = checkpoint::from_gguf(imported, Device::Cpu).expect("builds the model");
    let tokenizer = loaded.tokenizer.take().expect("GGUF carries a tokenizer");
    Some((loaded, tokenizer))
}

fn answer(
    model: &Checkpoint,
    tokenizer: &Tokenizer,
    question: &str,
) -> (Vec<u32>, Vec<u32>, String) {
    let prompt = tokenizer
        .render_chat(&[ChatMessage::new(Role::User, question)], true)
        .expect("renders ChatML")
        .ids;
    let params = SamplingParams {
        max_tokens: 24,
        stop_token_ids: tokenizer.stop_ids(),
        ..SamplingParams::default()
    };
    let completion =
        generate::generate(&model.model, tokenizer, &[(prompt.clone(), params)], |_| {})
            .expect("generates")
            .remove(0);
    (prompt, completion.tokens, completion.text)
}

#[test]
fn smollm2_says_paris_is_the_capital_of_france_and_transformers_agrees() {
    let Some((model, tokenizer)) = import() else {
        return;
    };
    let (prompt, tokens, text) = answer(&model, &tokenizer, "What is the capital of France?");
    println!("SmolLM2 answered: {text:?}");
    // The published model answers this correctly under greedy decoding.
    assert!(text.contains("Paris"), "{text:?}");

    let Some(python) = python_venv::venv_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    checkpoint::save(
        dir.path(),
        &model.var_store,
        &model.config,
        Some(&tokenizer),
    )
    .expect("exports");
    let to_i64 = |ids: &[u32]| ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>();
    let outputs = BTreeMap::from([
        (
            "prompt".to_string(),
            Tensor::from_slice(&to_i64(&prompt)).view([1, -1]),
        ),
        ("greedy".to_string(), Tensor::from_slice(&to_i64(&tokens))),
        (
            "greedy_stops_on_eos".to_string(),
            Tensor::from_slice(&[1i64]),
        ),
    ]);
    safetensors::save(
        &dir.path().join("ferrite_outputs.safetensors"),
        &outputs,
        &BTreeMap::new(),
    )
    .expect("writes");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/compare_llama.py");
    let output = Command::new(python)
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "transformers' greedy continuation differs:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
