//! Consumers: messages applied in Postgres transactions that also record them in the inbox.
//!
//! Deliveries that arrive together are applied together. The consumer takes one delivery and
//! every delivery already received behind it (never waiting for more, up to `max_batch`), and
//! applies that batch in one transaction: one insert of all their ids into `inbox` (`ON
//! CONFLICT DO NOTHING`) returns the ids that are new, the handler runs for each new message in
//! delivery order, one commit, and only then is every message acknowledged. An id that was
//! already in the inbox, or twice in the batch, was processed before (its ack was lost) and is
//! acknowledged without running the handler. One commit per batch instead of one per message
//! is what lets a consumer keep up with a publisher: a commit waits for a disk flush, and under
//! load the deliveries that arrive while one batch commits form the next.
//!
//! Two batches are in flight at once, each holding one connection (never more than half the
//! pool, so the service's requests keep connections of their own): while one waits for its
//! commit, the next is applied, and the deliveries that arrive meanwhile form the one after.
//! The broker's prefetch bounds the messages held in all of them.
//!
//! A failure rolls the whole batch back. When a handler fails or panics, that call counts as
//! its message's attempt (requeued, or dead-lettered when permanent, as a message alone would
//! be) and each other message of the batch is applied again in a transaction of its own, so
//! one bad message never costs the others an attempt; when the commit fails, every message is
//! applied again alone. A redelivered message (it failed before, or its consumer stopped) is
//! never batched: a poison message rolls back a batch at most once, on its first delivery, and
//! the quorum queue dead-letters it after `max_deliveries` attempts while the rest flow. As a
//! consequence a handler may run more than once for one delivery, rolled back each time but the
//! last; only its work in the transaction is applied exactly once. A batch also holds its row
//! locks until its one commit: handlers that lock shared rows in differing orders can deadlock
//! across batches, which Postgres breaks by failing one of them, a transient failure retried
//! like any other.
//!
//! Long work (a training run) does not fit a handler: the broker cancels a consumer whose
//! delivery stays unacknowledged past its consumer timeout (30 minutes by default). The handler
//! records the job in its transaction and returns; a worker takes it from Postgres with a lease.

mod batch;

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use ferrite_proto::Event;
use futures::stream::Peekable;
use futures::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use super::{AmqpError, Broker, from_field_table, topology};

/// The longest pause before a failed message is requeued or a failed subscription retried.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// [`ConsumerSpec::max_batch`] unless set otherwise. Past a few dozen messages a batch saves
/// little more (the commit is already shared), while a failure re-applies more messages alone.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// What to consume and how to handle it.
pub struct ConsumerSpec {
    /// The durable queue; also the consumer's name in the inbox. Two services must not share
    /// one, and replicas of one service share it to split the work.
    pub queue: String,
    /// Routing keys bound from the events exchange, e.g. `JobRequested::ROUTING_KEY`.
    pub bindings: Vec<String>,
    /// Deliveries handled at once (the AMQP prefetch). Use 1 where order matters.
    pub prefetch: u16,
    /// Most messages applied in one transaction; 1 applies each alone. A batch never waits to
    /// fill: it holds what has arrived, so one message alone costs no more than before.
    pub max_batch: usize,
    /// Pause before a failed message is requeued, times its delivery count, so a brief outage
    /// (a database failover) does not use up every attempt within milliseconds.
    pub retry_delay: Duration,
    pub handler: Arc<dyn Handler>,
}

