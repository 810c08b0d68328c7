//! The services' REST APIs as the pipeline runner uses them.
//!
//! Answers are kept as JSON: the runner reads a few fields from each and records the rest in
//! the run's state and report as the services sent them.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

/// An authenticated client of one running Ferrite.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

/// A request the service answered with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{method} {path}: {status}: {message}")]
pub struct ApiFailure {
    pub method: &'static str,
    pub path: String,
    pub status: u16,
    pub message: String,
}

impl Client {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let request = self.http.get(self.url(path));
        self.send("GET", path, request).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self.http.post(self.url(path)).json(body);
        self.send("POST", path, request).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self.http.put(self.url(path)).json(body);
        self.send("PUT", path, request).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        let request = self.http.delete(self.url(path));
        self.send("DELETE", path, request).await
    }

    /// `None` when `path` answers 404; any other error is returned.
    pub async fn get_optional(&self, path: &str) -> anyhow::Result<Option<Value>> {
        match self.get(path).await {
            Ok(value) => Ok(Some(value)),
            Err(error) => match error.downcast_ref::<ApiFailure>() {
                Some(failure) if failure.status == 404 => Ok(None),
                _ => Err(error),
            },
        }
    }

    /// Uploads a dataset version from bytes already read (and sliced) by the runner.
    pub async fn upload_dataset(
        &self,
        name: &str,
        kind: &str,
        format: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let path = format!("/v1/datasets/{name}/versions?kind={kind}&format={format}");
        let request = self.http.post(self.url(&path)).body(body);
        self.send("POST", &path, request).await
    }

    /// A chat completion through the gateway, and the serving version it names.
    pub async fn chat(
        &self,
        model: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> anyhow::Result<(Value, Option<String>)> {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        let path = "/v1/chat/completions";
        let response = self
            .authorised(self.http.post(self.url(path)).json(&body))
            .send()
            .await
            .with_context(|| format!("no answer from POST {path}"))?;
        let version = response
            .headers()
            .get("x-ferrite-model-version")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok((read("POST", path, response).await?, version))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.bearer_auth(&self.token)
    }

    async fn send(
        &self,
        method: &'static str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<Value> {
        let response = self
            .authorised(request)
            .send()
            .await
            .with_context(|| format!("no answer from {method} {path} at {}", self.base))?;
        read(method, path, response).await
    }
}

async fn read(
    method: &'static str,
    path: &str,
    response: reqwest::Response,
) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("{method} {path}: the answer could not be read"))?;
    if !status.is_success() {
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .map_or_else(|| text.chars().take(300).collect(), str::to_owned);
        return Err(ApiFailure {
            method,
            path: path.to_owned(),
            status: status.as_u16(),
            message,
        }
        .into());
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: the answer is not JSON"))
}

/// The file's format as the dataset registry names it, from its extension.
pub fn dataset_format(path: &Path) -> &'static str {
    match path.extension().and_then(|ext| ext.to_str()) {
        Some("jsonl") => "jsonl",
        Some("json") => "json",
        _ => "text",
    }
}

/// A string field of a JSON answer, or an error naming it.
pub fn field<'a>(value: &'a Value, name: &str, what: &str) -> anyhow::Result<&'a str> {
    value[name]
        .as_str()
        .with_context(|| format!("{what} has no `{name}` string: {value}"))
}
