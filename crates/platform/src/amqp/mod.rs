//! RabbitMQ messaging: a reconnecting broker, confirmed publishes, an outbox, idempotent consumers.
//!
//! The guarantees, end to end:
//! - an event written with [`outbox::enqueue`] inside a database transaction is published if and
//!   only if that transaction commits, at least once, even when the broker is down at the time;
//! - every message carries a UUID `message_id`, and a consumer records it in the `inbox` table in
//!   the same transaction as the handler's effect, so a redelivered message is acknowledged and
//!   skipped: at-least-once delivery with effects applied exactly once;
//! - a message is acknowledged only after its effect is committed; one that keeps failing is
//!   dead-lettered to `<queue>.dlq` after `max_deliveries` attempts while the rest keep flowing.

mod connection;
mod consumer;
pub mod outbox;
mod publisher;
mod topology;

use lapin::types::{AMQPValue, FieldTable, LongString};

pub use connection::Broker;
pub use consumer::{ConsumerSpec, Handler, HandlerError, IncomingMessage, spawn_consumer};
pub use outbox::spawn_outbox_relay;
pub use publisher::OutgoingMessage;
pub use topology::{dead_letter_exchange, dead_letter_queue};

/// Content type of every message body: a protobuf message from `ferrite_proto`.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// What can go wrong talking to RabbitMQ or recording messages in Postgres.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// No connection to the broker right now; the supervisor is reconnecting.
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error("could not connect to RabbitMQ")]
    Connect(#[source] lapin::Error),
    #[error("timed out connecting to RabbitMQ after {seconds} s")]
    ConnectTimeout { seconds: u64 },
    #[error("could not open a RabbitMQ channel")]
    Channel(#[source] lapin::Error),
    #[error("could not declare {object}")]
    Declare {
        object: String,
        #[source]
        source: lapin::Error,
    },
    #[error("could not publish message {message_id} to `{routing_key}`")]
    Publish {
        message_id: uuid::Uuid,
        routing_key: String,
        #[source]
        source: lapin::Error,
    },
    /// The broker refused to take responsibility for the message (a negative confirm).
    #[error("RabbitMQ refused message {message_id} to `{routing_key}`")]
    Refused {
        message_id: uuid::Uuid,
        routing_key: String,
    },
    #[error("no confirm for message {message_id} within {seconds} s")]
    ConfirmTimeout {
        message_id: uuid::Uuid,
        seconds: u64,
    },
    #[error("could not subscribe to queue `{queue}`")]
    Subscribe {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("{context}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl AmqpError {
    /// Wraps a Postgres error with what was being done, for `map_err`.
    fn database(context: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Database { context, source }
    }
}

/// String headers (trace context) as an AMQP field table.
fn to_field_table(headers: &[(String, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(
            name.as_str().into(),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
    }
    table
}

/// The string-valued entries of an AMQP field table; numbers and nested tables are left out,
/// because only text headers (trace context) travel between Ferrite services.
fn from_field_table(table: &FieldTable) -> Vec<(String, String)> {
    table
        .inner()
        .iter()
        .filter_map(|(name, value)| {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => return None,
            };
            Some((name.as_str().to_owned(), text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_headers_survive_a_field_table_round_trip() {
        let headers = vec![
            (
                "traceparent".to_owned(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            ),
            ("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned()),
        ];
        let mut back = from_field_table(&to_field_table(&headers));
        back.sort();
        assert_eq!(back, headers);
    }

    #[test]
    fn non_text_headers_are_left_out() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        assert!(from_field_table(&table).is_empty());
    }
}
