//! Typed settings, loaded once at start-up from defaults, an optional file, then the environment.
//!
//! Loading goes through a seam: [`Settings::load`] takes the environment as a map, so tests
//! never mutate the process environment. Every bad value is collected, and start-up reports
//! them all in one message before anything serves.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::secret::Secret;

/// Prefix of every environment variable Ferrite reads.
pub const ENV_PREFIX: &str = "FERRITE_";

/// Everything a Ferrite process is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub store: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub auth: AuthSettings,
    pub worker: WorkerSettings,
    pub datasets: DatasetSettings,
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub host: IpAddr,
    /// Port 0 asks the OS for a free port; tests rely on it.
    pub port: u16,
    /// Largest JSON request body, in bytes.
    pub json_limit_bytes: usize,
    /// How long in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Where every service's REST API is reachable (the all-in-one process or an Ingress);
    /// `None` means this process itself. Services query each other through it.
    pub api_url: Option<Url>,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: Secret<Url>,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: Secret<Url>,
    /// The topic exchange every event is published to.
    pub exchange: String,
    /// Unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
    /// Deliveries of one message before it is dead-lettered.
    pub max_deliveries: u32,
    /// Delay between reconnection attempts after the broker goes away.
    pub reconnect_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A folder on the local disk.
    Local(PathBuf),
    /// An S3 bucket, at `s3_endpoint` when set (any S3-compatible server).
    S3 { bucket: String },
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub location: StoreLocation,
    pub s3_endpoint: Option<Url>,
    pub s3_region: String,
    pub s3_access_key: Option<Secret<String>>,
    pub s3_secret_key: Option<Secret<String>>,
    /// Objects at least this large are uploaded in parts of this size.
    pub multipart_part_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// OTLP/gRPC collector; traces are exported only when this is set.
    pub otlp_endpoint: Option<Url>,
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info,sqlx=warn`.
    pub log_filter: String,
    pub service_name: String,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// A token given the admin role at start-up, so a fresh install can create the others.
    pub bootstrap_admin_token: Option<Secret<String>>,
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Training jobs a local runner executes at once.
    pub concurrency: usize,
    /// Time a worker's lease on a job lasts without a heartbeat.
    pub lease: Duration,
    /// Where attempts run.
    pub backend: WorkerBackend,
    /// The program a local worker runs (`<program> worker --job ID --attempt N`); `None` is
    /// this process's own executable.
    pub command: Option<PathBuf>,
    /// Attempts a job gets in all before it is failed.
    pub max_attempts: u32,
    /// Folder for a worker's downloads and checkpoints; the system temp folder when `None`.
    pub scratch_dir: Option<PathBuf>,
    /// Container image of a Kubernetes worker.
    pub image: String,
    /// Namespace Kubernetes workers run in.
    pub kubernetes_namespace: String,
}

/// Where the training runner starts workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerBackend {
    /// Child processes of the runner.
    Local,
    /// A `batch/v1` Job per attempt.
    Kubernetes,
}

#[derive(Debug, Clone)]
pub struct DatasetSettings {
    /// Longest line an upload may hold, in bytes.
    pub max_line_bytes: usize,
    /// Largest upload after decompression, in bytes.
    pub max_upload_bytes: u64,
}

/// Every problem found while loading settings, reported together.
#[derive(Debug, thiserror::Error)]
pub struct SettingsError {
    pub problems: Vec<String>,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid settings ({} problems): ", self.problems.len())?;
        f.write_str(&self.problems.join("; "))
    }
}

/// Defaults, by setting key. Keys are the environment names without the prefix, in lower case.
const DEFAULTS: &[(&str, &str)] = &[
    ("http_host", "127.0.0.1"),
    ("http_port", "8080"),
    ("http_json_limit_bytes", "16777216"),
    ("http_shutdown_grace_seconds", "30"),
    ("api_url", ""),
    ("database_url", "postgres://postgres@127.0.0.1:5432/ferrite"),
    ("database_max_connections", "10"),
    ("database_acquire_timeout_seconds", "5"),
    ("amqp_url", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ("amqp_exchange", "ferrite.events"),
    ("amqp_prefetch", "16"),
    ("amqp_max_deliveries", "5"),
    ("amqp_reconnect_delay_ms", "500"),
    ("store", "./.ferrite/store"),
    ("s3_endpoint", ""),
    ("s3_region", "us-east-1"),
    ("s3_access_key", ""),
    ("s3_secret_key", ""),
    ("multipart_part_bytes", "8388608"),
    ("otlp_endpoint", ""),
    ("log_format", "json"),
    ("log_filter", "info,sqlx=warn,lapin=warn"),
    ("service_name", "ferrite"),
    ("admin_token", ""),
    ("worker_concurrency", "1"),
    ("worker_lease_seconds", "30"),
    ("worker_backend", "local"),
    ("worker_command", ""),
    ("worker_max_attempts", "3"),
    ("worker_scratch_dir", ""),
    ("worker_image", "ghcr.io/ferrite-ml/ferrite:latest"),
    ("kubernetes_namespace", "ferrite"),
    ("dataset_max_line_bytes", "1048576"),
    ("dataset_max_upload_bytes", "10737418240"),
];

/// A bootstrap admin token shorter than this is refused: it guards every other token.
const MIN_ADMIN_TOKEN_CHARS: usize = 24;

/// Raw values by key, before parsing. The later source wins.
type RawSettings = BTreeMap<String, String>;

impl Settings {
    /// Loads settings from defaults, then `file` (YAML, nested or flat keys), then every
    /// `FERRITE_*` entry of `env`.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let mut problems = Vec::new();
        let mut raw: RawSettings = DEFAULTS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();

        if let Some(path) = file {
            match read_file(path) {
                Ok(values) => {
                    for (key, value) in values {
                        match raw.get_mut(&key) {
                            Some(slot) => *slot = value,
                            None => problems
                                .push(format!("{}: unknown setting `{key}`", path.display())),
                        }
                    }
                }
                Err(problem) => problems.push(problem),
            }
        }

        // Unknown FERRITE_ variables are left alone: scripts and tools share the prefix.
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX)
                && let Some(slot) = raw.get_mut(&key.to_ascii_lowercase())
            {
                slot.clone_from(value);
            }
        }

        let mut parser = Parser {
            raw: &raw,
            problems,
        };
        let settings = parser.settings();
        if parser.problems.is_empty() {
            Ok(settings)
        } else {
            Err(SettingsError {
                problems: parser.problems,
            })
        }
    }

    /// Loads from the process environment and `FERRITE_CONFIG` (a file path), if set.
    pub fn from_process_env() -> Result<Self, SettingsError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let file = env.get("FERRITE_CONFIG").map(PathBuf::from);
        Self::load(file.as_deref(), &env)
    }
}

fn read_file(path: &Path) -> Result<RawSettings, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read settings file {}: {e}", path.display()))?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| format!("settings file {} is not valid YAML: {e}", path.display()))?;
    let mut flat = RawSettings::new();
    flatten(&value, String::new(), &mut flat)
        .map_err(|e| format!("settings file {}: {e}", path.display()))?;
    Ok(flat)
}

/// Turns `{http: {port: 80}}` into `http_port = "80"`, so files and variables share keys.
fn flatten(value: &serde_yaml::Value, prefix: String, out: &mut RawSettings) -> Result<(), String> {
    use serde_yaml::Value;
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                let key = key.as_str().ok_or("setting names must be strings")?;
                let key = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}_{key}")
                };
                flatten(child, key, out)?;
            }
        }
        // An empty file, or a key with no value, sets nothing.
        Value::Null if prefix.is_empty() => {}
        Value::Null => {
            out.insert(prefix, String::new());
        }
        Value::Bool(b) => {
            out.insert(prefix, b.to_string());
        }
        Value::Number(n) => {
            out.insert(prefix, n.to_string());
        }
        Value::String(s) => {
            out.insert(prefix, s.clone());
        }
        Value::Sequence(_) | Value::Tagged(_) => {
            return Err(format!("`{prefix}` must be a single value"));
        }
    }
    Ok(())
}

/// Parses raw values, recording every failure instead of stopping at the first.
struct Parser<'a> {
    raw: &'a RawSettings,
    problems: Vec<String>,
}

impl Parser<'_> {
    fn settings(&mut self) -> Settings {
        let http = HttpSettings {
            host: self.parse::<Host>("http_host").0,
            port: self.parse("http_port"),
            json_limit_bytes: self.parse("http_json_limit_bytes"),
            shutdown_grace: Duration::from_secs(self.parse("http_shutdown_grace_seconds")),
            api_url: self.optional_url("api_url", &["http", "https"]),
        };
        let database = DatabaseSettings {
            url: Secret::new(self.url("database_url", &["postgres", "postgresql"])),
            max_connections: self.parse("database_max_connections"),
            acquire_timeout: Duration::from_secs(self.parse("database_acquire_timeout_seconds")),
        };
        let amqp = AmqpSettings {
            url: Secret::new(self.url("amqp_url", &["amqp", "amqps"])),
            exchange: self.text("amqp_exchange"),
            prefetch: self.parse("amqp_prefetch"),
            max_deliveries: self.parse("amqp_max_deliveries"),
            reconnect_delay: Duration::from_millis(self.parse("amqp_reconnect_delay_ms")),
        };
        let store = StoreSettings {
            location: self.store_location(),
            s3_endpoint: self.optional_url("s3_endpoint", &["http", "https"]),
            s3_region: self.text("s3_region"),
            s3_access_key: self.optional_text("s3_access_key").map(Secret::new),
            s3_secret_key: self.optional_text("s3_secret_key").map(Secret::new),
            multipart_part_bytes: self.parse("multipart_part_bytes"),
        };
        if matches!(store.location, StoreLocation::S3 { .. })
            && (store.s3_access_key.is_none() || store.s3_secret_key.is_none())
        {
            // Without keys the S3 client would look for credentials at the cloud metadata
            // address, which is never what a Ferrite install on its own hardware wants.
            self.problems.push(
                "FERRITE_S3_ACCESS_KEY, FERRITE_S3_SECRET_KEY: both are required with an s3:// store"
                    .into(),
            );
        }
        let unparsed = self
            .problems
            .iter()
            .any(|p| p.starts_with("FERRITE_MULTIPART_PART_BYTES"));
        if !unparsed && store.multipart_part_bytes < 5 * 1024 * 1024 {
            // S3 refuses parts under 5 MiB (all but the last).
            self.problems
                .push("FERRITE_MULTIPART_PART_BYTES: must be at least 5242880".into());
        }
        let telemetry = TelemetrySettings {
            otlp_endpoint: self.optional_url("otlp_endpoint", &["http", "https"]),
            log_format: match self.text("log_format").as_str() {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                other => {
                    self.problems.push(format!(
                        "FERRITE_LOG_FORMAT: `{other}` is not `json` or `pretty`"
                    ));
                    LogFormat::Json
                }
            },
            log_filter: self.text("log_filter"),
            service_name: self.text("service_name"),
        };
        let auth = AuthSettings {
            bootstrap_admin_token: self.optional_text("admin_token").map(Secret::new),
        };
        let worker = WorkerSettings {
            concurrency: self.parse("worker_concurrency"),
            lease: Duration::from_secs(self.parse("worker_lease_seconds")),
            backend: match self.text("worker_backend").as_str() {
                "local" => WorkerBackend::Local,
                "kubernetes" => WorkerBackend::Kubernetes,
                other => {
                    self.problems.push(format!(
                        "FERRITE_WORKER_BACKEND: `{other}` is not `local` or `kubernetes`"
                    ));
                    WorkerBackend::Local
                }
            },
            command: self.optional_text("worker_command").map(PathBuf::from),
            max_attempts: self.parse("worker_max_attempts"),
            scratch_dir: self.optional_text("worker_scratch_dir").map(PathBuf::from),
            image: self.text("worker_image"),
            kubernetes_namespace: self.text("kubernetes_namespace"),
        };
        let datasets = DatasetSettings {
            max_line_bytes: self.parse("dataset_max_line_bytes"),
            max_upload_bytes: self.parse("dataset_max_upload_bytes"),
        };
        let settings = Settings {
            http,
            database,
            amqp,
            store,
            telemetry,
            auth,
            worker,
            datasets,
        };
        self.check_ranges(&settings);
        settings
    }

    /// Values that parse but cannot work; each would otherwise fail later, or panic.
    fn check_ranges(&mut self, settings: &Settings) {
        let acquire = settings.database.acquire_timeout.as_secs();
        let rules = [
            (
                settings.http.json_limit_bytes >= 1024,
                "http_json_limit_bytes",
                "at least 1024",
            ),
            (
                settings.database.max_connections >= 1,
                "database_max_connections",
                "at least 1",
            ),
            (
                (1..=600).contains(&acquire),
                "database_acquire_timeout_seconds",
                "1 to 600",
            ),
            (
                !settings.amqp.exchange.trim().is_empty(),
                "amqp_exchange",
                "not empty",
            ),
            (settings.amqp.prefetch >= 1, "amqp_prefetch", "at least 1"),
            (
                settings.amqp.max_deliveries >= 1,
                "amqp_max_deliveries",
                "at least 1",
            ),
            (
                settings.worker.concurrency >= 1,
                "worker_concurrency",
                "at least 1",
            ),
            (
                settings.worker.max_attempts >= 1,
                "worker_max_attempts",
                "at least 1",
            ),
            (
                settings.worker.lease.as_secs() >= 2,
                "worker_lease_seconds",
                "at least 2",
            ),
            (
                !settings.worker.image.trim().is_empty(),
                "worker_image",
                "not empty",
            ),
            (
                !settings.worker.kubernetes_namespace.trim().is_empty(),
                "kubernetes_namespace",
                "not empty",
            ),
            (
                settings.datasets.max_line_bytes >= 64,
                "dataset_max_line_bytes",
                "at least 64",
            ),
            (
                settings.datasets.max_upload_bytes >= 1024,
                "dataset_max_upload_bytes",
                "at least 1024",
            ),
            (
                !settings.store.s3_region.trim().is_empty(),
                "s3_region",
                "not empty",
            ),
            (
                !settings.telemetry.service_name.trim().is_empty(),
                "service_name",
                "not empty",
            ),
        ];
        for (ok, key, rule) in rules {
            // A value that did not parse is reported once, by `parse`.
            let name = env_name(key);
            if !ok && !self.problems.iter().any(|p| p.starts_with(&name)) {
                self.problems.push(format!("{name}: must be {rule}"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&settings.telemetry.log_filter) {
            self.problems.push(format!("FERRITE_LOG_FILTER: {e}"));
        }
        if let Some(token) = &settings.auth.bootstrap_admin_token
            && token.expose().len() < MIN_ADMIN_TOKEN_CHARS
        {
            self.problems.push(format!(
                "FERRITE_ADMIN_TOKEN: must be at least {MIN_ADMIN_TOKEN_CHARS} characters"
            ));
        }
    }

    fn text(&self, key: &str) -> String {
        self.raw.get(key).cloned().unwrap_or_default()
    }

    fn optional_text(&self, key: &str) -> Option<String> {
        Some(self.text(key)).filter(|v| !v.trim().is_empty())
    }

    fn parse<T>(&mut self, key: &str) -> T
    where
        T: std::str::FromStr + Default,
        T::Err: fmt::Display,
    {
        let value = self.text(key);
        value.trim().parse().unwrap_or_else(|e| {
            self.problems
                .push(format!("{}: `{value}` is invalid: {e}", env_name(key)));
            T::default()
        })
    }

    /// A required URL. On a problem it records it and returns a placeholder, so the remaining
    /// fields are still checked; `Settings::load` then returns the problems, never the value.
    fn url(&mut self, key: &str, schemes: &[&str]) -> Url {
        if let Some(url) = self.optional_url(key, schemes) {
            return url;
        }
        if self.optional_text(key).is_none() {
            self.problems
                .push(format!("{}: is required", env_name(key)));
        }
        Url::parse("invalid:placeholder").expect("a constant URL parses")
    }

    fn optional_url(&mut self, key: &str, schemes: &[&str]) -> Option<Url> {
        let value = self.optional_text(key)?;
        match Url::parse(&value) {
            Ok(url) if schemes.contains(&url.scheme()) => Some(url),
            Ok(url) => {
                self.problems.push(format!(
                    "{}: scheme `{}` is not one of {}",
                    env_name(key),
                    url.scheme(),
                    schemes.join(", ")
                ));
                None
            }
            // The value may hold a password, so it is not echoed.
            Err(e) => {
                self.problems
                    .push(format!("{}: not a valid URL: {e}", env_name(key)));
                None
            }
        }
    }

    fn store_location(&mut self) -> StoreLocation {
        let value = self.text("store");
        if let Some(rest) = value.strip_prefix("s3://") {
            let bucket = rest.trim_end_matches('/');
            if bucket.is_empty() || bucket.contains('/') {
                // The value is not echoed: a mistyped one may hold credentials.
                self.problems
                    .push("FERRITE_STORE: an S3 store must be `s3://<bucket>`".into());
            }
            StoreLocation::S3 {
                bucket: bucket.to_owned(),
            }
        } else if value.contains("://") {
            self.problems
                .push("FERRITE_STORE: must be a folder path or `s3://<bucket>`".into());
            StoreLocation::Local(PathBuf::new())
        } else if value.trim().is_empty() {
            self.problems.push("FERRITE_STORE: is required".into());
            StoreLocation::Local(PathBuf::new())
        } else {
            StoreLocation::Local(PathBuf::from(value))
        }
    }
}

