//! The HTTP application against real Postgres, RabbitMQ and s3s-fs: migrations, readiness,
//! auth, errors, events through the outbox and graceful shutdown.

mod common;

use std::time::Duration;

use common::app::{ADMIN_TOKEN, spawn_app, spawn_app_on};
use common::{PrivateRabbit, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);

async fn applied_migrations(pool: &sqlx::PgPool, schema: &str) -> Vec<(i64, Vec<u8>)> {
    sqlx::query_as(&format!(
        "SELECT version, checksum FROM \"{schema}\"._sqlx_migrations ORDER BY version"
    ))
    .fetch_all(pool)
    .await
    .expect("the migrations table exists")
}

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_are_a_no_op_the_second_time() {
    let app = spawn_app(&[]).await;
    let pool = app.database.pool.clone();
    let probe = applied_migrations(&pool, "probe").await;
    let auth = applied_migrations(&pool, "auth").await;
    // The probe schema has the messaging migration (1) and its own (100); auth has its one.
    assert_eq!(
        probe.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        vec![1, 100]
    );
    assert_eq!(auth.iter().map(|(v, _)| *v).collect::<Vec<_>>(), vec![1]);
    for table in ["outbox", "inbox", "effects"] {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(format!("probe.{table}"))
            .fetch_one(&pool)
            .await
            .expect("query");
        assert!(found.is_some(), "probe.{table} exists");
    }
    app.shutdown.cancel();
    app.stopped.await.expect("joins").expect("stops cleanly");

    // A second start on the same database must apply nothing and change nothing.
    let env = app.settings_env.clone();
    let again = spawn_app_on(app.database, env).await;
    assert_eq!(applied_migrations(&pool, "probe").await, probe);
    assert_eq!(applied_migrations(&pool, "auth").await, auth);
    again.stop().await;
}

async fn readiness(app: &common::app::TestApp) -> (StatusCode, Value) {
    let response = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("answers");
    let status = response.status();
    (status, response.json().await.expect("JSON"))
}

