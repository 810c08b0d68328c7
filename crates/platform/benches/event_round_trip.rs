//! Event round trip (publish, confirm, consume, commit, ack): Ferrite against plain lapin.
//!
//! Run it with the shared RabbitMQ (127.0.0.1:5672) and Postgres (127.0.0.1:5432) up:
//!
//! ```text
//! source scripts/env.sh && cargo bench -p ferrite-platform --bench event_round_trip
//! ```
//!
//! Every path uses persistent messages, publisher confirms and a durable quorum queue with
//! manual acks and the same prefetch, so the broker does the same disk work for each. Four
//! paths, in one process:
//! - `lapin`: publish and wait for the confirm; the consumer acks at once;
//! - `lapin + commit`: the same, but before the ack the consumer inserts the message id by one
//!   statement that commits on its own (one round trip, one disk flush) on a plain sqlx pool
//!   (its defaults): the least that any consumer recording its messages durably, as
//!   exactly-once delivery needs, can pay per message;
//! - `lapin + inbox tx`: the same record inside a transaction (`BEGIN`, insert, `COMMIT`), where
//!   a handler's effect would also go: exactly-once bookkeeping written naively by hand;
//! - `ferrite`: the product as a service runs it: settings from `Settings::load` (the platform's
//!   defaults, with this run's URLs, exchange and prefetch), the pool from `db::connect`, the
//!   schema from `db::migrate`, `Broker::publish_event`, and `spawn_consumer` with the default
//!   `ConsumerSpec` and a handler that does nothing, so the framework's own work is measured:
//!   inbox rows, commits (one per batch of deliveries that arrive together), acks. The round
//!   trip ends when the consumer's `amqp.consume` span closes, right after the ack.
//!
//! Latency is measured one message at a time (p50, p99), throughput with 32 concurrent
//! publishers, in rounds that alternate between the paths. The ratios at the end compare
//! Ferrite with each lapin path, and the durable floor (`lapin + commit`) with bare lapin. It takes seconds once built and leaves nothing behind: its
//! database, exchanges and queues are dropped at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferrite_platform::amqp::{
    Broker, ConsumerSpec, Handler, HandlerError, IncomingMessage, spawn_consumer,
};
use ferrite_platform::settings::AmqpSettings;
use ferrite_platform::{Settings, db};
use ferrite_proto::{Event, JobRequested};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use prost::Message as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use uuid::Uuid;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const MESSAGING_MIGRATION: &str =
    include_str!("../../../migrations/_messaging/1_outbox_and_inbox.sql");

const WARM_UP: usize = 50;
const ROUNDS: usize = 3;
const LATENCY_MESSAGES: usize = 200;
const THROUGHPUT_MESSAGES: usize = 2_000;
const PUBLISHERS: usize = 32;
/// The same for every path; a Ferrite service reads it from `FERRITE_AMQP_PREFETCH`.
const PREFETCH: u16 = 64;
/// The Ferrite path's schema, as a service's own.
const BENCH_SCHEMA: &str = "bench";
/// Bounds each wait so that a broken setup fails instead of hanging; never a measurement.
const PATIENCE: Duration = Duration::from_secs(60);

