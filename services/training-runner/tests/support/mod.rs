//! The training runner in a real application (Postgres, RabbitMQ, an S3-compatible store), with
//! stand-in registries: a small service that answers the two resolve routes from a table the
//! test fills, and records every JobFinished it consumes as the model registry would.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{HttpResponse, web};
use ferrite_platform::amqp::{ConsumerSpec, Handler, HandlerError, IncomingMessage};
use ferrite_platform::app::Mounted;
use ferrite_platform::storage::{ObjectKey, Storage};
use ferrite_platform::{ApiError, ServiceContext, ServiceModule, Settings};
use ferrite_proto::{Event, JobFinished};
use ferrite_training_runner::TrainingRunner;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Postgres, Transaction};

use crate::common::app::{ADMIN_TOKEN, TestApp, spawn_modules, test_env};
use crate::common::s3::S3Server;
use crate::common::{SHARED_AMQP_URL, TestDatabase, delete_topology, eventually, unique_name};

pub mod jobs;

/// What the stand-in registries answer and what they have consumed.
#[derive(Default)]
pub struct Registries {
    /// Reference -> DatasetVersion JSON.
    pub datasets: Mutex<HashMap<String, serde_json::Value>>,
    /// Reference -> ModelVersion JSON.
    pub models: Mutex<HashMap<String, serde_json::Value>>,
    pub finished: Mutex<Vec<JobFinished>>,
}

impl Registries {
    /// Registers a dataset version under `reference` whose bytes sit at `object_key`.
    pub fn add_dataset(
        &self,
        reference: &str,
        kind: &str,
        format: &str,
        object_key: &str,
    ) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let version = serde_json::json!({
            "id": id, "dataset_id": uuid::Uuid::now_v7(), "dataset_name": reference,
            "number": 1, "kind": kind, "format": format, "sha256": "0".repeat(64),
            "object_key": object_key, "bytes": 0, "rows": 0, "created_at": "2026-01-01T00:00:00Z",
        });
        lock(&self.datasets).insert(reference.to_owned(), version);
        id
    }

    /// Registers a model version under `reference` whose folder is at `artifact_prefix`.
    pub fn add_model(&self, reference: &str, artifact_prefix: &str) -> String {
        self.add_version(reference, "model", artifact_prefix)
    }

    /// Registers a version of `kind` (`model`, `adapter`, `tokenizer`) under `reference`.
    pub fn add_version(&self, reference: &str, kind: &str, artifact_prefix: &str) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let version = serde_json::json!({
            "id": id, "model_id": uuid::Uuid::now_v7(), "model_name": reference, "number": 1,
            "kind": kind, "artifact_prefix": artifact_prefix, "base_version_id": null,
            "source_job_id": null, "metrics": {}, "created_at": "2026-01-01T00:00:00Z",
        });
        lock(&self.models).insert(reference.to_owned(), version);
        id
    }

    pub fn finished_for(&self, job_id: &str) -> Vec<JobFinished> {
        lock(&self.finished)
            .iter()
            .filter(|event| event.job_id == job_id)
            .cloned()
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct StandInRegistries {
    state: Arc<Registries>,
    queue: String,
}

#[async_trait::async_trait]
impl ServiceModule for StandInRegistries {
    fn name(&self) -> &'static str {
        "stand-in-registries"
    }

    fn schema(&self) -> &'static str {
        "stand_in_registries"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let state = web::Data::from(self.state.clone());
        let consumer = ConsumerSpec::new(
            self.queue.clone(),
            &[JobFinished::ROUTING_KEY],
            &ctx.broker,
            Arc::new(RecordFinished(self.state.clone())),
        );
        Ok(Mounted {
            routes: Arc::new(move |cfg| {
                cfg.app_data(state.clone())
                    .route(
                        "/v1/datasets/resolve/{reference}",
                        web::get().to(resolve_dataset),
                    )
                    .route(
                        "/v1/registry/resolve/{reference}",
                        web::get().to(resolve_model),
                    );
            }),
            openapi: utoipa::openapi::OpenApi::default(),
            consumers: vec![consumer],
            tasks: Vec::new(),
        })
    }
}

async fn resolve_dataset(
    state: web::Data<Registries>,
    reference: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    lock(&state.datasets)
        .get(reference.as_str())
        .map(|version| HttpResponse::Ok().json(version))
        .ok_or_else(|| ApiError::not_found("dataset", &reference))
}

async fn resolve_model(
    state: web::Data<Registries>,
    reference: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    lock(&state.models)
        .get(reference.as_str())
        .map(|version| HttpResponse::Ok().json(version))
        .ok_or_else(|| ApiError::not_found("model", &reference))
}

struct RecordFinished(Arc<Registries>);

#[async_trait::async_trait]
impl Handler for RecordFinished {
    async fn handle(
        &self,
        message: &IncomingMessage,
        _tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError> {
        let event: JobFinished = message.decode()?;
        lock(&self.0.finished).push(event);
        Ok(())
    }
}

/// A running runner with its stand-in registries and S3 server.
pub struct RunnerApp {
    pub app: TestApp,
    pub registries: Arc<Registries>,
    pub storage: Storage,
    /// The workers' scratch folder (`FERRITE_WORKER_SCRATCH_DIR`).
    pub scratch: PathBuf,
    /// The events exchange, which names this test's queues.
    pub exchange: String,
    queues: Vec<String>,
    _s3: S3Server,
}

/// Which services answer the runner's resolve calls and consume its JobFinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// A stand-in answering from [`Registries`].
    StandIn,
    /// The real dataset and model registries.
    Real,
}

