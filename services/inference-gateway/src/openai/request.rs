//! OpenAI request bodies, read field by field so every refusal names the field at fault by its
//! full path (`messages[1].content`), and turned into token ids plus one set of sampling
//! parameters per choice.

use ferrite_model::generate::SamplingParams;
use ferrite_model::tokenizer::{ChatMessage, Role};
use ferrite_platform::ApiError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::response::Endpoint;
use crate::engine::ModelInfo;

/// Why a request was refused before generation started.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("{message}")]
    Invalid {
        /// The path of the value at fault, e.g. `stop[1]` or `messages[0].role`.
        param: String,
        message: String,
    },
    #[error("unrecognized request argument `{0}`")]
    Unrecognized(String),
    #[error(
        "`{0}` is not supported: the engine does not implement it, and ignoring it would \
         answer another request than the one sent; leave it out"
    )]
    Unsupported(String),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// Found from the prompt's size alone, before encoding it.
    #[error(
        "this model's maximum context length is {limit} tokens; the prompt is {bytes} bytes, \
         which no tokenization of this model's fits in fewer than {at_least} tokens"
    )]
    PromptTooLong {
        param: &'static str,
        limit: usize,
        bytes: usize,
        at_least: usize,
    },
    #[error(
        "this model's maximum context length is {limit} tokens; the request has {prompt} \
         prompt tokens and asks for {completion} more ({total} in all)"
    )]
    ContextLength {
        param: &'static str,
        limit: usize,
        prompt: usize,
        completion: usize,
        /// Wide enough that a client's `max_tokens` near `usize::MAX` cannot overflow it.
        total: u128,
    },
    #[error("the model `{0}` has no chat template")]
    NoChatTemplate(String),
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(#[source] ferrite_model::tokenizer::TokenizerError),
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        let message = error.to_string();
        match error {
            // The body is JSON, of the wrong type: the code every service gives a wrong value.
            RequestError::NotAnObject => ApiError::invalid_request("invalid_value", message),
            RequestError::Unrecognized(param) => {
                ApiError::invalid_request("unknown_parameter", message).with_param(param)
            }
            RequestError::Unsupported(param) => {
                ApiError::invalid_request("unsupported_parameter", message).with_param(param)
            }
            RequestError::Missing(param) => {
                ApiError::invalid_request("missing_field", message).with_param(param)
            }
            RequestError::Invalid { param, .. } => {
                ApiError::invalid_request("invalid_value", message).with_param(param)
            }
            RequestError::ModelNotFound(name) => {
                ApiError::not_found("model", &name).with_param("model")
            }
            RequestError::ContextLength { param, .. }
            | RequestError::PromptTooLong { param, .. } => {
                ApiError::invalid_request("context_length_exceeded", message).with_param(param)
            }
            RequestError::NoChatTemplate(_) => {
                ApiError::invalid_request("chat_template_missing", message).with_param("model")
            }
            RequestError::Tokenize(source) => ApiError::internal(&source),
        }
    }
}

/// How log-probabilities are asked for and reported: the two endpoints differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// `/v1/completions`: `logprobs: k` alternatives per position.
    Completion,
    /// `/v1/chat/completions`: `logprobs: true` with `top_logprobs: k`.
    Chat,
}

/// A request body as a JSON object, with typed access to its fields.
#[derive(Debug)]
pub struct Body(Map<String, Value>);

impl Body {
    /// The body as read by the JSON extractor, which must be one object.
    pub fn new(body: Value) -> Result<Self, RequestError> {
        match body {
            Value::Object(map) => Ok(Self(map)),
            _ => Err(RequestError::NotAnObject),
        }
    }

    /// Refuses an argument `endpoint` does not take, naming it.
    pub fn check_arguments(&self, endpoint: Endpoint) -> Result<(), RequestError> {
        super::arguments::check(&self.0, endpoint)
    }

    /// The field as `T`; absent and `null` are both `None`. A value wrong inside the field
    /// (the second of `stop: ["a", 3]`) is named by its path, `stop[1]`.
    fn get<T: DeserializeOwned>(
        &self,
        param: &'static str,
        expected: &str,
    ) -> Result<Option<T>, RequestError> {
        let Some(value) = self.0.get(param).filter(|value| !value.is_null()) else {
            return Ok(None);
        };
        serde_path_to_error::deserialize(value)
            .map(Some)
            .map_err(|error| {
                let inside = error.path().to_string();
                let at = match inside.as_str() {
                    "." => param.to_owned(),
                    index if index.starts_with('[') => format!("{param}{index}"),
                    field => format!("{param}.{field}"),
                };
                let message = if at == param {
                    format!("`{param}` must be {expected}, got {value}")
                } else {
                    format!("`{param}` must be {expected}; `{at}`: {}", error.inner())
                };
                invalid(at, message)
            })
    }