/// `IpAddr` has no `Default`, which `Parser::parse` needs as a placeholder after a failure.
struct Host(IpAddr);

impl Default for Host {
    fn default() -> Self {
        Self(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }
}

impl std::str::FromStr for Host {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_load_without_any_environment() {
        let settings = Settings::load(None, &BTreeMap::new()).expect("defaults are valid");
        assert_eq!(settings.http.port, 8080);
        assert_eq!(
            settings.store.location,
            StoreLocation::Local("./.ferrite/store".into())
        );
        assert!(settings.telemetry.otlp_endpoint.is_none());
    }

    #[test]
    fn environment_overrides_defaults() {
        let settings = Settings::load(
            None,
            &env(&[
                ("FERRITE_HTTP_PORT", "0"),
                ("FERRITE_STORE", "s3://models"),
                ("FERRITE_S3_ACCESS_KEY", "key"),
                ("FERRITE_S3_SECRET_KEY", "secret"),
            ]),
        )
        .expect("valid");
        assert_eq!(settings.http.port, 0);
        assert_eq!(
            settings.store.location,
            StoreLocation::S3 {
                bucket: "models".into()
            }
        );
    }

    #[test]
    fn every_bad_value_is_reported_together() {
        let err = Settings::load(
            None,
            &env(&[
                ("FERRITE_DATABASE_URL", "not a url"),
                ("FERRITE_HTTP_PORT", "99999"),
                ("FERRITE_LOG_FORMAT", "xml"),
            ]),
        )
        .expect_err("three bad values");
        let message = err.to_string();
        assert_eq!(err.problems.len(), 3, "{message}");
        assert!(message.contains("FERRITE_DATABASE_URL"), "{message}");
        assert!(message.contains("FERRITE_HTTP_PORT"), "{message}");
        assert!(message.contains("FERRITE_LOG_FORMAT"), "{message}");
    }

