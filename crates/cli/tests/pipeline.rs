//! `ferrite pipeline`: checks that name their lines, and a real run that resumes after a kill.
//!
//! The run test starts the `ferrite` binary's own `ferrite up` (every service, a local worker)
//! on a fresh database, exchange and store folder, then drives `ferrite pipeline run` as a user
//! would.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::app::{ADMIN_TOKEN, test_env};
use common::{TestDatabase, eventually, unique_name};
use serde_json::Value;

const FERRITE: &str = env!("CARGO_BIN_EXE_ferrite");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(prefix: &str) -> PathBuf {
    let folder = std::env::temp_dir().join(unique_name(prefix));
    std::fs::create_dir_all(&folder).expect("create a scratch folder");
    folder
}

fn check(source: &str) -> Output {
    let folder = scratch("ferrite-pipeline-check");
    let file = folder.join("p.yaml");
    std::fs::write(&file, source).expect("write the pipeline");
    Command::new(FERRITE)
        .args(["pipeline", "check"])
        .arg(&file)
        .output()
        .expect("run ferrite pipeline check")
}

#[test]
fn check_reports_every_problem_with_its_line_and_fails() {
    let source = "\
name: p
stages:
  - name: tok
    kind: tokeniser
  - name: pre
    kind: pretrain
    inputs:
      datasets: [corpus]
    hyper_parameters:
      preset: enormous
  - name: serve
    kind: deploy
    inputs:
      model: stage:nowhere
  - name: tuned
    kind: sft
    inputs:
      datasets: [alpaca]
      base_model: stage:pre
    keep_checkpoints: 4294967296
    max_attempts: twice
";
    let output = check(source);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    // Line 4: the misspelt kind; line 7: `inputs` of a pretrain without `base_model`;
    // line 10: a preset ferrite_model does not know; line 14: a stage that does not exist;
    // lines 20 and 21: job options the runner would refuse (both are u32 counts of at least
    // one; 2^32 does not fit).
    for expected in [
        "p.yaml:4: unknown stage kind `tokeniser`",
        "p.yaml:7: a `pretrain` stage needs `inputs.base_model`",
        "p.yaml:10: hyper_parameters.preset",
        "p.yaml:14: there is no stage named `nowhere`",
        "p.yaml:20: keep_checkpoints: must be a whole number from 1 to 4294967295, not 4294967296",
        "p.yaml:21: max_attempts: must be a whole number from 1 to 4294967295, not a string",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
}

#[test]
fn the_bundled_pipelines_pass_their_checks() {
    for name in ["demo.yaml", "demo-quick.yaml", "smollm2-lora.yaml"] {
        let file = repo_root().join("examples").join(name);
        let output = Command::new(FERRITE)
            .args(["pipeline", "check"])
            .arg(&file)
            .output()
            .expect("run ferrite pipeline check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name}:\n{stderr}");
    }
}

/// A `ferrite up` child on its own database, exchange, store and port.
struct Ferrite {
    child: std::process::Child,
    url: String,
    database: Option<TestDatabase>,
}

impl Ferrite {
    async fn start() -> Self {
        let database = TestDatabase::create().await;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let env = test_env(
            &database.name,
            &[("FERRITE_HTTP_PORT".into(), port.to_string())],
        );
        let log = std::fs::File::create(scratch("ferrite-up-log").join("up.log")).expect("log");
        let child = Command::new(FERRITE)
            .arg("up")
            .envs(env)
            .env("FERRITE_LOG_FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ferrite up");
        let url = format!("http://127.0.0.1:{port}");
        let readyz = format!("{url}/readyz");
        eventually(Duration::from_secs(90), "ferrite up to be ready", || {
            let readyz = readyz.clone();
            async move {
                match reqwest::get(&readyz).await {
                    Ok(answer) => answer
                        .json::<Value>()
                        .await
                        .is_ok_and(|report| report["status"] == "ready"),
                    Err(_) => false,
                }
            }
        })
        .await;
        Self {
            child,
            url,
            database: Some(database),
        }
    }

    fn pipeline_run(&self, file: &Path, runs: &Path) -> Command {
        let mut command = Command::new(FERRITE);
        command
            .args(["pipeline", "run"])
            .arg(file)
            .arg("--runs-dir")
            .arg(runs)
            .env("FERRITE_URL", &self.url)
            .env("FERRITE_TOKEN", ADMIN_TOKEN);
        command
    }

    async fn jobs(&self) -> Vec<Value> {
        let answer: Value = reqwest::Client::new()
            .get(format!("{}/v1/jobs", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("list jobs")
            .json()
            .await
            .expect("jobs as JSON");
        answer["data"].as_array().cloned().unwrap_or_default()
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
        if let Some(database) = self.database.take() {
            database.drop().await;
        }
    }
}

fn tiny_pipeline(folder: &Path) -> PathBuf {
    let corpus = repo_root().join("data/corpus/corpus.txt");
    // 800 kB of text: enough tokens that the pretrainer's held-out split (one 4,096-token
    // block in fifty) is not empty.
    let source = format!(
        "\
name: resume-test
datasets:
  - name: resume-corpus
    kind: text
    path: {corpus}
    max_bytes: 800000
stages:
  - name: tokenizer
    kind: tokenizer
    inputs: {{datasets: [resume-corpus]}}
    hyper_parameters: {{vocab_size: 400}}
  - name: pretrain
    kind: pretrain
    inputs: {{datasets: [resume-corpus], base_model: 'stage:tokenizer'}}
    hyper_parameters:
      preset: tiny
      total_steps: 150
      warmup_steps: 5
      batch_size: 4
      sequence_length: 64
      eval_interval: 50
      eval_windows: 4
      checkpoint_interval: 50
      threads: 1
  - name: register
    kind: register
    inputs: {{model: 'stage:pretrain'}}
    alias: candidate
",
        corpus = corpus.display()
    );
    let file = folder.join("resume.yaml");
    std::fs::write(&file, source).expect("write the pipeline");
    file
}

fn state(runs: &Path) -> Value {
    std::fs::read(runs.join("resume-test/state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null)
}

#[tokio::test]
#[ignore = "requires the fetched corpus (scripts/fetch-data.sh)"]
async fn a_killed_run_resumes_without_submitting_any_job_twice() {
    let ferrite = Ferrite::start().await;
    let folder = scratch("ferrite-pipeline-run");
    let runs = folder.join("runs");
    let file = tiny_pipeline(&folder);

    // Kill the runner once the pretraining job is submitted: the job keeps running.
    let mut first = ferrite
        .pipeline_run(&file, &runs)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the first run");
    eventually(
        Duration::from_secs(120),
        "the pretrain job to be submitted",
        || {
            let submitted = state(&runs)["stages"]["pretrain"]["job_id"].is_string();
            async move { submitted }
        },
    )
    .await;
    first.kill().expect("kill the first run");
    first.wait().expect("reap the first run");
    let pretrain_job = state(&runs)["stages"]["pretrain"]["job_id"].clone();

    let second = ferrite
        .pipeline_run(&file, &runs)
        .output()
        .expect("run again");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(
        stderr.contains("tokenizer finished earlier, skipped"),
        "{stderr}"
    );

    // One tokenizer job and one pretrain job, the latter followed again rather than resubmitted.
    let after = state(&runs);
    assert_eq!(ferrite.jobs().await.len(), 2);
    assert_eq!(after["stages"]["pretrain"]["job_id"], pretrain_job);
    for stage in ["tokenizer", "pretrain", "register"] {
        assert_eq!(
            after["stages"][stage]["status"], "succeeded",
            "{stage}: {after}"
        );
    }
    let version = after["stages"]["pretrain"]["model_version_id"]
        .as_str()
        .expect("a registered version");
    assert_eq!(after["stages"]["register"]["model_version_id"], version);

    // A third run has nothing left to do, and the report names the version by id.
    let third = ferrite
        .pipeline_run(&file, &runs)
        .output()
        .expect("run a third time");
    assert!(third.status.success());
    assert_eq!(ferrite.jobs().await.len(), 2);
    let report = std::fs::read_to_string(runs.join("resume-test/report.md")).expect("report");
    assert!(report.contains(version), "{report}");
    assert!(report.contains("(unigram)"), "{report}");

    ferrite.stop().await;
    let _ = std::fs::remove_dir_all(&folder);
}
