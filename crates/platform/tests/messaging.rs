//! Messaging against real RabbitMQ and Postgres: outbox, inbox, dead letters, broker restarts.

mod common;

use std::time::Duration;

use common::consumer::{
    Gate, PATIENCE, Recorder, broker_with_queue, create_effects_table, effects_of, job, next_call,
    start_consumer, stop, take_dead_letter,
};
use common::{PrivateRabbit, SHARED_AMQP_URL, TestDatabase, eventually};
use ferrite_platform::amqp::{outbox, spawn_outbox_relay};
use ferrite_proto::{Event, JobRequested};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Writes `event` through the outbox in a transaction of its own and commits.
async fn enqueue_committed(pool: &PgPool, event: &JobRequested) -> Uuid {
    let mut tx = pool.begin().await.expect("begin");
    let id = outbox::enqueue(&mut tx, event).await.expect("enqueue");
    tx.commit().await.expect("commit");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_event_takes_effect_once_when_the_ack_is_lost_and_it_is_redelivered() {
    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let mut rabbit = PrivateRabbit::start().await;
    let (broker, _, queue) = broker_with_queue(&rabbit.url(), 5).await;
    let relay_shutdown = CancellationToken::new();
    let relay = spawn_outbox_relay(db.pool.clone(), broker.clone(), relay_shutdown.clone());

    let (mut first, mut first_calls) = Recorder::new();
    let (gate, mut handler_entered, release) = Gate::new();
    first.gate = Some(gate);
    let (consumer, consumer_shutdown) = start_consumer(&broker, &db.pool, &queue, 1, first);

    let original = enqueue_committed(&db.pool, &job("job-1")).await;
    assert_eq!(next_call(&mut first_calls).await.message_id, original);
    tokio::time::timeout(PATIENCE, handler_entered.recv())
        .await
        .expect("the handler wrote its effect");
    // Otherwise the relay could miss the confirm in the outage and publish the row again,
    // leaving a second copy in the queue.
    eventually(PATIENCE, "the relay to mark the row delivered", || async {
        delivered_at(&db.pool, original).await.is_some()
    })
    .await;

    // The broker goes away while the handler holds its effect: the commit still succeeds, but
    // the ack has no channel to travel on.
    rabbit.stop().await;
    release.notify_one();
    stop(consumer, consumer_shutdown).await;
    assert_eq!(
        effects_of(&db.pool, original).await,
        1,
        "the effect was committed before the ack was lost"
    );

    // A persistent, confirmed message on a quorum queue outlives the restart, and with no ack
    // it is back in the queue, ready for redelivery.
    rabbit.start_again().await;
    broker.wait_connected(PATIENCE).await.expect("reconnects");
    assert_eq!(
        common::ready_messages(&rabbit.url(), &queue).await,
        1,
        "the unacknowledged message was returned"
    );

    // A fresh consumer with prefetch 1 receives the returned message before the marker, which
    // was published after it; the marker reaching the handler therefore proves the duplicate
    // was acknowledged, and the handler seeing the marker first proves it was skipped.
    let (second, mut second_calls) = Recorder::new();
    let (consumer, consumer_shutdown) = start_consumer(&broker, &db.pool, &queue, 1, second);
    let marker = enqueue_committed(&db.pool, &job("marker")).await;
    assert_eq!(
        next_call(&mut second_calls).await.message_id,
        marker,
        "the redelivery skipped the handler"
    );
    stop(consumer, consumer_shutdown).await;

    assert_eq!(
        effects_of(&db.pool, original).await,
        1,
        "the redelivery applied nothing"
    );
    assert_eq!(
        common::ready_messages(&rabbit.url(), &queue).await,
        0,
        "both messages were acknowledged"
    );
    stop(relay, relay_shutdown).await;
    broker.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_max_deliveries_while_others_flow() {
    const MAX_DELIVERIES: u32 = 3;
    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let (broker, settings, queue) = broker_with_queue(SHARED_AMQP_URL, MAX_DELIVERIES).await;

    let (mut recorder, mut calls) = Recorder::new();
    recorder.poison = Some("poison".to_owned());
    // Prefetch 4: the poison message holds one slot while it is retried, the others flow.
    let (consumer, shutdown) = start_consumer(&broker, &db.pool, &queue, 4, recorder);

    let poison = broker.publish_event(&job("poison")).await.expect("publish");
    let mut healthy = Vec::new();
    for i in 0..5 {
        healthy.push(
            broker
                .publish_event(&job(&format!("healthy-{i}")))
                .await
                .expect("publish"),
        );
    }

    // Every healthy message once, and the poison message once per allowed delivery.
    let expected_calls = healthy.len() + MAX_DELIVERIES as usize;
    let mut poison_counts = Vec::new();
    let mut healthy_seen = Vec::new();
    for _ in 0..expected_calls {
        let call = next_call(&mut calls).await;
        if call.message_id == poison {
            poison_counts.push(call.delivery_count);
        } else {
            healthy_seen.push(call.message_id);
        }
    }
    let dead_lettered = take_dead_letter(&queue).await;
    stop(consumer, shutdown).await;

    assert_eq!(
        poison_counts,
        vec![1, 2, 3],
        "one call per delivery, counted by the broker"
    );
    healthy_seen.sort();
    healthy.sort();
    assert_eq!(
        healthy_seen, healthy,
        "each healthy message was handled exactly once"
    );
    for id in &healthy {
        assert_eq!(effects_of(&db.pool, *id).await, 1);
    }
    assert_eq!(
        effects_of(&db.pool, poison).await,
        0,
        "failed attempts were rolled back"
    );
    assert!(
        calls.try_recv().is_err(),
        "nothing was delivered after the dead-lettering"
    );
    assert_eq!(dead_lettered, Some(poison.to_string()));

    common::delete_topology(SHARED_AMQP_URL, &settings, &[&queue]).await;
    broker.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_written_while_the_broker_is_down_is_delivered_after_it_returns() {
    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let mut rabbit = PrivateRabbit::start().await;
    let (broker, _, queue) = broker_with_queue(&rabbit.url(), 5).await;
    let relay_shutdown = CancellationToken::new();
    let relay = spawn_outbox_relay(db.pool.clone(), broker.clone(), relay_shutdown.clone());

    rabbit.stop().await;
    eventually(
        PATIENCE,
        "the broker handle to notice the outage",
        || async { !broker.is_connected() },
    )
    .await;
    let id = enqueue_committed(&db.pool, &job("written-while-down")).await;
    assert!(
        delivered_at(&db.pool, id).await.is_none(),
        "no broker, so no confirm, so not delivered"
    );

    rabbit.start_again().await;
    let (recorder, mut calls) = Recorder::new();
    let (consumer, shutdown) = start_consumer(&broker, &db.pool, &queue, 1, recorder);
    let call = next_call(&mut calls).await;
    assert_eq!(call.message_id, id);
    assert_eq!(
        call.decode::<JobRequested>().expect("decodes").job_id,
        "written-while-down"
    );
    eventually(PATIENCE, "the relay to mark the row delivered", || async {
        delivered_at(&db.pool, id).await.is_some()
    })
    .await;

    stop(consumer, shutdown).await;
    stop(relay, relay_shutdown).await;
    broker.close().await;
    db.drop().await;
}

async fn delivered_at(pool: &PgPool, message_id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT delivered_at FROM outbox WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(pool)
        .await
        .expect("the outbox row exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_keeps_consuming_after_the_broker_restarts() {
    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let mut rabbit = PrivateRabbit::start().await;
    let (broker, _, queue) = broker_with_queue(&rabbit.url(), 5).await;
    let (recorder, mut calls) = Recorder::new();
    let (consumer, shutdown) = start_consumer(&broker, &db.pool, &queue, 4, recorder);

    let before = broker.publish_event(&job("before")).await.expect("publish");
    assert_eq!(next_call(&mut calls).await.message_id, before);

    rabbit.stop().await;
    eventually(
        PATIENCE,
        "the broker handle to notice the outage",
        || async { !broker.is_connected() },
    )
    .await;
    rabbit.start_again().await;
    broker.wait_connected(PATIENCE).await.expect("reconnects");

    // The queue is durable, so this is kept even if the consumer has not re-subscribed yet.
    let after = broker
        .publish_event(&job("after"))
        .await
        .expect("publish after the restart");
    assert_eq!(
        next_call(&mut calls).await.message_id,
        after,
        "the same consumer task got it"
    );
    stop(consumer, shutdown).await;
    // Checked after the stop, which waits for in-flight handlers to commit.
    assert_eq!(effects_of(&db.pool, before).await, 1);
    assert_eq!(effects_of(&db.pool, after).await, 1);

    broker.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_publishes_nothing() {
    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let (broker, settings, queue) = broker_with_queue(SHARED_AMQP_URL, 5).await;
    let relay_shutdown = CancellationToken::new();
    let relay = spawn_outbox_relay(db.pool.clone(), broker.clone(), relay_shutdown.clone());
    let (recorder, mut calls) = Recorder::new();
    let (consumer, shutdown) = start_consumer(&broker, &db.pool, &queue, 1, recorder);

    let mut tx = db.pool.begin().await.expect("begin");
    outbox::enqueue(&mut tx, &job("rolled-back"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    // The relay publishes in row order and the consumer takes one message at a time, so had
    // the first row survived, it would reach the handler before this one.
    let committed = enqueue_committed(&db.pool, &job("committed")).await;

    assert_eq!(next_call(&mut calls).await.message_id, committed);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1, "the rolled-back row never existed for the relay");
    stop(consumer, shutdown).await;
    stop(relay, relay_shutdown).await;
    assert!(calls.try_recv().is_err(), "nothing else was delivered");
    assert_eq!(
        common::ready_messages(SHARED_AMQP_URL, &queue).await,
        0,
        "nothing else is waiting"
    );

    common::delete_topology(SHARED_AMQP_URL, &settings, &[&queue]).await;
    broker.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_running_handler_commit_and_leaves_the_rest_queued() {
    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let (broker, settings, queue) = broker_with_queue(SHARED_AMQP_URL, 5).await;

    let (mut recorder, mut calls) = Recorder::new();
    let (gate, mut handler_entered, release) = Gate::new();
    recorder.gate = Some(gate);
    // Prefetch 1: the second message is not delivered while the first is unacknowledged.
    let (consumer, shutdown) = start_consumer(&broker, &db.pool, &queue, 1, recorder);
    let running = broker
        .publish_event(&job("running"))
        .await
        .expect("publish");
    let waiting = broker
        .publish_event(&job("waiting"))
        .await
        .expect("publish");
    assert_eq!(next_call(&mut calls).await.message_id, running);
    tokio::time::timeout(PATIENCE, handler_entered.recv())
        .await
        .expect("the handler is running");

    // Shutdown cancels the subscription first, so the ack of the running message frees no
    // slot for the waiting one; then it waits for the running handler.
    shutdown.cancel();
    release.notify_one();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("stops in time")
        .expect("no panic");

    assert_eq!(
        effects_of(&db.pool, running).await,
        1,
        "the running handler committed"
    );
    assert_eq!(
        effects_of(&db.pool, waiting).await,
        0,
        "the waiting message was never handled"
    );
    assert!(
        calls.try_recv().is_err(),
        "no handler ran after the shutdown"
    );
    let ready = common::ready_messages(SHARED_AMQP_URL, &queue).await;
    assert_eq!(
        ready, 1,
        "the running message was acknowledged, the waiting one is still queued"
    );

    common::delete_topology(SHARED_AMQP_URL, &settings, &[&queue]).await;
    broker.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_schema_migrated_by_the_platform_relays_its_own_outbox() {
    use ferrite_platform::settings::DatabaseSettings;
    use sqlx::postgres::PgListener;

    let db = TestDatabase::create().await;
    let url = format!("postgres://postgres@127.0.0.1:5432/{}", db.name);
    let database = DatabaseSettings {
        url: ferrite_platform::Secret::new(url::Url::parse(&url).expect("valid URL")),
        max_connections: 5,
        acquire_timeout: Duration::from_secs(10),
    };
    let schema = "relay_test";
    let pool = ferrite_platform::db::connect(&database, schema).expect("pool");
    ferrite_platform::db::migrate(&pool, schema, None)
        .await
        .expect("migrate");
    create_effects_table(&pool).await;

    // The relay listens on `ferrite_outbox_<its schema>`; the trigger must notify exactly there.
    let mut listener = PgListener::connect_with(&pool).await.expect("listen");
    listener
        .listen(&format!("ferrite_outbox_{schema}"))
        .await
        .expect("listen");
    let (broker, settings, queue) = broker_with_queue(SHARED_AMQP_URL, 5).await;
    let relay_shutdown = CancellationToken::new();
    let relay = spawn_outbox_relay(pool.clone(), broker.clone(), relay_shutdown.clone());
    let (recorder, mut calls) = Recorder::new();
    let (consumer, shutdown) = start_consumer(&broker, &pool, &queue, 1, recorder);

    let id = enqueue_committed(&pool, &job("in-a-schema")).await;
    let notified = tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .expect("notified");
    assert_eq!(
        notified.expect("a notification").channel(),
        format!("ferrite_outbox_{schema}")
    );
    assert_eq!(next_call(&mut calls).await.message_id, id);
    stop(consumer, shutdown).await;
    stop(relay, relay_shutdown).await;

    // The migration created both tables in the service's schema (the test database also has
    // them in `public`, from `TestDatabase`).
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
         WHERE table_name IN ('outbox', 'inbox') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("list tables");
    assert!(tables.contains(&format!("{schema}.outbox")), "{tables:?}");
    assert!(tables.contains(&format!("{schema}.inbox")), "{tables:?}");
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        inbox, 1,
        "the consumer recorded the message in the schema's inbox"
    );

    common::delete_topology(SHARED_AMQP_URL, &settings, &[&queue]).await;
    broker.close().await;
    pool.close().await;
    db.drop().await;
}

/// Runs on the current-thread runtime so that every task the test spawns (relay, consumer)
/// records into the thread-local subscriber installed here.
#[tokio::test]
async fn the_consumer_span_continues_the_trace_of_the_request_that_wrote_the_outbox_row() {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing::Instrument as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("messaging-test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let db = TestDatabase::create().await;
    create_effects_table(&db.pool).await;
    let (broker, settings, queue) = broker_with_queue(SHARED_AMQP_URL, 5).await;
    let relay_shutdown = CancellationToken::new();
    let relay = spawn_outbox_relay(db.pool.clone(), broker.clone(), relay_shutdown.clone());
    let (recorder, mut calls) = Recorder::new();
    let (consumer, shutdown) = start_consumer(&broker, &db.pool, &queue, 1, recorder);

    let id = enqueue_committed(&db.pool, &job("traced"))
        .instrument(tracing::info_span!("http.request"))
        .await;
    assert_eq!(next_call(&mut calls).await.message_id, id);
    stop(consumer, shutdown).await;
    stop(relay, relay_shutdown).await;

    let spans = exporter
        .get_finished_spans()
        .expect("the in-memory exporter holds the spans");
    let named = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("a `{name}` span was recorded"))
    };
    let (request, enqueue, consume) = (
        named("http.request"),
        named("enqueue"),
        named("amqp.consume"),
    );
    // The trace context is taken inside `enqueue`, so that is the consumer's parent, and all
    // three share the request's trace id.
    assert_eq!(enqueue.parent_span_id, request.span_context.span_id());
    assert_eq!(consume.parent_span_id, enqueue.span_context.span_id());
    assert_eq!(
        consume.span_context.trace_id(),
        request.span_context.trace_id()
    );

    common::delete_topology(SHARED_AMQP_URL, &settings, &[&queue]).await;
    broker.close().await;
    db.drop().await;
}

#[test]
fn job_requested_is_routed_by_its_event_key() {
    // The tests bind queues to this key; if it changed, they would silently receive nothing.
    assert_eq!(JobRequested::ROUTING_KEY, "job.requested");
}
