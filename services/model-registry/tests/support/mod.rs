//! A model registry on port 0 with its own database, exchange and s3s-fs store, plus the
//! model folders and events the tests feed it.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferrite_model_registry::ModelRegistry;
use ferrite_platform::amqp::{Broker, OutgoingMessage};
use ferrite_platform::storage::{ObjectKey, Storage};
use ferrite_platform::{Application, ServiceModule, Settings};
use ferrite_proto::{Event, JobFinished, JobOutcome};
use prost::Message as _;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::app::{ADMIN_TOKEN, test_env};
use crate::common::s3::S3Server;
use crate::common::{SHARED_AMQP_URL, TestDatabase, delete_topology};

mod weights;

pub use weights::{mini_config, zeros_safetensors};

/// Bounds every wait on the consumer; never a measurement.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Registry {
    pub address: String,
    pub database: TestDatabase,
    pub s3: S3Server,
    pub settings: Settings,
    pub broker: Broker,
    shutdown: CancellationToken,
    stopped: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub client: reqwest::Client,
    test_queues: Vec<String>,
}

/// Starts the registry, with `extra` modules beside it (a stand-in dataset registry).
/// Prefetch 1 makes the consumer take deliveries one at a time, in queue order.
pub async fn spawn_with(extra: Vec<Box<dyn ServiceModule>>) -> Registry {
    let s3 = S3Server::start().await;
    let database = TestDatabase::create().await;
    let mut overrides = s3.env();
    overrides.push(("FERRITE_AMQP_PREFETCH".into(), "1".into()));
    let env = test_env(&database.name, &overrides);
    let settings = Settings::load(None, &env).expect("test settings are valid");
    let host = settings.http.host;
    let mut modules: Vec<Box<dyn ServiceModule>> = vec![Box::new(ModelRegistry)];
    modules.extend(extra);
    let application = Application::build(settings.clone(), modules)
        .await
        .expect("the application builds");
    let address = format!("http://{host}:{}", application.port());
    let shutdown = application.shutdown_token();
    let stopped = tokio::spawn(application.run_until_stopped());
    let broker = Broker::start(settings.amqp.clone(), CancellationToken::new());
    broker
        .wait_connected(PATIENCE)
        .await
        .expect("RabbitMQ is running on 127.0.0.1:5672");
    Registry {
        address,
        database,
        s3,
        settings,
        broker,
        shutdown,
        stopped,
        client: reqwest::Client::new(),
        test_queues: Vec::new(),
    }
}

pub async fn spawn() -> Registry {
    spawn_with(Vec::new()).await
}

