//! The JSON body extractor of every route: a refusal names the path of the value at fault.

mod keys;
mod objects;

use std::ops::{Deref, DerefMut};

use actix_web::body::{BodyStream, to_bytes_limited};
use actix_web::dev::{Decompress, Payload};
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::{FromRequest, HttpMessage, HttpRequest, mime};
use bytes::Bytes;
use futures::future::LocalBoxFuture;
use serde::de::DeserializeOwned;
use serde_json::error::Category;
use serde_path_to_error::Path;

use self::objects::ObjectsOnly;
use crate::error::{
    ApiError, body_too_large, field_in_message, not_json, not_utf8, payload_error, syntax_error,
    too_large,
};

/// The largest JSON body a route reads, in bytes (`http.json_limit_bytes`). [`Json`] reads it
/// from the app data, where [`crate::Application`] puts it.
#[derive(Debug, Clone, Copy)]
pub struct JsonLimit(pub usize);

/// A request body of `application/json` (or any `application/*+json` type) parsed as `T`.
///
/// Unlike actix's `web::Json`, a value of the wrong type is refused with its full path as
/// `param` (`hyper_parameters.lr`, `messages[1].content`) rather than with serde's sentence
/// alone, which says what was wrong but not where, a struct is read from a JSON object
/// only, never from an array, and no object may repeat a key, whatever type reads it. A body
/// over [`JsonLimit`] is a 413, one of another content type (or none, or two), or of another
/// charset than UTF-8, a 415 `invalid_content_type`, and one that is not JSON a 400 naming the
/// line and column.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T> Json<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Json<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Json<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let checked = admit(req);
        // Gzip and deflate bodies are inflated as actix's own extractors do; the limit applies
        // to the inflated bytes.
        let stream = Decompress::from_headers(payload.take(), req.headers());
        Box::pin(async move {
            let limit = checked?;
            let bytes = read(stream, limit).await?;
            from_slice(&bytes).map(Json)
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a route reads a JSON body, but the application registers no `JsonLimit`")]
struct NoLimit;

/// Everything that can be refused before reading: the content type, then a `Content-Length`
/// over the limit. Returns the limit to read under.
fn admit(req: &HttpRequest) -> Result<usize, ApiError> {
    let limit = req
        .app_data::<JsonLimit>()
        .ok_or_else(|| ApiError::internal(&NoLimit))?
        .0;
    declares_json(req)?;
    // An unreadable `Content-Length` is left to the read, which counts the bytes themselves.
    let length = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    match length {
        Some(length) if length > limit => Err(body_too_large(length, limit)),
        _ => Ok(limit),
    }
}

/// Whether the body is declared JSON in UTF-8: `application/json` or
/// `application/<anything>+json`, declared once, with no charset or `utf-8`.
///
/// A request without `Content-Type` is refused too. Every client that means to send JSON says
/// so (OpenAI's SDKs, reqwest's `.json`, `curl --json` or `-H`), so refusing it costs no real
/// client, while reading an undeclared body as JSON on a guess hides the client's mistake: a
/// form body (`a=1`) would come back as a JSON syntax error at column 1 rather than as the
/// header to add. `curl -d` without `-H` declares `application/x-www-form-urlencoded`, and the
/// 415 names that type.
///
/// The body is always read as UTF-8 (RFC 8259 makes it JSON's only encoding on the wire), so
/// another declared charset would be read as something the client did not send. Two
/// `Content-Type` headers are refused rather than one picked: a proxy reading the other one
/// would disagree about what the body is.
fn declares_json(req: &HttpRequest) -> Result<(), ApiError> {
    if req.headers().get_all(CONTENT_TYPE).nth(1).is_some() {
        return Err(not_json("more than one `Content-Type`"));
    }
    let mime = match req.mime_type() {
        Ok(Some(mime)) => mime,
        Ok(None) => return Err(not_json("no `Content-Type`")),
        Err(_) => return Err(not_json("an unreadable `Content-Type`")),
    };
    // `application/json+x` parses as subtype `json` with suffix `x`: not JSON.
    let json = match mime.suffix() {
        Some(suffix) => suffix == "json",
        None => mime.subtype() == "json",
    };
    if mime.type_() != "application" || !json {
        return Err(not_json(&format!("`{}`", mime.essence_str())));
    }
    match mime.get_param(mime::CHARSET) {
        Some(charset) if !charset.as_str().eq_ignore_ascii_case("utf-8") => {
            Err(not_utf8(charset.as_str()))
        }
        _ => Ok(()),
    }
}

async fn read(stream: Decompress<Payload>, limit: usize) -> Result<Bytes, ApiError> {
    match to_bytes_limited(BodyStream::new(stream), limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => Err(payload_error(&actix_web::Error::from(error), limit)),
        Err(_over_the_limit) => Err(too_large(limit)),
    }
}

/// Parses a whole body as `T`, trailing input refused as `serde_json::from_slice` refuses it.
/// A syntax error is a 400 `invalid_json` naming its line and column; a value of the wrong
/// type (an array where a struct belongs among them), a missing or unknown field, or a key
/// repeated in any object, a 400 `invalid_value` naming its path.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    // The path is tracked outside the object check, so a refused array is named by its path.
    let checked = ObjectsOnly(&mut deserializer);
    let value = serde_path_to_error::deserialize(checked).map_err(|error| {
        let inner = error.inner();
        // serde_json calls a token a plain enum cannot start with (`"role": 7`) a syntax error;
        // if the body is valid JSON, the fault is the value at the path, not the syntax.
        let valid_json = || serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
        if inner.classify() == Category::Data || valid_json() {
            value_error(error.path(), inner)
        } else {
            syntax_error(inner)
        }
    })?;
    deserializer.end().map_err(|error| syntax_error(&error))?;
    Ok(value)
}

fn value_error(path: &Path, error: &serde_json::Error) -> ApiError {
    let message = plain_words(&error.to_string());
    match param(path, &message) {
        Some(param) => ApiError::invalid_request("invalid_value", format!("`{param}`: {message}"))
            .with_param(param),
        None => ApiError::invalid_request("invalid_value", format!("invalid body: {message}")),
    }
}

/// serde's message with the Rust it leaks put in the client's words: the names of types
/// (`expected struct RegisterVersion`) say nothing to a client, an untagged enum's message
/// names the enum and none of its forms, and the position serde_json appends is redundant
/// next to the path (and `column 0` when the value came from serde's buffer).
fn plain_words(message: &str) -> String {
    if message.starts_with("data did not match any variant of untagged enum") {
        return "matches none of the forms this value can take".to_owned();
    }
    let message = match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => &message[..at],
        _ => message,
    };
    let mut words = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("expected ") {
        let after = &rest[at + "expected ".len()..];
        let kinds = [
            ("struct variant ", "a JSON object"),
            ("tuple struct ", "a list"),
            ("struct ", "a JSON object"),
            ("internally tagged enum ", "a JSON object with its tag"),
            ("adjacently tagged enum ", "a JSON object with its tag"),
            ("enum ", "one of its allowed values"),
        ];
        let Some((kind, plain)) = kinds.iter().find(|(kind, _)| after.starts_with(kind)) else {
            words.push_str(&rest[..at + "expected ".len()]);
            rest = after;
            continue;
        };
        let name = &after[kind.len()..];
        let end = name
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(name.len());
        words.push_str(&rest[..at + "expected ".len()]);
        words.push_str(plain);
        rest = &name[end..];
    }
    words.push_str(rest);
    words
}

