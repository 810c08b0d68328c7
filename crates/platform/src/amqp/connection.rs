//! The broker handle: one lapin connection that a supervisor task keeps alive across restarts.

use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::{AmqpError, topology};
use crate::settings::AmqpSettings;

/// How long one connection attempt may take before it counts as failed; a broker that accepts
/// TCP but never finishes the handshake must not stall reconnection forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the supervisor double-checks the connection state, in case lapin reports a lost
/// connection only through its status and not through the error callback.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A cheap-to-clone handle on the RabbitMQ connection.
///
/// [`Broker::start`] returns at once and a supervisor task connects in the background, then
/// reconnects after `reconnect_delay` whenever the connection is lost. Each (re)connect declares
/// the events exchange and the dead-letter exchange; consumers re-declare their own queues when
/// they re-subscribe. A service can therefore start while the broker is down, and `/readyz`
/// reports the state through [`Broker::is_connected`].
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    settings: AmqpSettings,
    /// The live connection, or `None` while (re)connecting.
    connection: watch::Sender<Option<Arc<Connection>>>,
    /// The channel publishers share, in confirm mode; opened lazily on the live connection.
    publisher: Mutex<Option<Channel>>,
    /// Consumer queues and their bindings, declared on every (re)connect before the connection
    /// is handed out, so no publisher can send an event before its queues exist. The lock is
    /// held across "declare, then publish the connection" and across registration, so a queue
    /// registered mid-connect is never missed.
    queues: Mutex<Vec<(String, Vec<String>)>>,
    closed: CancellationToken,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("exchange", &self.shared.settings.exchange)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Broker {
    /// Starts the connection supervisor on the current Tokio runtime. It closes the connection
    /// and stops when `shutdown` fires or [`Broker::close`] is called.
    pub fn start(settings: AmqpSettings, shutdown: CancellationToken) -> Self {
        let shared = Arc::new(Shared {
            settings,
            connection: watch::Sender::new(None),
            publisher: Mutex::new(None),
            queues: Mutex::new(Vec::new()),
            // A child, so that `close` stops this broker without cancelling the caller's token.
            closed: shutdown.child_token(),
        });
        let span = info_span!("amqp.supervisor", messaging.exchange = %shared.settings.exchange);
        tokio::spawn(supervise(shared.clone()).instrument(span));
        Self { shared }
    }

    /// The settings this broker was started with.
    pub fn settings(&self) -> &AmqpSettings {
        &self.shared.settings
    }

    /// Whether a connection is open now; what `/readyz` reports.
    pub fn is_connected(&self) -> bool {
        self.shared
            .connection
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Waits until connected, or fails with [`AmqpError::NotConnected`] after `timeout`.
    /// For start-up code and tests that want the broker before going on.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), AmqpError> {
        let never = CancellationToken::new();
        match tokio::time::timeout(timeout, self.connection(&never)).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) | Err(_) => Err(AmqpError::NotConnected),
        }
    }

    /// Declares `queue` (with its dead-letter queue and `bindings`) now if connected, and again
    /// on every reconnect before publishers may send. Register every consumer's queue before
    /// events for it are published, or the broker drops them as unroutable.
    pub async fn register_queue(&self, queue: &str, bindings: &[String]) -> Result<(), AmqpError> {
        let mut queues = self.shared.queues.lock().await;
        if self.current_connection().is_some() {
            self.declare_queue(queue, bindings).await?;
        }
        queues.push((queue.to_owned(), bindings.to_vec()));
        Ok(())
    }

    /// Closes the connection and stops reconnecting. Other clones become unusable.
    pub async fn close(&self) {
        self.shared.closed.cancel();
        let connection = self.shared.connection.send_replace(None);
        if let Some(connection) = connection {
            // Closing an already broken connection fails, and there is nothing left to do then.
            let _ = connection.close(200, "ferrite shutting down").await;
        }
    }

    /// The live connection, waiting for the supervisor if it is reconnecting; `None` once
    /// `cancel` fires or the broker is closed.
    pub(crate) async fn connection(&self, cancel: &CancellationToken) -> Option<Arc<Connection>> {
        let mut updates = self.shared.connection.subscribe();
        loop {
            if let Some(connection) = updates.borrow_and_update().as_ref()
                && connection.status().connected()
            {
                return Some(connection.clone());
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = self.shared.closed.cancelled() => return None,
                changed = updates.changed() => changed.ok()?,
            }
        }
    }

    /// The live connection, without waiting.
    pub(crate) fn current_connection(&self) -> Option<Arc<Connection>> {
        self.shared
            .connection
            .borrow()
            .clone()
            .filter(|c| c.status().connected())
    }

    /// The shared confirm-mode channel, opened on first use after each (re)connect.
    pub(crate) async fn publisher_channel(&self) -> Result<Channel, AmqpError> {
        let mut slot = self.shared.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let connection = self.current_connection().ok_or(AmqpError::NotConnected)?;
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::Channel)?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::Channel)?;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