/// Starts the runner (local backend, this crate's binary as the worker) with stand-in
/// registries on a fresh database, the shared broker under a fresh exchange, and a private
/// s3s-fs.
pub async fn spawn_runner(extra: &[(&str, &str)]) -> RunnerApp {
    spawn_runner_with(Peers::StandIn, extra).await
}

/// As [`spawn_runner`], with the registries `peers` names.
pub async fn spawn_runner_with(peers: Peers, extra: &[(&str, &str)]) -> RunnerApp {
    let database = TestDatabase::create().await;
    let s3 = S3Server::start().await;
    let scratch = std::env::temp_dir().join(unique_name("ferrite-scratch"));
    let mut settings_env: Vec<(String, String)> = s3.env();
    settings_env.extend(
        [
            (
                "FERRITE_WORKER_COMMAND",
                env!("CARGO_BIN_EXE_ferrite-training-runner"),
            ),
            ("FERRITE_WORKER_LEASE_SECONDS", "5"),
            ("FERRITE_WORKER_CONCURRENCY", "2"),
            ("FERRITE_WORKER_SCRATCH_DIR", &scratch.display().to_string()),
            ("FERRITE_LOG_FORMAT", "pretty"),
            ("FERRITE_LOG_FILTER", "warn"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let env = test_env(&database.name, &settings_env);
    let settings = Settings::load(None, &env).expect("test settings are valid");
    let storage = Storage::from_settings(&settings.store).expect("the store opens");
    let registries = Arc::new(Registries::default());
    let exchange = env["FERRITE_AMQP_EXCHANGE"].clone();
    let finished_queue = format!("{exchange}.stand-in-registry");
    let (modules, finished_queue): (Vec<Box<dyn ServiceModule>>, _) = match peers {
        Peers::StandIn => (
            vec![
                Box::new(TrainingRunner),
                Box::new(StandInRegistries {
                    state: registries.clone(),
                    queue: finished_queue.clone(),
                }),
            ],
            finished_queue,
        ),
        Peers::Real => (
            vec![
                Box::new(TrainingRunner),
                Box::new(ferrite_dataset_registry::DatasetRegistry),
                Box::new(ferrite_model_registry::ModelRegistry),
            ],
            ferrite_model_registry::consumers::job_finished::queue_name(&exchange),
        ),
    };
    let app = spawn_modules(database, env, modules).await;
    RunnerApp {
        app,
        registries,
        storage,
        scratch,
        queues: vec![
            ferrite_training_runner::consumer::queue_name(&exchange),
            finished_queue,
        ],
        exchange,
        _s3: s3,
    }
}

impl RunnerApp {
    /// Sends `method path` as the admin; returns the status and the JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        self.app.call(method, path, Some(ADMIN_TOKEN), body).await
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Submits a job and returns its id.
    pub async fn submit(&self, spec: serde_json::Value) -> String {
        let (status, body) = self
            .call(reqwest::Method::POST, "/v1/jobs", Some(spec))
            .await;
        assert_eq!(status, 201, "submission refused: {body}");
        body["id"].as_str().expect("the job has an id").to_owned()
    }

    /// Waits until the job reaches a final state and returns it.
    pub async fn wait_final(&self, id: &str, patience: Duration) -> serde_json::Value {
        let path = format!("/v1/jobs/{id}");
        eventually(patience, "the job to finish", || async {
            let job = self.get(&path).await;
            matches!(
                job["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .await;
        self.get(&path).await
    }

    /// Puts `bytes` at `key` in the store the runner uses.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        let key = ObjectKey::parse(key).expect("a valid key");
        self.storage
            .put(&key, bytes.into())
            .await
            .expect("the store takes the object");
    }

    /// A pool on the runner's schema, to check what the API does not show.
    pub async fn runner_pool(&self) -> PgPool {
        PgPool::connect(&format!(
            "postgres://postgres@127.0.0.1:5432/{}?options=-c%20search_path%3Dtraining_runner",
            self.app.database.name
        ))
        .await
        .expect("connect to the runner's schema")
    }

    /// Stops the application and removes its database, exchanges and queues.
    pub async fn stop(self) {
        let settings = Settings::load(None, &self.app.settings_env).expect("valid");
        self.app.stop().await;
        // The application's own clean-up knows only the probe's queue; deleting its exchanges
        // again is harmless.
        // A private broker goes away with its test; only the shared one needs tidying.
        if settings.amqp.url.expose().as_str() == SHARED_AMQP_URL {
            let queues: Vec<&str> = self.queues.iter().map(String::as_str).collect();
            delete_topology(SHARED_AMQP_URL, &settings.amqp, &queues).await;
        }
    }
}

/// The first `bytes` of the bundled public-domain corpus, cut at a line end.
pub fn corpus_sample(bytes: usize) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/corpus/corpus.txt");
    let text =
        std::fs::read_to_string(path).expect("data/corpus/corpus.txt is fetched (data/README.md)");
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text[..end].rfind('\n').unwrap_or(end);
    text.as_bytes()[..cut].to_vec()
}
