//! The durable `JobRequested` work queue: admits jobs to the scheduler, and nothing more.
//!
//! The handler only marks the job accepted in Postgres and returns, so the delivery is
//! acknowledged within milliseconds however long the training takes: the broker's consumer
//! timeout never meets a training run. A duplicate delivery (the same message again, or the
//! same job requested twice) finds the job already accepted and changes nothing, and the
//! scheduler starts attempts from the job row, never from a message, so a job runs once.

use ferrite_platform::amqp::{Handler, HandlerError, IncomingMessage};
use ferrite_proto::JobRequested;
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::store;

/// Name of the work queue, under the events exchange's name so tests stay apart.
pub fn queue_name(exchange: &str) -> String {
    format!("{exchange}.training-runner.jobs")
}

pub struct AcceptJobs {
    /// Wakes the scheduler once the acceptance commits (it also polls).
    pub wake: std::sync::Arc<Notify>,
}

#[async_trait::async_trait]
impl Handler for AcceptJobs {
    #[tracing::instrument(skip_all, fields(job.id))]
    async fn handle(
        &self,
        message: &IncomingMessage,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError> {
        let event: JobRequested = message.decode()?;
        tracing::Span::current().record("job.id", event.job_id.as_str());
        let id: Uuid = event.job_id.parse().map_err(|e| {
            HandlerError::Permanent(
                anyhow::Error::new(e).context(format!("job id `{}` is not a UUID", event.job_id)),
            )
        })?;
        if store::accept(tx, id).await? {
            store::log(tx, id, None, "info", "taken from the work queue").await?;
            tracing::info!(job.id = %id, "job accepted from the queue");
        } else {
            // Unknown ids are jobs of another runner's database or long deleted: nothing to do.
            tracing::info!(job.id = %id, "JobRequested for a job already accepted or unknown; skipped");
        }
        // The notification may arrive before the commit; the scheduler's poll covers that.
        self.wake.notify_one();
        Ok(())
    }
}