#[tokio::test]
async fn readyz_turns_unready_when_rabbitmq_stops_and_ready_again_when_it_returns() {
    let mut rabbit = PrivateRabbit::start().await;
    let app = spawn_app(&[("FERRITE_AMQP_URL".into(), rabbit.url())]).await;
    eventually(PATIENCE, "ready with the broker up", || async {
        readiness(&app).await.0 == StatusCode::OK
    })
    .await;

    rabbit.stop().await;
    eventually(PATIENCE, "unready with the broker down", || async {
        readiness(&app).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (_, report) = readiness(&app).await;
    assert_eq!(report["status"], "unready");
    assert_ne!(report["checks"]["rabbitmq"], "ok", "{report}");
    assert_eq!(
        report["checks"]["postgres:probe"], "ok",
        "only the broker is down: {report}"
    );

    rabbit.start_again().await;
    eventually(PATIENCE, "ready again after the broker returns", || async {
        readiness(&app).await.0 == StatusCode::OK
    })
    .await;

    app.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_tokens_get_401_and_a_labeler_on_an_admin_route_gets_403() {
    let app = spawn_app(&[]).await;
    let admin_route = "/v1/probe/admin";

    let (status, body) = app.call(Method::GET, admin_route, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["type"], "authentication_error");

    let (status, _) = app
        .call(Method::GET, admin_route, Some("fer_nope"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let labeler_spec = json!({"name": "labeler-ana", "role": "labeler"});
    let (status, created) = app
        .call(
            Method::POST,
            "/v1/auth/tokens",
            Some(ADMIN_TOKEN),
            Some(labeler_spec),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let labeler = created["token"].as_str().expect("a token is returned once");

    let (status, body) = app
        .call(Method::GET, admin_route, Some(labeler), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "insufficient_role");

    let (status, _) = app
        .call(Method::GET, admin_route, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    // Only the digest is stored: the token's text appears nowhere in the table.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_sha256 FROM auth.api_tokens")
        .fetch_all(&app.database.pool)
        .await
        .expect("query");
    assert!(
        stored
            .iter()
            .all(|digest| digest.len() == 32 && *digest != labeler.as_bytes())
    );

    // A revoked token stops working at once.
    let id = created["id"].as_str().expect("an id");
    let revoke = format!("/v1/auth/tokens/{id}");
    let (status, _) = app
        .call(Method::DELETE, &revoke, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .call(Method::GET, "/v1/auth/whoami", Some(labeler), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    app.stop().await;
}

#[tokio::test]
async fn errors_have_the_openai_shape_and_name_the_field() {
    let app = spawn_app(&[]).await;

    let unknown = app
        .client
        .get(app.url("/v1/nothing-here"))
        .send()
        .await
        .expect("answers");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let body: Value = unknown.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "route_not_found");

    let malformed = app
        .client
        .post(app.url("/v1/probe/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"note\": ")
        .send()
        .await
        .expect("answers");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let body: Value = malformed.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "invalid_json");

    let missing = app
        .client
        .post(app.url("/v1/probe/events"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"other": 1}))
        .send()
        .await
        .expect("answers");
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let body: Value = missing.json().await.expect("JSON");
    assert_eq!(body["error"]["param"], "note");

    // The service keeps serving after bad input.
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(health.status(), StatusCode::OK);

    app.stop().await;
}

#[tokio::test]
async fn an_event_emitted_over_http_is_consumed_once() {
    let app = spawn_app(&[]).await;
    let response = app
        .client
        .post(app.url("/v1/probe/events"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"note": "hello"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("JSON");
    let id: uuid::Uuid = body["message_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("a UUID");

    let pool = app.probe_pool().await;
    eventually(PATIENCE, "the consumer to record the effect", || async {
        let notes: Vec<String> =
            sqlx::query_scalar("SELECT note FROM effects WHERE message_id = $1")
                .bind(id)
                .fetch_all(&pool)
                .await
                .expect("query");
        notes == ["hello"]
    })
    .await;
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .expect("query");
    assert_eq!(delivered, 1);

    pool.close().await;
    app.stop().await;
}

#[tokio::test]
async fn operations_routes_answer_and_metrics_count_requests() {
    let app = spawn_app(&[]).await;
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(health.status(), StatusCode::OK);

    let openapi: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert!(
        openapi["paths"]["/v1/auth/tokens"].is_object(),
        "token routes are documented"
    );
    assert!(openapi["paths"]["/readyz"].is_object());

    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("answers");
    let text = metrics.text().await.expect("text");
    // Exactly one /healthz request was made above, so the counter reads 1.
    assert!(
        text.contains(
            r#"ferrite_http_requests_total{method="GET",route="/healthz",status="200"} 1"#
        ),
        "{text}"
    );

    app.stop().await;
}

#[tokio::test]
async fn a_request_in_flight_at_shutdown_finishes() {
    let app = spawn_app(&[]).await;
    let entered = app.slow_entered.notified();
    let slow = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/probe/slow");
        async move {
            client
                .get(url)
                .send()
                .await
                .expect("answers")
                .text()
                .await
                .expect("text")
        }
    });
    // Shut down only once the handler is running, so the request is truly in flight.
    entered.await;
    app.shutdown.cancel();
    assert_eq!(slow.await.expect("joins"), "finished");
    app.stopped.await.expect("joins").expect("stops cleanly");
    app.database.drop().await;
}

#[tokio::test]
async fn a_revoked_bootstrap_admin_token_stays_revoked_after_a_restart() {
    // Regression: start-up used to clear `revoked_at` of the configured admin token.
    let app = spawn_app(&[]).await;
    let me: Value = app
        .client
        .get(app.url("/v1/auth/whoami"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    let id = me["token_id"].as_str().expect("an id").to_owned();
    let revoked = app
        .client
        .delete(app.url(&format!("/v1/auth/tokens/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answers");
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    app.shutdown.cancel();
    app.stopped.await.expect("joins").expect("stops cleanly");

    let env = app.settings_env.clone();
    let again = spawn_app_on(app.database, env).await;
    let after = again
        .client
        .get(again.url("/v1/auth/whoami"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await;
    assert_eq!(after.expect("answers").status(), StatusCode::UNAUTHORIZED);
    again.stop().await;
}
