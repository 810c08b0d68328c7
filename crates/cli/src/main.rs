//! The `ferrite` command.

mod dataset;
mod demo;
mod model;
mod pipeline;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrite",
    version,
    about = "Take a language model from raw text to a served, aligned model."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process on one port, with a local training worker.
    Up,
    /// Show whether each service of a running Ferrite answers and is ready.
    Status {
        /// Base URL of the running Ferrite.
        #[arg(long, env = "FERRITE_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Run one attempt of a training job; the training runner starts these.
    Worker {
        /// The job's id.
        #[arg(long)]
        job: String,
        /// The attempt number, from 1.
        #[arg(long)]
        attempt: u32,
    },
    /// Run the bundled pipeline on real data, answer a chat request and write the report.
    Demo {
        /// The `tiny` preset on small slices (about five minutes on two cores).
        #[arg(long)]
        quick: bool,
        /// Run this pipeline file instead of examples/demo.yaml.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Where Ferrite answers, or where the demo starts it when nothing does.
        #[arg(long, env = "FERRITE_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// A token for an already running Ferrite (engineer or admin).
        #[arg(long, env = "FERRITE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Where run states and reports are kept.
        #[arg(long, default_value = ".ferrite/runs")]
        runs_dir: PathBuf,
    },
    /// Upload, list and show datasets.
    Dataset {
        #[command(subcommand)]
        command: dataset::DatasetCommand,
    },
    /// Import, list and show models; move aliases.
    Model(model::ModelArgs),
    /// Check or run a pipeline file.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Check a pipeline file without running anything; every problem names its line.
    Check { file: PathBuf },
    /// Run a pipeline through a running Ferrite, resuming what an earlier run left unfinished.
    Run {
        file: PathBuf,
        /// Base URL of the running Ferrite.
        #[arg(long, env = "FERRITE_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// A bearer token with the engineer or admin role.
        #[arg(long, env = "FERRITE_TOKEN", hide_env_values = true)]
        token: String,
        /// Where run states and reports are kept.
        #[arg(long, default_value = ".ferrite/runs")]
        runs_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Up => up::run().await,
        Command::Worker { job, attempt } => {
            match ferrite_training_runner::worker::WorkerArgs::new(&job, attempt) {
                Ok(worker) => worker.run("worker").await,
                Err(problem) => {
                    eprintln!("ferrite worker: {problem}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Status { url } => match up::print_status(&url).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("ferrite status: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            quick,
            file,
            url,
            token,
            runs_dir,
        } => {
            let options = demo::DemoOptions {
                quick,
                file,
                url,
                token,
                runs_dir,
            };
            report_failure("ferrite demo", demo::run(options).await)
        }
        Command::Dataset { command } => {
            report_failure("ferrite dataset", dataset::run(command).await)
        }
        Command::Model(args) => report_failure("ferrite model", model::run(args).await),
        Command::Pipeline { command } => {
            report_failure("ferrite pipeline", run_pipeline(command).await)
        }
    }
}

async fn run_pipeline(command: PipelineCommand) -> anyhow::Result<()> {
    match command {
        PipelineCommand::Check { file } => pipeline::check(&file).map(|_| ()),
        PipelineCommand::Run {
            file,
            url,
            token,
            runs_dir,
        } => {
            let options = pipeline::RunOptions {
                url,
                token,
                runs_dir,
                poll: pipeline::POLL,
            };
            let report = pipeline::run(&file, &options).await?;
            eprintln!("report: {}", report.display());
            Ok(())
        }
    }
}

fn report_failure(command: &str, outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