/// One way of sending a message and learning that it went all the way round.
trait RoundTrip: Send + Sync {
    /// Publishes one message and waits for the broker's confirm.
    fn publish(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database = format!("ferrite_bench_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(POSTGRES_ADMIN_URL)
        .await
        .context("connect to Postgres")?;
    sqlx::query(&format!(r#"CREATE DATABASE "{database}""#))
        .execute(&mut admin)
        .await?;
    let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
    // A plain sqlx pool with its defaults, the inbox table in `public`.
    let raw_pool = PgPoolOptions::new().connect(&url).await?;
    sqlx::raw_sql(MESSAGING_MIGRATION)
        .execute(&raw_pool)
        .await?;

    let outcome = run_all(&raw_pool, &url).await;

    raw_pool.close().await;
    sqlx::query(&format!(
        r#"DROP DATABASE IF EXISTS "{database}" WITH (FORCE)"#
    ))
    .execute(&mut admin)
    .await?;
    outcome
}

async fn run_all(raw_pool: &PgPool, database_url: &str) -> anyhow::Result<()> {
    println!(
        "event round trip: {ROUNDS} rounds of {LATENCY_MESSAGES} sequential messages (latency) and \
         {THROUGHPUT_MESSAGES} from {PUBLISHERS} publishers (throughput) per path, paths \
         interleaved; persistent, confirmed, quorum queue"
    );
    let (consumed, mut ferrite_done) = mpsc::unbounded_channel();
    // Only the consume span is enabled, so no other span or event (lapin's, sqlx's) costs
    // anything in any path.
    let layer = ConsumeSpanClosed { done: consumed }.with_filter(filter_fn(|metadata| {
        metadata.is_span() && metadata.name() == "amqp.consume"
    }));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;

    // The plain client, alone and with the two ways it could record a message durably.
    let mut references = Vec::new();
    for bookkeeping in [
        Bookkeeping::None,
        Bookkeeping::Commit(raw_pool.clone()),
        Bookkeeping::InboxTransaction(raw_pool.clone()),
    ] {
        let name = bookkeeping.name();
        let (path, done) = RawPath::start(bookkeeping).await?;
        references.push((name, path, done, Samples::default()));
    }
    let ferrite = FerritePath::start(database_url).await?;
    let mut ferrite_results = Samples::default();

    for _ in 0..WARM_UP {
        for (_, path, done, _) in &mut references {
            round_trip(path.as_ref(), done).await?;
        }
        round_trip(ferrite.as_ref(), &mut ferrite_done).await?;
    }
    // Rounds alternate between the paths, message by message for latency, so drift in the
    // machine's load (other builds, the broker's disk) falls on all of them alike.
    for _ in 0..ROUNDS {
        for _ in 0..LATENCY_MESSAGES {
            for (_, path, done, samples) in &mut references {
                samples
                    .latencies
                    .push(round_trip(path.as_ref(), done).await?);
            }
            ferrite_results
                .latencies
                .push(round_trip(ferrite.as_ref(), &mut ferrite_done).await?);
        }
        for (_, path, done, samples) in &mut references {
            samples.busy += throughput(path, done).await?;
        }
        ferrite_results.busy += throughput(&ferrite, &mut ferrite_done).await?;
    }
    for (_, path, _, _) in &references {
        path.clone().stop().await;
    }
    ferrite.stop().await;

    println!(
        "{:<20} {:>9} {:>9} {:>12}",
        "path", "p50 ms", "p99 ms", "messages/s"
    );
    let rows = references
        .iter_mut()
        .map(|(name, _, _, samples)| (*name, samples))
        .chain([("ferrite", &mut ferrite_results)]);
    for (name, samples) in rows {
        let rate = samples
            .rate()
            .map_or_else(|| "-".to_owned(), |rate| format!("{rate:.0}"));
        println!(
            "{name:<20} {:>9.2} {:>9.2} {rate:>12}",
            millis(samples.p(50)),
            millis(samples.p(99))
        );
    }
    // Latency ratios above 1 and throughput ratios below 1 mean the first path is slower.
    let (_, _, _, bare) = &mut references[0];
    let bare_p50 = bare.p(50);
    for (name, _, _, reference) in &mut references {
        let throughput = match (reference.rate(), ferrite_results.rate()) {
            (Some(reference), Some(ferrite)) => {
                format!(", messages/s {:.2}x", ferrite / reference)
            }
            _ => String::new(),
        };
        println!(
            "ferrite / {name}: p50 {:.2}x, p99 {:.2}x{throughput}",
            ratio(ferrite_results.p(50), reference.p(50)),
            ratio(ferrite_results.p(99), reference.p(99)),
        );
    }
    // The least that any consumer recording its messages durably pays per message, against the
    // bare client: exactly-once delivery cannot be cheaper than this on this machine's disk.
    let (name, _, _, commit) = &mut references[1];
    println!("{name} / lapin: p50 {:.2}x", ratio(commit.p(50), bare_p50));
    Ok(())
}

/// What one path measured.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    /// Time spent on the throughput runs, all rounds together.
    busy: Duration,
}

impl Samples {
    fn p(&mut self, percentile: usize) -> Duration {
        self.latencies.sort_unstable();
        self.latencies[(self.latencies.len() * percentile / 100).min(self.latencies.len() - 1)]
    }

    fn rate(&self) -> Option<f64> {
        (!self.busy.is_zero())
            .then(|| (ROUNDS * throughput_messages()) as f64 / self.busy.as_secs_f64())
    }
}

/// One message there and back.
async fn round_trip<P: RoundTrip>(
    path: &P,
    done: &mut mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    path.publish().await?;
    tokio::time::timeout(PATIENCE, done.recv())
        .await
        .context("round trip timed out")?;
    Ok(started.elapsed())
}

/// Messages per throughput run: a whole number per publisher.
fn throughput_messages() -> usize {
    THROUGHPUT_MESSAGES / PUBLISHERS * PUBLISHERS
}

/// Time to get [`throughput_messages`] round, from concurrent publishers.
async fn throughput<P: RoundTrip + 'static>(
    path: &Arc<P>,
    done: &mut mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..PUBLISHERS {
        let path = path.clone();
        publishers.spawn(async move {
            for _ in 0..throughput_messages() / PUBLISHERS {
                path.publish().await?;
            }
            anyhow::Ok(())
        });
    }
    for _ in 0..throughput_messages() {
        tokio::time::timeout(PATIENCE, done.recv())
            .await
            .context("throughput run timed out")?;
    }
    let elapsed = started.elapsed();
    while let Some(published) = publishers.join_next().await {
        published??;
    }
    Ok(elapsed)
}

fn body() -> Vec<u8> {
    JobRequested {
        job_id: Uuid::new_v4().to_string(),
        kind: "sft".into(),
        spec_json: "{}".into(),
        attempt: 1,
    }
    .encode_to_vec()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn quorum_queue() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments
}

/// The plain lapin client: one confirm channel to publish, one channel to consume.
struct RawPath {
    connection: Connection,
    publisher: Channel,
    exchange: String,
    queue: String,
    consumer: tokio::task::JoinHandle<()>,
}

/// What the plain client's consumer writes to Postgres before it acknowledges a message.
#[derive(Clone)]
enum Bookkeeping {
    /// Nothing: it acknowledges at once.
    None,
    /// The message id inserted by one statement that commits on its own (one round trip and
    /// one disk flush): the cheapest durable record of a message there is.
    Commit(PgPool),
    /// The message id inserted into an inbox table inside a transaction, where a handler's
    /// effect would also go (`BEGIN`, insert, `COMMIT`): what Ferrite does, written by hand.
    InboxTransaction(PgPool),
}

impl Bookkeeping {
    fn name(&self) -> &'static str {
        match self {
            Self::None => "lapin",
            Self::Commit(_) => "lapin + commit",
            Self::InboxTransaction(_) => "lapin + inbox tx",
        }
    }

    async fn record(&self, delivery: &lapin::message::Delivery) -> anyhow::Result<()> {
        let (pool, in_transaction) = match self {
            Self::None => return Ok(()),
            Self::Commit(pool) => (pool, false),
            Self::InboxTransaction(pool) => (pool, true),
        };
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .context("no message id")?;
        let insert = sqlx::query(
            "INSERT INTO inbox (consumer, message_id) VALUES ('raw', $1) ON CONFLICT DO NOTHING",
        )
        .bind(Uuid::parse_str(id.as_str())?);
        if in_transaction {
            let mut tx = pool.begin().await?;
            insert.execute(&mut *tx).await?;
            tx.commit().await?;
        } else {
            insert.execute(pool).await?;
        }
        Ok(())
    }
}

impl RawPath {
    async fn start(
        bookkeeping: Bookkeeping,
    ) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<()>)> {
        let suffix = Uuid::new_v4().simple();
        let exchange = format!("ferrite.bench.raw.{suffix}");
        let queue = format!("bench-raw-{suffix}");
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        publisher
            .exchange_declare(
                &exchange,
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        publisher
            .queue_declare(&queue, durable, quorum_queue())
            .await?;
        publisher
            .queue_bind(
                &queue,
                &exchange,
                JobRequested::ROUTING_KEY,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                &queue,
                "bench",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (done, finished) = mpsc::unbounded_channel();
        let consumer = tokio::spawn(async move {
            // Each delivery in a task of its own, as Ferrite's consumer does; the prefetch
            // bounds how many run at once.
            while let Some(Ok(delivery)) = deliveries.next().await {
                let (bookkeeping, done) = (bookkeeping.clone(), done.clone());
                tokio::spawn(async move {
                    if bookkeeping.record(&delivery).await.is_err() {
                        return;
                    }
                    if delivery.acker.ack(BasicAckOptions::default()).await.is_ok() {
                        let _ = done.send(());
                    }
                });
            }
        });
        Ok((
            Arc::new(Self {
                connection,
                publisher,
                exchange,
                queue,
                consumer,
            }),
            finished,
        ))
    }

    async fn stop(self: Arc<Self>) {
        self.consumer.abort();
        // A fresh channel for each deletion: a failed one closes its channel, and the other
        // must still run so that nothing is left on the shared broker.
        if let Ok(channel) = self.connection.create_channel().await {
            let _ = channel
                .queue_delete(&self.queue, QueueDeleteOptions::default())
                .await;
        }
        if let Ok(channel) = self.connection.create_channel().await {
            let options = ExchangeDeleteOptions::default();
            let _ = channel.exchange_delete(&self.exchange, options).await;
        }
        let _ = self.connection.close(200, "bench done").await;
    }
}

impl RoundTrip for RawPath {
    async fn publish(&self) -> anyhow::Result<()> {
        let properties = BasicProperties::default()
            .with_message_id(Uuid::now_v7().to_string().into())
            .with_content_type("application/x-protobuf".into())
            .with_type(JobRequested::ROUTING_KEY.into())
            .with_delivery_mode(2);
        let confirm = self
            .publisher
            .basic_publish(
                &self.exchange,
                JobRequested::ROUTING_KEY,
                BasicPublishOptions::default(),
                &body(),
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("the broker refused a message");
        }
        Ok(())
    }
}

/// Ferrite's broker handle and consumer, with a handler that does nothing but what the
/// framework does around it (the inbox row, the commit, the ack).
struct FerritePath {
    broker: Broker,
    pool: PgPool,
    queue: String,
    settings: AmqpSettings,
    shutdown: CancellationToken,
    consumer: tokio::task::JoinHandle<()>,
}

struct NoEffect;

#[async_trait::async_trait]
impl Handler for NoEffect {
    async fn handle(
        &self,
        _: &IncomingMessage,
        _: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Reports each closed `amqp.consume` span: the consumer closes it after the ack, so this is
/// the end of a Ferrite round trip, seen without changing what is measured.
struct ConsumeSpanClosed {
    done: mpsc::UnboundedSender<()>,
}

impl<S> Layer<S> for ConsumeSpanClosed
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        if ctx
            .span(&id)
            .is_some_and(|span| span.name() == "amqp.consume")
        {
            let _ = self.done.send(());
        }
    }
}

impl FerritePath {
    /// A service's setup on `database_url`: its settings, pool, schema, broker and consumer.
    async fn start(database_url: &str) -> anyhow::Result<Arc<Self>> {
        let suffix = Uuid::new_v4().simple();
        let env = [
            ("FERRITE_DATABASE_URL", database_url.to_owned()),
            ("FERRITE_AMQP_URL", AMQP_URL.to_owned()),
            ("FERRITE_AMQP_EXCHANGE", format!("ferrite.bench.{suffix}")),
            ("FERRITE_AMQP_PREFETCH", PREFETCH.to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        let Settings { database, amqp, .. } = Settings::load(None, &env)?;
        let pool = db::connect(&database, BENCH_SCHEMA)?;
        db::migrate(&pool, BENCH_SCHEMA, None).await?;

        let broker = Broker::start(amqp.clone(), CancellationToken::new());
        broker.wait_connected(PATIENCE).await?;
        let queue = format!("bench-ferrite-{suffix}");
        broker
            .declare_queue(&queue, &[JobRequested::ROUTING_KEY.to_owned()])
            .await?;

        let spec = ConsumerSpec::new(
            queue.clone(),
            &[JobRequested::ROUTING_KEY],
            &broker,
            Arc::new(NoEffect),
        );
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(broker.clone(), pool.clone(), spec, shutdown.clone());
        Ok(Arc::new(Self {
            broker,
            pool,
            queue,
            settings: amqp,
            shutdown,
            consumer,
        }))
    }

    async fn stop(self: Arc<Self>) {
        self.shutdown.cancel();
        let Ok(path) = Arc::try_unwrap(self) else {
            return;
        };
        let _ = path.consumer.await;
        if let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
            && let Ok(channel) = connection.create_channel().await
        {
            for queue in [
                path.queue.clone(),
                ferrite_platform::amqp::dead_letter_queue(&path.queue),
            ] {
                let _ = channel
                    .queue_delete(&queue, QueueDeleteOptions::default())
                    .await;
            }
            for exchange in [
                path.settings.exchange.clone(),
                ferrite_platform::amqp::dead_letter_exchange(&path.settings),
            ] {
                let _ = channel
                    .exchange_delete(&exchange, ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = connection.close(200, "bench done").await;
        }
        path.broker.close().await;
        path.pool.close().await;
    }
}

impl RoundTrip for FerritePath {
    async fn publish(&self) -> anyhow::Result<()> {
        let event = JobRequested {
            job_id: Uuid::new_v4().to_string(),
            kind: "sft".into(),
            spec_json: "{}".into(),
            attempt: 1,
        };
        self.broker.publish_event(&event).await?;
        Ok(())
    }
}
