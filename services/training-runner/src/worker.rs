//! The worker: one attempt of one job, in its own process (`ferrite worker --job ID --attempt N`).
//!
//! It needs only Postgres and object storage. It takes the lease the scheduler set aside,
//! heartbeats, downloads the inputs (and the last checkpoint when an earlier attempt left one),
//! runs the trainer on a blocking thread, and writes metrics, checkpoints and its outcome. Events
//! (JobProgress, JobFinished) go into the service's outbox table, which the runner's relay
//! publishes, so the worker never talks to RabbitMQ. Every write is conditional on still holding
//! the lease; a worker that loses it stops at the trainer's next step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use ferrite_platform::amqp::outbox;
use ferrite_platform::storage::Storage;
use ferrite_platform::{Settings, db};
use ferrite_training::job::{self, DatasetInput, JobError, JobInputs, JobOutput};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::{JobState, ResolvedJob};
use crate::events::{self, Outcome};
use crate::observer::{Flags, RunObserver};
use crate::store::{self, AttemptEnd};
use crate::transfer;

/// The schema the runner migrated; the worker only reads and writes it.
pub const SCHEMA: &str = "training_runner";

/// What one attempt shares between its async side and the trainer's thread.
#[derive(Clone)]
pub struct Attempt {
    pub pool: PgPool,
    pub storage: Storage,
    pub job_id: Uuid,
    pub number: u32,
    pub part_bytes: usize,
}

impl Attempt {
    pub async fn log(&self, level: &str, message: &str) {
        let logged = match self.pool.acquire().await {
            Ok(mut conn) => {
                store::log(&mut conn, self.job_id, Some(self.number), level, message).await
            }
            Err(error) => Err(error),
        };
        // The job log is a convenience; the process log below still has the line.
        if let Err(error) = logged {
            tracing::warn!(error = %error, "cannot append to the job log");
        }
    }
}

/// Runs attempt `attempt` of job `job_id` to its end and records the outcome. An error means
/// the outcome could not be recorded (the lease was lost, or Postgres went away): the runner
/// then sees the process end and decides.
#[tracing::instrument(skip_all, fields(job.id = %job_id, job.attempt = attempt))]
pub async fn run_worker(settings: Settings, job_id: Uuid, attempt: u32) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database, SCHEMA)?;
    let storage = Storage::from_settings(&settings.store).context("object storage")?;
    let lease = settings.worker.lease;
    let pid = std::process::id();
    if !store::take_lease(&pool, job_id, attempt, lease, pid).await? {
        anyhow::bail!(
            "attempt {attempt} of job {job_id} does not hold the lease; another attempt or the runner took over"
        );
    }
    let attempt = Attempt {
        pool,
        storage,
        job_id,
        number: attempt,
        part_bytes: settings.store.multipart_part_bytes,
    };
    attempt
        .log("info", &format!("worker {pid} took the lease"))
        .await;
    tracing::info!(worker.pid = pid, "lease taken");

    let flags = Flags::default();
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(
        attempt.clone(),
        lease,
        flags.clone(),
        stop_heartbeat.clone(),
    ));

    let scratch = scratch_dir(
        settings.worker.scratch_dir.as_deref(),
        job_id,
        attempt.number,
    );
    let result = train(&attempt, &scratch, &flags).await;
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    // An attempt refused before downloading anything never made its folder.
    remove_scratch_dir(&scratch).await;
    record_outcome(&attempt, &flags, result).await
}

/// Why a run ended without an artifact, as the worker records it.
enum RunError {
    /// Retrying cannot help: a bad input or an unsupported kind.
    Permanent(String),
    /// The trainer stopped because the job was cancelled or the lease lost.
    Stopped,
    /// Another attempt may succeed.
    Retryable(String),
}

