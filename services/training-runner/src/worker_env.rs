//! The settings a worker needs, as the `FERRITE_*` environment variables it reads: one list for
//! both backends, so a setting added for workers reaches local processes and Kubernetes pods
//! alike.
//!
//! A local child inherits the runner's environment, but the runner's settings may have come
//! from a file or, in tests, from a map that never touched the environment. Writing out what
//! the worker reads makes the child see exactly the runner's Postgres, store and worker
//! settings. A pod gets the plain settings in its manifest and the credentials from a
//! Kubernetes Secret.

use std::path::Path;

use ferrite_platform::Settings;
use ferrite_platform::settings::{ENV_PREFIX, LogFormat, StoreLocation};

/// A worker's environment, split by whether a value may be written down in the open.
#[derive(Debug, Clone)]
pub struct WorkerEnv {
    /// Store, lease, pool, telemetry and API settings: fit for a manifest.
    pub plain: Vec<(String, String)>,
    /// The database URL and S3 keys: only for a child process's environment or a Secret,
    /// never for a log or a manifest.
    pub credentials: Vec<(String, String)>,
}

impl WorkerEnv {
    /// Every variable, for a local child process.
    pub fn all(&self) -> Vec<(String, String)> {
        self.plain
            .iter()
            .chain(&self.credentials)
            .cloned()
            .collect()
    }
}

/// The environment of a worker of `settings`, its scratch folder `scratch_dir` where the
/// backend sets one (a pod's volume) and the settings' own otherwise.
pub fn worker_env(settings: &Settings, scratch_dir: Option<&Path>) -> WorkerEnv {
    let log_format = match settings.telemetry.log_format {
        LogFormat::Json => "json",
        LogFormat::Pretty => "pretty",
    };
    let plain = [
        ("STORE", Some(store_value(&settings.store.location))),
        ("S3_REGION", Some(settings.store.s3_region.clone())),
        (
            "S3_ENDPOINT",
            settings.store.s3_endpoint.as_ref().map(ToString::to_string),
        ),
        (
            "MULTIPART_PART_BYTES",
            Some(settings.store.multipart_part_bytes.to_string()),
        ),
        // A worker holds a lease, heartbeats and writes metrics: a few connections suffice.
        ("DATABASE_MAX_CONNECTIONS", Some("4".to_owned())),
        (
            "DATABASE_ACQUIRE_TIMEOUT_SECONDS",
            Some(settings.database.acquire_timeout.as_secs().to_string()),
        ),
        (
            "WORKER_LEASE_SECONDS",
            Some(settings.worker.lease.as_secs().to_string()),
        ),
        (
            "WORKER_MAX_ATTEMPTS",
            Some(settings.worker.max_attempts.to_string()),
        ),
        (
            "WORKER_SCRATCH_DIR",
            scratch_dir
                .or(settings.worker.scratch_dir.as_deref())
                .map(|dir| dir.display().to_string()),
        ),
        (
            "API_URL",
            settings.http.api_url.as_ref().map(ToString::to_string),
        ),
        ("LOG_FORMAT", Some(log_format.to_owned())),
        ("LOG_FILTER", Some(settings.telemetry.log_filter.clone())),
        ("SERVICE_NAME", Some("ferrite-worker".to_owned())),
        (
            "OTLP_ENDPOINT",
            settings
                .telemetry
                .otlp_endpoint
                .as_ref()
                .map(ToString::to_string),
        ),
    ];
    let credentials = [
        (
            "DATABASE_URL",
            Some(settings.database.url.expose().to_string()),
        ),
        (
            "S3_ACCESS_KEY",
            settings
                .store
                .s3_access_key
                .as_ref()
                .map(|key| key.expose().clone()),
        ),
        (
            "S3_SECRET_KEY",
            settings
                .store
                .s3_secret_key
                .as_ref()
                .map(|key| key.expose().clone()),
        ),
    ];
    WorkerEnv {
        plain: variables(plain),
        credentials: variables(credentials),
    }
}

/// The set values, named as the environment names them.
fn variables<const N: usize>(values: [(&str, Option<String>); N]) -> Vec<(String, String)> {
    values
        .into_iter()
        .filter_map(|(name, value)| Some((format!("{ENV_PREFIX}{name}"), value?)))
        .collect()
}

fn store_value(location: &StoreLocation) -> String {
    match location {
        StoreLocation::Local(path) => path.display().to_string(),
        StoreLocation::S3 { bucket } => format!("s3://{bucket}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The worker must load the same store, database and lease from the written variables.
    #[test]
    fn settings_survive_the_trip_through_the_environment() {
        let given: BTreeMap<String, String> = [
            (
                "FERRITE_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/jobs_test",
            ),
            ("FERRITE_STORE", "s3://ferrite-bucket"),
            ("FERRITE_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("FERRITE_S3_ACCESS_KEY", "key"),
            ("FERRITE_S3_SECRET_KEY", "secret"),
            ("FERRITE_WORKER_LEASE_SECONDS", "7"),
            ("FERRITE_WORKER_SCRATCH_DIR", "/tmp/scratch"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let settings = Settings::load(None, &given).expect("valid settings");
        let written: BTreeMap<String, String> =
            worker_env(&settings, None).all().into_iter().collect();
        let back = Settings::load(None, &written).expect("the written variables are valid");

        assert_eq!(
            back.database.url.expose().as_str(),
            "postgres://postgres@127.0.0.1:5432/jobs_test"
        );
        assert_eq!(
            back.store.location,
            StoreLocation::S3 {
                bucket: "ferrite-bucket".into()
            }
        );
        assert_eq!(
            back.store.s3_endpoint.as_ref().map(url::Url::as_str),
            Some("http://127.0.0.1:9000/")
        );
        assert_eq!(
            back.store.s3_secret_key.map(|s| s.expose().clone()),
            Some("secret".into())
        );
        assert_eq!(back.worker.lease.as_secs(), 7);
        assert_eq!(back.worker.scratch_dir, Some("/tmp/scratch".into()));
    }

    /// A manifest gets `plain` only: no credential may be in it, and every credential must be
    /// in `credentials`, or a pod would start without it.
    #[test]
    fn credentials_stay_out_of_the_plain_half() {
        let given: BTreeMap<String, String> = [
            (
                "FERRITE_DATABASE_URL",
                "postgres://user:db-pass@127.0.0.1/x",
            ),
            ("FERRITE_STORE", "s3://bucket"),
            ("FERRITE_S3_ACCESS_KEY", "access-id"),
            ("FERRITE_S3_SECRET_KEY", "s3-pass"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let settings = Settings::load(None, &given).expect("valid settings");
        let env = worker_env(&settings, Some(Path::new("/scratch")));

        for (name, value) in &env.plain {
            for secret in ["db-pass", "access-id", "s3-pass"] {
                assert!(!value.contains(secret), "{name} holds a credential");
            }
        }
        let names: Vec<&str> = env.credentials.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "FERRITE_DATABASE_URL",
                "FERRITE_S3_ACCESS_KEY",
                "FERRITE_S3_SECRET_KEY"
            ]
        );
        let plain: BTreeMap<&str, &str> = env
            .plain
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            plain["FERRITE_WORKER_SCRATCH_DIR"], "/scratch",
            "the backend's folder wins"
        );
    }
}
