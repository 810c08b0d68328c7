//! A recording handler and a consumer around it, for the messaging tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrite_platform::amqp::{
    Broker, ConsumerSpec, Handler, HandlerError, IncomingMessage, spawn_consumer,
};
use ferrite_platform::settings::AmqpSettings;
use ferrite_proto::{Event, JobRequested};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Bounds every wait for a message; generous because a private broker may be booting on a
/// machine busy compiling. Never a measurement.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// A handler that records each job as a row in `effects` and reports every call.
pub struct Recorder {
    pub calls: mpsc::UnboundedSender<IncomingMessage>,
    /// A job id whose handling always fails.
    pub poison: Option<String>,
    /// Holds the first call after its effect is written, until the test releases it.
    pub gate: Option<Gate>,
}

pub struct Gate {
    pub entered: mpsc::UnboundedSender<()>,
    pub release: Arc<Notify>,
    pub used: AtomicBool,
}

#[async_trait::async_trait]
impl Handler for Recorder {
    async fn handle(
        &self,
        message: &IncomingMessage,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError> {
        let job: JobRequested = message.decode()?;
        let _ = self.calls.send(message.clone());
        if self.poison.as_deref() == Some(job.job_id.as_str()) {
            return Err(HandlerError::Transient(anyhow::anyhow!(
                "job {} always fails",
                job.job_id
            )));
        }
        sqlx::query("INSERT INTO effects (message_id, job_id) VALUES ($1, $2)")
            .bind(message.message_id)
            .bind(&job.job_id)
            .execute(&mut **tx)
            .await?;
        if let Some(gate) = &self.gate
            && !gate.used.swap(true, Ordering::SeqCst)
        {
            let _ = gate.entered.send(());
            gate.release.notified().await;
        }
        Ok(())
    }
}

impl Gate {
    /// A gate, what tells that a handler entered it, and what releases it.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
        let (entered, handler_entered) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let gate = Self {
            entered,
            release: release.clone(),
            used: AtomicBool::new(false),
        };
        (gate, handler_entered, release)
    }
}

impl Recorder {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<IncomingMessage>) {
        let (calls, received) = mpsc::unbounded_channel();
        (
            Self {
                calls,
                poison: None,
                gate: None,
            },
            received,
        )
    }
}

/// The effects table a handler writes to. No unique key on purpose: an effect applied twice
/// shows up as two rows. Each row records the transaction that wrote it, which tells which
/// messages were applied together.
pub async fn create_effects_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE effects (
             message_id UUID NOT NULL,
             job_id TEXT NOT NULL,
             transaction_id BIGINT NOT NULL DEFAULT txid_current()
         )",
    )
    .execute(pool)
    .await
    .expect("create the effects table");
}

pub async fn effects_of(pool: &PgPool, message_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(pool)
        .await
        .expect("count effects")
}

pub fn job(id: &str) -> JobRequested {
    JobRequested {
        job_id: id.to_owned(),
        kind: "sft".to_owned(),
        spec_json: "{}".to_owned(),
        attempt: 1,
    }
}

pub async fn next_call(calls: &mut mpsc::UnboundedReceiver<IncomingMessage>) -> IncomingMessage {
    tokio::time::timeout(PATIENCE, calls.recv())
        .await
        .expect("a message reached the handler in time")
        .expect("the handler is alive")
}

pub fn start_consumer(
    broker: &Broker,
    pool: &PgPool,
    queue: &str,
    prefetch: u16,
    handler: Recorder,
) -> (JoinHandle<()>, CancellationToken) {
    let mut spec = ConsumerSpec::new(
        queue,
        &[JobRequested::ROUTING_KEY],
        broker,
        Arc::new(handler),
    );
    spec.prefetch = prefetch;
    spec.retry_delay = Duration::from_millis(10);
    let shutdown = CancellationToken::new();
    (
        spawn_consumer(broker.clone(), pool.clone(), spec, shutdown.clone()),
        shutdown,
    )
}

pub async fn stop(task: JoinHandle<()>, shutdown: CancellationToken) {
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the task stopped in time")
        .expect("the task did not panic");
}

/// A broker on `url` with an events exchange of its own, connected, and a fresh queue bound to
/// `JobRequested`.
pub async fn broker_with_queue(url: &str, max_deliveries: u32) -> (Broker, AmqpSettings, String) {
    let settings = super::amqp_settings(url, max_deliveries);
    let broker = Broker::start(settings.clone(), CancellationToken::new());
    broker
        .wait_connected(PATIENCE)
        .await
        .expect("connects to the broker");
    let queue = super::unique_name("jobs");
    broker
        .declare_queue(&queue, &[JobRequested::ROUTING_KEY.to_owned()])
        .await
        .expect("declare");
    (broker, settings, queue)
}

/// Waits until `queue`'s dead-letter queue holds a message, takes it and returns its id.
pub async fn take_dead_letter(queue: &str) -> Option<String> {
    let dlq = ferrite_platform::amqp::dead_letter_queue(queue);
    super::eventually(PATIENCE, "a message in the dead-letter queue", || async {
        super::ready_messages(super::SHARED_AMQP_URL, &dlq).await == 1
    })
    .await;
    let dead = super::take_message(super::SHARED_AMQP_URL, &dlq)
        .await
        .expect("a dead-lettered message");
    let id = dead.delivery.properties.message_id().as_ref();
    id.map(|id| id.to_string())
}
