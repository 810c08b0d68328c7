//! The platform's Postgres pool against a real server: it hands out live connections without
//! pinging each one first.

mod common;

use std::time::Duration;

use common::{TestDatabase, eventually};
use ferrite_platform::Secret;
use ferrite_platform::db::{self, PING_AFTER_IDLE};
use ferrite_platform::settings::DatabaseSettings;

#[tokio::test]
async fn a_connection_the_server_ended_while_it_was_idle_is_replaced_before_use() {
    let db = TestDatabase::create().await;
    let url = format!("postgres://postgres@127.0.0.1:5432/{}", db.name);
    let settings = DatabaseSettings {
        url: Secret::new(url::Url::parse(&url).expect("valid URL")),
        // One connection, so the second query gets the first one's connection or a new one.
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
    };
    let pool = db::connect(&settings, "public").expect("pool");
    let backend = |pool| async move {
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
    };
    let first = backend(&pool).await.expect("the first query runs");

    // What a Postgres restart does to every connection, done to this one alone.
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&db.pool)
        .await
        .expect("terminate the pool's connection");
    assert!(terminated, "the connection's server process existed");
    eventually(
        Duration::from_secs(60),
        "the server process to exit",
        || {
            let admin = db.pool.clone();
            async move {
                let alive: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                )
                .bind(first)
                .fetch_one(&admin)
                .await
                .expect("query pg_stat_activity");
                !alive
            }
        },
    )
    .await;
    // Idle long enough to be pinged. Without that ping the pool would hand out the dead
    // connection, and this query would fail.
    tokio::time::sleep(PING_AFTER_IDLE * 2).await;

    let second = backend(&pool)
        .await
        .expect("the pool replaced the dead connection");
    assert_ne!(
        second, first,
        "a new server process serves the new connection"
    );

    pool.close().await;
    db.drop().await;
}
