//! Pipelines: a YAML file of stages run through the services' REST APIs, resumable, reported.
//!
//! `spec` reads and checks the file (every problem at its line), `stages` holds one type per
//! kind of stage, `runner` runs them in order against a running Ferrite and keeps the state
//! that lets a rerun resume, and `report` writes what a run measured as Markdown and HTML.

pub mod client;
pub mod jobs;
pub mod progress;
pub mod publish;
pub mod report;
pub mod runner;
pub mod spec;
pub mod stages;
pub mod state;
pub mod yaml;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use runner::{Run, RunOptions};

/// `ferrite pipeline check FILE`: parses and checks without contacting anything.
pub fn check(file: &Path) -> anyhow::Result<spec::Pipeline> {
    let pipeline = spec::load(file)?;
    eprintln!(
        "{}: pipeline `{}` is valid: {} datasets, {} models, {} stages",
        file.display(),
        pipeline.name,
        pipeline.datasets.len(),
        pipeline.models.len(),
        pipeline.stages.len()
    );
    Ok(pipeline)
}

/// `ferrite pipeline run FILE`: runs what is not done yet, then writes the report.
pub async fn run(file: &Path, options: &RunOptions) -> anyhow::Result<PathBuf> {
    let pipeline = check(file)?;
    let mut run = Run::new(pipeline, options)?;
    let outcome = run.run_all().await;
    // The report shows what finished even when a stage failed.
    let written = report::write(run.pipeline(), run.state(), run.folder(), &[])?;
    outcome?;
    Ok(written)
}

/// The default poll interval for job state.
pub const POLL: Duration = Duration::from_millis(1000);
