//! Publishing with publisher confirms: a publish returns only once the broker owns the message.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrite_proto::Event;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use uuid::Uuid;

use super::{AmqpError, Broker, CONTENT_TYPE, to_field_table};
use crate::telemetry;

/// How long to wait for the broker's confirm before treating a publish as failed. A persistent
/// message to a quorum queue is confirmed after a disk sync, milliseconds normally; a minute
/// means the broker is stuck, and the caller (the outbox relay) will try again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// A message ready for the events exchange.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingMessage<'a> {
    /// Unique per message; consumers skip an id they have already processed, so a message
    /// published twice (after a crash between confirm and bookkeeping) takes effect once.
    pub message_id: Uuid,
    pub routing_key: &'a str,
    /// The encoded protobuf message.
    pub body: &'a [u8],
    /// Text headers, e.g. the W3C trace context (`traceparent`, `tracestate`).
    pub headers: &'a [(String, String)],
}

/// A message handed to the broker whose confirm has not arrived yet.
pub(crate) struct Unconfirmed {
    message_id: Uuid,
    routing_key: String,
    confirm: PublisherConfirm,
}

impl Broker {
    /// Publishes `event` under its routing key with the current trace context, and waits for
    /// the broker's confirm. Returns the message id.
    ///
    /// Fails with [`AmqpError::NotConnected`] at once while the broker is away. A write to the
    /// database that must also emit an event should use [`super::outbox::enqueue`] instead, which
    /// cannot lose the event between the commit and the publish.
    #[tracing::instrument(
        skip_all,
        fields(messaging.routing_key = E::ROUTING_KEY, messaging.message_id)
    )]
    pub async fn publish_event<E: Event>(&self, event: &E) -> Result<Uuid, AmqpError> {
        let message_id = Uuid::now_v7();
        tracing::Span::current()
            .record("messaging.message_id", tracing::field::display(message_id));
        let body = event.encode_to_vec();
        let headers = telemetry::inject_context();
        // `send` rather than `publish`: this span already names the message, and a second one
        // nested in it would cost every event a span more to record and export.
        let message = OutgoingMessage {
            message_id,
            routing_key: E::ROUTING_KEY,
            body: &body,
            headers: &headers,
        };
        self.send(message).await?.confirmed().await?;
        Ok(message_id)
    }

    /// Publishes one message and waits for the broker's confirm.
    #[tracing::instrument(
        skip_all,
        fields(
            messaging.message_id = %message.message_id,
            messaging.routing_key = message.routing_key,
        )
    )]
    pub async fn publish(&self, message: OutgoingMessage<'_>) -> Result<(), AmqpError> {
        self.send(message).await?.confirmed().await
    }

    /// Hands a message to the broker without waiting for its confirm, so that a batch can be
    /// sent in one go and its confirms awaited together.
    pub(crate) async fn send(
        &self,
        message: OutgoingMessage<'_>,
    ) -> Result<Unconfirmed, AmqpError> {
        let channel = self.publisher_channel().await?;
        let properties = BasicProperties::default()
            .with_message_id(message.message_id.to_string().into())
            .with_content_type(CONTENT_TYPE.into())
            .with_type(message.routing_key.into())
            // 2 = persistent: written to disk, so a confirmed message survives a broker restart.
            .with_delivery_mode(2)
            .with_timestamp(unix_seconds())
            .with_headers(to_field_table(message.headers));
        // TODO: not `mandatory`, so a message no queue is bound for is confirmed and dropped.
        // Right for events nobody subscribes to, wrong for a work queue whose consumer has never
        // started; until returned messages are handled, register such queues at start-up with
        // `Broker::register_queue`.
        let confirm = channel
            .basic_publish(
                &self.settings().exchange,
                message.routing_key,
                BasicPublishOptions::default(),
                message.body,
                properties,
            )
            .await
            .map_err(|source| AmqpError::Publish {
                message_id: message.message_id,
                routing_key: message.routing_key.to_owned(),
                source,
            })?;
        Ok(Unconfirmed {
            message_id: message.message_id,
            routing_key: message.routing_key.to_owned(),
            confirm,
        })
    }
}

impl Unconfirmed {
    /// Waits for the broker to confirm (ack) the message.
    pub(crate) async fn confirmed(self) -> Result<(), AmqpError> {
        let Self {
            message_id,
            routing_key,
            confirm,
        } = self;
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout {
                message_id,
                seconds: CONFIRM_TIMEOUT.as_secs(),
            })?
            .map_err(|source| AmqpError::Publish {
                message_id,
                routing_key: routing_key.clone(),
                source,
            })?;
        match confirmation {
            // `NotRequested` cannot happen on a confirm-mode channel; accepting it keeps a
            // broker without confirms usable rather than failing every publish.
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => Err(AmqpError::Refused {
                message_id,
                routing_key,
            }),
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
