//! `ferrite model`: import a GGUF model into the registry, list and show models, move aliases.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ferrite_model_registry::import::{gguf_to_folder, tar_folder};
use indicatif::ProgressBar;
use serde_json::{Value, json};

use crate::pipeline::client::{ApiFailure, Client};

#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
    /// Base URL of the running Ferrite.
    #[arg(
        long,
        global = true,
        env = "FERRITE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// A bearer token with the engineer role (admin to move a protected alias).
    #[arg(
        long,
        global = true,
        env = "FERRITE_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Convert a GGUF file into a Hugging Face folder here and upload it as the next version
    /// of NAME (created when new).
    Import {
        /// The GGUF v3 file (F32, F16, BF16, Q8_0, Q4_0 or Q4_1 tensors).
        #[arg(long)]
        gguf: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// List models.
    List,
    /// Show a model with its versions and aliases (NAME), or one version (NAME:N,
    /// NAME@ALIAS, an id).
    Show { reference: String },
    /// Point ALIAS of model NAME at VERSION (a number or a version id).
    Alias {
        name: String,
        alias: String,
        version: String,
        /// Protect the alias, so only an admin may move it (admin only).
        #[arg(long)]
        protected: bool,
    },
    /// Print the lineage of a version: its parents, jobs and datasets.
    Lineage { reference: String },
}

pub async fn run(args: ModelArgs) -> anyhow::Result<()> {
    if args.token.is_empty() {
        anyhow::bail!("give a token with --token or FERRITE_TOKEN");
    }
    let client = Client::new(&args.url, &args.token)?;
    match args.command {
        ModelCommand::Import {
            gguf,
            name,
            description,
        } => import(&client, &args.url, &args.token, &gguf, &name, description).await,
        ModelCommand::List => list(&client).await,
        ModelCommand::Show { reference } => show(&client, &reference).await,
        ModelCommand::Alias {
            name,
            alias,
            version,
            protected,
        } => {
            let version = match version.parse::<u64>() {
                Ok(number) => json!(number),
                Err(_) => json!(version),
            };
            let mut body = json!({ "version": version });
            if protected {
                body["protected"] = json!(true);
            }
            let path = format!("/v1/registry/models/{name}/aliases/{alias}");
            let moved = client.put(&path, &body).await?;
            println!("{name}@{alias} -> {name}:{}", moved["version_number"]);
            Ok(())
        }
        ModelCommand::Lineage { reference } => {
            let version = client
                .get(&format!("/v1/registry/resolve/{reference}"))
                .await?;
            let id = text(&version["id"]);
            let lineage = client
                .get(&format!("/v1/registry/versions/{id}/lineage"))
                .await?;
            println!("{}", serde_json::to_string_pretty(&lineage)?);
            Ok(())
        }
    }
}

async fn import(
    client: &Client,
    url: &str,
    token: &str,
    gguf: &Path,
    name: &str,
    description: Option<String>,
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("cannot make a scratch folder")?;
    let folder = scratch.path().join("model");
    let archive = scratch.path().join("model.tar");
    let converting = spinner(format!("converting {}", gguf.display()));
    let (source, folder_for_task, archive_for_task) =
        (gguf.to_path_buf(), folder.clone(), archive.clone());
    tokio::task::spawn_blocking(move || {
        gguf_to_folder(&source, &folder_for_task)?;
        tar_folder(&folder_for_task, &archive_for_task)
    })
    .await
    .context("the conversion task failed")??;
    converting.finish_and_clear();

    match client
        .post(
            "/v1/registry/models",
            &json!({"name": name, "description": description}),
        )
        .await
    {
        Ok(_) => println!("created model {name}"),
        Err(error) if is_status(&error, 409) => {}
        Err(error) => return Err(error),
    }

    let size_bytes = tokio::fs::metadata(&archive).await?.len();
    let uploading = spinner(format!("uploading {} MB", size_bytes / 1_000_000));
    let file = tokio::fs::File::open(&archive).await?;
    let path = format!("/v1/registry/models/{name}/uploads");
    let response = reqwest::Client::new()
        .post(format!("{}{path}", url.trim_end_matches('/')))
        .bearer_auth(token)
        .header("content-type", "application/x-tar")
        .header("content-length", size_bytes)
        .body(reqwest::Body::from(file))
        .send()
        .await
        .with_context(|| format!("no answer from POST {path}"))?;
    uploading.finish_and_clear();
    let status = response.status();
    let version: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!(
            "POST {path}: {status}: {}",
            text(&version["error"]["message"])
        );
    }
    println!(
        "registered {}:{} ({}, id {}, at {})",
        text(&version["model_name"]),
        version["number"],
        text(&version["kind"]),
        text(&version["id"]),
        text(&version["artifact_prefix"])
    );
    Ok(())
}

async fn list(client: &Client) -> anyhow::Result<()> {
    let models = client.get("/v1/registry/models").await?;
    println!("{:<40} {:<20} description", "name", "created by");
    for model in models.as_array().into_iter().flatten() {
        println!(
            "{:<40} {:<20} {}",
            text(&model["name"]),
            text(&model["created_by"]),
            text(&model["description"])
        );
    }
    Ok(())
}

async fn show(client: &Client, reference: &str) -> anyhow::Result<()> {
    let is_version = reference.contains([':', '@']) || uuid::Uuid::parse_str(reference).is_ok();
    if is_version {
        let version = client
            .get(&format!("/v1/registry/resolve/{reference}"))
            .await?;
        println!("{}", serde_json::to_string_pretty(&version)?);
        return Ok(());
    }
    let model = client
        .get(&format!("/v1/registry/models/{reference}"))
        .await?;
    println!(
        "{} ({} version(s))",
        text(&model["name"]),
        model["versions"]
    );
    for alias in model["aliases"].as_array().into_iter().flatten() {
        let lock = if alias["protected"] == true {
            " (protected)"
        } else {
            ""
        };
        println!(
            "  @{} -> {}{lock}",
            text(&alias["alias"]),
            alias["version_number"]
        );
    }
    let versions = client
        .get(&format!("/v1/registry/models/{reference}/versions"))
        .await?;
    println!(
        "{:>4} {:<12} {:<38} {:<38} metrics",
        "#", "kind", "id", "job"
    );
    for version in versions.as_array().into_iter().flatten() {
        println!(
            "{:>4} {:<12} {:<38} {:<38} {}",
            version["number"].to_string(),
            text(&version["kind"]),
            text(&version["id"]),
            text(&version["source_job_id"]),
            version["metrics"]
        );
    }
    Ok(())
}

fn spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner
}

fn is_status(error: &anyhow::Error, status: u16) -> bool {
    error
        .downcast_ref::<ApiFailure>()
        .is_some_and(|failure| failure.status == status)
}

/// A JSON string's text, or `-` for anything else (null, absent).
fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}