/// The full path of the value at fault, or `None` when it is the body itself. A missing field
/// was never entered, so the path ends at its object and serde's message names the field; an
/// unknown or repeated one was read before it was refused, so the path already ends with it.
/// A key serde_path_to_error cannot read as text (one read as an enum variant) ends the path
/// as `?`; the message names it, so the `?` gives way to the name.
fn param(path: &Path, message: &str) -> Option<String> {
    let mut object = path.iter().next().is_some().then(|| path.to_string());
    let entered = ["unknown field", "duplicate key"];
    let mut in_path = entered.iter().any(|prefix| message.starts_with(prefix));
    if in_path && let Some(known) = object.as_deref().and_then(|o| o.strip_suffix('?')) {
        object = Some(known.trim_end_matches('.').to_owned()).filter(|o| !o.is_empty());
        in_path = false;
    }
    let field = field_in_message(message).filter(|_| !in_path);
    match (object, field) {
        (Some(object), Some(field)) => Some(format!("{object}.{field}")),
        (object, field) => object.or(field),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use actix_web::http::StatusCode;
    use serde::Deserialize;

    use super::*;

    #[test]
    fn a_missing_top_level_field_is_named_in_param() {
        #[derive(Debug, Deserialize)]
        #[expect(dead_code, reason = "only deserialised")]
        struct Request {
            model: String,
        }
        let error = from_slice::<Request>(b"{}").expect_err("missing field");
        assert_eq!(error.body().param.as_deref(), Some("model"));
    }

    #[test]
    fn a_bad_value_is_not_mistaken_for_a_field_name() {
        #[derive(Debug, Deserialize)]
        enum Role {
            Admin,
        }
        let error = from_slice::<Role>(b"\"root\"").expect_err("unknown variant");
        assert_eq!(error.body().param, None, "`root` is the value, not a field");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialised")]
    struct Job {
        kind: String,
        #[serde(default)]
        hyper_parameters: Option<HyperParameters>,
        #[serde(default)]
        messages: Vec<Message>,
        #[serde(default)]
        labels: BTreeMap<String, u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialised")]
    struct HyperParameters {
        lr: f64,
    }

    #[derive(Debug, Deserialize)]
    #[expect(dead_code, reason = "only deserialised")]
    struct Message {
        role: Role,
        content: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Role {
        User,
    }

    fn refusal(body: &str) -> ApiError {
        from_slice::<Job>(body.as_bytes()).expect_err("refused")
    }

    fn param(body: &str) -> Option<String> {
        refusal(body).body().param.clone()
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_full_path() {
        let error = refusal(r#"{"kind": "sft", "hyper_parameters": {"lr": "fast"}}"#);
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.body().code.as_deref(), Some("invalid_value"));
        assert_eq!(error.body().param.as_deref(), Some("hyper_parameters.lr"));
        let message = &error.body().message;
        assert!(
            message.starts_with("`hyper_parameters.lr`: invalid type: string \"fast\""),
            "the message says where and what: {message}"
        );
        // The second message (index 1), not the first, holds the number.
        let messages = r#"{"kind": "sft", "messages": [{"role": "user", "content": "hi"},
            {"role": "user", "content": 5}]}"#;
        assert_eq!(param(messages).as_deref(), Some("messages[1].content"));
        let role = r#"{"kind": "sft", "messages": [{"role": "root", "content": "hi"}]}"#;
        assert_eq!(param(role).as_deref(), Some("messages[0].role"));
        assert_eq!(
            param(r#"{"kind": "sft", "labels": {"tier": "gold"}}"#).as_deref(),
            Some("labels.tier")
        );
    }

    #[test]
    fn missing_unknown_and_repeated_fields_are_named_inside_their_object() {
        assert_eq!(
            param(r#"{"kind": "sft", "hyper_parameters": {}}"#).as_deref(),
            Some("hyper_parameters.lr")
        );
        assert_eq!(
            param(r#"{"kind": "sft", "hyper_parameters": {"lr": 1, "epochs": 2}}"#).as_deref(),
            Some("hyper_parameters.epochs")
        );
        assert_eq!(
            param(r#"{"kind": "sft", "hyper_parameters": {"lr": 1, "lr": 2}}"#).as_deref(),
            Some("hyper_parameters.lr")
        );
        // A field named like its object is still appended: the path stops at the object.
        assert_eq!(
            param(r#"{"kind": "sft", "messages": [{"content": "hi"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(param("{}").as_deref(), Some("kind"));
        assert_eq!(
            param(r#"{"kind": "sft", "epochs": 3}"#).as_deref(),
            Some("epochs")
        );
    }

    #[test]
    fn serde_messages_are_put_in_the_clients_words() {
        // Regression: messages named Rust types and serde_json's position of a buffered value.
        for (serde, plain) in [
            (
                "invalid type: sequence, expected struct RegisterVersion at line 1 column 0",
                "invalid type: sequence, expected a JSON object",
            ),
            (
                "data did not match any variant of untagged enum VersionSelector",
                "matches none of the forms this value can take",
            ),
            (
                "invalid type: integer `5`, expected struct variant Schedule::Cosine",
                "invalid type: integer `5`, expected a JSON object",
            ),
            (
                "invalid type: string \"x\", expected f64 at line 3 column 12",
                "invalid type: string \"x\", expected f64",
            ),
            ("missing field `lr`", "missing field `lr`"),
        ] {
            assert_eq!(plain_words(serde), plain);
        }
    }

    #[test]
    fn a_body_of_the_wrong_shape_names_no_param() {
        let error = refusal(r#""sft""#);
        assert_eq!(error.body().code.as_deref(), Some("invalid_value"));
        assert_eq!(error.body().param, None, "the body itself is at fault");
    }

    #[test]
    fn a_syntax_error_names_its_line_and_column() {
        // The body ends before the value of `kind`; serde_json reports the last character it
        // read, the space after the colon: the 8th of line 2 (`"kind": `).
        let error = refusal("{\n\"kind\": ");
        assert_eq!(error.body().code.as_deref(), Some("invalid_json"));
        assert_eq!(error.body().param.as_deref(), Some("line 2, column 8"));
        assert!(
            error.body().message.contains("line 2 column 8"),
            "{}",
            error.body().message
        );
        // Input after the object is refused as serde_json::from_slice refuses it: the `x`
        // at column 17 of line 1.
        let trailing = refusal(r#"{"kind": "sft"} x"#);
        assert_eq!(trailing.body().param.as_deref(), Some("line 1, column 17"));
    }
}
