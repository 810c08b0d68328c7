//! Consumers: each message handled in a Postgres transaction that also records it in the inbox.
//!
//! For every delivery the framework opens a transaction, inserts `(queue, message_id)` into
//! `inbox` (`ON CONFLICT DO NOTHING`), runs the handler in that transaction, commits, and only
//! then acknowledges. A message whose id is already in the inbox was processed before (its ack
//! was lost) and is acknowledged without running the handler. A failing handler rolls back and
//! the message is requeued; the quorum queue dead-letters it after `max_deliveries` attempts.
//!
//! Long work (a training run) does not fit a handler: the broker cancels a consumer whose
//! delivery stays unacknowledged past its consumer timeout (30 minutes by default). The handler
//! records the job in its transaction and returns; a worker takes it from Postgres with a lease.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use ferrite_proto::Event;
use futures::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use super::{AmqpError, Broker, from_field_table, topology};
use crate::telemetry;

/// The longest pause before a failed message is requeued or a failed subscription retried.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// What to consume and how to handle it.
pub struct ConsumerSpec {
    /// The durable queue; also the consumer's name in the inbox. Two services must not share
    /// one, and replicas of one service share it to split the work.
    pub queue: String,
    /// Routing keys bound from the events exchange, e.g. `JobRequested::ROUTING_KEY`.
    pub bindings: Vec<String>,
    /// Deliveries handled at once (the AMQP prefetch). Use 1 where order matters.
    pub prefetch: u16,
    /// Pause before a failed message is requeued, times its delivery count, so a brief outage
    /// (a database failover) does not use up every attempt within milliseconds.
    pub retry_delay: Duration,
    pub handler: Arc<dyn Handler>,
}

impl ConsumerSpec {
    /// A spec with the broker's default prefetch and a 200 ms retry step.
    pub fn new(
        queue: impl Into<String>,
        bindings: &[&str],
        broker: &Broker,
        handler: Arc<dyn Handler>,
    ) -> Self {
        Self {
            queue: queue.into(),
            bindings: bindings.iter().map(|key| (*key).to_owned()).collect(),
            prefetch: broker.settings().prefetch,
            retry_delay: Duration::from_millis(200),
            handler,
        }
    }
}

impl std::fmt::Debug for ConsumerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSpec")
            .field("queue", &self.queue)
            .field("bindings", &self.bindings)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

/// A delivery as a handler sees it.
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    pub message_id: Uuid,
    pub routing_key: String,
    /// The encoded protobuf message; see [`IncomingMessage::decode`].
    pub body: Vec<u8>,
    /// Text headers, including the W3C trace context.
    pub headers: Vec<(String, String)>,
    /// 1 on the first delivery, counted by the broker across consumers and restarts.
    pub delivery_count: u32,
}

impl IncomingMessage {
    /// Decodes the body as `E`. A body that does not decode never will, so the error is
    /// [`HandlerError::Permanent`] and the message goes straight to the dead-letter queue.
    pub fn decode<E: Event>(&self) -> Result<E, HandlerError> {
        E::decode(self.body.as_slice()).map_err(|e| {
            HandlerError::Permanent(
                anyhow::Error::new(e).context(format!("body is not a valid {}", E::ROUTING_KEY)),
            )
        })
    }
}

/// Why a handler did not apply a message. Either way its transaction is rolled back.
#[derive(Debug)]
pub enum HandlerError {
    /// Might succeed later (a database hiccup, a dependency down): the message is requeued,
    /// up to `max_deliveries` deliveries in all.
    Transient(anyhow::Error),
    /// Will never succeed (an invalid body, a reference to nothing): dead-lettered now.
    Permanent(anyhow::Error),
}

/// `?` on any error in a handler makes it [`HandlerError::Transient`].
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::Transient(error.into())
    }
}

/// Applies one message's effect inside the transaction the framework opened.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Do the work in `tx` and return; the framework commits and then acknowledges. Return
    /// quickly: long work should be recorded here and run elsewhere.
    async fn handle(
        &self,
        message: &IncomingMessage,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError>;
}

/// Starts a consumer that runs until `shutdown`, re-subscribing after every reconnect.
///
/// On shutdown it cancels the subscription, lets handlers already running commit and
/// acknowledge, and closes its channel, which returns every other unacknowledged delivery to
/// the queue. Await the handle to know all that is done.
pub fn spawn_consumer(
    broker: Broker,
    pool: PgPool,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let span = info_span!("amqp.consumer", messaging.destination = %spec.queue);
    tokio::spawn(run_consumer(broker, pool, Arc::new(spec), shutdown).instrument(span))
}

