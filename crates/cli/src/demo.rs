//! `ferrite demo`: the bundled pipeline on real data, a chat answer, and the report.
//!
//! The demo checks that the fetched data is there, uses the Ferrite answering at `--url` or
//! starts `ferrite up` as a child process with an admin token of its own, runs
//! `examples/demo.yaml` (or `demo-quick.yaml`), asks every deployment the same questions through
//! the gateway, prints one answer as the gateway sent it, and writes the report.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::pipeline::client::Client;
use crate::pipeline::report::{self, ServingSample};
use crate::pipeline::{self, Run, RunOptions};

/// Files the demo's pipelines read, and how to get them.
const DATA: [&str; 3] = [
    "data/corpus/corpus.txt",
    "data/sft/alpaca_en_demo.json",
    "data/chat/chitchat.jsonl",
];

/// Questions put to every deployment.
const PROMPTS: [&str; 2] = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
];

/// How long `ferrite up` may take to become ready.
const STARTUP_PATIENCE: Duration = Duration::from_secs(120);

/// Options of `ferrite demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub quick: bool,
    /// A pipeline file to run instead of the bundled one.
    pub file: Option<PathBuf>,
    pub url: String,
    /// A token for a Ferrite that is already running.
    pub token: Option<String>,
    pub runs_dir: PathBuf,
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    check_data()?;
    let file = options.file.clone().unwrap_or_else(|| {
        PathBuf::from(if options.quick {
            "examples/demo-quick.yaml"
        } else {
            "examples/demo.yaml"
        })
    });
    let pipeline = pipeline::check(&file)?;
    let folder = options.runs_dir.join(&pipeline.name);
    let server = Server::ensure(&options, &folder).await?;

    let run_options = RunOptions {
        url: server.url.clone(),
        token: server.token.clone(),
        runs_dir: options.runs_dir.clone(),
        poll: pipeline::POLL,
    };
    let mut run = Run::new(pipeline, &run_options)?;
    let outcome = run.run_all().await;
    let samples = match &outcome {
        Ok(()) => ask_deployments(&run).await,
        Err(_) => Ok(Vec::new()),
    };
    let written = report::write(
        run.pipeline(),
        run.state(),
        run.folder(),
        samples.as_deref().unwrap_or_default(),
    );
    server.stop().await;
    outcome?;
    samples?;
    let html = written?;

    println!(
        "\n{}",
        report::summary_markdown(run.pipeline(), run.state())
    );
    println!(
        "report: {} and {}",
        html.display(),
        html.with_extension("md").display()
    );
    println!("demo finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn check_data() -> anyhow::Result<()> {
    let missing: Vec<&str> = DATA
        .iter()
        .copied()
        .filter(|path| !Path::new(path).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the demo's data is missing ({}); run scripts/fetch-data.sh from the repository root first",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Asks every deployment of the run each prompt; prints the first answer as the gateway sent it.
async fn ask_deployments(run: &Run) -> anyhow::Result<Vec<ServingSample>> {
    let client = run.client();
    let mut samples = Vec::new();
    let deployments = run
        .state()
        .stages
        .values()
        .filter_map(|record| Some((record.deployment.clone()?, record.model_label.clone())));
    for (deployment, label) in deployments.collect::<Vec<_>>() {
        for prompt in PROMPTS {
            let sample = ask(
                client,
                &deployment,
                prompt,
                label.clone().unwrap_or_default(),
            )
            .await?;
            samples.push(sample);
        }
    }
    Ok(samples)
}

async fn ask(
    client: &Client,
    deployment: &str,
    prompt: &str,
    model_label: String,
) -> anyhow::Result<ServingSample> {
    let started = Instant::now();
    let (answer, version) = client
        .chat(deployment, prompt, 48)
        .await
        .with_context(|| format!("deployment `{deployment}` did not answer"))?;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if prompt == PROMPTS[0] {
        println!("chat completion from `{deployment}`:");
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    }
    Ok(ServingSample {
        deployment: deployment.to_owned(),
        version_id: version.unwrap_or_default(),
        model_label,
        prompt: prompt.to_owned(),
        answer: answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        completion_tokens: answer["usage"]["completion_tokens"].as_u64(),
        latency_ms,
    })
}

/// The Ferrite the demo talks to, and the child process when the demo started it.
struct Server {
    url: String,
    token: String,
    child: Option<tokio::process::Child>,
}

impl Server {
    /// Uses a Ferrite that answers at `options.url`, or starts one.
    async fn ensure(options: &DemoOptions, folder: &Path) -> anyhow::Result<Self> {
        if answers(&options.url).await {
            let token = options.token.clone().context(
                "a Ferrite answers at the URL but no token was given; pass --token or FERRITE_TOKEN (engineer or admin)",
            )?;
            eprintln!("demo: using the Ferrite at {}", options.url);
            return Ok(Self {
                url: options.url.clone(),
                token,
                child: None,
            });
        }
        Self::start(&options.url, folder).await
    }

    /// Starts `ferrite up` on the URL's port with an admin token made for this run.
    async fn start(url: &str, folder: &Path) -> anyhow::Result<Self> {
        let port = url::Url::parse(url)
            .ok()
            .and_then(|parsed| parsed.port_or_known_default())
            .context("the URL names no port")?;
        let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let log_path = folder.join("ferrite-up.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let program = std::env::current_exe().context("cannot find the ferrite executable")?;
        eprintln!(
            "demo: starting `ferrite up` on port {port} (log: {})",
            log_path.display()
        );
        let child = tokio::process::Command::new(program)
            .arg("up")
            .env("FERRITE_HTTP_HOST", "127.0.0.1")
            .env("FERRITE_HTTP_PORT", port.to_string())
            .env("FERRITE_ADMIN_TOKEN", &token)
            .stdout(Stdio::from(
                log.try_clone().context("cannot share the log file")?,
            ))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `ferrite up`")?;
        let server = Self {
            url: url.to_owned(),
            token,
            child: Some(child),
        };
        server.wait_until_ready(&log_path).await?;
        Ok(server)
    }

    async fn wait_until_ready(&self, log_path: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_PATIENCE;
        loop {
            if ready(&self.url).await {
                eprintln!("demo: ferrite is up at {}", self.url);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "`ferrite up` was not ready within {} s; see {}",
                    STARTUP_PATIENCE.as_secs(),
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops the child the demo started: SIGTERM for an orderly shutdown, then a kill.
    async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

async fn answers(url: &str) -> bool {
    reqwest::get(format!("{url}/healthz")).await.is_ok()
}

async fn ready(url: &str) -> bool {
    match reqwest::get(format!("{url}/readyz")).await {
        Ok(response) => response
            .json::<serde_json::Value>()
            .await
            .is_ok_and(|report| report["status"] == "ready"),
        Err(_) => false,
    }
}
