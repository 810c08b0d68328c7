//! A whole Ferrite application on port 0, with a small `probe` service that exercises the
//! platform: an HTTP route that emits an event through the outbox, a consumer that records it,
//! role-protected routes and a slow route for shutdown tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use ferrite_platform::amqp::{ConsumerSpec, Handler, HandlerError, IncomingMessage, outbox};
use ferrite_platform::app::Mounted;
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::{ApiError, Application, ServiceContext, ServiceModule, Settings};
use ferrite_proto::{Event, JobRequested};
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{SHARED_AMQP_URL, TestDatabase, unique_name};

/// The bootstrap admin token every test application starts with.
pub const ADMIN_TOKEN: &str = "fer_test_admin_token_0123456789";

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub database: TestDatabase,
    pub settings_env: BTreeMap<String, String>,
    pub shutdown: CancellationToken,
    pub stopped: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub client: reqwest::Client,
    /// Notified each time `/v1/probe/slow` starts handling a request.
    pub slow_entered: Arc<Notify>,
}

impl TestApp {
    /// A pool on the probe service's schema.
    pub async fn probe_pool(&self) -> PgPool {
        PgPool::connect(&format!(
            "postgres://postgres@127.0.0.1:5432/{}?options=-c%20search_path%3Dprobe",
            self.database.name
        ))
        .await
        .expect("connect to the probe schema")
    }

    /// Shuts the application down, checks it stopped cleanly, and removes what it left behind:
    /// its database, and its exchanges and queues on the shared broker.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.stopped.await.expect("joins").expect("stops cleanly");
        self.database.drop().await;
        let settings = Settings::load(None, &self.settings_env).expect("valid");
        let url = settings.amqp.url.expose().to_string();
        if url == SHARED_AMQP_URL {
            let queue = format!("{}.probe", settings.amqp.exchange);
            super::delete_topology(&url, &settings.amqp, &[&queue]).await;
        }
    }

    /// Sends `method path` with the bearer token and JSON body when given; returns the status
    /// and the JSON body (`Null` when the body is empty or not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the application answers");
        let status = response.status();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }
}

/// Settings for a test: its own database, exchange and store folder, port 0.
pub fn test_env(database: &str, extra: &[(String, String)]) -> BTreeMap<String, String> {
    let store = std::env::temp_dir().join(unique_name("ferrite-store"));
    let mut env: BTreeMap<String, String> = [
        ("FERRITE_HTTP_PORT", "0".to_owned()),
        (
            "FERRITE_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:5432/{database}"),
        ),
        ("FERRITE_DATABASE_MAX_CONNECTIONS", "4".to_owned()),
        ("FERRITE_AMQP_URL", SHARED_AMQP_URL.to_owned()),
        ("FERRITE_AMQP_EXCHANGE", unique_name("ferrite.test")),
        ("FERRITE_AMQP_RECONNECT_DELAY_MS", "100".to_owned()),
        ("FERRITE_STORE", store.display().to_string()),
        ("FERRITE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("FERRITE_HTTP_SHUTDOWN_GRACE_SECONDS", "10".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(extra.iter().cloned());
    env
}

/// Builds and runs the probe application on a fresh database.
pub async fn spawn_app(extra_env: &[(String, String)]) -> TestApp {
    let database = TestDatabase::create().await;
    let env = test_env(&database.name, extra_env);
    spawn_app_on(database, env).await
}

/// Builds and runs the probe application with the given settings.
pub async fn spawn_app_on(database: TestDatabase, env: BTreeMap<String, String>) -> TestApp {
    let queue = format!("{}.probe", env["FERRITE_AMQP_EXCHANGE"]);
    let slow_entered = Arc::new(Notify::new());
    let probe = Probe {
        queue,
        slow_entered: slow_entered.clone(),
    };
    let mut app = spawn_modules(database, env, vec![Box::new(probe)]).await;
    app.slow_entered = slow_entered;
    app
}

/// Builds and runs an application of `modules` with the given settings: how a service's tests
/// mount the service itself, with stand-ins for the peers it calls.
pub async fn spawn_modules(
    database: TestDatabase,
    env: BTreeMap<String, String>,
    modules: Vec<Box<dyn ServiceModule>>,
) -> TestApp {
    let settings = Settings::load(None, &env).expect("test settings are valid");
    let host = settings.http.host;
    let application = Application::build(settings, modules)
        .await
        .expect("the application builds");
    let address = format!("http://{host}:{}", application.port());
    let shutdown = application.shutdown_token();
    let stopped = tokio::spawn(application.run_until_stopped());
    TestApp {
        address,
        database,
        settings_env: env,
        shutdown,
        stopped,
        client: reqwest::Client::new(),
        slow_entered: Arc::new(Notify::new()),
    }
}

/// A service that exists only to exercise the platform.
pub struct Probe {
    pub queue: String,
    pub slow_entered: Arc<Notify>,
}

#[async_trait::async_trait]
impl ServiceModule for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn schema(&self) -> &'static str {
        "probe"
    }

    fn migrator(&self) -> Option<Migrator> {
        // Relative to the including crate's manifest: every crate sits two folders deep, so
        // other crates' tests can include this module too.
        Some(sqlx::migrate!(
            "../../crates/platform/tests/probe_migrations"
        ))
    }

    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let pool = web::Data::new(ctx.pool.clone());
        let slow_entered = web::Data::from(self.slow_entered.clone());
        let consumer = ConsumerSpec::new(
            self.queue.clone(),
            &[JobRequested::ROUTING_KEY],
            &ctx.broker,
            Arc::new(RecordEffect),
        );
        Ok(Mounted {
            routes: Arc::new(move |cfg| {
                cfg.app_data(pool.clone())
                    .app_data(slow_entered.clone())
                    .route("/v1/probe/events", web::post().to(emit))
                    .route("/v1/probe/admin", web::get().to(admin_only))
                    .route("/v1/probe/slow", web::get().to(slow));
            }),
            openapi: utoipa::openapi::OpenApi::default(),
            consumers: vec![consumer],
            tasks: Vec::new(),
        })
    }
}

#[derive(serde::Deserialize)]
struct Emit {
    note: String,
}

/// Writes an event through the outbox in one transaction.
async fn emit(
    principal: Principal,
    pool: web::Data<PgPool>,
    body: ferrite_platform::http::Json<Emit>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let mut tx = pool.begin().await?;
    let event = JobRequested {
        job_id: body.note.clone(),
        ..JobRequested::default()
    };
    let id = outbox::enqueue(&mut tx, &event)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    tx.commit().await?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "message_id": id })))
}

async fn admin_only(principal: Principal) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Admin])?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "ok": true })))
}

/// Takes a while, so a shutdown can begin while it is in flight.
async fn slow(entered: web::Data<Notify>) -> HttpResponse {
    entered.notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    HttpResponse::Ok().body("finished")
}

/// Records each event's note, keyed by message id.
struct RecordEffect;

#[async_trait::async_trait]
impl Handler for RecordEffect {
    async fn handle(
        &self,
        message: &IncomingMessage,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError> {
        let event: JobRequested = message.decode()?;
        tracing::info!(note = %event.job_id, "probe effect");
        sqlx::query("INSERT INTO effects (message_id, note) VALUES ($1, $2)")
            .bind(message.message_id)
            .bind(event.job_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