    #[test]
    fn a_password_in_a_bad_url_is_not_echoed() {
        let err = Settings::load(None, &env(&[("FERRITE_AMQP_URL", "http://u:s3cret@host")]))
            .expect_err("wrong scheme");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn a_nested_file_sets_values_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("ferrite-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ferrite.yaml");
        std::fs::write(&path, "http:\n  port: 9000\nworker:\n  concurrency: 3\n").expect("write");
        let settings = Settings::load(Some(&path), &BTreeMap::new()).expect("valid file");
        assert_eq!((settings.http.port, settings.worker.concurrency), (9000, 3));

        std::fs::write(&path, "htp:\n  port: 9000\n").expect("write");
        let err = Settings::load(Some(&path), &BTreeMap::new()).expect_err("typo");
        assert!(
            err.to_string().contains("unknown setting `htp_port`"),
            "{err}"
        );
    }

    #[test]
    fn values_that_parse_but_cannot_work_are_reported_with_the_rest() {
        let err = Settings::load(
            None,
            &env(&[
                ("FERRITE_DATABASE_MAX_CONNECTIONS", "0"),
                ("FERRITE_AMQP_EXCHANGE", ""),
                ("FERRITE_LOG_FILTER", "info,[[["),
                ("FERRITE_ADMIN_TOKEN", "short"),
                ("FERRITE_STORE", "s3://AKIA:hunter2@bucket/x"),
                ("FERRITE_S3_ACCESS_KEY", "key"),
                ("FERRITE_S3_SECRET_KEY", "secret"),
            ]),
        )
        .expect_err("five bad values");
        assert_eq!(err.problems.len(), 5, "{err}");
        assert!(
            !err.to_string().contains("hunter2"),
            "credentials are not echoed: {err}"
        );
    }

    #[test]
    fn an_s3_store_without_keys_is_refused_rather_than_asking_the_metadata_service() {
        let err = Settings::load(None, &env(&[("FERRITE_STORE", "s3://models")]))
            .expect_err("keys are required");
        assert!(err.to_string().contains("FERRITE_S3_ACCESS_KEY"), "{err}");
    }

    #[test]
    fn small_multipart_parts_are_refused_because_s3_rejects_them() {
        let err = Settings::load(None, &env(&[("FERRITE_MULTIPART_PART_BYTES", "1024")]))
            .expect_err("too small");
        assert!(err.to_string().contains("FERRITE_MULTIPART_PART_BYTES"));
    }
}