/// Prepares the inputs, runs the trainer and uploads the artifact.
async fn train(
    attempt: &Attempt,
    scratch: &Path,
    flags: &Flags,
) -> Result<(ResolvedJob, JobOutput), (Option<ResolvedJob>, RunError)> {
    let retryable = |error: anyhow::Error| RunError::Retryable(format!("{error:#}"));
    let job = store::resolved_job(&attempt.pool, attempt.job_id)
        .await
        .map_err(|e| (None, retryable(e.into())))?
        .ok_or_else(|| (None, RunError::Permanent("the job does not exist".into())))?;
    let with_job = |error: RunError| (Some(job.clone()), error);

    // A device that cannot be loaded now will not load on the next attempt either.
    let device = device(&job).map_err(|e| with_job(RunError::Permanent(format!("{e:#}"))))?;
    let inputs = prepare(attempt, &job, scratch, device)
        .await
        .map_err(|error| {
            with_job(match error.downcast_ref::<transfer::NothingUnder>() {
                Some(missing) => RunError::Permanent(missing.to_string()),
                None => retryable(error),
            })
        })?;
    let kind = job.kind;
    let hyper_parameters = job.hyper_parameters.clone();
    let mut observer = RunObserver::new(attempt.clone(), flags.clone(), job.keep_checkpoints);
    let output = tokio::task::spawn_blocking(move || {
        let output = job::run(kind, &hyper_parameters, &inputs, &mut observer);
        observer.flush_blocking();
        output
    })
    .await
    .map_err(|e| with_job(RunError::Retryable(format!("the trainer panicked: {e}"))))?;
    let output = output.map_err(|error| {
        with_job(match error {
            JobError::Invalid(_) | JobError::Unsupported(_) => {
                RunError::Permanent(error.to_string())
            }
            JobError::Stopped => RunError::Stopped,
            JobError::Failed(message) => RunError::Retryable(message),
        })
    })?;

    let prefix = events::output_prefix(attempt.job_id);
    let bytes = transfer::upload_dir(attempt, &output.artifact_dir, &prefix)
        .await
        .map_err(|e| with_job(retryable(e)))?;
    attempt
        .log(
            "info",
            &format!("artifact uploaded to {prefix} ({bytes} bytes)"),
        )
        .await;
    Ok((job, output))
}

/// Downloads datasets, the base model and the last checkpoint into `scratch`.
async fn prepare(
    attempt: &Attempt,
    job: &ResolvedJob,
    scratch: &Path,
    device: tch::Device,
) -> anyhow::Result<JobInputs> {
    if tokio::fs::try_exists(scratch).await? {
        tokio::fs::remove_dir_all(scratch).await?;
    }
    let output_dir = scratch.join("output");
    let checkpoint_dir = scratch.join("checkpoints");
    for dir in [&output_dir, &checkpoint_dir] {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let mut datasets = Vec::with_capacity(job.datasets.len());
    for (index, dataset) in job.datasets.iter().enumerate() {
        let path = scratch.join(format!("dataset-{index}"));
        transfer::download_dataset(&attempt.storage, dataset, &path).await?;
        datasets.push(DatasetInput {
            version_id: dataset.version_id.clone(),
            kind: dataset.kind.clone(),
            role: dataset.role,
            path,
        });
    }
    let base_model = match &job.base_model {
        Some(model) => {
            let dir = scratch.join("base");
            transfer::download_prefix(&attempt.storage, &model.artifact_prefix, &dir).await?;
            Some(dir)
        }
        None => None,
    };
    let resume_from = match store::last_checkpoint(&attempt.pool, attempt.job_id).await? {
        Some(checkpoint) => {
            let dir = scratch.join("resume");
            transfer::download_prefix(&attempt.storage, &checkpoint.prefix, &dir).await?;
            let step = u64::try_from(checkpoint.step).unwrap_or_default();
            store::set_resumed_from(&attempt.pool, attempt.job_id, attempt.number, step).await?;
            attempt
                .log(
                    "info",
                    &format!("resuming from the checkpoint of step {step}"),
                )
                .await;
            Some(dir)
        }
        None => None,
    };
    attempt.log("info", "inputs downloaded").await;
    Ok(JobInputs {
        base_model,
        datasets,
        output_dir,
        checkpoint_dir,
        resume_from,
        device,
    })
}

fn device(job: &ResolvedJob) -> anyhow::Result<tch::Device> {
    if job.resources.gpus == 0 {
        return Ok(tch::Device::Cpu);
    }
    ferrite_model::device::resolve("cuda").context("the job asks for a GPU")
}

/// The folder attempt `attempt` of job `job_id` works in: its datasets, base, checkpoints and
/// output. The worker removes it when it ends; the local backend removes it after a worker
/// that could not (killed, crashed).
///
/// `root` is the worker's scratch setting; without one, the system's temporary folder.
pub(crate) fn scratch_dir(root: Option<&Path>, job_id: Uuid, attempt: u32) -> PathBuf {
    root.map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join(format!("ferrite-job-{job_id}-{attempt}"))
}

/// Removes an attempt's scratch folder; returns whether there was one. A failure is logged:
/// the folder only takes disk space.
pub(crate) async fn remove_scratch_dir(dir: &Path) -> bool {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            tracing::warn!(error = %error, dir = %dir.display(), "cannot remove the scratch folder");
            false
        }
    }
}

