//! The scheduler: starts attempts through a [`Backend`] and notices the ones that died.
//!
//! One loop, woken by the work queue's consumer, by a backend reporting an ended worker, or by
//! a short poll. Each round it (1) ends attempts whose worker exited or whose lease ran out,
//! queueing the job again while attempts remain, and (2) starts queued jobs up to the
//! configured concurrency. A job's next attempt is started only after the previous one is
//! ended in Postgres and, for a lost lease, after its worker was stopped: two attempts of one
//! job never run at once.

use std::sync::Arc;
use std::time::Duration;

use ferrite_platform::amqp::outbox;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backend::{AttemptEnded, AttemptLaunch, Backend};
use crate::domain::JobState;
use crate::events::{self, Outcome};
use crate::store::{self, AttemptEnd};

/// The longest the scheduler sleeps without a wake-up.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct Scheduler {
    pub pool: PgPool,
    pub backend: Arc<dyn Backend>,
    pub concurrency: usize,
    pub lease: Duration,
    pub wake: Arc<Notify>,
}

impl Scheduler {
    /// Runs until `shutdown`. Local workers die with the runner's process; their attempts are
    /// found lost by the next runner and resume from their checkpoints.
    pub async fn run(
        self,
        mut ended: mpsc::UnboundedReceiver<AttemptEnded>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        tracing::info!(
            backend = self.backend.name(),
            concurrency = self.concurrency,
            "scheduler started"
        );
        loop {
            if let Err(error) = self.round().await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "scheduler round failed; retrying"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(ended) = ended.recv() => {
                    if let Err(error) = self.attempt_ended(&ended).await {
                        tracing::warn!(error = format!("{error:#}"), "cannot record an ended worker");
                    }
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
        tracing::info!("scheduler stopped");
        Ok(())
    }

    // TODO: a new attempt's first lease is one lease long, so a worker that needs longer to
    // start (a Kubernetes pod pulling its image) is taken for lost and retried; the start
    // deserves its own, longer grace per backend.
    async fn round(&self) -> anyhow::Result<()> {
        for (job_id, attempt) in store::expired_leases(&self.pool).await? {
            let attempt = u32::try_from(attempt).unwrap_or_default();
            // The worker may be alive but stuck; it must be gone before another attempt starts.
            self.backend.stop(job_id, attempt).await?;
            let detail = "the worker's lease expired without a heartbeat";
            self.end(job_id, attempt, AttemptEnd::Lost, detail).await?;
        }
        while self.backend.running().await < self.concurrency {
            if !self.start_next().await? {
                break;
            }
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(job.id = %ended.job_id, job.attempt = ended.attempt))]
    async fn attempt_ended(&self, ended: &AttemptEnded) -> anyhow::Result<()> {
        // A clean exit means the worker recorded its outcome; if it somehow did not, the
        // attempt still must not hold the job forever.
        let detail = if ended.clean {
            format!("{} without recording an outcome", ended.detail)
        } else {
            ended.detail.clone()
        };
        self.end(ended.job_id, ended.attempt, AttemptEnd::Lost, &detail)
            .await
    }

    /// Ends an attempt the worker did not end itself; a no-op when it did.
    async fn end(
        &self,
        job_id: Uuid,
        attempt: u32,
        end: AttemptEnd,
        detail: &str,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let Some(state) = store::end_attempt(&mut tx, job_id, attempt, end, detail).await? else {
            return Ok(());
        };
        let line = format!("attempt {attempt} lost: {detail}; the job is now {state}");
        store::log(&mut tx, job_id, Some(attempt), "warn", &line).await?;
        if state.is_final()
            && let Some(job) = store::resolved_job(&self.pool, job_id).await?
        {
            let outcome = match state {
                JobState::Cancelled => Outcome::Cancelled,
                _ => Outcome::Failed { error: detail },
            };
            outbox::enqueue(&mut tx, &events::finished(job_id, &job, &outcome)).await?;
        }
        tx.commit().await?;
        tracing::warn!(job.id = %job_id, job.attempt = attempt, job.state = %state, detail, "attempt lost");
        Ok(())
    }

    /// Starts the oldest queued job, if any; false when none waits.
    async fn start_next(&self) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let Some(job) = store::next_startable(&mut tx).await? else {
            return Ok(false);
        };
        let attempt = u32::try_from(job.current_attempt).unwrap_or_default() + 1;
        store::start_attempt(&mut tx, job.id, attempt, self.backend.name(), self.lease).await?;
        let line = format!(
            "attempt {attempt} starting on the {} backend",
            self.backend.name()
        );
        store::log(&mut tx, job.id, Some(attempt), "info", &line).await?;
        tx.commit().await?;

        let launch = AttemptLaunch {
            job_id: job.id,
            attempt,
            kind: job.resolved.0.kind.as_str().to_owned(),
            resources: job.resolved.0.resources.clone(),
        };
        if let Err(error) = self.backend.launch(&launch).await {
            let detail = format!("the worker could not start: {error:#}");
            self.end(job.id, attempt, AttemptEnd::Failed, &detail)
                .await?;
        } else {
            tracing::info!(job.id = %job.id, job.attempt = attempt, "attempt started");
        }
        Ok(true)
    }
}
