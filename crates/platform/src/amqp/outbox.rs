//! The transactional outbox: events written with the change that caused them, sent after commit.
//!
//! [`enqueue`] inserts a row in the caller's transaction, so the event exists if and only if
//! the change does. One relay per service pool ([`spawn_outbox_relay`]) publishes pending rows in
//! order, waits for the broker's confirms and marks the rows delivered. It wakes on a
//! `NOTIFY` from the table's trigger and also polls, in case a notification was missed while
//! its listening connection was down. Rows are locked with `FOR UPDATE SKIP LOCKED`, so two
//! relays on one schema (two replicas of a service) never publish the same row at once.
//!
//! A row can still be published twice: if the relay dies after the confirm but before its
//! `UPDATE` commits. The row keeps its `message_id`, and consumers skip ids they have seen.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrite_proto::Event;
use sqlx::postgres::PgListener;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use super::{AmqpError, Broker, OutgoingMessage};
use crate::telemetry;

/// Rows published per transaction. Large enough to pipeline confirms, small enough that a
/// failed batch is cheap to retry.
const BATCH_SIZE: i64 = 100;

// TODO: Postgres serialises the commits of transactions that NOTIFY (one global lock), so
// transactions that write to the outbox (its trigger notifies) cannot share a disk flush; past
// a few hundred such commits per second this caps throughput, and the trigger should give way
// to a short poll here.

/// Fallback poll when no notification arrives.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How often delivered outbox rows and old inbox rows are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Writes `event` to the outbox in the caller's transaction and returns its message id.
///
/// The current span's trace context is stored with the row, so the consumer's span becomes a
/// child of the request that wrote it, however long the row waits for the broker.
#[tracing::instrument(
    skip_all,
    fields(messaging.routing_key = E::ROUTING_KEY, messaging.message_id)
)]
pub async fn enqueue<E: Event>(tx: &mut PgConnection, event: &E) -> Result<Uuid, AmqpError> {
    let message_id = Uuid::now_v7();
    tracing::Span::current().record("messaging.message_id", tracing::field::display(message_id));
    let headers: BTreeMap<String, String> = telemetry::inject_context().into_iter().collect();
    sqlx::query(
        "INSERT INTO outbox (message_id, routing_key, body, headers) VALUES ($1, $2, $3, $4)",
    )
    .bind(message_id)
    .bind(E::ROUTING_KEY)
    .bind(event.encode_to_vec())
    .bind(Json(headers))
    .execute(tx)
    .await
    .map_err(AmqpError::database(
        "could not write the event to the outbox",
    ))?;
    Ok(message_id)
}

/// Starts the relay that publishes committed outbox rows of `pool`'s schema until `shutdown`.
///
/// Run one per service pool. While the broker is down the relay waits for it and then
/// publishes everything that piled up, in order.
pub fn spawn_outbox_relay(
    pool: PgPool,
    broker: Broker,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run_relay(broker, pool, shutdown).instrument(info_span!("amqp.outbox_relay")))
}

async fn run_relay(broker: Broker, pool: PgPool, shutdown: CancellationToken) {
    let retry_delay = broker.settings().reconnect_delay;
    let mut wake_up = WakeUp::new(pool.clone());
    let mut failing = false;
    let mut last_prune = tokio::time::Instant::now();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Listening starts before the first batch, so rows committed during a batch still
        // wake the relay afterwards.
        wake_up.ensure_listening().await;

        match relay_batch(&broker, &pool).await {
            Ok(published) => {
                if failing {
                    info!("outbox relay resumed");
                    failing = false;
                }
                if published == BATCH_SIZE as usize {
                    continue;
                }
            }
            Err(AmqpError::NotConnected) => {
                // Waiting for the supervisor beats polling a dead broker.
                if broker.connection(&shutdown).await.is_none() {
                    break;
                }
                continue;
            }
            Err(error) => {
                if !failing {
                    let retry_delay_ms = retry_delay.as_millis();
                    warn!(error = %error, retry_delay_ms, "outbox relay failed; retrying");
                    failing = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(retry_delay) => continue,
                }
            }
        }

        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = tokio::time::Instant::now();
            prune(&pool).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = wake_up.wait(POLL_INTERVAL) => {}
        }
    }
    info!("outbox relay stopped");
}

/// One pending outbox row.
#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    message_id: Uuid,
    routing_key: String,
    body: Vec<u8>,
    headers: Json<BTreeMap<String, String>>,
}

