//! Batched consumption against real RabbitMQ and Postgres: messages that arrive together are
//! applied in one transaction, each exactly once, and a failure in a batch costs only its own
//! message an attempt.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::consumer::{
    Gate, PATIENCE, Recorder, broker_with_queue, create_effects_table, effects_of, job, next_call,
    start_consumer, stop, take_dead_letter,
};
use common::{SHARED_AMQP_URL, TestDatabase, eventually};
use ferrite_platform::amqp::{Broker, IncomingMessage, OutgoingMessage};
use ferrite_platform::settings::AmqpSettings;
use ferrite_proto::{Event, JobRequested};
use prost::Message as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// More than any test publishes, so the broker sends every message at once.
const PREFETCH: u16 = 16;

/// A consumer that applies one batch at a time and is held inside the handler of a first
/// message until released, so that the messages published meanwhile all wait in its buffer
/// and are then taken as one batch.
struct HeldConsumer {
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    calls: mpsc::UnboundedReceiver<IncomingMessage>,
    release: Arc<Notify>,
    pool: PgPool,
}

impl HeldConsumer {
    async fn start(broker: &Broker, db: &TestDatabase, queue: &str, poison: Option<&str>) -> Self {
        // The consumer applies at most half its pool's connections' worth of batches at once:
        // one, with two.
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&format!("postgres://postgres@127.0.0.1:5432/{}", db.name))
            .await
            .expect("connect the consumer's pool");
        let (mut recorder, mut calls) = Recorder::new();
        recorder.poison = poison.map(str::to_owned);
        let (gate, mut handler_entered, release) = Gate::new();
        recorder.gate = Some(gate);
        let (task, shutdown) = start_consumer(broker, &pool, queue, PREFETCH, recorder);

        let first = broker.publish_event(&job("held")).await.expect("publish");
        assert_eq!(next_call(&mut calls).await.message_id, first);
        tokio::time::timeout(PATIENCE, handler_entered.recv())
            .await
            .expect("the handler holds the first message");
        Self {
            task,
            shutdown,
            calls,
            release,
            pool,
        }
    }

    /// Lets the consumer go on once the broker has sent it every message of `queue`.
    async fn release_when_all_sent(&self, queue: &str) {
        eventually(PATIENCE, "every message sent to the consumer", || async {
            common::ready_messages(SHARED_AMQP_URL, queue).await == 0
        })
        .await;
        self.release.notify_one();
    }

    /// Every message id the handler is called with next, `count` calls in all.
    async fn calls(&mut self, count: usize) -> Vec<IncomingMessage> {
        let mut calls = Vec::with_capacity(count);
        for _ in 0..count {
            calls.push(next_call(&mut self.calls).await);
        }
        calls
    }

    /// Stops the consumer (its running batch commits and acknowledges first) and checks that
    /// the handler was not called again.
    async fn stop(mut self) {
        stop(self.task, self.shutdown).await;
        assert!(
            self.calls.try_recv().is_err(),
            "no call beyond those expected"
        );
        self.pool.close().await;
    }
}

async fn transactions_of(pool: &PgPool, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id) FROM effects WHERE message_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .expect("count transactions")
}

async fn inbox_rows(pool: &PgPool, queue: &str, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = $1 AND message_id = ANY($2)")
        .bind(queue)
        .bind(ids)
        .fetch_one(pool)
        .await
        .expect("count inbox rows")
}

/// What each test starts from: a database with the effects table, a broker, a fresh queue.
struct Setup {
    db: TestDatabase,
    broker: Broker,
    settings: AmqpSettings,
    queue: String,
}

impl Setup {
    /// The setup and a held consumer on its queue whose handler fails for job `poison`.
    async fn start(max_deliveries: u32, poison: Option<&str>) -> (Self, HeldConsumer) {
        let db = TestDatabase::create().await;
        create_effects_table(&db.pool).await;
        let (broker, settings, queue) = broker_with_queue(SHARED_AMQP_URL, max_deliveries).await;
        let consumer = HeldConsumer::start(&broker, &db, &queue, poison).await;
        let setup = Self {
            db,
            broker,
            settings,
            queue,
        };
        (setup, consumer)
    }

