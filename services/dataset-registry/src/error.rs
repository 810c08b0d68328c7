//! The registry's errors and the one place they become HTTP statuses.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use ferrite_platform::ApiError;
use ferrite_platform::error::ErrorBody;
use ferrite_platform::peers::PeerError;
use ferrite_platform::storage::StorageError;

use crate::domain::ParseError;
use crate::ingest::IngestError;
use crate::validate::Report;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Authentication and other errors already in the platform's shape.
    #[error("{0}")]
    Api(ApiError),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("dataset `{dataset}` holds {existing} data; this upload is {requested}")]
    KindMismatch {
        dataset: String,
        existing: String,
        requested: String,
    },
    #[error("the {resource} `{name}` does not exist")]
    NotFound {
        resource: &'static str,
        name: String,
    },
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("unsupported Content-Encoding `{0}`; send the body plain or gzip")]
    Encoding(String),
    #[error("the tokenizer model `{reference}` cannot be used: {message}")]
    Tokenizer { reference: String, message: String },
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{context}: {source}")]
    Internal {
        context: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RegistryError {
    pub fn not_found(resource: &'static str, name: impl Into<String>) -> Self {
        Self::NotFound {
            resource,
            name: name.into(),
        }
    }

    fn api_error(&self) -> ApiError {
        match self {
            RegistryError::Api(e) => ApiError::new(
                e.status(),
                &e.body().kind,
                e.body().code.as_deref().unwrap_or("error"),
                e.body().message.clone(),
            ),
            RegistryError::Parse(e) => {
                ApiError::invalid_request("invalid_value", &e.message).with_param(e.field)
            }
            RegistryError::Ingest(IngestError::TooLarge { .. }) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "upload_too_large",
                self.to_string(),
            ),
            RegistryError::Ingest(IngestError::Invalid(report)) => {
                let first = report.problems.first();
                let error = ApiError::invalid_request("invalid_rows", invalid_message(report));
                match first.and_then(place) {
                    Some(place) => error.with_param(place),
                    None => error,
                }
            }
            RegistryError::Ingest(IngestError::Body(_)) => {
                ApiError::invalid_request("unreadable_body", self.to_string())
            }
            RegistryError::Ingest(IngestError::Storage(e)) | RegistryError::Storage(e) => {
                ApiError::internal(e)
            }
            RegistryError::KindMismatch { .. } => {
                ApiError::conflict("kind_mismatch", self.to_string()).with_param("kind")
            }
            RegistryError::NotFound { resource, name } => ApiError::not_found(resource, name),
            RegistryError::Invalid { field, message } => {
                ApiError::invalid_request("invalid_value", message).with_param(*field)
            }
            RegistryError::Encoding(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_encoding",
                self.to_string(),
            ),
            RegistryError::Tokenizer { .. } => {
                ApiError::invalid_request("invalid_tokenizer", self.to_string())
                    .with_param("tokenizer")
            }
            RegistryError::Peer(e) => match e.status() {
                Some(404) => ApiError::invalid_request("tokenizer_not_found", e.to_string())
                    .with_param("tokenizer"),
                _ => ApiError::unavailable("the model registry could not be reached"),
            },
            RegistryError::Database(_) => {
                // sqlx::Error is not Clone; rebuild the mapping from its description.
                ApiError::internal(self)
            }
            RegistryError::Internal { .. } => ApiError::internal(self),
        }
    }
}

impl From<ApiError> for RegistryError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

/// `record 3 (line 1)` for a JSON array element, `line 4` for a line.
fn place(problem: &crate::scan::Problem) -> Option<String> {
    match (problem.record, problem.line) {
        (Some(record), Some(line)) => Some(format!("record {record} (line {line})")),
        (Some(record), None) => Some(format!("record {record}")),
        (None, Some(line)) => Some(format!("line {line}")),
        (None, None) => None,
    }
}

fn invalid_message(report: &Report) -> String {
    let first = report
        .problems
        .first()
        .map(|p| match (place(p), &p.field) {
            (Some(place), Some(field)) => format!("{place}, field `{field}`: {}", p.message),
            (Some(place), None) => format!("{place}: {}", p.message),
            (None, _) => p.message.clone(),
        })
        .unwrap_or_default();
    format!(
        "the upload was refused with {} problem(s); the first: {first}",
        report.total
    )
}

/// A validation report: the standard error body plus `problems` and `problems_total`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ValidationErrorBody {
    #[serde(flatten)]
    pub error: ErrorBody,
    /// The first problems, each `{line, field, message}`.
    pub problems: Vec<crate::scan::Problem>,
    /// How many problems were found in all.
    pub problems_total: u64,
}

impl ResponseError for RegistryError {
    fn status_code(&self) -> StatusCode {
        match self {
            RegistryError::Api(e) => e.status(),
            RegistryError::Parse(_)
            | RegistryError::Ingest(IngestError::Invalid(_) | IngestError::Body(_))
            | RegistryError::Invalid { .. }
            | RegistryError::Tokenizer { .. } => StatusCode::BAD_REQUEST,
            RegistryError::Ingest(IngestError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::KindMismatch { .. } => StatusCode::CONFLICT,
            RegistryError::NotFound { .. } => StatusCode::NOT_FOUND,
            RegistryError::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RegistryError::Peer(e) if e.status() == Some(404) => StatusCode::BAD_REQUEST,
            RegistryError::Peer(_) => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
            ) => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Database(_)
            | RegistryError::Storage(_)
            | RegistryError::Ingest(IngestError::Storage(_))
            | RegistryError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let RegistryError::Api(e) = self {
            return e.error_response();
        }
        if let RegistryError::Database(e) = self {
            return ApiError::from(clone_sqlx(e)).error_response();
        }
        let api = self.api_error();
        match self {
            RegistryError::Ingest(IngestError::Invalid(report)) => {
                HttpResponse::build(api.status()).json(serde_json::json!({
                    "error": ValidationErrorBody {
                        error: api.body().clone(),
                        problems: report.problems.clone(),
                        problems_total: report.total,
                    }
                }))
            }
            _ => api.error_response(),
        }
    }
}

/// The platform maps an unavailable database to 503; keep that distinction for the kinds it
/// checks, everything else is a 500.
fn clone_sqlx(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