/// Publishes up to [`BATCH_SIZE`] pending rows and marks the confirmed ones delivered.
/// Returns how many rows were found.
#[tracing::instrument(skip_all, fields(outbox.rows))]
async fn relay_batch(broker: &Broker, pool: &PgPool) -> Result<usize, AmqpError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(AmqpError::database("could not begin an outbox batch"))?;
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT id, message_id, routing_key, body, headers FROM outbox
         WHERE delivered_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH_SIZE)
    .fetch_all(&mut *tx)
    .await
    .map_err(AmqpError::database("could not read pending outbox rows"))?;
    tracing::Span::current().record("outbox.rows", rows.len());
    if rows.is_empty() {
        return Ok(0);
    }

    // Everything is handed to the broker before any confirm is awaited: one channel keeps the
    // order, and the confirms of a pipelined batch arrive together instead of one disk sync
    // per message. A failure here rolls back, and the rows already sent are sent again later
    // under the same message ids.
    let mut unconfirmed = Vec::with_capacity(rows.len());
    for row in &rows {
        let headers: Vec<(String, String)> = row.headers.0.clone().into_iter().collect();
        let span = info_span!(
            "amqp.outbox_publish",
            messaging.message_id = %row.message_id,
            messaging.routing_key = %row.routing_key,
        );
        // The publish belongs to the trace of the request that wrote the row.
        telemetry::set_remote_parent(&span, &headers);
        let message = OutgoingMessage {
            message_id: row.message_id,
            routing_key: &row.routing_key,
            body: &row.body,
            headers: &headers,
        };
        unconfirmed.push((row.id, broker.send(message).instrument(span).await?));
    }

    let mut delivered = Vec::with_capacity(rows.len());
    let mut first_error = None;
    for (id, message) in unconfirmed {
        match message.confirmed().await {
            Ok(()) => delivered.push(id),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    sqlx::query("UPDATE outbox SET delivered_at = now() WHERE id = ANY($1)")
        .bind(&delivered)
        .execute(&mut *tx)
        .await
        .map_err(AmqpError::database("could not mark outbox rows delivered"))?;
    tx.commit()
        .await
        .map_err(AmqpError::database("could not commit an outbox batch"))?;
    match first_error {
        Some(error) => Err(error),
        None => Ok(rows.len()),
    }
}

/// Deletes outbox rows delivered a week ago and inbox rows older than 30 days. A message
/// redelivered after 30 days would be processed again; no broker holds one that long.
#[tracing::instrument(skip_all)]
async fn prune(pool: &PgPool) {
    let outbox = sqlx::query("DELETE FROM outbox WHERE delivered_at < now() - interval '7 days'")
        .execute(pool)
        .await;
    let inbox = sqlx::query("DELETE FROM inbox WHERE processed_at < now() - interval '30 days'")
        .execute(pool)
        .await;
    // Pruning is housekeeping: the next round retries, so a failure is only worth a warning.
    if let Err(error) = outbox.and(inbox) {
        warn!(error = %error, "could not prune old outbox and inbox rows");
    }
}

/// The relay's `LISTEN` connection, re-established lazily when it breaks.
struct WakeUp {
    pool: PgPool,
    listener: Option<PgListener>,
    warned: bool,
}

impl WakeUp {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            listener: None,
            warned: false,
        }
    }

    async fn ensure_listening(&mut self) {
        if self.listener.is_some() {
            return;
        }
        match listen(&self.pool).await {
            Ok(listener) => {
                self.listener = Some(listener);
                self.warned = false;
            }
            Err(error) => {
                // Polling still delivers everything, only later; one warning per outage.
                if !self.warned {
                    warn!(error = %error, "outbox relay cannot LISTEN; polling only");
                    self.warned = true;
                }
            }
        }
    }

    /// Returns on a notification or after `poll`, whichever comes first.
    async fn wait(&mut self, poll: Duration) {
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(poll).await;
            return;
        };
        match tokio::time::timeout(poll, listener.try_recv()).await {
            Ok(Ok(Some(_))) | Err(_) => {}
            // The connection broke: notifications sent meanwhile are lost, so run a batch now
            // and listen again.
            Ok(Ok(None) | Err(_)) => self.listener = None,
        }
    }
}

#[tracing::instrument(skip_all)]
async fn listen(pool: &PgPool) -> Result<PgListener, AmqpError> {
    // The trigger names the channel after the table's schema, which is this pool's first
    // `search_path` entry.
    let schema: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await
        .map_err(AmqpError::database("could not read the current schema"))?;
    let mut listener = PgListener::connect_with(pool)
        .await
        .map_err(AmqpError::database(
            "could not open the outbox LISTEN connection",
        ))?;
    listener
        .listen(&format!("ferrite_outbox_{schema}"))
        .await
        .map_err(AmqpError::database("could not LISTEN for outbox rows"))?;
    Ok(listener)
}