impl ConsumerSpec {
    /// A spec with the broker's default prefetch, batches of up to [`DEFAULT_MAX_BATCH`] and a
    /// 200 ms retry step.
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
            max_batch: DEFAULT_MAX_BATCH,
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
            .field("max_batch", &self.max_batch)
            .field("retry_delay", &self.retry_delay)
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
    ///
    /// `tx` may already hold the work of earlier messages of the same batch, and a rollback
    /// (this message's error, a later one's, a failed commit) undoes it all; the framework then
    /// calls the handler again. Only work done in `tx` is applied exactly once: anything else
    /// (waking a task, a call to another service) must bear being repeated.
    async fn handle(
        &self,
        message: &IncomingMessage,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError>;
}

/// Starts a consumer that runs until `shutdown`, re-subscribing after every reconnect.
///
/// On shutdown it cancels the subscription, lets batches already running commit and
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
    let deliveries = channel
        .basic_consume(
            &spec.queue,
            &tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(subscribe_error)?;
    let in_flight_limit = batches_in_flight(pool);
    info!(
        prefetch = spec.prefetch,
        max_batch = spec.max_batch,
        in_flight_limit,
        "consuming"
    );

    let mut deliveries = pin!(deliveries.peekable());
    let max_deliveries = broker.settings().max_deliveries;
    // Batches are bounded by `in_flight_limit`; messages waiting out their retry delay hold no
    // connection and are bounded by the prefetch, as is everything together.
    let mut batches = JoinSet::new();
    let mut requeues = JoinSet::new();
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ended::Shutdown,
            Some(joined) = batches.join_next(), if !batches.is_empty() => {
                schedule_requeues(joined, &mut requeues, shutdown);
            }
            Some(joined) = requeues.join_next(), if !requeues.is_empty() => {
                finished(joined);
            }
            next = deliveries.next(), if batches.len() < in_flight_limit => match next {
                Some(Ok(first)) => {
                    let batch = take_batch(first, deliveries.as_mut(), spec.max_batch);
                    let (pool, spec) = (pool.clone(), spec.clone());
                    batches.spawn(batch::process(batch, pool, spec, max_deliveries));
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
    while let Some(joined) = batches.join_next().await {
        schedule_requeues(joined, &mut requeues, shutdown);
    }
    while let Some(joined) = requeues.join_next().await {
        finished(joined);
    }
    // Deliveries received but not started go back to the queue when the channel closes. On a
    // quorum queue that counts as a failed delivery, so a message can lose one attempt per
    // shutdown that catches it prefetched.
    close(&channel).await;
    Ok(ended)
}

/// Batches that apply at once: two, so that one can wait for its commit's disk flush while
/// the next is applied. More would only split the deliveries into smaller batches and more
/// commits; on the bench's two cores, five made throughput worse, not better. Never more
/// than half the pool, which leaves connections to the service's requests and outbox relay.
const BATCHES_IN_FLIGHT: u32 = 2;

fn batches_in_flight(pool: &PgPool) -> usize {
    let half_pool = pool.options().get_max_connections() / 2;
    let limit = BATCHES_IN_FLIGHT.min(half_pool).max(1);
    usize::try_from(limit).unwrap_or(1)
}

/// `first` and the deliveries already received behind it, up to `max_batch` in all; never
/// waits for more. A redelivery is never batched: it failed before, or its consumer stopped,
/// and it is the likeliest to fail again and roll the others back with it.
fn take_batch(
    first: Delivery,
    mut deliveries: Pin<&mut Peekable<Consumer>>,
    max_batch: usize,
) -> Vec<Delivery> {
    if !is_first_delivery(&first) {
        return vec![first];
    }
    let mut batch = vec![first];
    while batch.len() < max_batch {
        let next = deliveries
            .as_mut()
            .next_if(|next| next.as_ref().is_ok_and(is_first_delivery))
            .now_or_never();
        match next {
            Some(Some(Ok(delivery))) => batch.push(delivery),
            // Nothing received yet, a redelivery or the end of the stream: the loop takes it.
            _ => break,
        }
    }
    batch
}

fn is_first_delivery(delivery: &Delivery) -> bool {
    let headers = delivery.properties.headers().as_ref();
    !delivery.redelivered && headers.map_or(1, delivery_count) == 1
}

async fn close(channel: &Channel) {
    // The channel may already be closed by the broker; either way it is gone afterwards.
    let _ = channel.close(200, "consumer stopped").await;
}

/// Starts the delayed requeues a finished batch left.
fn schedule_requeues(
    joined: Result<Vec<batch::DelayedRequeue>, JoinError>,
    requeues: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    for requeue in finished(joined).into_iter().flatten() {
        requeues.spawn(requeue.run(shutdown.clone()));
    }
}

/// What a task returned, or `None` if it panicked.
fn finished<T>(joined: Result<T, JoinError>) -> Option<T> {
    match joined {
        Ok(value) => Some(value),
        Err(error) => {
            if error.is_panic() {
                // Handler panics are caught in `batch`; this is one in the framework itself.
                // Its deliveries return to the queue when the channel closes.
                error!(error = %error, "message processing panicked");
            }
            None
        }
    }
}

impl IncomingMessage {
    /// Takes what a handler needs from a delivery, moving its body out; fails without a UUID
    /// message id, which every Ferrite publisher sets and without which the inbox cannot
    /// deduplicate.
    fn from_delivery(delivery: &mut Delivery) -> Result<Self, &'static str> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .ok_or("no message_id")
            .and_then(|id| Uuid::parse_str(id.as_str()).map_err(|_| "message_id is not a UUID"))?;
        let headers = delivery.properties.headers().as_ref();
        Ok(Self {
            message_id,
            routing_key: delivery.routing_key.as_str().to_owned(),
            body: std::mem::take(&mut delivery.data),
            headers: headers.map(from_field_table).unwrap_or_default(),
            delivery_count: headers.map_or(1, delivery_count),
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
