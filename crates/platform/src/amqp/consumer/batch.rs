//! One batch of deliveries: applied in one transaction with their inbox rows, then settled.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::join_all;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};
use uuid::Uuid;

use super::{ConsumerSpec, HandlerError, IncomingMessage, MAX_RETRY_DELAY};
use crate::telemetry;

/// A delivery ready for its handler, with the span it is handled in.
struct Received {
    delivery: Delivery,
    message: IncomingMessage,
    /// `amqp.consume`, a child of the publisher's trace context; it closes once the delivery
    /// is settled (acknowledged or rejected).
    span: Span,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    /// Already in the inbox, or earlier in the same batch: processed before, its ack lost.
    Duplicate,
    Retry,
    Reject,
}

/// How one transaction over a group of messages ended.
enum Attempt {
    /// Committed; each message applied or skipped as a duplicate, in delivery order.
    Committed(Vec<Outcome>),
    /// No transaction, or no inbox rows: Postgres is away and no handler ran.
    Unavailable,
    /// The handler of the message at `at` failed or panicked; rolled back.
    Failed { at: usize, outcome: Outcome },
    /// Every handler succeeded but the commit failed.
    CommitFailed,
}

/// A message that failed and is put back after its retry delay; holds no connection.
pub(super) struct DelayedRequeue {
    delivery: Delivery,
    span: Span,
    delay: Duration,
}

impl DelayedRequeue {
    /// Waits out the delay (cut short by `shutdown`), then returns the message to the queue.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let Self {
            delivery,
            span,
            delay,
        } = self;
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            nack(&delivery, true).await;
        }
        .instrument(span)
        .await;
    }
}

/// Applies `deliveries` and settles each; never fails, it logs instead. Returns the messages
/// to requeue after a delay, which the consumer waits for without holding a batch slot.
pub(super) async fn process(
    deliveries: Vec<Delivery>,
    pool: PgPool,
    spec: Arc<ConsumerSpec>,
    max_deliveries: u32,
) -> Vec<DelayedRequeue> {
    let mut group = Vec::with_capacity(deliveries.len());
    for mut delivery in deliveries {
        match IncomingMessage::from_delivery(&mut delivery) {
            Ok(message) => {
                let span = consume_span(&spec.queue, &message);
                group.push(Received {
                    delivery,
                    message,
                    span,
                });
            }
            Err(problem) => {
                let routing_key = delivery.routing_key.as_str();
                warn!(
                    problem,
                    routing_key, "dead-lettering a message that cannot be deduplicated"
                );
                nack(&delivery, false).await;
            }
        }
    }

    if group.is_empty() {
        return Vec::new();
    }
    let outcomes = apply(&group, &pool, &spec).await;
    let settled = group
        .into_iter()
        .zip(outcomes)
        .map(|(received, outcome)| settle(received, outcome, &spec, max_deliveries));
    join_all(settled).await.into_iter().flatten().collect()
}

fn consume_span(queue: &str, message: &IncomingMessage) -> Span {
    let span = info_span!(
        parent: None,
        "amqp.consume",
        otel.kind = "consumer",
        messaging.destination = %queue,
        messaging.message_id = %message.message_id,
        messaging.routing_key = %message.routing_key,
        messaging.delivery_count = message.delivery_count,
    );
    // The consumer's span continues the trace of whatever published the message.
    telemetry::set_remote_parent(&span, &message.headers);
    span
}

/// The outcome of each message of `group`, in order: the group in one transaction, or, when
/// that fails for one message's sake, every other message in a transaction of its own.
async fn apply(group: &[Received], pool: &PgPool, spec: &ConsumerSpec) -> Vec<Outcome> {
    match attempt(group, pool, spec).await {
        Attempt::Committed(outcomes) => outcomes,
        Attempt::Unavailable => vec![Outcome::Retry; group.len()],
        // That call was the failed message's attempt; the others did nothing wrong and get
        // theirs now, instead of a redelivery that would count against them.
        Attempt::Failed { at, outcome } => {
            apply_each_alone(group, Some((at, outcome)), pool, spec).await
        }
        Attempt::CommitFailed if group.len() == 1 => vec![Outcome::Retry],
        // No telling which message the commit failed for, if any: each gets a commit of its own.
        Attempt::CommitFailed => apply_each_alone(group, None, pool, spec).await,
    }
}

