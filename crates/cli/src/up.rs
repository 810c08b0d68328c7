//! `ferrite up`: all seven services in one process, on one port.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use ferrite_platform::ServiceModule;

/// Every service, in the order a pipeline meets them.
pub fn all_services() -> Vec<Box<dyn ServiceModule>> {
    vec![
        Box::new(ferrite_dataset_registry::DatasetRegistry),
        Box::new(ferrite_training_runner::TrainingRunner),
        Box::new(ferrite_feedback_collector::FeedbackCollector),
        Box::new(ferrite_reward_model::RewardModel),
        Box::new(ferrite_grpo_evaluator::GrpoEvaluator),
        Box::new(ferrite_model_registry::ModelRegistry),
        Box::new(ferrite_inference_gateway::InferenceGateway),
    ]
}

pub async fn run() -> ExitCode {
    let never_ready = Arc::new(AtomicBool::new(false));
    let code = ferrite_platform::launch::serve_with("up", all_services(), |application| {
        let url = format!("http://{}", application.local_addr());
        let stop = application.shutdown_token();
        let never_ready = never_ready.clone();
        tokio::spawn(async move {
            if let Err(e) = wait_until_ready(&url, Duration::from_secs(60)).await {
                eprintln!("ferrite up: {e:#}");
                never_ready.store(true, Ordering::SeqCst);
                stop.cancel();
            }
        });
    })
    .await;
    // Giving up on readiness is a failure, though the shutdown that follows is orderly.
    if never_ready.load(Ordering::SeqCst) {
        ExitCode::FAILURE
    } else {
        code
    }
}

/// Polls `/readyz` until every dependency answers, then prints the status table.
async fn wait_until_ready(url: &str, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let report = readiness(url).await?;
        if report["status"] == "ready" {
            print_report(url, &report);
            eprintln!("ferrite is up at {url} (stop with Ctrl-C)");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            print_report(url, &report);
            anyhow::bail!("not ready after {} s", patience.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints one line per service and dependency; true when everything is ready.
pub async fn print_status(url: &str) -> anyhow::Result<bool> {
    let report = readiness(url).await?;
    print_report(url, &report);
    Ok(report["status"] == "ready")
}

async fn readiness(url: &str) -> anyhow::Result<serde_json::Value> {
    let response = reqwest::get(format!("{url}/readyz"))
        .await
        .with_context(|| format!("no Ferrite answers at {url}"))?;
    response
        .json()
        .await
        .context("`/readyz` did not answer JSON")
}

fn print_report(url: &str, report: &serde_json::Value) {
    println!("{:<22} status", "component");
    let checks = report["checks"].as_object().cloned().unwrap_or_default();
    for (name, outcome) in checks {
        let outcome = outcome.as_str().unwrap_or("?");
        let label = name
            .strip_prefix("postgres:")
            .map_or(name.clone(), |schema| {
                if schema == "auth" {
                    "auth (tokens)".to_owned()
                } else {
                    schema.replace('_', "-")
                }
            });
        println!(
            "{label:<22} {}",
            if outcome == "ok" { "ready" } else { outcome }
        );
    }
    println!(
        "{:<22} {}",
        "overall",
        report["status"].as_str().unwrap_or("?")
    );
    println!("OpenAPI: {url}/openapi.json");
}
