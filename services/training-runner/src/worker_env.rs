//! The settings a local worker process needs, as `FERRITE_*` environment variables.
//!
//! A child inherits the runner's environment, but the runner's settings may have come from a
//! file or, in tests, from a map that never touched the environment. Writing out what the
//! worker reads makes the child see exactly the runner's Postgres, store and worker settings.

use ferrite_platform::Settings;
use ferrite_platform::settings::{LogFormat, StoreLocation};

/// `(name, value)` pairs for a worker's environment. They include secrets (the database URL,
/// S3 keys): pass them only to a child process, never to a log or a manifest.
pub fn worker_env(settings: &Settings) -> Vec<(String, String)> {
    let mut env = vec![
        ("DATABASE_URL", settings.database.url.expose().to_string()),
        ("DATABASE_MAX_CONNECTIONS", "4".to_owned()),
        (
            "DATABASE_ACQUIRE_TIMEOUT_SECONDS",
            settings.database.acquire_timeout.as_secs().to_string(),
        ),
        ("STORE", store_value(&settings.store.location)),
        ("S3_REGION", settings.store.s3_region.clone()),
        (
            "MULTIPART_PART_BYTES",
            settings.store.multipart_part_bytes.to_string(),
        ),
        (
            "WORKER_LEASE_SECONDS",
            settings.worker.lease.as_secs().to_string(),
        ),
        (
            "LOG_FORMAT",
            match settings.telemetry.log_format {
                LogFormat::Json => "json",
                LogFormat::Pretty => "pretty",
            }
            .to_owned(),
        ),
        ("LOG_FILTER", settings.telemetry.log_filter.clone()),
        ("SERVICE_NAME", "ferrite-worker".to_owned()),
    ];
    let optional = [
        (
            "S3_ENDPOINT",
            settings.store.s3_endpoint.as_ref().map(|u| u.to_string()),
        ),
        (
            "S3_ACCESS_KEY",
            settings
                .store
                .s3_access_key
                .as_ref()
                .map(|s| s.expose().clone()),
        ),
        (
            "S3_SECRET_KEY",
            settings
                .store
                .s3_secret_key
                .as_ref()
                .map(|s| s.expose().clone()),
        ),
        (
            "WORKER_SCRATCH_DIR",
            settings
                .worker
                .scratch_dir
                .as_ref()
                .map(|p| p.display().to_string()),
        ),
        (
            "OTLP_ENDPOINT",
            settings
                .telemetry
                .otlp_endpoint
                .as_ref()
                .map(|u| u.to_string()),
        ),
    ];
    env.extend(
        optional
            .into_iter()
            .filter_map(|(name, value)| value.map(|value| (name, value))),
    );
    env.into_iter()
        .map(|(name, value)| {
            (
                format!("{}{name}", ferrite_platform::settings::ENV_PREFIX),
                value,
            )
        })
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
        let written: BTreeMap<String, String> = worker_env(&settings).into_iter().collect();
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
}
