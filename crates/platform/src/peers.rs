//! Queries from one service to another's REST API.
//!
//! Services never read each other's tables; when one needs another's data at request time (the
//! training runner resolving a dataset version, the gateway a model version) it asks over HTTP.
//! Every path prefix is unique, so one base URL reaches them all: the all-in-one process itself,
//! or the Ingress on Kubernetes (`FERRITE_API_URL`).
//!
//! Each service process issues itself an `engineer` token at start-up, named after the service
//! and the process, and revokes it at shutdown.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

use crate::auth::{Auth, AuthError, Role};
use crate::error::ErrorEnvelope;
use crate::secret::Secret;

/// Why a query to another service failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer answered with an error status; `message` is its error body's message.
    #[error("{method} {path}: {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        /// The peer's error code (`not_found`, ...), when its body had one.
        code: Option<String>,
        message: String,
    },
    /// The peer could not be reached or its answer could not be read.
    #[error("{method} {path}: {source}")]
    Transport {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
}

impl PeerError {
    /// The HTTP status the peer answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            PeerError::Status { status, .. } => Some(*status),
            PeerError::Transport { .. } => None,
        }
    }
}

/// A client for the other services' REST APIs, authenticated as this service.
#[derive(Clone)]
pub struct Peers {
    base: Url,
    http: reqwest::Client,
    token: Secret<String>,
    token_id: uuid::Uuid,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("base", &self.base).finish()
    }
}

impl Peers {
    /// Issues this process's service token and builds the client.
    pub async fn start(auth: &Auth, service: &str, base: Url) -> Result<Self, AuthError> {
        let name = format!("service:{service}:{}", uuid::Uuid::now_v7());
        let issued = auth.issue(&name, Role::Engineer).await?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a client with timeouts only always builds");
        Ok(Self {
            base,
            http,
            token: issued.token,
            token_id: issued.id,
        })
    }

    /// Revokes the service token; called at shutdown.
    pub async fn stop(&self, auth: &Auth) {
        if let Err(error) = auth.revoke(self.token_id).await {
            tracing::warn!(error = %error, "cannot revoke the service token");
        }
    }

    /// The base URL queries go to.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `GET path`, decoded from JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, PeerError> {
        let request = self.http.get(self.url(path));
        self.send("GET", path, request).await
    }

    /// `POST path` with a JSON body, decoded from JSON.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PeerError> {
        let request = self.http.post(self.url(path)).json(body);
        self.send("POST", path, request).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base.as_str().trim_end_matches('/'), path)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, PeerError> {
        let transport = |source| PeerError::Transport {
            method,
            path: path.to_owned(),
            source,
        };
        let mut request = request.bearer_auth(self.token.expose());
        for (name, value) in crate::telemetry::inject_context() {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        if status.is_success() {
            return response.json().await.map_err(transport);
        }
        let body = response.bytes().await.map_err(transport)?;
        let (code, message) = match serde_json::from_slice::<ErrorEnvelope>(&body) {
            Ok(error) => (error.error.code, error.error.message),
            Err(_) => (None, String::from_utf8_lossy(&body).into_owned()),
        };
        Err(PeerError::Status {
            method,
            path: path.to_owned(),
            status: status.as_u16(),
            code,
            message,
        })
    }
}
