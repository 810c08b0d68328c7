//! Exchanges and queues, declared idempotently on every (re)connect and (re)subscribe.
//!
//! Work and event queues are quorum queues with `x-delivery-limit`: the broker counts every
//! delivery that ends without an ack (a nack with requeue, a consumer that died, a lost
//! connection) and dead-letters the message once the limit is passed. Counting in the client
//! instead (republishing with a counter header) would miss the case that matters most: a
//! message that crashes the consumer process every time would never reach the limit, because
//! the process never lives to republish it. Quorum queues are also replicated and fsync their
//! log, which is the durability a work queue wants.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{AmqpError, Broker};
use crate::settings::AmqpSettings;

/// The exchange dead-lettered messages go through: `<exchange>.dlx`.
pub fn dead_letter_exchange(settings: &AmqpSettings) -> String {
    format!("{}.dlx", settings.exchange)
}

/// The queue that holds what `queue` gave up on: `<queue>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Declares the durable events topic exchange and the direct dead-letter exchange.
#[tracing::instrument(skip_all, fields(messaging.exchange = %settings.exchange))]
pub(crate) async fn declare_exchanges(
    channel: &Channel,
    settings: &AmqpSettings,
) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            &settings.exchange,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare {
            object: format!("exchange {}", settings.exchange),
            source,
        })?;
    let dlx = dead_letter_exchange(settings);
    channel
        .exchange_declare(&dlx, ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .map_err(|source| AmqpError::Declare {
            object: format!("exchange {dlx}"),
            source,
        })?;
    Ok(())
}

/// Declares `queue` with its dead-letter queue and binds it to each routing key.
///
/// Declaring is idempotent only with the same arguments: changing `max_deliveries` for an
/// existing queue makes RabbitMQ refuse the declaration (PRECONDITION_FAILED) until the queue
/// is deleted or a policy overrides the limit.
#[tracing::instrument(skip_all, fields(messaging.destination = queue))]
pub(crate) async fn declare_queue(
    channel: &Channel,
    settings: &AmqpSettings,
    queue: &str,
    bindings: &[String],
) -> Result<(), AmqpError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dlx = dead_letter_exchange(settings);
    let dlq = dead_letter_queue(queue);

    let mut dlq_arguments = FieldTable::default();
    dlq_arguments.insert("x-queue-type".into(), text("quorum"));
    channel
        .queue_declare(&dlq, durable, dlq_arguments)
        .await
        .map_err(|source| AmqpError::Declare {
            object: format!("queue {dlq}"),
            source,
        })?;
    channel
        .queue_bind(
            &dlq,
            &dlx,
            queue,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare {
            object: format!("binding {dlx} -> {dlq}"),
            source,
        })?;

    channel
        .queue_declare(queue, durable, queue_arguments(settings, queue))
        .await
        .map_err(|source| AmqpError::Declare {
            object: format!("queue {queue}"),
            source,
        })?;
    for key in bindings {
        channel
            .queue_bind(
                queue,
                &settings.exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| AmqpError::Declare {
                object: format!("binding {} -[{key}]-> {queue}", settings.exchange),
                source,
            })?;
    }
    Ok(())
}

impl Broker {
    /// Declares a consumer queue, its dead-letter queue and its bindings now.
    ///
    /// [`super::spawn_consumer`] does this itself on every subscribe; call it at start-up when
    /// events published before the consumer first subscribes must not be dropped as unroutable.
    #[tracing::instrument(skip_all, fields(messaging.destination = queue))]
    pub async fn declare_queue(&self, queue: &str, bindings: &[String]) -> Result<(), AmqpError> {
        let connection = self.current_connection().ok_or(AmqpError::NotConnected)?;
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::Channel)?;
        let declared = declare_queue(&channel, self.settings(), queue, bindings).await;
        // A failed declaration closes the channel on the broker's side already.
        let _ = channel.close(200, "queue declared").await;
        declared
    }
}

/// Arguments of a consumer queue: quorum, bounded deliveries, dead-lettered to `<queue>.dlq`.
fn queue_arguments(settings: &AmqpSettings, queue: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), text("quorum"));
    // RabbitMQ dead-letters a message once it has been returned more than `x-delivery-limit`
    // times, so a limit of N allows N + 1 deliveries; hence the minus one.
    let limit = i64::from(settings.max_deliveries.saturating_sub(1));
    arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        text(&dead_letter_exchange(settings)),
    );
    // Route by queue name, not by the original routing key, so each queue's failures land in
    // its own `.dlq` whatever event they were.
    arguments.insert("x-dead-letter-routing-key".into(), text(queue));
    arguments
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn settings(max_deliveries: u32) -> AmqpSettings {
        AmqpSettings {
            url: Secret::new(url::Url::parse("amqp://127.0.0.1:5672/%2f").expect("constant URL")),
            exchange: "ferrite.events".into(),
            prefetch: 16,
            max_deliveries,
            reconnect_delay: std::time::Duration::from_millis(500),
        }
    }

    #[test]
    fn five_deliveries_means_a_delivery_limit_of_four_returns() {
        let arguments = queue_arguments(&settings(5), "training-runner.jobs");
        let limit = arguments.inner().get("x-delivery-limit").cloned();
        assert_eq!(limit, Some(AMQPValue::LongLongInt(4)));
    }

    #[test]
    fn dead_letters_are_routed_to_the_queue_of_their_own_consumer() {
        let arguments = queue_arguments(&settings(5), "training-runner.jobs");
        assert_eq!(
            arguments.inner().get("x-dead-letter-routing-key").cloned(),
            Some(text("training-runner.jobs"))
        );
        assert_eq!(
            dead_letter_queue("training-runner.jobs"),
            "training-runner.jobs.dlq"
        );
        assert_eq!(dead_letter_exchange(&settings(5)), "ferrite.events.dlx");
    }
}
