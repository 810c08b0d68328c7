//! Test support: the gateway running in a real Application (Postgres, RabbitMQ, a store on
//! disk) beside a small model registry stand-in served over HTTP, and a hand-built model whose
//! greedy output is known in advance.
//!
//! The model is a bigram chain. Every layer's output projection is zero, so each position
//! sees only its own token's embedding; the output head maps token t onto the embedding of
//! t's predecessor in a chosen chain, so the most likely next token is t's successor. Greedy
//! decoding therefore spells [`CHAIN`] after any prompt and then emits EOS. The tokenizer
//! has no merges, so every byte is its own token and "é" and "😀" each take several tokens.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use actix_web::{HttpResponse, web};
use ferrite_inference_gateway::InferenceGateway;
use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
use ferrite_model::{Llama, ModelConfig, checkpoint};
use ferrite_platform::app::Mounted;
use ferrite_platform::storage::{ObjectKey, Storage};
use ferrite_platform::{ApiError, Application, ServiceContext, ServiceModule, Settings};
use serde_json::{Value, json};
use sqlx::Connection;
use tch::{Device, Kind, Tensor, nn};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The text greedy decoding produces after any prompt whose last token is not in the chain
/// (every such token leads to its first one, "\n"), before EOS.
pub const CHAIN: &str = "\nZé😀 STOP";

pub const ADMIN_TOKEN: &str = "fer_gateway_test_admin_token_42";
const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const SHARED_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Registry versions the stand-in answers for, by every reference that names them.
pub type Versions = Arc<Mutex<HashMap<String, Value>>>;

/// Answers `GET /v1/registry/resolve/{reference}` from a map, as the model registry would.
struct FakeRegistry {
    versions: Versions,
}

#[async_trait::async_trait]
impl ServiceModule for FakeRegistry {
    fn name(&self) -> &'static str {
        "fake-registry"
    }

    fn schema(&self) -> &'static str {
        "fake_registry"
    }

    fn migrator(&self) -> Option<sqlx::migrate::Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let versions = web::Data::new(self.versions.clone());
        Ok(Mounted::routes(
            Arc::new(move |cfg| {
                cfg.app_data(versions.clone())
                    .route("/v1/registry/resolve/{reference}", web::get().to(resolve));
            }),
            utoipa::openapi::OpenApi::default(),
        ))
    }
}

async fn resolve(
    versions: web::Data<Versions>,
    reference: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let found = versions
        .lock()
        .ok()
        .and_then(|versions| versions.get(reference.as_str()).cloned());
    found
        .map(|version| HttpResponse::Ok().json(version))
        .ok_or_else(|| ApiError::not_found("model_version", &reference))
}