    /// The deployment name clients put in `model`.
    pub fn model(&self) -> Result<String, RequestError> {
        self.get::<String>("model", "a string")?
            .ok_or(RequestError::Missing("model"))
    }

    pub fn stream(&self) -> Result<bool, RequestError> {
        Ok(self.get("stream", "a boolean")?.unwrap_or(false))
    }

    /// `stream_options.include_usage`.
    pub fn include_usage(&self) -> Result<bool, RequestError> {
        let Some(options) = self.get::<Map<String, Value>>("stream_options", "an object")? else {
            return Ok(false);
        };
        match options.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(include)) => Ok(*include),
            Some(other) => Err(invalid(
                "stream_options.include_usage",
                format!("`stream_options.include_usage` must be a boolean, got {other}"),
            )),
        }
    }

    /// Which of `max_completion_tokens` and `max_tokens` the client set (the first wins).
    fn max_tokens_param(&self) -> Option<&'static str> {
        ["max_completion_tokens", "max_tokens"]
            .into_iter()
            .find(|param| self.0.get(*param).is_some_and(|value| !value.is_null()))
    }

    /// `max_tokens` (or chat's newer `max_completion_tokens`): a whole number of at least 1.
    fn max_tokens(&self) -> Result<Option<usize>, RequestError> {
        let Some(param) = self.max_tokens_param() else {
            return Ok(None);
        };
        let value = self.0.get(param).unwrap_or(&Value::Null);
        match value.as_u64() {
            Some(count) if count >= 1 => Ok(Some(usize::try_from(count).unwrap_or(usize::MAX))),
            _ => Err(invalid(
                param,
                format!("`{param}` must be an integer of at least 1, got {value}"),
            )),
        }
    }

    /// The completion endpoint's prompt: a string, or a list holding one string.
    pub fn prompt(&self) -> Result<String, RequestError> {
        let value = self
            .0
            .get("prompt")
            .ok_or(RequestError::Missing("prompt"))?;
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                items[0].as_str().unwrap_or_default().to_owned()
            }
            // TODO: batched prompts (a list of several) and token-id prompts are refused;
            // clients that send them get a 400 instead of several choices.
            _ => {
                return Err(invalid(
                    "prompt",
                    "`prompt` must be a string (or a list of exactly one string)".to_string(),
                ));
            }
        };
        if text.is_empty() {
            return Err(invalid("prompt", "`prompt` is empty".to_string()));
        }
        Ok(text)
    }

    /// The chat endpoint's `response_format`: absent or `{"type": "text"}`. The engine only
    /// generates free text and cannot hold its output to JSON, so `json_object` and
    /// `json_schema` (and any type it does not know) are refused rather than ignored: a client
    /// that asked for JSON would otherwise get text it then fails to parse.
    pub fn response_format(&self) -> Result<(), RequestError> {
        const TYPE: &str = "response_format.type";
        let Some(format) =
            self.get::<Map<String, Value>>("response_format", "an object with `type`")?
        else {
            return Ok(());
        };
        match format.get("type") {
            Some(Value::String(kind)) if kind == "text" => Ok(()),
            Some(Value::String(kind)) => Err(invalid(
                TYPE,
                format!(
                    "`{TYPE}` `{kind}` is not supported: this server generates plain text, so \
                     the only supported type is `text`"
                ),
            )),
            None | Some(Value::Null) => Err(RequestError::Missing(TYPE)),
            Some(other) => Err(invalid(
                TYPE,
                format!("`{TYPE}` must be a string, got {other}"),
            )),
        }
    }

    /// The chat endpoint's conversation.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, RequestError> {
        let messages: Vec<Value> = self
            .get("messages", "a list of messages")?
            .ok_or(RequestError::Missing("messages"))?;
        if messages.is_empty() {
            return Err(invalid("messages", "`messages` is empty".to_string()));
        }
        messages
            .iter()
            .enumerate()
            .map(|(index, message)| chat_message(index, message))
            .collect()
    }

    /// Sampling for each of the `n` choices, checked against the model's context.
    pub fn sampling(
        &self,
        format: LogprobsFormat,
        info: &ModelInfo,
        prompt_tokens: usize,
    ) -> Result<Vec<SamplingParams>, RequestError> {
        let limit = info.context_length;
        let prompt_param = match format {
            LogprobsFormat::Chat => "messages",
            _ => "prompt",
        };
        let max_tokens = match (self.max_tokens()?, format) {
            (Some(count), _) => count,
            // The chat API's default is the rest of the context; the legacy API's is 16.
            (None, LogprobsFormat::Chat) => limit.saturating_sub(prompt_tokens).max(1),
            (None, _) => 16,
        };
        // `max_tokens` comes from the client and may be near usize::MAX, so the sum is taken
        // in u128; a completion longer than the whole context is blamed on the field asking it.
        let total = prompt_tokens as u128 + max_tokens as u128;
        if total > limit as u128 {
            let param = match self.max_tokens_param() {
                Some(param) if max_tokens > limit => param,
                _ => prompt_param,
            };
            return Err(RequestError::ContextLength {
                param,
                limit,
                prompt: prompt_tokens,
                completion: max_tokens,
                total,
            });
        }

        let (logprobs, top_logprobs) = self.logprobs(format)?;
        let base = SamplingParams {
            max_tokens,
            temperature: self.bounded("temperature", 0.0, 2.0)?.unwrap_or(1.0),
            top_p: self.top_p()?,
            top_k: self.top_k()?,
            seed: 0,
            stop: self.stop()?,
            stop_token_ids: info.tokenizer.stop_ids(),
            logprobs,
            top_logprobs,
        };
        self.get::<String>("user", "a string")?;
        let n = self.n()?;
        let seed = self
            .seed()?
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
        // Choice i draws from seed + i: distinct choices, and the same seed repeats them all.
        Ok((0..n)
            .map(|index| SamplingParams {
                seed: seed.wrapping_add(index as u64),
                ..base.clone()
            })
            .collect())
    }

    /// `seed`: any integer a client may send, signed (OpenAI's int64) or up to u64::MAX; a
    /// negative seed is reinterpreted as its two's-complement bits, which is still one fixed seed.
    fn seed(&self) -> Result<Option<u64>, RequestError> {
        match self.0.get("seed") {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .or_else(|| value.as_i64().map(|seed| seed as u64))
                .map(Some)
                .ok_or_else(|| {
                    invalid(
                        "seed",
                        format!("`seed` must be an integer from -2^63 to 2^64-1, got {value}"),
                    )
                }),
        }
    }

    fn bounded(
        &self,
        param: &'static str,
        low: f64,
        high: f64,
    ) -> Result<Option<f64>, RequestError> {
        let value = self.get::<f64>(param, "a number")?;
        match value {
            Some(v) if !(low..=high).contains(&v) => Err(invalid(
                param,
                format!("`{param}` must lie in [{low}, {high}], got {v}"),
            )),
            other => Ok(other),
        }
    }

    fn top_p(&self) -> Result<Option<f64>, RequestError> {
        match self.bounded("top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => Err(invalid("top_p", "`top_p` must be above 0".to_string())),
            // 1 keeps everything, the same as no filter.
            Some(p) if p >= 1.0 => Ok(None),
            other => Ok(other),
        }
    }

    /// `top_k`: at least 1; -1 (as other servers accept) or 0 means no limit.
    fn top_k(&self) -> Result<Option<usize>, RequestError> {
        match self.get::<i64>("top_k", "an integer")? {
            None | Some(-1) | Some(0) => Ok(None),
            Some(k) if k > 0 => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
            Some(k) => Err(invalid(
                "top_k",
                format!("`top_k` must be -1 or at least 1, got {k}"),
            )),
        }
    }

    fn n(&self) -> Result<usize, RequestError> {
        match self.get::<u64>("n", "an integer")? {
            None => Ok(1),
            Some(n @ 1..=MAX_CHOICES) => Ok(n as usize),
            Some(n) => Err(invalid(
                "n",
                format!("`n` must lie in [1, {MAX_CHOICES}], got {n}"),
            )),
        }
    }

    fn stop(&self) -> Result<Vec<String>, RequestError> {
        let stops = match self.0.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(stop)) => vec![stop.clone()],
            Some(_) => self
                .get::<Vec<String>>("stop", "a string or a list of strings")?
                .unwrap_or_default(),
        };
        if stops.len() > MAX_STOPS {
            return Err(invalid(
                "stop",
                format!("`stop` holds at most {MAX_STOPS} strings"),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(invalid("stop", "`stop` holds an empty string".to_string()));
        }
        Ok(stops)
    }

    fn logprobs(&self, format: LogprobsFormat) -> Result<(bool, usize), RequestError> {
        match format {
            LogprobsFormat::Completion | LogprobsFormat::None => {
                match self.get::<u64>("logprobs", "an integer from 0 to 5")? {
                    None => Ok((false, 0)),
                    Some(top @ 0..=5) => Ok((true, top as usize)),
                    Some(top) => Err(invalid(
                        "logprobs",
                        format!("`logprobs` must lie in [0, 5], got {top}"),
                    )),
                }
            }
            LogprobsFormat::Chat => {
                let wanted = self.get::<bool>("logprobs", "a boolean")?.unwrap_or(false);
                match self.get::<u64>("top_logprobs", "an integer from 0 to 20")? {
                    None => Ok((wanted, 0)),
                    Some(_) if !wanted => Err(invalid(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`".to_string(),
                    )),
                    Some(top @ 0..=20) => Ok((true, top as usize)),
                    Some(top) => Err(invalid(
                        "top_logprobs",
                        format!("`top_logprobs` must lie in [0, 20], got {top}"),
                    )),
                }
            }
        }
    }
}

/// Most choices one request may ask for.
const MAX_CHOICES: u64 = 8;
/// Most stop strings one request may give, as OpenAI allows.
const MAX_STOPS: usize = 4;

fn invalid(param: impl Into<String>, message: String) -> RequestError {
    RequestError::Invalid {
        param: param.into(),
        message,
    }
}

/// One message: a role this template knows and text content (a string or text parts). A
/// refusal names the message and its field, `messages[1].content`.
fn chat_message(index: usize, message: &Value) -> Result<ChatMessage, RequestError> {
    let at = format!("messages[{index}]");
    let Some(message) = message.as_object() else {
        return Err(invalid(
            &at,
            format!("`{at}` must be an object with `role` and `content`, got {message}"),
        ));
    };
    let role_at = format!("{at}.role");
    let role = match message.get("role") {
        Some(Value::String(role)) => match role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                let message = format!("`{role_at}` is the unsupported role `{other}`");
                return Err(invalid(role_at, message));
            }
        },
        Some(other) => {
            let message = format!("`{role_at}` must be a string, got {other}");
            return Err(invalid(role_at, message));
        }
        None => return Err(invalid(&role_at, format!("`{role_at}` is required"))),
    };
    let content_at = format!("{at}.content");
    let content = match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(
                |(part_index, part)| match (part.get("type"), part.get("text")) {
                    (Some(Value::String(kind)), Some(Value::String(text))) if kind == "text" => {
                        Ok(text.as_str())
                    }
                    _ => {
                        let part_at = format!("{content_at}[{part_index}]");
                        let message = format!("`{part_at}` is not a text part, got {part}");
                        Err(invalid(part_at, message))
                    }
                },
            )
            .collect::<Result<Vec<&str>, _>>()?
            .concat(),
        Some(other) => {
            let message =
                format!("`{content_at}` must be a string or a list of text parts, got {other}");
            return Err(invalid(content_at, message));
        }
        None => return Err(invalid(&content_at, format!("`{content_at}` is required"))),
    };
    Ok(ChatMessage::new(role, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Body {
        let value = serde_json::from_str(json).expect("test bodies are JSON");
        Body::new(value).expect("an object")
    }

    fn refused_param(result: Result<impl std::fmt::Debug, RequestError>) -> String {
        match result {
            Err(RequestError::Invalid { param, .. }) => param,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn max_tokens_that_is_not_a_positive_whole_number_is_refused_by_name() {
        for value in ["0", "-1", "1.5", "\"ten\""] {
            let body = body(&format!(r#"{{"max_tokens": {value}}}"#));
            assert_eq!(refused_param(body.max_tokens()), "max_tokens", "{value}");
        }
        assert_eq!(
            body(r#"{"max_tokens": 7}"#).max_tokens().ok(),
            Some(Some(7))
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused() {
        assert!(matches!(
            Body::new(serde_json::json!([1, 2])),
            Err(RequestError::NotAnObject)
        ));
    }

    #[test]
    fn response_format_text_is_accepted_and_json_formats_are_refused() {
        for accepted in [
            "{}",
            r#"{"response_format": null}"#,
            r#"{"response_format": {"type": "text"}}"#,
        ] {
            assert!(body(accepted).response_format().is_ok(), "{accepted}");
        }
        // Regression: these were accepted and answered with free text.
        for kind in ["json_object", "json_schema", "yaml"] {
            let request = format!(r#"{{"response_format": {{"type": "{kind}"}}}}"#);
            match body(&request).response_format() {
                Err(RequestError::Invalid { param, message }) => {
                    assert_eq!(param, "response_format.type");
                    assert!(
                        message.contains(kind) && message.contains("only supported type is `text`"),
                        "it names what came and what is supported: {message}"
                    );
                }
                other => panic!("{kind} must be refused, got {other:?}"),
            }
        }
        assert_eq!(
            refused_param(body(r#"{"response_format": {"type": 1}}"#).response_format()),
            "response_format.type"
        );
        assert_eq!(
            refused_param(body(r#"{"response_format": "json"}"#).response_format()),
            "response_format"
        );
        assert!(matches!(
            body(r#"{"response_format": {}}"#).response_format(),
            Err(RequestError::Missing("response_format.type"))
        ));
    }

    #[test]
    fn stop_is_a_string_or_a_list_and_never_empty() {
        assert_eq!(
            body(r#"{"stop": "END"}"#).stop().ok(),
            Some(vec!["END".to_string()])
        );
        assert_eq!(
            body(r#"{"stop": ["a", "b"]}"#).stop().ok(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(refused_param(body(r#"{"stop": [""]}"#).stop()), "stop");
        assert_eq!(refused_param(body(r#"{"stop": 3}"#).stop()), "stop");
        // The second string of the list is the number.
        assert_eq!(
            refused_param(body(r#"{"stop": ["a", 3]}"#).stop()),
            "stop[1]"
        );
    }

    #[test]
    fn a_bad_message_is_named_by_its_index_and_field() {
        let refused = |messages: &str| {
            refused_param(body(&format!(r#"{{"messages": {messages}}}"#)).messages())
        };
        // Index 1 is the second message, the one at fault in each case.
        let first = r#"{"role": "user", "content": "hi"}"#;
        assert_eq!(
            refused(&format!(r#"[{first}, {{"role": "user", "content": 5}}]"#)),
            "messages[1].content"
        );
        assert_eq!(
            refused(&format!(
                r#"[{first}, {{"role": "root", "content": "hi"}}]"#
            )),
            "messages[1].role"
        );
        assert_eq!(
            refused(&format!(r#"[{first}, {{"content": "hi"}}]"#)),
            "messages[1].role"
        );
        assert_eq!(refused(&format!("[{first}, 5]")), "messages[1]");
        assert_eq!(
            refused(&format!(
                r#"[{first}, {{"role": "user", "content": [{{"type": "text", "text": "a"}},
                {{"type": "image_url"}}]}}]"#
            )),
            "messages[1].content[1]"
        );
    }

    #[test]
    fn include_usage_is_named_inside_stream_options() {
        let body = body(r#"{"stream_options": {"include_usage": "yes"}}"#);
        assert_eq!(
            refused_param(body.include_usage()),
            "stream_options.include_usage"
        );
    }

    #[test]
    fn chat_content_may_be_text_parts() {
        let body = body(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
                {"type": "text", "text": "there"}]}]}"#,
        );
        let messages = body.messages().expect("valid");
        assert_eq!(messages, [ChatMessage::new(Role::User, "hi there")]);
    }

    #[test]
    fn a_seed_is_any_signed_or_unsigned_64_bit_integer() {
        // u64::MAX is above i64::MAX yet a valid seed; -1 keeps its bits, which are u64::MAX.
        assert_eq!(
            body(r#"{"seed": 18446744073709551615}"#).seed().ok(),
            Some(Some(u64::MAX))
        );
        assert_eq!(body(r#"{"seed": -1}"#).seed().ok(), Some(Some(u64::MAX)));
        assert_eq!(body(r#"{"seed": 7}"#).seed().ok(), Some(Some(7)));
        for value in ["1.5", "18446744073709551616", "\"x\""] {
            let body = body(&format!(r#"{{"seed": {value}}}"#));
            assert_eq!(refused_param(body.seed()), "seed", "{value}");
        }
    }

    #[test]
    fn empty_message_content_is_accepted_as_openai_accepts_it() {
        let body = body(
            r#"{"messages": [{"role": "user", "content": ""},
            {"role": "user", "content": []}]}"#,
        );
        let messages = body.messages().expect("valid");
        assert_eq!(
            messages,
            [
                ChatMessage::new(Role::User, ""),
                ChatMessage::new(Role::User, "")
            ]
        );
    }

    #[test]
    fn empty_prompts_and_conversations_are_refused() {
        assert_eq!(refused_param(body(r#"{"prompt": ""}"#).prompt()), "prompt");
        assert_eq!(
            refused_param(body(r#"{"messages": []}"#).messages()),
            "messages"
        );
    }
}