/// Connects, waits for the connection to break, and starts over until the broker is closed.
async fn supervise(shared: Arc<Shared>) {
    let delay = shared.settings.reconnect_delay;
    let mut failed_attempts = 0_u32;
    loop {
        let attempt = tokio::select! {
            _ = shared.closed.cancelled() => break,
            attempt = connect(&shared.settings) => attempt,
        };
        let queues = shared.queues.lock().await;
        let attempt = match attempt {
            Ok((connection, lost)) => declare_queues(&connection, &shared.settings, &queues)
                .await
                .map(|()| (connection, lost)),
            Err(error) => Err(error),
        };
        match attempt {
            Ok((connection, mut lost)) => {
                info!(failed_attempts, "connected to RabbitMQ");
                failed_attempts = 0;
                let connection = Arc::new(connection);
                shared.connection.send_replace(Some(connection.clone()));
                drop(queues);

                let reason = wait_until_lost(&connection, &mut lost, &shared.closed).await;
                shared.connection.send_replace(None);
                *shared.publisher.lock().await = None;
                match reason {
                    None => {
                        let _ = connection.close(200, "ferrite shutting down").await;
                        break;
                    }
                    Some(reason) => {
                        warn!(error = %reason, "lost the RabbitMQ connection; reconnecting")
                    }
                }
            }
            Err(error) => {
                drop(queues);
                // One warning per outage, not one per attempt.
                if failed_attempts == 0 {
                    warn!(
                        error = %error,
                        retry_delay_ms = delay.as_millis(),
                        "cannot connect to RabbitMQ; retrying until it is back"
                    );
                }
                failed_attempts = failed_attempts.saturating_add(1);
            }
        }
        tokio::select! {
            _ = shared.closed.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    info!("RabbitMQ supervisor stopped");
}

/// Opens a connection and declares the exchanges. The receiver yields errors lapin reports
/// on the connection afterwards.
#[tracing::instrument(skip_all)]
async fn connect(
    settings: &AmqpSettings,
) -> Result<(Connection, mpsc::UnboundedReceiver<lapin::Error>), AmqpError> {
    // TODO: lapin runs its I/O on its default executor (async-global-executor threads and an
    // async-io reactor), not on Tokio, because `tokio-executor-trait` is not a dependency; it
    // works, at the cost of a few extra threads per process.
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("ferrite:{}", settings.exchange).into());
    let connection = tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(settings.url.expose().as_str(), properties),
    )
    .await
    .map_err(|_| AmqpError::ConnectTimeout {
        seconds: CONNECT_TIMEOUT.as_secs(),
    })?
    .map_err(AmqpError::Connect)?;

    let (errors, lost) = mpsc::unbounded_channel();
    connection.on_error(move |error| {
        // The receiver is gone only after the supervisor moved on from this connection.
        let _ = errors.send(error);
    });

    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::Channel)?;
    topology::declare_exchanges(&channel, settings).await?;
    // The declaring channel is not needed any more; a failure to close it changes nothing.
    let _ = channel.close(200, "topology declared").await;
    Ok((connection, lost))
}

/// Declares every registered consumer queue on a fresh connection.
async fn declare_queues(
    connection: &Connection,
    settings: &AmqpSettings,
    queues: &[(String, Vec<String>)],
) -> Result<(), AmqpError> {
    if queues.is_empty() {
        return Ok(());
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::Channel)?;
    for (queue, bindings) in queues {
        topology::declare_queue(&channel, settings, queue, bindings).await?;
    }
    let _ = channel.close(200, "queues declared").await;
    Ok(())
}

/// Returns why the connection broke, or `None` if the broker was closed on purpose first.
async fn wait_until_lost(
    connection: &Connection,
    lost: &mut mpsc::UnboundedReceiver<lapin::Error>,
    closed: &CancellationToken,
) -> Option<String> {
    let mut check = tokio::time::interval(STATUS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = closed.cancelled() => return None,
            error = lost.recv() => {
                let reason = error.map(|e| e.to_string());
                return Some(reason.unwrap_or_else(|| "connection dropped".to_owned()));
            }
            _ = check.tick() => {
                if !connection.status().connected() {
                    return Some(format!("connection state is {:?}", connection.status().state()));
                }
            }
        }
    }
}