/// Applies each message of `group` in a transaction of its own, except the one whose outcome
/// `known` already holds.
async fn apply_each_alone(
    group: &[Received],
    known: Option<(usize, Outcome)>,
    pool: &PgPool,
    spec: &ConsumerSpec,
) -> Vec<Outcome> {
    if group.len() > 1 {
        debug!(
            messages = group.len(),
            "a batch was rolled back; applying its messages one at a time"
        );
    }
    let mut outcomes = Vec::with_capacity(group.len());
    for (index, received) in group.iter().enumerate() {
        let outcome = match known {
            Some((at, outcome)) if at == index => outcome,
            _ => match attempt(std::slice::from_ref(received), pool, spec).await {
                Attempt::Committed(alone) => alone.first().copied().unwrap_or(Outcome::Retry),
                Attempt::Failed { outcome, .. } => outcome,
                Attempt::Unavailable | Attempt::CommitFailed => Outcome::Retry,
            },
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// One transaction: the inbox rows of `group`, the handler of each new message, the commit.
/// Dropping the transaction on any early return rolls it back.
async fn attempt(group: &[Received], pool: &PgPool, spec: &ConsumerSpec) -> Attempt {
    let (mut tx, mut new_ids) = match begin(pool, &spec.queue, group).await {
        Ok(begun) => begun,
        Err(error) => {
            let doing = "begin a transaction with the messages' inbox rows; requeueing them";
            database_failed(&error, spec, group.len(), doing);
            return Attempt::Unavailable;
        }
    };

    let mut outcomes = Vec::with_capacity(group.len());
    for (at, received) in group.iter().enumerate() {
        // Removed once handled, so a second copy of an id in this batch is a duplicate.
        if !new_ids.remove(&received.message.message_id) {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        let handled = AssertUnwindSafe(spec.handler.handle(&received.message, &mut tx))
            .catch_unwind()
            .instrument(received.span.clone())
            .await;
        let outcome = received.span.in_scope(|| match handled {
            Ok(Ok(())) => Outcome::Applied,
            Ok(Err(error)) => failed(error),
            // A panicking handler must not leave its delivery unacknowledged (holding a
            // prefetch slot) until the channel closes: it counts as a failed attempt.
            Err(_) => {
                warn!("handler panicked; the message will be redelivered");
                Outcome::Retry
            }
        });
        if outcome != Outcome::Applied {
            return Attempt::Failed { at, outcome };
        }
        outcomes.push(outcome);
    }

    match tx.commit().await {
        Ok(()) => Attempt::Committed(outcomes),
        Err(error) => {
            database_failed(
                &error,
                spec,
                group.len(),
                "commit the handlers' transaction",
            );
            Attempt::CommitFailed
        }
    }
}

/// Logs a Postgres failure that befell a whole group of messages, not one of them.
fn database_failed(error: &sqlx::Error, spec: &ConsumerSpec, messages: usize, doing: &str) {
    warn!(
        error = %error,
        messaging.destination = %spec.queue,
        messages,
        "could not {doing}"
    );
}

/// Begins a transaction, inserts the inbox row of every message in it and returns it with the
/// ids that were not there yet.
///
/// The ids go in sorted: two batches that share ids (copies of one message) then take their
/// row locks in the same order and wait for each other instead of deadlocking. A concurrent
/// batch holding one of the ids makes this insert wait until it commits (the id is then not
/// new) or rolls back (it is).
async fn begin(
    pool: &PgPool,
    consumer: &str,
    group: &[Received],
) -> Result<(Transaction<'static, Postgres>, HashSet<Uuid>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut ids: Vec<Uuid> = group
        .iter()
        .map(|received| received.message.message_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let new_ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO inbox (consumer, message_id)
         SELECT $1, id FROM unnest($2::uuid[]) AS id
         ON CONFLICT DO NOTHING
         RETURNING message_id",
    )
    .bind(consumer)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok((tx, new_ids.into_iter().collect()))
}

/// What a handler's error means for its message; logged here, once.
fn failed(error: HandlerError) -> Outcome {
    match error {
        HandlerError::Transient(error) => {
            warn!(
                error = format!("{error:#}"),
                "handler failed; the message will be redelivered"
            );
            Outcome::Retry
        }
        HandlerError::Permanent(error) => {
            warn!(
                error = format!("{error:#}"),
                "handler rejected the message; dead-lettering it"
            );
            Outcome::Reject
        }
    }
}

/// Acknowledges or rejects the message as its outcome says, in its span, and closes the span.
/// A message to retry is returned instead, to be requeued after its delay.
async fn settle(
    received: Received,
    outcome: Outcome,
    spec: &ConsumerSpec,
    max_deliveries: u32,
) -> Option<DelayedRequeue> {
    let Received {
        delivery,
        message,
        span,
    } = received;
    match outcome {
        Outcome::Applied => ack(&delivery).instrument(span).await,
        Outcome::Duplicate => {
            async {
                info!("skipping a message already processed");
                ack(&delivery).await;
            }
            .instrument(span)
            .await;
        }
        Outcome::Reject => nack(&delivery, false).instrument(span).await,
        Outcome::Retry if message.delivery_count >= max_deliveries => {
            async {
                error!(
                    max_deliveries,
                    "message failed on its last delivery; dead-lettering it"
                );
                // Requeued past the quorum queue's delivery limit, the broker dead-letters it.
                nack(&delivery, true).await;
            }
            .instrument(span)
            .await;
        }
        Outcome::Retry => {
            let delay = spec
                .retry_delay
                .saturating_mul(message.delivery_count)
                .min(MAX_RETRY_DELAY);
            return Some(DelayedRequeue {
                delivery,
                span,
                delay,
            });
        }
    }
    None
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The effect is committed; the redelivery that follows is skipped by the inbox.
        warn!(error = %error, "could not acknowledge; the redelivery will be skipped");
    }
}

async fn nack(delivery: &Delivery, requeue: bool) {
    let options = BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.acker.nack(options).await {
        // The channel is gone, and with it the delivery: the broker requeues it anyway.
        warn!(error = %error, "could not reject the message; the broker will redeliver it");
    }
}
