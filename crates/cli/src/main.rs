//! The `ferrite` command.

mod up;

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
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Up => up::run().await,
        Command::Status { url } => match up::print_status(&url).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("ferrite status: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