/// Renews the lease every third of its length; raises the flags on cancel or loss.
async fn heartbeat(attempt: Attempt, lease: Duration, flags: Flags, stop: CancellationToken) {
    let interval = (lease / 3).max(Duration::from_millis(200));
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match store::heartbeat(&attempt.pool, attempt.job_id, attempt.number, lease).await {
            Ok(Some(cancel_requested)) => {
                last_renewed = tokio::time::Instant::now();
                if cancel_requested && !flags.cancelled.swap(true, Ordering::SeqCst) {
                    tracing::info!("cancel requested; stopping at the next step");
                }
            }
            Ok(None) => {
                tracing::warn!("lease lost; stopping at the next step");
                flags.lease_lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(error) => {
                tracing::warn!(error = %error, "heartbeat failed");
                // Past the lease the runner may have started another attempt: stop writing.
                if last_renewed.elapsed() > lease {
                    flags.lease_lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

/// Writes how the attempt ended, in one transaction with its JobFinished when the job ends.
async fn record_outcome(
    attempt: &Attempt,
    flags: &Flags,
    result: Result<(ResolvedJob, JobOutput), (Option<ResolvedJob>, RunError)>,
) -> anyhow::Result<()> {
    if flags.lease_lost.load(Ordering::SeqCst) {
        anyhow::bail!("the lease was lost; the runner decides what happens to the job");
    }
    let mut tx = attempt.pool.begin().await?;
    if !store::hold_lease(&mut tx, attempt.job_id, attempt.number).await? {
        anyhow::bail!("the lease was lost before the outcome could be recorded");
    }
    let (id, number) = (attempt.job_id, attempt.number);
    let (line, event) = match result {
        Ok((job, output)) => {
            let prefix = events::output_prefix(id);
            // A metric a run never measured is NaN; JSON and the registry cannot hold it.
            let final_metrics: BTreeMap<String, f64> = output
                .final_metrics
                .iter()
                .filter(|(_, value)| value.is_finite())
                .map(|(name, value)| (name.clone(), *value))
                .collect();
            store::succeed(&mut tx, id, number, &prefix, &final_metrics).await?;
            let outcome = Outcome::Succeeded {
                final_metrics: &final_metrics,
            };
            let event = events::finished(id, &job, &outcome);
            (
                format!("succeeded after {} steps", output.steps),
                Some(event),
            )
        }
        Err((job, RunError::Stopped)) if flags.cancelled.load(Ordering::SeqCst) => {
            store::finish_job(&mut tx, id, number, JobState::Cancelled, None).await?;
            let event = job.map(|job| events::finished(id, &job, &Outcome::Cancelled));
            ("cancelled".to_owned(), event)
        }
        Err((job, RunError::Permanent(error))) => {
            store::finish_job(&mut tx, id, number, JobState::Failed, Some(&error)).await?;
            let event =
                job.map(|job| events::finished(id, &job, &Outcome::Failed { error: &error }));
            (format!("failed: {error}"), event)
        }
        Err((job, RunError::Retryable(error))) => {
            let state = store::end_attempt(&mut tx, id, number, AttemptEnd::Failed, &error).await?;
            let event = match (state, job) {
                (Some(JobState::Failed), Some(job)) => Some(events::finished(
                    id,
                    &job,
                    &Outcome::Failed { error: &error },
                )),
                (Some(JobState::Cancelled), Some(job)) => {
                    Some(events::finished(id, &job, &Outcome::Cancelled))
                }
                _ => None,
            };
            let state = state.map_or("unchanged".to_owned(), |s| s.to_string());
            (
                format!("attempt failed: {error}; the job is now {state}"),
                event,
            )
        }
        Err((_, RunError::Stopped)) => {
            // Stopped without a cancel or a lost lease: the trainer broke its contract.
            let error = "the trainer stopped without being asked to";
            store::end_attempt(&mut tx, id, number, AttemptEnd::Failed, error).await?;
            (error.to_owned(), None)
        }
    };
    if let Some(event) = &event {
        outbox::enqueue(&mut tx, event).await?;
    }
    store::log(&mut tx, id, Some(number), "info", &line).await?;
    tx.commit().await?;
    tracing::info!(outcome = %line, "attempt ended");
    Ok(())
}

/// `--job ID --attempt N`, as both the service binary and `ferrite worker` take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerArgs {
    pub job_id: Uuid,
    pub attempt: u32,
}

impl WorkerArgs {
    /// From a job id as text and an attempt number.
    pub fn new(job_id: &str, attempt: u32) -> Result<Self, String> {
        let job_id = job_id
            .parse()
            .map_err(|_| format!("`{job_id}` is not a job id"))?;
        if attempt == 0 {
            return Err("attempts are numbered from 1".into());
        }
        Ok(Self { job_id, attempt })
    }

    /// Parses the arguments after `worker`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut job_id = None;
        let mut attempt = None;
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("`{flag}` needs a value"))?;
            match flag.as_str() {
                "--job" => {
                    job_id = Some(
                        value
                            .parse()
                            .map_err(|_| format!("`{value}` is not a job id"))?,
                    );
                }
                "--attempt" => {
                    attempt = Some(
                        value
                            .parse()
                            .map_err(|_| format!("`{value}` is not an attempt number"))?,
                    );
                }
                other => {
                    return Err(format!(
                        "unknown argument `{other}`; expected --job ID --attempt N"
                    ));
                }
            }
        }
        match (job_id, attempt) {
            (Some(job_id), Some(attempt)) if attempt >= 1 => Ok(Self { job_id, attempt }),
            _ => Err("expected --job ID --attempt N (N from 1)".into()),
        }
    }

    /// Loads settings and telemetry like any Ferrite process, then runs the attempt. Exit 0
    /// means the worker recorded the attempt's outcome itself.
    pub async fn run(self, process: &str) -> std::process::ExitCode {
        let settings = match ferrite_platform::launch::load_settings(process) {
            Ok(settings) => settings,
            Err(code) => return code,
        };
        let _telemetry = match ferrite_platform::telemetry::init(&settings.telemetry) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{process}: {error}");
                return std::process::ExitCode::FAILURE;
            }
        };
        match run_worker(settings, self.job_id, self.attempt).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(job.id = %self.job_id, job.attempt = self.attempt, error = format!("{error:#}"), "worker failed");
                std::process::ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn worker_arguments_parse_in_either_order() {
        let id = "01a242a6-4fbd-732e-824d-d4a30e8fba24";
        let expected = WorkerArgs {
            job_id: id.parse().expect("a UUID"),
            attempt: 2,
        };
        let forward = WorkerArgs::parse(&args(&format!("--job {id} --attempt 2")));
        let backward = WorkerArgs::parse(&args(&format!("--attempt 2 --job {id}")));
        assert_eq!(forward, Ok(expected));
        assert_eq!(backward, Ok(expected));
    }

    #[test]
    fn attempt_zero_and_missing_values_are_refused() {
        let id = "01a242a6-4fbd-732e-824d-d4a30e8fba24";
        assert!(WorkerArgs::parse(&args(&format!("--job {id} --attempt 0"))).is_err());
        assert!(WorkerArgs::parse(&args(&format!("--job {id} --attempt"))).is_err());
        assert!(WorkerArgs::parse(&args("--job nope --attempt 1")).is_err());
        assert!(WorkerArgs::new(id, 0).is_err());
    }
}
