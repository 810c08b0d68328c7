//! The one JSON error body every Ferrite endpoint returns, in the OpenAI shape.
//!
//! Policy: handlers return typed errors of their own module and convert them into [`ApiError`]
//! in one `From` impl per module, which picks the status. Client errors say what and where
//! (the `param` names the field or line). A 500 says nothing internal; its cause chain goes to
//! the log once, here, where it is turned into a response.

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An error as clients see it: `{"error": {"message", "type", "code", "param"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A sentence for humans.
    pub message: String,
    /// The class of error, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A stable snake_case code per failure, e.g. `model_not_found`.
    pub code: Option<String>,
    /// The request field (or line) at fault.
    pub param: Option<String>,
}

/// The most characters of one word (a run without spaces: a name, a value the client sent)
/// that an error message keeps; a longer one is cut and ends in `…`.
const WORD_CHARS: usize = 200;

/// The most characters an error message or `param` keeps, for values with spaces in them.
const MESSAGE_CHARS: usize = 2_000;

/// `text` with each word over [`WORD_CHARS`] cut, and the whole cut at [`MESSAGE_CHARS`].
///
/// Messages echo what the client sent (`` `name` is not a valid name ``) so that it can find
/// the value at fault; a few hundred characters are enough to find it, and echoing it whole
/// would make a 3 MB name a 3 MB error body (and a 3 MB log line wherever it is logged).
fn clipped(text: String) -> String {
    let long = |piece: &str, limit: usize| piece.chars().nth(limit).is_some();
    if !text.split_whitespace().any(|word| long(word, WORD_CHARS)) && !long(&text, MESSAGE_CHARS) {
        return text;
    }
    let mut out = String::new();
    for piece in text.split_inclusive(char::is_whitespace) {
        let word = piece.trim_end_matches(char::is_whitespace);
        if long(word, WORD_CHARS) {
            out.extend(word.chars().take(WORD_CHARS));
            out.push('…');
            // The quote or bracket that closed the value still closes it.
            out.extend(word.chars().last().filter(char::is_ascii_punctuation));
            out.push_str(&piece[word.len()..]);
        } else {
            out.push_str(piece);
        }
    }
    if long(&out, MESSAGE_CHARS) {
        out = out.chars().take(MESSAGE_CHARS).chain(['…']).collect();
    }
    out
}

impl ApiError {
    /// An error with `message`, each value it echoes cut to a few hundred characters.
    pub fn new(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                message: clipped(message.into()),
                kind: kind.to_owned(),
                code: Some(code.to_owned()),
                param: None,
            },
        }
    }

    /// Names the request field or line at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.body.param = Some(clipped(param.into()));
        self
    }

    /// 400: the request is malformed or a field is invalid.
    pub fn invalid_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// 401: no valid credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    /// 403: valid credentials without the needed role.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "insufficient_role",
            message,
        )
    }

    /// 404 for a named resource kind, e.g. `not_found("model", "gpt-x")`.
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("{resource}_not_found"),
            format!("the {resource} `{name}` does not exist"),
        )
    }

    /// 409: the request conflicts with the current state.
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", code, message)
    }

    /// 503: a dependency is down; the client may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "unavailable",
            message,
        )
    }

    /// 500. The cause is logged with its whole chain; the client sees a generic sentence.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %ErrorChain(cause), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "the server failed to handle the request",
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.body.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(ErrorEnvelope {
            error: self.body.clone(),
        })
    }
}

impl From<sqlx::Error> for ApiError {
    /// Postgres being away or saturated is a 503 the client may retry; anything else is a bug.
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %ErrorChain(&e), "database unavailable");
                Self::unavailable("the database is unavailable; retry shortly")
            }
            e => Self::internal(&e),
        }
    }
}

/// Displays an error and all its sources, `outer: inner: innermost`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// A body that is not JSON at all, with the line and column where parsing stopped.
pub(crate) fn syntax_error(e: &serde_json::Error) -> ApiError {
    ApiError::invalid_request("invalid_json", format!("the body is not valid JSON: {e}"))
        .with_param(format!("line {}, column {}", e.line(), e.column()))
}

/// serde names the field in backticks in "missing field `model`", "unknown field `x`" and
/// "duplicate field `x`", as the JSON extractor does in "duplicate key `x`"; in other messages
/// a backticked word is a value, not a field.
pub(crate) fn field_in_message(message: &str) -> Option<String> {
    let named = [
        "missing field",
        "unknown field",
        "duplicate field",
        "duplicate key",
    ];
    if !named.iter().any(|prefix| message.starts_with(prefix)) {
        return None;
    }
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}

/// The 415 for a JSON route's body sent as another content type (or none); `sent` says what
/// the request declared instead, to finish the sentence "the request declared ...".
pub(crate) fn not_json(sent: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "invalid_content_type",
        format!(
            "the body must be JSON, sent with `Content-Type: application/json`; the request \
             declared {sent}"
        ),
    )
}

/// The 415 for a JSON body declared in another charset than UTF-8, the only one read.
pub(crate) fn not_utf8(charset: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "invalid_content_type",
        format!(
            "the body must be JSON in UTF-8, the only encoding read; the request declared \
             `charset={charset}`"
        ),
    )
}

/// The 413 for a body whose `Content-Length` is over the limit, refused before it is read.
pub(crate) fn body_too_large(length: usize, limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "body_too_large",
        format!("the body is {length} bytes; the limit is {limit}"),
    )
}

/// The 413 every service answers for a body over the configured limit.
pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "body_too_large",
        format!("the body exceeds the limit of {limit} bytes"),
    )
}

/// Raw body (`Bytes`, `String`) extractor settings: the same limit as JSON bodies, instead of
/// actix's 256 KiB default.
pub fn payload_config(limit_bytes: usize) -> actix_web::web::PayloadConfig {
    actix_web::web::PayloadConfig::new(limit_bytes)
}

/// A raw body extractor's failure in the standard shape. `PayloadConfig` takes no error
/// handler, so a handler that reads `Result<Bytes, actix_web::Error>` passes the error here.
pub fn payload_error(error: &actix_web::Error, limit_bytes: usize) -> ApiError {
    let status = error.as_response_error().status_code();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit_bytes)
    } else {
        ApiError::new(
            status,
            "invalid_request_error",
            "invalid_body",
            format!("cannot read the body: {error}"),
        )
    }
}

/// Query-string extractor settings: a bad or repeated parameter is a 400 in the usual shape,
/// naming the parameter when serde names it (missing, unknown, duplicate); a value that does
/// not parse (`limit=abc`) comes with serde's sentence only, as serde_urlencoded does not say
/// which parameter held it.
pub fn query_config() -> actix_web::web::QueryConfig {
    actix_web::web::QueryConfig::default().error_handler(|err, _req| query_error(&err).into())
}

fn query_error(err: &actix_web::error::QueryPayloadError) -> ApiError {
    let message = match err {
        actix_web::error::QueryPayloadError::Deserialize(e) => e.to_string(),
        other => other.to_string(),
    };
    let param = field_in_message(&message);
    let error =
        ApiError::invalid_request("invalid_query", format!("invalid query string: {message}"));
    match param {
        Some(param) => error.with_param(param),
        None => error,
    }
}

/// Path extractor settings: an unparsable path segment (a bad id) is a 400 in the usual shape.
pub fn path_config() -> actix_web::web::PathConfig {
    actix_web::web::PathConfig::default().error_handler(|err, _req| {
        ApiError::invalid_request("invalid_path", format!("invalid path parameter: {err}")).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_openai_shape() {
        let error = ApiError::invalid_request("invalid_value", "bad").with_param("max_tokens");
        let json = serde_json::to_value(ErrorEnvelope {
            error: error.body().clone(),
        })
        .expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "bad", "type": "invalid_request_error",
                "code": "invalid_value", "param": "max_tokens"
            }})
        );
    }

    #[test]
    fn a_repeated_query_parameter_is_named() {
        #[derive(Debug, serde::Deserialize)]
        #[expect(dead_code, reason = "only deserialised")]
        struct Query {
            kind: String,
        }
        // serde_urlencoded reports a repeated key as serde's "duplicate field `kind`".
        let err =
            actix_web::web::Query::<Query>::from_query("kind=a&kind=b").expect_err("duplicate");
        let error = query_error(&err);
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.body().param.as_deref(), Some("kind"));
        assert_eq!(error.body().code.as_deref(), Some("invalid_query"));
    }

    #[test]
    fn an_unparsable_query_value_is_a_400_without_a_guessed_param() {
        #[derive(Debug, serde::Deserialize)]
        #[expect(dead_code, reason = "only deserialised")]
        struct Query {
            limit: u32,
        }
        let err =
            actix_web::web::Query::<Query>::from_query("limit=abc").expect_err("not a number");
        let error = query_error(&err);
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            error.body().param,
            None,
            "serde_urlencoded does not name it"
        );
    }

    #[test]
    fn an_echoed_value_is_cut_to_a_few_hundred_characters() {
        // Regression: a 3 MB name came back whole in the message and the param.
        let name = "x".repeat(3 << 20);
        let error = ApiError::invalid_request(
            "invalid_value",
            format!("`{name}` is not a valid name; use letters"),
        )
        .with_param(format!("models.{name}"));
        // The backtick and the first 199 `x`s (200 characters), the ellipsis, the closing
        // backtick; the rest of the sentence stays.
        let kept = format!("`{}…` is not a valid name; use letters", "x".repeat(199));
        assert_eq!(error.body().message, kept);
        assert_eq!(
            error.body().param.as_deref().map(|p| p.chars().count()),
            Some(201)
        );
        // A long value made of short words is cut as a whole, after 2,000 characters.
        let words = "ab ".repeat(1_000);
        let error = ApiError::invalid_request("invalid_value", words);
        assert_eq!(error.body().message.chars().count(), MESSAGE_CHARS + 1);
        assert!(error.body().message.ends_with('…'));
        // A short message is left as it is.
        assert_eq!(
            ApiError::conflict("c", "`a b` exists").body().message,
            "`a b` exists"
        );
    }

    #[test]
    fn an_internal_error_hides_its_cause() {
        let cause = std::io::Error::other("password=abc at db-7");
        let error = ApiError::internal(&cause);
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.body().message.contains("password"));
    }
}