/// How one subscription ended.
enum Ended {
    Shutdown,
    Lost(String),
}

async fn run_consumer(
    broker: Broker,
    pool: PgPool,
    spec: Arc<ConsumerSpec>,
    shutdown: CancellationToken,
) {
    let reconnect_delay = broker.settings().reconnect_delay;
    let mut failed_subscribes = 0_u32;
    loop {
        let Some(connection) = broker.connection(&shutdown).await else {
            break;
        };
        match consume(&broker, &connection, &pool, &spec, &shutdown).await {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::Lost(reason)) => {
                failed_subscribes = 0;
                warn!(reason, "consumer lost its channel; re-subscribing");
            }
            Err(error) => {
                // A refused declaration (queue arguments changed) fails the same way every
                // time: warn once, then retry ever more slowly without flooding the log.
                if failed_subscribes == 0 {
                    warn!(error = %error, "consumer could not subscribe; retrying");
                }
                failed_subscribes = failed_subscribes.saturating_add(1);
            }
        }
        let delay = reconnect_delay
            .saturating_mul(failed_subscribes.max(1))
            .min(MAX_RETRY_DELAY);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    info!("consumer stopped");
}

/// One subscription: from declaring the queue until the channel breaks or shutdown.
#[tracing::instrument(skip_all, fields(messaging.destination = %spec.queue))]
async fn consume(
    broker: &Broker,
    connection: &Connection,
    pool: &PgPool,
    spec: &Arc<ConsumerSpec>,
    shutdown: &CancellationToken,
) -> Result<Ended, AmqpError> {
    let subscribe_error = |source| AmqpError::Subscribe {
        queue: spec.queue.clone(),
        source,
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::Channel)?;
    topology::declare_queue(&channel, broker.settings(), &spec.queue, &spec.bindings).await?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await
        .map_err(subscribe_error)?;
    let tag = format!("{}.{}", spec.queue, Uuid::new_v4().simple());
    let mut deliveries = channel
        .basic_consume(
            &spec.queue,
            &tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(subscribe_error)?;
    info!(prefetch = spec.prefetch, "consuming");

    // The broker never sends more than `prefetch` unacknowledged deliveries, which bounds
    // this set.
    let mut in_flight = JoinSet::new();
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ended::Shutdown,
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => report_panic(joined),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    let max_deliveries = broker.settings().max_deliveries;
                    let (pool, spec) = (pool.clone(), spec.clone());
                    let shutdown = shutdown.clone();
                    in_flight.spawn(process(delivery, pool, spec, max_deliveries, shutdown));
                }
                Some(Err(error)) => break Ended::Lost(error.to_string()),
                None => break Ended::Lost("the broker cancelled the subscription".to_owned()),
            },
        }
    };

    if matches!(ended, Ended::Shutdown) {
        // Stops new deliveries; fails only if the channel is already gone, which stops them too.
        let _ = channel
            .basic_cancel(&tag, BasicCancelOptions::default())
            .await;
    }
    while let Some(joined) = in_flight.join_next().await {
        report_panic(joined);
    }
    // Deliveries received but not started go back to the queue when the channel closes. On a
    // quorum queue that counts as a failed delivery, so a message can lose one attempt per
    // shutdown that catches it prefetched.
    close(&channel).await;
    Ok(ended)
}

async fn close(channel: &Channel) {
    // The channel may already be closed by the broker; either way it is gone afterwards.
    let _ = channel.close(200, "consumer stopped").await;
}

fn report_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        // Handler panics are caught in `process`; this is one in the framework itself. Its
        // delivery returns to the queue when the channel closes.
        error!(error = %error, "message processing panicked");
    }
}

/// What became of one delivery.
enum Outcome {
    Applied,
    /// Already in the inbox: processed before, its ack lost.
    Duplicate,
    Retry,
    Reject,
}