    /// Checks that the queue is empty, then removes what the test left behind.
    async fn finish(self) {
        // The consumer's channel is closed by now, which would have returned any
        // unacknowledged message to the queue.
        assert_eq!(
            common::ready_messages(SHARED_AMQP_URL, &self.queue).await,
            0,
            "every message was acknowledged, the skipped ones too"
        );
        common::delete_topology(SHARED_AMQP_URL, &self.settings, &[&self.queue]).await;
        self.broker.close().await;
        self.db.drop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_together_are_applied_in_one_transaction_each_exactly_once() {
    const MESSAGES: usize = 6;
    let (setup, mut consumer) = Setup::start(5, None).await;
    let Setup {
        db, broker, queue, ..
    } = &setup;

    let publishes = (0..MESSAGES).map(|i| {
        let broker = broker.clone();
        async move { broker.publish_event(&job(&format!("together-{i}"))).await }
    });
    let mut published: Vec<Uuid> = futures::future::join_all(publishes)
        .await
        .into_iter()
        .map(|published| published.expect("publish"))
        .collect();
    consumer.release_when_all_sent(queue).await;
    let mut handled: Vec<Uuid> = consumer
        .calls(MESSAGES)
        .await
        .iter()
        .map(|call| call.message_id)
        .collect();
    consumer.stop().await;

    handled.sort();
    published.sort();
    assert_eq!(handled, published, "one handler call per message");
    for id in &published {
        assert_eq!(effects_of(&db.pool, *id).await, 1, "message {id}");
    }
    assert_eq!(
        transactions_of(&db.pool, &published).await,
        1,
        "all waited behind the held message, so they were taken and committed as one batch"
    );
    assert_eq!(
        inbox_rows(&db.pool, queue, &published).await,
        MESSAGES as i64,
        "one inbox row per message"
    );
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_in_a_batch_is_dead_lettered_and_the_rest_of_the_batch_applied_once() {
    const MAX_DELIVERIES: u32 = 3;
    let (setup, mut consumer) = Setup::start(MAX_DELIVERIES, Some("poison")).await;
    let Setup {
        db, broker, queue, ..
    } = &setup;

    // Published one after the other, so they arrive in this order and form one batch:
    // two handled before the poison message (and rolled back with it), one never reached.
    let mut ids = BTreeMap::new();
    for name in ["before-0", "before-1", "poison", "after"] {
        let id = broker.publish_event(&job(name)).await.expect("publish");
        ids.insert(name, id);
    }
    consumer.release_when_all_sent(queue).await;
    // `before-*` twice each: in the batch, then alone after the rollback. `after` once, alone.
    // The poison message once per delivery: its call in the batch was its first attempt, and
    // being redelivered it is never batched again.
    let expected_calls = 2 + 2 + 1 + MAX_DELIVERIES as usize;
    let calls = consumer.calls(expected_calls).await;
    let dead_lettered = take_dead_letter(queue).await;
    consumer.stop().await;

    let deliveries_of = |name: &str| -> Vec<u32> {
        calls
            .iter()
            .filter(|call| call.message_id == ids[name])
            .map(|call| call.delivery_count)
            .collect()
    };
    assert_eq!(
        deliveries_of("poison"),
        vec![1, 2, 3],
        "one call per delivery"
    );
    assert_eq!(
        deliveries_of("before-0"),
        vec![1, 1],
        "in the batch, then alone"
    );
    assert_eq!(
        deliveries_of("before-1"),
        vec![1, 1],
        "in the batch, then alone"
    );
    assert_eq!(deliveries_of("after"), vec![1], "alone only");

    let healthy = [ids["before-0"], ids["before-1"], ids["after"]];
    for id in &healthy {
        assert_eq!(effects_of(&db.pool, *id).await, 1, "applied exactly once");
    }
    assert_eq!(
        inbox_rows(&db.pool, queue, &healthy).await,
        3,
        "one inbox row per healthy message"
    );
    assert_eq!(
        effects_of(&db.pool, ids["poison"]).await,
        0,
        "every attempt was rolled back"
    );
    assert_eq!(
        inbox_rows(&db.pool, queue, &[ids["poison"]]).await,
        0,
        "the poison message's inbox row was rolled back with its effect"
    );
    assert_eq!(
        dead_lettered,
        Some(ids["poison"].to_string()),
        "the poison message, and only it, was dead-lettered"
    );
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_in_the_same_batch_and_an_id_already_in_the_inbox_are_acknowledged_unhandled() {
    let (setup, mut consumer) = Setup::start(5, None).await;
    let Setup {
        db, broker, queue, ..
    } = &setup;

    // Processed before, its ack lost: the inbox has it, the queue has it again.
    let processed = Uuid::now_v7();
    sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2)")
        .bind(queue)
        .bind(processed)
        .execute(&db.pool)
        .await
        .expect("record the processed message");
    // Published twice under one id, as the outbox relay does after a crash between the
    // broker's confirm and marking the row delivered.
    let copied = Uuid::now_v7();
    let fresh = Uuid::now_v7();
    for (id, name) in [
        (copied, "copied"),
        (copied, "copied"),
        (processed, "processed"),
        (fresh, "fresh"),
    ] {
        broker
            .publish(OutgoingMessage {
                message_id: id,
                routing_key: JobRequested::ROUTING_KEY,
                body: &job(name).encode_to_vec(),
                headers: &[],
            })
            .await
            .expect("publish");
    }
    consumer.release_when_all_sent(queue).await;
    let handled: Vec<Uuid> = consumer
        .calls(2)
        .await
        .iter()
        .map(|call| call.message_id)
        .collect();
    consumer.stop().await;

    assert_eq!(
        handled,
        vec![copied, fresh],
        "the first copy and the new message, in delivery order; nothing else"
    );
    assert_eq!(
        effects_of(&db.pool, copied).await,
        1,
        "the copy was skipped"
    );
    assert_eq!(effects_of(&db.pool, fresh).await, 1);
    assert_eq!(
        effects_of(&db.pool, processed).await,
        0,
        "the processed message was skipped"
    );
    assert_eq!(
        transactions_of(&db.pool, &[copied, fresh]).await,
        1,
        "the four deliveries were one batch"
    );
    setup.finish().await;
}
