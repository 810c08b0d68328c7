//! The worker's [`JobObserver`]: metrics in batches, throttled progress events, checkpoints
//! uploaded (and old ones pruned) before the trainer goes on, and the answer to "should I stop?".
//!
//! The trainer calls it from a blocking thread; each call that needs Postgres or the store
//! blocks that thread on the worker's runtime, which is what the trainer expects (a checkpoint
//! is in storage when `checkpoint` returns).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrite_platform::amqp::outbox;
use ferrite_proto::JobProgress;
use ferrite_training::job::JobObserver;
use sqlx::PgConnection;
use tokio::runtime::Handle;

use crate::events;
use crate::store::{self, MetricValue};
use crate::transfer;
use crate::worker::Attempt;

/// Metrics wait at most this long before they are written.
const METRICS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Metric values written in one statement at most.
const METRICS_BATCH: usize = 500;
/// At most one JobProgress event per this interval: subscribers want a live view, not a copy
/// of the metrics table.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Raised by the heartbeat; read by the trainer through `should_stop`.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub cancelled: Arc<AtomicBool>,
    pub lease_lost: Arc<AtomicBool>,
}

pub struct RunObserver {
    attempt: Attempt,
    flags: Flags,
    /// The job's `keep_checkpoints`; `None` keeps every checkpoint.
    keep_checkpoints: Option<NonZeroU32>,
    runtime: Handle,
    pending: Vec<MetricValue>,
    progress: (u64, u64),
    last_values: BTreeMap<String, f64>,
    last_flush: Instant,
    last_progress_event: Option<Instant>,
}

impl RunObserver {
    /// Must be built on the worker's runtime (it keeps a handle to it).
    pub fn new(attempt: Attempt, flags: Flags, keep_checkpoints: Option<NonZeroU32>) -> Self {
        Self {
            attempt,
            flags,
            keep_checkpoints,
            runtime: Handle::current(),
            pending: Vec::new(),
            progress: (0, 0),
            last_values: BTreeMap::new(),
            last_flush: Instant::now(),
            last_progress_event: None,
        }
    }