impl Registry {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (reqwest::StatusCode, Value) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the registry answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, Value) {
        self.call(Method::GET, path, ADMIN_TOKEN, None).await
    }

    /// Creates the model `name`; returns the status (201, or 409 when it exists).
    pub async fn create_model(&self, name: &str) -> reqwest::StatusCode {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/registry/models",
                ADMIN_TOKEN,
                Some(json!({"name": name})),
            )
            .await;
        assert!(status == 201 || status == 409, "{body}");
        status
    }

    /// Uploads a tar to `/v1/registry/models/{name}/uploads?{query}`.
    pub async fn upload(
        &self,
        name: &str,
        query: &str,
        tar: Vec<u8>,
    ) -> (reqwest::StatusCode, Value) {
        let response = self
            .client
            .post(self.url(&format!("/v1/registry/models/{name}/uploads?{query}")))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/x-tar")
            .body(tar)
            .send()
            .await
            .expect("the registry answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Uploads a valid tiny model folder as the next version of `name` (created when new)
    /// and returns the version.
    pub async fn upload_tiny_as(&self, name: &str) -> Value {
        self.create_model(name).await;
        let (status, version) = self.upload(name, "", tar_of(&tiny_model_folder())).await;
        assert_eq!(status, 201, "{version}");
        version
    }

    /// Issues a token with `role` through the admin API.
    pub async fn token(&self, role: &str) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/auth/tokens",
                ADMIN_TOKEN,
                Some(json!({"name": format!("test-{role}"), "role": role})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("a token").to_owned()
    }

    /// Publishes `event` under `message_id`, as the training runner's relay would.
    pub async fn publish(&self, message_id: Uuid, event: &JobFinished) {
        self.broker
            .publish(OutgoingMessage {
                message_id,
                routing_key: JobFinished::ROUTING_KEY,
                body: &event.encode_to_vec(),
                headers: &[],
            })
            .await
            .expect("RabbitMQ confirms the message");
    }

    /// Stores `files` under `prefix` in the registry's store, as the training runner stores a
    /// job's output before it publishes JobFinished.
    pub async fn store_folder(&self, prefix: &str, files: &BTreeMap<String, Vec<u8>>) {
        let storage = Storage::from_settings(&self.settings.store).expect("the store opens");
        let prefix = ObjectKey::parse(prefix.trim_end_matches('/')).expect("a valid prefix");
        for (name, bytes) in files {
            let key = prefix.join(name).expect("a valid file name");
            storage
                .put(&key, bytes.clone().into())
                .await
                .expect("the store takes the file");
        }
    }

    /// Stores `files` as the output of `event`'s job and publishes the event.
    pub async fn finish_job(&self, event: &JobFinished, files: &BTreeMap<String, Vec<u8>>) {
        let prefix = event
            .artifact_prefix
            .as_deref()
            .expect("a succeeded job's prefix");
        self.store_folder(prefix, files).await;
        self.publish(Uuid::now_v7(), event).await;
    }

    /// A queue of the test's own bound to `routing_key`, to watch what the registry emits.
    pub async fn watch(&mut self, routing_key: &str) -> String {
        let queue = format!("{}.test-watch.{routing_key}", self.settings.amqp.exchange);
        self.broker
            .register_queue(&queue, &[routing_key.to_owned()])
            .await
            .expect("declare the watch queue");
        self.test_queues.push(queue.clone());
        queue
    }

    /// A pool on the registry's schema, to look at what it committed.
    pub async fn registry_pool(&self) -> PgPool {
        PgPool::connect(&format!(
            "postgres://postgres@127.0.0.1:5432/{}?options=-c%20search_path%3Dmodel_registry",
            self.database.name
        ))
        .await
        .expect("connect to the registry schema")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.stopped.await.expect("joins").expect("stops cleanly");
        self.broker.close().await;
        self.database.drop().await;
        let mut queues = vec![ferrite_model_registry::consumers::job_finished::queue_name(
            &self.settings.amqp.exchange,
        )];
        queues.extend(self.test_queues);
        let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
        delete_topology(SHARED_AMQP_URL, &self.settings.amqp, &queues).await;
    }
}

/// A JobFinished for a successful job of `kind`.
pub fn finished(kind: &str, output: &str, base: Option<&str>, datasets: &[Uuid]) -> JobFinished {
    let job_id = Uuid::now_v7();
    JobFinished {
        job_id: job_id.to_string(),
        kind: kind.into(),
        outcome: JobOutcome::Succeeded as i32,
        artifact_prefix: Some(format!("jobs/{job_id}/output/")),
        base_model_version_id: base.map(str::to_owned),
        dataset_version_ids: datasets.iter().map(Uuid::to_string).collect(),
        final_metrics: [("loss".to_owned(), 1.25)].into(),
        output_model_name: output.into(),
        ..JobFinished::default()
    }
}

/// A safetensors file of one f32 tensor `w` of shape [2], with `data_end` as the end offset
/// its header claims; 8 is right, anything larger points past the file.
pub fn safetensors(data_end: u64) -> Vec<u8> {
    tensor_file("w", data_end)
}

/// A safetensors file of one f32 tensor `name` of shape [2], its header claiming `data_end`
/// as the end of its bytes.
pub fn tensor_file(name: &str, data_end: u64) -> Vec<u8> {
    let header =
        format!(r#"{{"{name}":{{"dtype":"F32","shape":[2],"data_offsets":[0,{data_end}]}}}}"#);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    bytes
}

/// [`mini_config`]'s config.json and weights holding every tensor it requires.
pub fn tiny_model_folder() -> BTreeMap<String, Vec<u8>> {
    let config = mini_config();
    BTreeMap::from([
        (
            "config.json".to_owned(),
            config.to_json_string().into_bytes(),
        ),
        (
            "model.safetensors".to_owned(),
            zeros_safetensors(&ferrite_model::Llama::parameter_shapes(&config)),
        ),
    ])
}

/// A PEFT LoRA config and a small, well-formed adapter weights file.
pub fn tiny_adapter_folder() -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([
        (
            "adapter_config.json".to_owned(),
            br#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}"#.to_vec(),
        ),
        ("adapter_model.safetensors".to_owned(), safetensors(8)),
    ])
}

/// A tar archive of `files` (regular files only).
pub fn tar_of(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    tar_builder(files).into_inner().expect("finish the tar")
}

/// A tar archive holding `files`, open for more entries.
pub fn tar_builder(files: &BTreeMap<String, Vec<u8>>) -> tar::Builder<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .expect("append to an in-memory tar");
    }
    builder
}