/// A running gateway and what tests need to reach it.
pub struct TestGateway {
    pub address: String,
    pub client: reqwest::Client,
    pub versions: Versions,
    pub env: BTreeMap<String, String>,
    database: String,
    shutdown: CancellationToken,
    stopped: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestGateway {
    /// A gateway on a database and store of its own.
    pub async fn spawn() -> Self {
        let database = format!("ferrite_test_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("Postgres runs on 127.0.0.1:5432");
        sqlx::query(&format!(r#"CREATE DATABASE "{database}""#))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let store = std::env::temp_dir().join(format!("ferrite-gateway-store-{}", Uuid::new_v4()));
        let scratch =
            std::env::temp_dir().join(format!("ferrite-gateway-cache-{}", Uuid::new_v4()));
        let env: BTreeMap<String, String> = [
            ("FERRITE_HTTP_PORT", "0".to_owned()),
            (
                "FERRITE_DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:5432/{database}"),
            ),
            ("FERRITE_DATABASE_MAX_CONNECTIONS", "4".to_owned()),
            ("FERRITE_AMQP_URL", SHARED_AMQP_URL.to_owned()),
            (
                "FERRITE_AMQP_EXCHANGE",
                format!("ferrite.test-{}", Uuid::new_v4().simple()),
            ),
            ("FERRITE_STORE", store.display().to_string()),
            ("FERRITE_WORKER_SCRATCH_DIR", scratch.display().to_string()),
            ("FERRITE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("FERRITE_HTTP_SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Self::spawn_with(database, env, Versions::default()).await
    }

    /// Another process on the same database, store and registry (a restart).
    pub async fn restart(self) -> Self {
        let (database, env, versions) = (
            self.database.clone(),
            self.env.clone(),
            self.versions.clone(),
        );
        self.shutdown.cancel();
        self.stopped.await.expect("joins").expect("stops cleanly");
        Self::spawn_with(database, env, versions).await
    }

    async fn spawn_with(
        database: String,
        env: BTreeMap<String, String>,
        versions: Versions,
    ) -> Self {
        let settings = Settings::load(None, &env).expect("test settings are valid");
        let host = settings.http.host;
        let modules: Vec<Box<dyn ServiceModule>> = vec![
            Box::new(InferenceGateway),
            Box::new(FakeRegistry {
                versions: versions.clone(),
            }),
        ];
        let application = Application::build(settings, modules)
            .await
            .expect("the application builds");
        let address = format!("http://{host}:{}", application.port());
        let shutdown = application.shutdown_token();
        let stopped = tokio::spawn(application.run_until_stopped());
        Self {
            address,
            client: reqwest::Client::new(),
            versions,
            env,
            database,
            shutdown,
            stopped,
        }
    }

    /// Stops the application and drops its database and its exchanges on the shared broker.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.stopped.await.expect("joins").expect("stops cleanly");
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("Postgres runs");
        sqlx::query(&format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.database
        ))
        .execute(&mut admin)
        .await
        .expect("drop the test database");
        let settings = Settings::load(None, &self.env).expect("valid");
        let connection =
            lapin::Connection::connect(SHARED_AMQP_URL, lapin::ConnectionProperties::default())
                .await
                .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("open a channel");
        for exchange in [
            settings.amqp.exchange.clone(),
            ferrite_platform::amqp::dead_letter_exchange(&settings.amqp),
        ] {
            let _ = channel
                .exchange_delete(&exchange, lapin::options::ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "done").await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `method path` with a bearer token and an optional JSON body: status, headers, body text.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, String) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("the gateway answers");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a body");
        (status, headers, text)
    }

    /// POST with a JSON body; status and the body as JSON (`Null` when not JSON).
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> (reqwest::StatusCode, Value) {
        let (status, _, text) = self
            .send(reqwest::Method::POST, path, token, Some(body))
            .await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A new token of `role`, issued by the admin.
    pub async fn token(&self, role: &str) -> String {
        let (status, body) = self
            .post(
                "/v1/auth/tokens",
                ADMIN_TOKEN,
                &json!({"name": format!("test-{role}"), "role": role}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("a token").to_owned()
    }

    /// Writes the chain model into the store and registers it (see [`Self::register_folder`]).
    pub async fn register_chain_model(&self, name: &str) -> Value {
        let dir = tempfile::tempdir().expect("a temp dir");
        save_chain_model(dir.path());
        self.register_folder(name, dir.path()).await
    }

    /// Copies a Hugging Face folder into the store under a fresh prefix and registers a
    /// version of it with the stand-in registry as `name`, `name:1` and its id.
    pub async fn register_folder(&self, name: &str, dir: &Path) -> Value {
        self.register(name, dir, "model", None).await
    }

    /// Like [`Self::register_folder`] for any kind, with the base version of an adapter.
    pub async fn register(
        &self,
        name: &str,
        dir: &Path,
        kind: &str,
        base_version_id: Option<Uuid>,
    ) -> Value {
        let id = Uuid::now_v7();
        let prefix = format!("models/{id}/");
        let settings = Settings::load(None, &self.env).expect("valid");
        let storage = Storage::from_settings(&settings.store).expect("the store opens");
        for entry in std::fs::read_dir(dir).expect("reads") {
            let entry = entry.expect("an entry");
            let file = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(entry.path()).expect("reads the file");
            let key = ObjectKey::parse(&format!("{prefix}{file}")).expect("a valid key");
            storage.put(&key, bytes.into()).await.expect("uploads");
        }
        let version = json!({
            "id": id, "model_id": Uuid::now_v7(), "model_name": name, "number": 1,
            "kind": kind, "artifact_prefix": prefix, "base_version_id": base_version_id,
            "source_job_id": null, "metrics": {}, "created_at": "2026-01-01T00:00:00Z",
        });
        let mut versions = self.versions.lock().expect("not poisoned");
        for reference in [name.to_owned(), format!("{name}:1"), id.to_string()] {
            versions.insert(reference, version.clone());
        }
        version
    }

    /// Deploys the registered version `name:1` as `name`.
    pub async fn deploy(&self, name: &str) {
        let (status, body) = self
            .post(
                "/v1/deployments",
                ADMIN_TOKEN,
                &json!({"name": name, "model": format!("{name}:1")}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Registers the chain model and deploys it as `name`.
    pub async fn deploy_chain_model(&self, name: &str) -> Value {
        let version = self.register_chain_model(name).await;
        self.deploy(name).await;
        version
    }
}

/// The chain model's tokenizer: bytes only, plus the special tokens.
pub fn chain_tokenizer() -> Tokenizer {
    let config = TrainConfig {
        vocab_size: 256 + 5,
        min_frequency: 1,
    };
    Tokenizer::train(&config, ["no merges fit in this vocabulary"].into_iter())
        .expect("a byte tokenizer trains")
}

/// Saves the chain model as a Hugging Face folder in `dir`.
pub fn save_chain_model(dir: &Path) {
    tch::manual_seed(7);
    let tokenizer = chain_tokenizer();
    let vocab = tokenizer.vocab_size() as i64;
    let mut config = ModelConfig::preset("tiny")
        .expect("tiny exists")
        .with_vocab_size(vocab)
        .with_special_tokens(tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id());
    config.tie_word_embeddings = false;
    let var_store = nn::VarStore::new(Device::Cpu);
    let _model = Llama::new(&var_store.root(), &config);

    let chain = tokenizer.encode(CHAIN, false).expect("encodes");
    let distinct: std::collections::BTreeSet<&u32> = chain.iter().collect();
    assert_eq!(
        distinct.len(),
        chain.len(),
        "the chain's tokens must be distinct"
    );

    let hidden = config.hidden_size;
    // Embeddings with unit root-mean-square, so RMSNorm leaves them as they are. Tokens off
    // the chain share one direction (plus a little noise), so one head row can catch them all.
    let unit_rms = |t: Tensor| &t / t.square().mean_dim(1, true, Kind::Float).sqrt();
    let shared = Tensor::randn([1, hidden], (Kind::Float, Device::Cpu));
    let mut embeddings =
        unit_rms(&shared + Tensor::randn([vocab, hidden], (Kind::Float, Device::Cpu)) * 0.1);
    let on_chain = unit_rms(Tensor::randn(
        [chain.len() as i64, hidden],
        (Kind::Float, Device::Cpu),
    ));
    for (row, &token) in chain.iter().enumerate() {
        embeddings
            .get(i64::from(token))
            .copy_(&on_chain.get(row as i64));
    }
    let _ = embeddings.detach_();

    // head[j] is `scale` times the embedding of the token that leads to j, so the logit of
    // t's successor is scale * |e_t|^2 = 12 (|e_t|^2 = hidden), while any other row meets e_t
    // as a random direction: about 12 / sqrt(hidden) ~ 1 times a standard normal.
    let scale = 12.0 / hidden as f64;
    let head = Tensor::zeros([vocab, hidden], (Kind::Float, Device::Cpu));
    let successor = |from: &Tensor, to: u32| {
        head.get(i64::from(to)).copy_(&(from * scale));
    };
    for pair in chain.windows(2) {
        successor(&embeddings.get(i64::from(pair[0])), pair[1]);
    }
    let last = *chain.last().expect("non-empty");
    successor(&embeddings.get(i64::from(last)), tokenizer.eos_id());
    successor(&unit_rms(shared).get(0), chain[0]);

    let mut variables = var_store.variables();
    tch::no_grad(|| {
        for (name, tensor) in variables.iter_mut() {
            if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                let _ = tensor.zero_();
            } else if name == "model.embed_tokens.weight" {
                tensor.copy_(&embeddings);
            } else if name == "lm_head.weight" {
                tensor.copy_(&head);
            }
        }
    });
    checkpoint::save(dir, &var_store, &config, Some(&tokenizer)).expect("saves");
}

/// The `data:` payloads of an event stream, checking the framing on the way: every event is
/// `data: ...` followed by a blank line, and the last is `[DONE]`.
pub fn events(stream: &str) -> Vec<Value> {
    assert!(stream.ends_with("data: [DONE]\n\n"), "{stream:?}");
    let frames: Vec<&str> = stream.split_terminator("\n\n").collect();
    assert_eq!(
        frames.concat().len() + 2 * frames.len(),
        stream.len(),
        "every event ends with a blank line"
    );
    frames[..frames.len() - 1]
        .iter()
        .map(|frame| {
            let payload = frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {frame:?}"));
            assert!(!payload.contains('\n'), "one line per event: {frame:?}");
            serde_json::from_str(payload).expect("each event is JSON")
        })
        .collect()
}