    /// Writes the pending metrics (and a progress event when one is due) from the trainer's
    /// thread.
    pub fn flush_blocking(&mut self) {
        let runtime = self.runtime.clone();
        runtime.block_on(self.flush());
    }

    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let due = self
            .last_progress_event
            .is_none_or(|at| at.elapsed() >= PROGRESS_INTERVAL)
            || self.progress.0 >= self.progress.1;
        match self.write_metrics(due).await {
            Ok(()) => {
                self.pending.clear();
                if due {
                    self.last_progress_event = Some(Instant::now());
                }
            }
            Err(error) => {
                // Kept for the next flush; a long outage grows the batch, not the loss.
                tracing::warn!(error = %error, pending = self.pending.len(), "cannot write metrics");
            }
        }
        self.last_flush = Instant::now();
    }

    async fn write_metrics(&self, with_event: bool) -> anyhow::Result<()> {
        let (id, number) = (self.attempt.job_id, self.attempt.number);
        let mut tx = self.attempt.pool.begin().await?;
        if !store::hold_lease(&mut tx, id, number).await? {
            // Dropped: the attempt no longer owns the job's record.
            return Ok(());
        }
        for batch in self.pending.chunks(METRICS_BATCH) {
            store::insert_metrics(&mut tx, id, number, batch, self.progress).await?;
        }
        if with_event {
            let event = JobProgress {
                job_id: id.to_string(),
                attempt: number,
                step: self.progress.0,
                total_steps: self.progress.1,
                metrics: self
                    .last_values
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<HashMap<_, _>>(),
            };
            outbox::enqueue(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn save_checkpoint(&mut self, step: u64, dir: &Path) -> anyhow::Result<()> {
        self.flush().await;
        let prefix = events::checkpoint_prefix(self.attempt.job_id, step);
        let bytes = transfer::upload_dir(&self.attempt, dir, &prefix).await?;
        let (id, number) = (self.attempt.job_id, self.attempt.number);
        let mut tx = self.attempt.pool.begin().await?;
        if !store::hold_lease(&mut tx, id, number).await? {
            anyhow::bail!("the lease was lost; the checkpoint of step {step} is not recorded");
        }
        store::insert_checkpoint(&mut tx, id, number, step, &prefix, bytes).await?;
        let line = format!("checkpoint of step {step} written to {prefix} ({bytes} bytes)");
        store::log(&mut tx, id, Some(number), "info", &line).await?;
        self.prune_rows(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(step, object.prefix = %prefix, size_bytes = bytes, "checkpoint written");
        // The trainer's local copy is in storage now; the disk need not hold every step.
        if let Err(error) = tokio::fs::remove_dir_all(dir).await {
            tracing::warn!(error = %error, "cannot remove the local checkpoint copy");
        }
        if self.keep_checkpoints.is_some() {
            self.sweep_unrecorded(step).await;
        }
        Ok(())
    }

    /// Deletes the rows of the checkpoints beyond the job's retention, in the transaction that
    /// records the newest (which is never among them), and names them in the job log.
    async fn prune_rows(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        let Some(keep) = self.keep_checkpoints else {
            return Ok(());
        };
        let (id, number) = (self.attempt.job_id, self.attempt.number);
        let pruned = store::prune_checkpoints(tx, id, keep).await?;
        if !pruned.is_empty() {
            let steps: Vec<String> = pruned.iter().map(|c| c.step.to_string()).collect();
            let line = format!(
                "checkpoints of steps {} removed: keep_checkpoints is {keep}",
                steps.join(", ")
            );
            store::log(tx, id, Some(number), "info", &line).await?;
        }
        Ok(())
    }

    /// Deletes the job's checkpoint folders that no row points at, of steps before `newest`,
    /// once the rows are committed away: the checkpoints just pruned, and any that an earlier
    /// failed deletion, or a worker killed between a pruning commit and its deletion, left
    /// behind. Listing the job's folders instead of trusting the pruned rows is what makes a
    /// later checkpoint finish what an earlier one could not.
    ///
    /// Folders from `newest` on are left alone: this attempt writes nothing else meanwhile, and
    /// a newer folder could only be a stale attempt's upload, which its lost lease keeps from
    /// ever being recorded and which the next checkpoint past it sweeps. Best effort: a failure
    /// is logged and tried again at the next checkpoint, never a row pointing at deleted data.
    async fn sweep_unrecorded(&self, newest: u64) {
        match self.unrecorded_steps(newest).await {
            Ok(steps) => {
                for step in steps {
                    self.delete_checkpoint(step).await;
                }
            }
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(error, "cannot look for unrecorded checkpoints");
            }
        }
    }

    /// The steps before `newest` with objects in storage and no checkpoint row.
    async fn unrecorded_steps(&self, newest: u64) -> anyhow::Result<BTreeSet<u64>> {
        let id = self.attempt.job_id;
        let recorded: BTreeSet<u64> = store::checkpoints(&self.attempt.pool, id)
            .await?
            .iter()
            .filter_map(|checkpoint| u64::try_from(checkpoint.step).ok())
            .collect();
        let root = transfer::prefix_key(&events::checkpoints_root(id))?;
        let stored = self.attempt.storage.list(&root).await?;
        Ok(stored
            .iter()
            .filter_map(|object| events::checkpoint_step_of(id, &object.key))
            .filter(|step| *step < newest && !recorded.contains(step))
            .collect())
    }

    async fn delete_checkpoint(&self, step: u64) {
        let prefix = events::checkpoint_prefix(self.attempt.job_id, step);
        match transfer::delete_prefix(&self.attempt.storage, &prefix).await {
            Ok(objects) => {
                tracing::info!(step, object.prefix = %prefix, objects, "unrecorded checkpoint deleted");
            }
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(
                    step, object.prefix = %prefix, error,
                    "cannot delete an unrecorded checkpoint; the next checkpoint tries again"
                );
                let line = format!(
                    "the objects of the removed checkpoint of step {step} stay under {prefix} \
                     until the next checkpoint: {error}"
                );
                self.attempt.log("warn", &line).await;
            }
        }
    }
}

impl JobObserver for RunObserver {
    fn metrics(&mut self, step: u64, total_steps: u64, values: &BTreeMap<String, f64>) {
        self.progress = (step.max(self.progress.0), total_steps);
        for (name, value) in values {
            // JSON and the time series cannot hold NaN or infinities meaningfully.
            if !value.is_finite() {
                continue;
            }
            self.last_values.insert(name.clone(), *value);
            self.pending.push(MetricValue {
                name: name.clone(),
                step,
                value: *value,
            });
        }
        if self.last_flush.elapsed() >= METRICS_FLUSH_INTERVAL
            || self.pending.len() >= METRICS_BATCH
        {
            self.flush_blocking();
        }
    }

    fn checkpoint(&mut self, step: u64, dir: &Path) -> Result<(), String> {
        let runtime = self.runtime.clone();
        runtime
            .block_on(self.save_checkpoint(step, dir))
            .map_err(|error| format!("{error:#}"))
    }

    fn should_stop(&mut self) -> bool {
        self.flags.cancelled.load(Ordering::SeqCst) || self.flags.lease_lost.load(Ordering::SeqCst)
    }
}
