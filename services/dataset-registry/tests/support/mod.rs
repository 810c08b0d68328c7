//! A dataset registry on port 0 with its own database, exchange and s3s-fs store.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use ferrite_dataset_registry::DatasetRegistry;
use ferrite_platform::ServiceModule;
use sqlx::PgPool;

use crate::common::TestDatabase;
use crate::common::app::{ADMIN_TOKEN, TestApp, spawn_modules, test_env};
use crate::common::s3::S3Server;

/// The running registry and the s3s-fs store it writes to.
pub struct Registry {
    pub app: TestApp,
    pub s3: S3Server,
}

/// Starts the registry (plus `extra` modules) with settings `extra_env` on top of the usual.
pub async fn spawn_with(
    extra_env: &[(&str, &str)],
    extra: Vec<Box<dyn ServiceModule>>,
) -> Registry {
    let s3 = S3Server::start().await;
    let database = TestDatabase::create().await;
    let mut overrides = s3.env();
    overrides.extend(
        extra_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let env = test_env(&database.name, &overrides);
    let mut modules: Vec<Box<dyn ServiceModule>> = vec![Box::new(DatasetRegistry)];
    modules.extend(extra);
    let app = spawn_modules(database, env, modules).await;
    Registry { app, s3 }
}

pub async fn spawn(extra_env: &[(&str, &str)]) -> Registry {
    spawn_with(extra_env, Vec::new()).await
}

impl Registry {
    /// Uploads `body` to `/v1/datasets/{name}/versions?{query}`; gzip-encoded when `gzip`.
    pub async fn upload(
        &self,
        name: &str,
        query: &str,
        body: Vec<u8>,
        gzip: bool,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut request = self
            .app
            .client
            .post(
                self.app
                    .url(&format!("/v1/datasets/{name}/versions?{query}")),
            )
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/octet-stream");
        if gzip {
            request = request.header("content-encoding", "gzip");
        }
        let response = request
            .body(body)
            .send()
            .await
            .expect("the registry answers");
        let status = response.status();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        self.app.call(method, path, Some(ADMIN_TOKEN), body).await
    }

    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// The stored bytes of a version, through the download route.
    pub async fn content(&self, version_id: &str) -> Vec<u8> {
        let response = self
            .app
            .client
            .get(
                self.app
                    .url(&format!("/v1/datasets/versions/{version_id}/content")),
            )
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the registry answers");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("a body").to_vec()
    }

    /// A pool on the registry's own schema.
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&format!(
            "postgres://postgres@127.0.0.1:5432/{}?options=-c%20search_path%3Ddataset_registry",
            self.app.database.name
        ))
        .await
        .expect("connect to the registry schema")
    }

    /// Rows in the registry's tables and its outbox, in that order.
    pub async fn row_counts(&self) -> [i64; 4] {
        let pool = self.pool().await;
        let mut counts = [0; 4];
        for (i, table) in ["datasets", "dataset_versions", "dataset_aliases", "outbox"]
            .iter()
            .enumerate()
        {
            counts[i] = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .expect("count rows");
        }
        pool.close().await;
        counts
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}

/// `rows` SFT rows in JSONL, numbered so each is distinct.
pub fn sft_jsonl(rows: usize) -> Vec<u8> {
    (0..rows)
        .map(|i| {
            format!("{{\"instruction\": \"Say {i}\", \"input\": \"\", \"output\": \"{i}\"}}\n")
        })
        .collect::<String>()
        .into_bytes()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).expect("gzip in memory");
    encoder.finish().expect("gzip in memory")
}
