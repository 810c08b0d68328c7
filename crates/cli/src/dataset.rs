//! `ferrite dataset`: upload a file as a dataset version (with a progress bar), list, show.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::io::AsyncReadExt as _;

/// Where Ferrite answers and who asks.
#[derive(Debug, Args)]
pub struct Connection {
    /// Base URL of the running Ferrite.
    #[arg(long, env = "FERRITE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A bearer token with the engineer or admin role.
    #[arg(long, env = "FERRITE_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Upload FILE as the next version of dataset NAME; a `.gz` file is sent gzip-encoded.
    Upload {
        name: String,
        file: PathBuf,
        /// text, sft, chat, preference, ranking or prompts.
        #[arg(long)]
        kind: String,
        /// jsonl, json or text; the registry picks one from the kind and content when absent.
        #[arg(long)]
        format: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List datasets with their version counts and aliases.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a dataset and its versions (NAME), or one version (NAME:N, NAME@ALIAS, an id).
    Show {
        reference: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn run(command: DatasetCommand) -> anyhow::Result<()> {
    match command {
        DatasetCommand::Upload {
            name,
            file,
            kind,
            format,
            connection,
        } => upload(&connection, &name, &file, &kind, format.as_deref()).await,
        DatasetCommand::List { connection } => {
            let datasets = get(&connection, "/v1/datasets").await?;
            println!("{:<32} {:<11} {:>8}  aliases", "name", "kind", "versions");
            for dataset in datasets.as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:<11} {:>8}  {}",
                    text(&dataset["name"]),
                    text(&dataset["kind"]),
                    dataset["versions"].to_string(),
                    dataset["aliases"]
                );
            }
            Ok(())
        }
        DatasetCommand::Show {
            reference,
            connection,
        } => show(&connection, &reference).await,
    }
}

async fn show(connection: &Connection, reference: &str) -> anyhow::Result<()> {
    let is_version = reference.contains([':', '@']) || uuid::Uuid::parse_str(reference).is_ok();
    if is_version {
        let version = get(connection, &format!("/v1/datasets/resolve/{reference}")).await?;
        println!("{}", serde_json::to_string_pretty(&version)?);
        return Ok(());
    }
    let dataset = get(connection, &format!("/v1/datasets/{reference}")).await?;
    println!(
        "{} ({}), {} version(s), aliases {}",
        text(&dataset["name"]),
        text(&dataset["kind"]),
        dataset["versions"],
        dataset["aliases"]
    );
    let versions = get(connection, &format!("/v1/datasets/{reference}/versions")).await?;
    println!(
        "{:>4} {:<6} {:>10} {:>12} {:<12} id",
        "#", "format", "rows", "bytes", "sha256"
    );
    for version in versions.as_array().into_iter().flatten() {
        println!(
            "{:>4} {:<6} {:>10} {:>12} {:<12} {}",
            version["number"].to_string(),
            text(&version["format"]),
            version["rows"].to_string(),
            version["bytes"].to_string(),
            text(&version["sha256"]).get(..12).unwrap_or(""),
            text(&version["id"])
        );
    }
    Ok(())
}

async fn upload(
    connection: &Connection,
    name: &str,
    file: &Path,
    kind: &str,
    format: Option<&str>,
) -> anyhow::Result<()> {
    let handle = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let size = handle.metadata().await?.len();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("uploading {}", file.display()));
    bar.enable_steady_tick(Duration::from_millis(200));

    let mut path = format!("/v1/datasets/{name}/versions?kind={kind}");
    if let Some(format) = format {
        path.push_str(&format!("&format={format}"));
    }
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", connection.url.trim_end_matches('/')))
        .bearer_auth(&connection.token)
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(chunks(handle, bar.clone())));
    if file.extension().is_some_and(|e| e == "gz") {
        request = request.header("content-encoding", "gzip");
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("no answer from POST {path}"))?;
    bar.finish_and_clear();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        print_problems(&body);
        anyhow::bail!("{status}: {}", text(&body["error"]["message"]));
    }
    let verb = if status == reqwest::StatusCode::CREATED {
        "created"
    } else {
        "already there as"
    };
    println!(
        "{verb} {}:{} ({} rows, {} bytes, sha256 {})",
        text(&body["dataset_name"]),
        body["number"],
        body["rows"],
        body["bytes"],
        text(&body["sha256"])
    );
    Ok(())
}

/// The file as a stream of chunks that advance the progress bar as they are sent.
fn chunks(
    file: tokio::fs::File,
    bar: ProgressBar,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    futures::stream::try_unfold(file, move |mut file| {
        let bar = bar.clone();
        async move {
            let mut buffer = vec![0u8; 256 * 1024];
            let read = file.read(&mut buffer).await?;
            if read == 0 {
                return Ok(None);
            }
            buffer.truncate(read);
            bar.inc(read as u64);
            Ok(Some((buffer, file)))
        }
    })
}

fn print_problems(body: &Value) {
    for problem in body["error"]["problems"].as_array().into_iter().flatten() {
        let line = match &problem["line"] {
            Value::Number(line) => format!("line {line}"),
            _ => "upload".to_owned(),
        };
        let field = match &problem["field"] {
            Value::String(field) => format!(", field `{field}`"),
            _ => String::new(),
        };
        eprintln!("  {line}{field}: {}", text(&problem["message"]));
    }
    if let Some(total) = body["error"]["problems_total"].as_u64() {
        let listed = body["error"]["problems"].as_array().map_or(0, Vec::len);
        if total > listed as u64 {
            eprintln!("  ... and {} more", total - listed as u64);
        }
    }
}

async fn get(connection: &Connection, path: &str) -> anyhow::Result<Value> {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", connection.url.trim_end_matches('/')))
        .bearer_auth(&connection.token)
        .send()
        .await
        .with_context(|| format!("no answer from GET {path}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!("GET {path}: {status}: {}", text(&body["error"]["message"]));
    }
    Ok(body)
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}