/// Handles one delivery end to end and acknowledges it; never fails, it logs instead.
async fn process(
    delivery: Delivery,
    pool: PgPool,
    spec: Arc<ConsumerSpec>,
    max_deliveries: u32,
    shutdown: CancellationToken,
) {
    let message = match IncomingMessage::from_delivery(&delivery) {
        Ok(message) => message,
        Err(problem) => {
            let routing_key = delivery.routing_key.as_str();
            warn!(
                problem,
                routing_key, "dead-lettering a message that cannot be deduplicated"
            );
            nack(&delivery, false).await;
            return;
        }
    };
    let span = info_span!(
        "amqp.consume",
        otel.kind = "consumer",
        messaging.destination = %spec.queue,
        messaging.message_id = %message.message_id,
        messaging.routing_key = %message.routing_key,
        messaging.delivery_count = message.delivery_count,
    );
    // The consumer's span continues the trace of whatever published the message.
    telemetry::set_remote_parent(&span, &message.headers);

    async {
        // A panicking handler must not leave its delivery unacknowledged (holding a prefetch
        // slot) until the channel closes: it counts as a failed attempt.
        let outcome = AssertUnwindSafe(apply(&message, &pool, &spec))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                warn!("handler panicked; the message will be redelivered");
                Outcome::Retry
            });
        match outcome {
            Outcome::Applied => ack(&delivery).await,
            Outcome::Duplicate => {
                info!("skipping a message already processed");
                ack(&delivery).await;
            }
            Outcome::Reject => nack(&delivery, false).await,
            Outcome::Retry => {
                if message.delivery_count >= max_deliveries {
                    error!(
                        max_deliveries,
                        "message failed on its last delivery; dead-lettering it"
                    );
                } else {
                    let delay = spec
                        .retry_delay
                        .saturating_mul(message.delivery_count)
                        .min(MAX_RETRY_DELAY);
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                nack(&delivery, true).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Runs the handler in a transaction with the inbox insert, and commits if it succeeds.
async fn apply(message: &IncomingMessage, pool: &PgPool, spec: &ConsumerSpec) -> Outcome {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(error) => {
            warn!(error = %error, "could not begin a transaction; requeueing the message");
            return Outcome::Retry;
        }
    };
    let recorded = sqlx::query(
        "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(&spec.queue)
    .bind(message.message_id)
    .execute(&mut *tx)
    .await;
    match recorded {
        // A concurrent delivery of the same id waits on the row lock here, then sees it taken.
        Ok(result) if result.rows_affected() == 0 => return Outcome::Duplicate,
        Ok(_) => {}
        Err(error) => {
            warn!(error = %error, "could not record the message in the inbox; requeueing it");
            return Outcome::Retry;
        }
    }

    // Dropping `tx` on any early return below rolls it back.
    match spec.handler.handle(message, &mut tx).await {
        Ok(()) => match tx.commit().await {
            Ok(()) => Outcome::Applied,
            Err(error) => {
                warn!(error = %error, "could not commit the handler's transaction; requeueing");
                Outcome::Retry
            }
        },
        Err(HandlerError::Transient(error)) => {
            warn!(
                error = format!("{error:#}"),
                "handler failed; the message will be redelivered"
            );
            Outcome::Retry
        }
        Err(HandlerError::Permanent(error)) => {
            warn!(
                error = format!("{error:#}"),
                "handler rejected the message; dead-lettering it"
            );
            Outcome::Reject
        }
    }
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

impl IncomingMessage {
    /// Reads what a handler needs from a delivery; fails without a UUID message id, which
    /// every Ferrite publisher sets and without which the inbox cannot deduplicate.
    fn from_delivery(delivery: &Delivery) -> Result<Self, &'static str> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .ok_or("no message_id")
            .and_then(|id| Uuid::parse_str(id.as_str()).map_err(|_| "message_id is not a UUID"))?;
        let table = delivery.properties.headers().clone().unwrap_or_default();
        Ok(Self {
            message_id,
            routing_key: delivery.routing_key.as_str().to_owned(),
            body: delivery.data.clone(),
            headers: from_field_table(&table),
            delivery_count: delivery_count(&table),
        })
    }
}

/// The 1-based delivery count from the quorum queue's `x-delivery-count` header, which counts
/// earlier failed deliveries and is absent on the first.
fn delivery_count(headers: &FieldTable) -> u32 {
    let earlier = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(*n),
        _ => 0,
    };
    earlier.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_delivery_has_no_header_and_counts_as_one() {
        assert_eq!(delivery_count(&FieldTable::default()), 1);
    }

    #[test]
    fn the_broker_header_counts_earlier_deliveries() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        assert_eq!(
            delivery_count(&headers),
            3,
            "two failed deliveries before this one"
        );
    }

    #[test]
    fn an_undecodable_body_is_a_permanent_failure() {
        let message = IncomingMessage {
            message_id: Uuid::nil(),
            routing_key: "job.requested".into(),
            // A field header of wire type 7, which protobuf does not define.
            body: vec![0x0f],
            headers: Vec::new(),
            delivery_count: 1,
        };
        let decoded = message.decode::<ferrite_proto::JobRequested>();
        assert!(matches!(decoded, Err(HandlerError::Permanent(_))));
    }
}
