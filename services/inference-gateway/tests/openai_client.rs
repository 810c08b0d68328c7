//! The official `openai` Python package against a running gateway: chat, completions,
//! streaming, several choices and the error cases (scripts/openai_client_check.py).
//!
//! Serves SmolLM2-135M-Instruct (converted from its GGUF) when `scripts/fetch-data.sh` has
//! fetched it, and then also checks that it answers "Paris"; otherwise the chain model from
//! `support`. Needs the venv from `scripts/setup-python.sh` (the script sets it up and runs this
//! ignored test); without the venv the test says SKIPPED.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use ferrite_model::{checkpoint, gguf};
use support::TestGateway;

#[path = "../../../crates/model/tests/support/python.rs"]
mod python_venv;

/// The venv's Python, when it has the `openai` package; otherwise `None`, after saying why.
fn python() -> Option<PathBuf> {
    let python = python_venv::venv_python()?;
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|status| status.success());
    if !has_openai {
        eprintln!(
            "SKIPPED: the venv's {} lacks `openai` (run scripts/setup-python.sh)",
            python.display()
        );
        return None;
    }
    Some(python)
}

fn smollm2() -> Option<PathBuf> {
    let data = std::env::var_os("FERRITE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    let path = data.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    path.exists().then_some(path)
}

#[tokio::test]
#[ignore = "needs the Python venv with openai; scripts/test-openai-client.sh runs it"]
async fn the_official_openai_client_works_against_the_gateway() {
    let Some(python) = python() else {
        return;
    };
    let gateway = TestGateway::spawn().await;
    let (model, expect) = match smollm2() {
        Some(gguf_path) => {
            let dir = tempfile::tempdir().expect("a temp dir");
            let imported = gguf::import(&gguf_path).expect("SmolLM2 imports");
            let loaded = checkpoint::from_gguf(imported, tch::Device::Cpu).expect("builds");
            checkpoint::save(
                dir.path(),
                &loaded.var_store,
                &loaded.config,
                loaded.tokenizer.as_ref(),
            )
            .expect("saves a Hugging Face folder");
            drop(loaded);
            gateway.register_folder("smollm2", dir.path()).await;
            ("smollm2", Some("Paris"))
        }
        None => {
            eprintln!("NOTE: SmolLM2 is not fetched; serving the chain model instead");
            gateway.register_chain_model("chain").await;
            ("chain", None)
        }
    };
    gateway.deploy(model).await;
    let client_token = gateway.token("client").await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script)
        .arg(gateway.url("/v1"))
        .arg(&client_token)
        .arg(model);
    if let Some(word) = expect {
        command.args(["--expect", word]);
    }
    let output = command.output().await.expect("the script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "the openai client checks failed:\n{stdout}{stderr}"
    );
    gateway.stop().await;
}
