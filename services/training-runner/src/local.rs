//! The local backend: each attempt is a child process of the runner.
//!
//! The child runs `<program> worker --job ID --attempt N` with the runner's settings in its
//! environment, so it reaches the same Postgres and store. A task per child waits for its exit
//! and reports it as [`AttemptEnded`]; the runner learns a `kill -9` at once instead of after the
//! lease runs out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use ferrite_platform::Settings;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::backend::{AttemptEnded, AttemptLaunch, Backend, EndedSender};
use crate::worker;
use crate::worker_env::worker_env;

/// Starts workers as child processes.
pub struct LocalBackend {
    program: PathBuf,
    env: Vec<(String, String)>,
    /// The workers' scratch setting, under which each attempt has a folder.
    scratch_root: Option<PathBuf>,
    ended: EndedSender,
    /// Children still running.
    running: Arc<Mutex<HashMap<(Uuid, u32), Child>>>,
}

/// A running child, as its waiting task can be asked about it.
struct Child {
    /// Asks the task to kill the child.
    stop: oneshot::Sender<()>,
    /// Fires once the child has exited.
    exited: oneshot::Receiver<()>,
}

impl LocalBackend {
    pub fn new(settings: &Settings, ended: EndedSender) -> anyhow::Result<Self> {
        let program = match &settings.worker.command {
            Some(program) => program.clone(),
            None => std::env::current_exe().context("cannot find this program to run workers")?,
        };
        Ok(Self {
            program,
            env: worker_env(settings, None).all(),
            scratch_root: settings.worker.scratch_dir.clone(),
            ended,
            running: Arc::default(),
        })
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, u32), Child>> {
        // A poisoned map only means a panic elsewhere; its entries are still right.
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    #[tracing::instrument(skip_all, fields(job.id = %launch.job_id, job.attempt = launch.attempt))]
    async fn launch(&self, launch: &AttemptLaunch) -> anyhow::Result<()> {
        let mut child = tokio::process::Command::new(&self.program)
            .arg("worker")
            .arg("--job")
            .arg(launch.job_id.to_string())
            .arg("--attempt")
            .arg(launch.attempt.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        let key = (launch.job_id, launch.attempt);
        let (stop, mut stopped) = oneshot::channel();
        let (exit, exited) = oneshot::channel();
        self.children().insert(key, Child { stop, exited });
        tracing::info!(
            job.id = %launch.job_id,
            job.attempt = launch.attempt,
            worker.pid = child.id(),
            "worker started"
        );

        let running = self.running.clone();
        let ended = self.ended.clone();
        let scratch =
            worker::scratch_dir(self.scratch_root.as_deref(), launch.job_id, launch.attempt);
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = &mut stopped => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key);
            let _ = exit.send(());
            let (clean, detail) = match status {
                Ok(status) => (status.success(), format!("worker exited: {status}")),
                Err(error) => (false, format!("cannot wait for the worker: {error}")),
            };
            // A worker that ends on its own removes its folder; a killed one leaves it, with
            // the base model and datasets in it, to be removed here.
            if worker::remove_scratch_dir(&scratch).await {
                tracing::info!(dir = %scratch.display(), "removed the scratch folder the worker left");
            }
            // The receiver is gone only when the runner is shutting down.
            let _ = ended.send(AttemptEnded {
                job_id: key.0,
                attempt: key.1,
                clean,
                detail,
            });
        });
        Ok(())
    }

    /// Kills the child and returns once it has exited, so a new attempt never overlaps it.
    async fn stop(&self, job_id: Uuid, attempt: u32) -> anyhow::Result<()> {
        let child = self.children().remove(&(job_id, attempt));
        if let Some(child) = child {
            let _ = child.stop.send(());
            let _ = child.exited.await;
        }
        Ok(())
    }

    async fn running(&self) -> usize {
        self.children().len()
    }
}
