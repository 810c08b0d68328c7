//! The HTTP application against real Postgres, RabbitMQ and s3s-fs: migrations, readiness,
//! auth, errors, JSON bodies and methods, events through the outbox and graceful shutdown.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpResponse;
use common::app::{ADMIN_TOKEN, Probe, TestApp, spawn_app, spawn_app_on, spawn_modules, test_env};
use common::{PrivateRabbit, TestDatabase, eventually};
use ferrite_platform::app::Mounted;
use ferrite_platform::http::{Json, endpoint};
use ferrite_platform::{ServiceContext, ServiceModule};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::migrate::Migrator;

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

/// The text `/metrics` answers.
async fn metrics(app: &TestApp) -> String {
    let response = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("answers");
    response.text().await.expect("text")
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

    let text = metrics(&app).await;
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

/// A service whose routes take nested JSON through the platform's extractor: `/v1/runs` serves
/// GET and POST, `/v1/runs/{id}` GET and DELETE.
struct Runs;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSpec {
    name: String,
    hyper_parameters: HyperParameters,
    #[serde(default)]
    datasets: Vec<DatasetUse>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HyperParameters {
    lr: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetUse {
    reference: String,
    #[serde(default)]
    role: DatasetRole,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DatasetRole {
    #[default]
    Train,
    Eval,
}

#[async_trait::async_trait]
impl ServiceModule for Runs {
    fn name(&self) -> &'static str {
        "runs"
    }

    fn schema(&self) -> &'static str {
        "runs"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        Ok(Mounted::routes(
            Arc::new(|cfg| {
                cfg.service(endpoint("/v1/runs").get(list_runs).post(create_run))
                    .service(endpoint("/v1/runs/{id}").get(list_runs).delete(list_runs));
            }),
            utoipa::openapi::OpenApi::default(),
        ))
    }
}

/// Echoes what it parsed, so a test sees every field arrive.
async fn create_run(spec: Json<RunSpec>) -> HttpResponse {
    let datasets: Vec<Value> = spec
        .datasets
        .iter()
        .map(|dataset| json!([dataset.reference, format!("{:?}", dataset.role)]))
        .collect();
    HttpResponse::Created().json(json!({
        "name": spec.name, "lr": spec.hyper_parameters.lr, "datasets": datasets,
    }))
}

async fn list_runs() -> HttpResponse {
    HttpResponse::Ok().json(json!([]))
}

/// The probe service and [`Runs`] on a fresh database, with `extra` settings.
async fn spawn_runs(extra: &[(String, String)]) -> TestApp {
    let database = TestDatabase::create().await;
    let env = test_env(&database.name, extra);
    let probe = Probe {
        queue: format!("{}.probe", env["FERRITE_AMQP_EXCHANGE"]),
        slow_entered: Arc::default(),
    };
    spawn_modules(database, env, vec![Box::new(probe), Box::new(Runs)]).await
}

/// POSTs `body` as it is, with `content_type`; returns the status and the JSON answer.
async fn post_raw(
    app: &TestApp,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn error_of(body: &Value) -> (&Value, &Value) {
    (&body["error"]["code"], &body["error"]["param"])
}

#[tokio::test]
async fn a_json_body_of_the_wrong_shape_is_refused_naming_the_path_of_the_value_at_fault() {
    let app = spawn_runs(&[]).await;
    let run = |extra: Value| {
        let mut spec = json!({"name": "r1", "hyper_parameters": {"lr": 0.1}});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        spec
    };

    // Regression: these came back with serde's sentence and `param: null`.
    let cases = [
        (
            run(json!({"hyper_parameters": {"lr": "fast"}})),
            "hyper_parameters.lr",
        ),
        // The second dataset (index 1) holds the unknown role.
        (
            run(json!({"datasets": [{"reference": "a"}, {"reference": "b", "role": "test"}]})),
            "datasets[1].role",
        ),
        (
            run(json!({"datasets": [{"reference": 7}]})),
            "datasets[0].reference",
        ),
        // A number where an enum's name belongs: serde_json calls this a syntax error, but
        // the body is valid JSON, so the value at the path is what is wrong.
        (
            run(json!({"datasets": [{"reference": "a", "role": 7}]})),
            "datasets[0].role",
        ),
        // Missing, unknown and repeated fields are named inside their object.
        (run(json!({"hyper_parameters": {}})), "hyper_parameters.lr"),
        (
            run(json!({"hyper_parameters": {"lr": 0.1, "epochs": 3}})),
            "hyper_parameters.epochs",
        ),
        (run(json!({"name": ["r1"]})), "name"),
        // Regression: a struct was also read from an array, its fields taken by position, so
        // these passed as `{"lr": 0.1}` and `{"reference": "b"}`.
        (run(json!({"hyper_parameters": [0.1]})), "hyper_parameters"),
        (
            run(json!({"datasets": [{"reference": "a"}, ["b"]]})),
            "datasets[1]",
        ),
    ];
    for (spec, param) in cases {
        let (status, body) = app
            .call(
                Method::POST,
                "/v1/runs",
                Some(ADMIN_TOKEN),
                Some(spec.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{spec} -> {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(error_of(&body), (&json!("invalid_value"), &json!(param)));
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(param), "the message names it: {message}");
    }

    // The whole body as an array (`[name, hyper_parameters]`) is refused the same way; no
    // path names the body itself.
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/runs",
            Some(ADMIN_TOKEN),
            Some(json!(["r1", {"lr": 0.1}])),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body), (&json!("invalid_value"), &Value::Null));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("expected a JSON object"), "{message}");

    // A field repeated in the raw text, which `json!` cannot write.
    let repeated = r#"{"name": "r1", "hyper_parameters": {"lr": 0.1, "lr": 0.2}}"#;
    let (status, body) = post_raw(&app, "/v1/runs", "application/json", repeated).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "hyper_parameters.lr");

    let (status, body) = app
        .call(
            Method::POST,
            "/v1/runs",
            Some(ADMIN_TOKEN),
            Some(run(
                json!({"datasets": [{"reference": "b", "role": "eval"}]}),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["datasets"], json!([["b", "Eval"]]));
    app.stop().await;
}

#[tokio::test]
async fn a_json_syntax_error_names_its_line_and_column_and_the_limits_still_hold() {
    // 1024 bytes is the smallest limit the settings accept.
    let app = spawn_runs(&[("FERRITE_HTTP_JSON_LIMIT_BYTES".into(), "1024".into())]).await;

    // Line 2 is ` "datasets": [}`: the `}` at its 15th character cannot start a value.
    let broken = "{\"name\": \"r1\",\n \"datasets\": [}";
    let (status, body) = post_raw(&app, "/v1/runs", "application/json", broken).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        (&json!("invalid_json"), &json!("line 2, column 15"))
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("line 2 column 15"), "{message}");

    // 2048 bytes declared in `Content-Length` are refused before they are read...
    let padded = format!(
        r#"{{"name": "{}", "hyper_parameters": {{"lr": 0.1}}}}"#,
        "x".repeat(2000)
    );
    let (status, body) = post_raw(&app, "/v1/runs", "application/json", padded.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "body_too_large");
    // ...and so are they when streamed without a length, counted as they arrive.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(padded)];
    let stream = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (status, body) = post_raw(&app, "/v1/runs", "application/json", stream).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body["error"]["message"],
        "the body exceeds the limit of 1024 bytes"
    );

    // A valid body declared as anything but JSON is a 415, on the probe route of the shared
    // test service as on this one: `curl -d` declares the form type, and `text/json` is not
    // `application/`.
    let valid = r#"{"name": "r1", "hyper_parameters": {"lr": 0.1}}"#;
    for (path, content_type) in [
        ("/v1/runs", "text/plain"),
        ("/v1/probe/events", "text/plain"),
        ("/v1/runs", "application/x-www-form-urlencoded"),
        ("/v1/runs", "text/json"),
    ] {
        let (status, body) = post_raw(&app, path, content_type, valid).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_content_type");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(content_type),
            "it names what came: {message}"
        );
    }
    // Regression: `application/json+x` (subtype `json`, suffix `x`) passed for JSON, and a
    // latin1 body was read as UTF-8.
    for (content_type, named) in [
        ("application/json+x", "`application/json+x`"),
        ("application/json; charset=latin1", "`charset=latin1`"),
        ("application/json; charset=utf-16", "`charset=utf-16`"),
    ] {
        let (status, body) = post_raw(&app, "/v1/runs", content_type, valid).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type}");
        assert_eq!(body["error"]["code"], "invalid_content_type");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{content_type}: {message}");
    }
    // Regression: with two `Content-Type` headers the first was read; a proxy reading the
    // second would see another body.
    let twice = app
        .client
        .post(app.url("/v1/runs"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .header("content-type", "text/plain")
        .body(valid)
        .send()
        .await
        .expect("answers");
    assert_eq!(twice.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let body: serde_json::Value = twice.json().await.expect("a JSON error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than one"), "{message}");
    // So is one that declares no type at all.
    let undeclared = app
        .client
        .post(app.url("/v1/runs"))
        .bearer_auth(ADMIN_TOKEN)
        .body(valid)
        .send()
        .await
        .expect("answers");
    assert_eq!(undeclared.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for content_type in [
        "application/merge-patch+json",
        "application/json; charset=utf-8",
        "application/json; charset=UTF-8",
        "Application/JSON",
    ] {
        let (status, _) = post_raw(&app, "/v1/runs", content_type, valid).await;
        assert_eq!(status, StatusCode::CREATED, "{content_type} is JSON");
    }

    // A gzip body is inflated as actix's extractors inflate it.
    let compressed = {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(valid.as_bytes()).expect("gzip in memory");
        encoder.finish().expect("gzip in memory")
    };
    let response = app
        .client
        .post(app.url("/v1/runs"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::CREATED);
    app.stop().await;
}

/// The methods an `Allow` header lists, in any order.
fn allowed(response: &reqwest::Response) -> BTreeSet<String> {
    response
        .headers()
        .get("allow")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .map(|method| method.trim().to_owned())
        .filter(|method| !method.is_empty())
        .collect()
}

#[tokio::test]
async fn a_method_a_path_does_not_serve_is_a_405_naming_those_it_does() {
    let app = spawn_runs(&[]).await;
    let cases = [
        (Method::DELETE, "/v1/runs", &["GET", "HEAD", "POST"][..]),
        (Method::POST, "/v1/runs/7", &["GET", "HEAD", "DELETE"][..]),
        (Method::PUT, "/v1/auth/tokens", &["GET", "HEAD", "POST"][..]),
        (Method::POST, "/healthz", &["GET", "HEAD"][..]),
    ];
    for (method, path, expected) in cases {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("answers");
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let expected: BTreeSet<String> = expected.iter().map(|m| (*m).to_owned()).collect();
        assert_eq!(allowed(&response), expected, "{method} {path}");
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }

    // HEAD is served wherever GET is, with the headers and without the body (RFC 9110).
    let head = app
        .client
        .head(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(head.status(), StatusCode::OK);
    assert!(head.bytes().await.expect("reads").is_empty());

    // A path nothing serves stays a 404, whatever the method.
    for (method, path) in [
        (Method::DELETE, "/v1/nothing-here"),
        (Method::GET, "/v1/runs/7/x"),
    ] {
        let (status, body) = app.call(method, path, Some(ADMIN_TOKEN), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"]["code"], "route_not_found");
    }

    // The 405 is counted under the route's pattern, which keeps metric labels bounded: one
    // POST to `/v1/runs/7` above.
    let metrics = metrics(&app).await;
    assert!(
        metrics.contains(
            r#"ferrite_http_requests_total{method="POST",route="/v1/runs/{id}",status="405"} 1"#
        ),
        "{metrics}"
    );
    app.stop().await;
}
