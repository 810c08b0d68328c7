//! Which request arguments each OpenAI endpoint takes: those the gateway reads, those it may
//! ignore, and those OpenAI defines but the engine does not implement.
//!
//! OpenAI answers an argument it does not know with a 400, and so does the gateway: a
//! misspelled `max_token` silently ignored would give the client 16 tokens it never asked for,
//! and `tools` or `logit_bias` ignored would give it an answer to another question than the
//! one it asked.

use serde_json::{Map, Value};

use super::request::RequestError;
use super::response::Endpoint;

/// Arguments `request.rs` reads on both endpoints (`top_k` is not OpenAI's, but the engine
/// samples with it as other servers do).
const READ: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "logprobs",
    "user",
];

const READ_COMPLETION: &[&str] = &["prompt"];

const READ_CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
];

/// Chat arguments that change nothing about the text generated (bookkeeping, routing and
/// caching hints, and `parallel_tool_calls`, which means nothing without `tools`), so a server
/// without those features is right to ignore them.
const IGNORED_CHAT: &[&str] = &[
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
];

/// Completion arguments OpenAI defines that the engine does not implement.
const UNSUPPORTED_COMPLETION: &[&str] = &[
    "best_of",
    "echo",
    "suffix",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
];

/// Chat arguments OpenAI defines that the engine does not implement. `store: true` asks for
/// the completion to be kept for later use, which the gateway does not do.
const UNSUPPORTED_CHAT: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "store",
];

/// Refuses the first argument of `body` (in key order) that `endpoint` does not take: an
/// unknown one as unrecognised, a known one the engine does not implement as unsupported,
/// unless its value asks for nothing (clients that fill in every default send
/// `frequency_penalty: 0` and `logit_bias: {}`).
pub(super) fn check(body: &Map<String, Value>, endpoint: Endpoint) -> Result<(), RequestError> {
    let (read, ignored, unsupported) = match endpoint {
        Endpoint::Completion => (READ_COMPLETION, &[][..], UNSUPPORTED_COMPLETION),
        Endpoint::Chat => (READ_CHAT, IGNORED_CHAT, UNSUPPORTED_CHAT),
    };
    for (name, value) in body {
        let name = name.as_str();
        if READ.contains(&name) || read.contains(&name) || ignored.contains(&name) {
            continue;
        }
        if !unsupported.contains(&name) {
            return Err(RequestError::Unrecognized(name.to_owned()));
        }
        if !asks_for_nothing(name, value) {
            return Err(RequestError::Unsupported(name.to_owned()));
        }
    }
    Ok(())
}

/// Whether an argument's value is the one that leaves generation as it is: absent in effect
/// (`null`, `false`, `0`, empty), one candidate per choice (`best_of: 1`), no tool call
/// (`"none"`), or text output only (`modalities: ["text"]`).
fn asks_for_nothing(name: &str, value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Bool(true) => false,
        Value::Number(number) => {
            number.as_f64() == Some(0.0) || (name == "best_of" && number.as_u64() == Some(1))
        }
        Value::String(text) => {
            text.is_empty() || (matches!(name, "tool_choice" | "function_call") && text == "none")
        }
        Value::Array(items) => {
            items.is_empty() || (name == "modalities" && items.as_slice() == ["text"])
        }
        Value::Object(fields) => fields.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn checked(body: Value, endpoint: Endpoint) -> Result<(), RequestError> {
        check(body.as_object().expect("an object"), endpoint)
    }

    #[test]
    fn unknown_arguments_are_unrecognized_and_named() {
        // `max_token` is a misspelling that used to be ignored; `messages` belongs to chat
        // and `prompt` to completions; `response_format` is chat's only.
        for (body, endpoint, name) in [
            (json!({"max_token": 5}), Endpoint::Completion, "max_token"),
            (json!({"messages": []}), Endpoint::Completion, "messages"),
            (
                json!({"response_format": {"type": "text"}}),
                Endpoint::Completion,
                "response_format",
            ),
            (json!({"prompt": "hi"}), Endpoint::Chat, "prompt"),
            (json!({"best_of": 2}), Endpoint::Chat, "best_of"),
        ] {
            match checked(body, endpoint) {
                Err(RequestError::Unrecognized(found)) => assert_eq!(found, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn unsupported_arguments_are_refused_unless_they_ask_for_nothing() {
        for (name, value) in [
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("auto")),
            ("logit_bias", json!({"50256": -100})),
            ("frequency_penalty", json!(0.5)),
            ("presence_penalty", json!(-1)),
            ("store", json!(true)),
            ("modalities", json!(["text", "audio"])),
        ] {
            match checked(json!({ name: value }), Endpoint::Chat) {
                Err(RequestError::Unsupported(found)) => assert_eq!(found, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        for (name, value) in [
            ("frequency_penalty", json!(0)),
            ("presence_penalty", json!(0.0)),
            ("logit_bias", json!({})),
            ("tools", json!([])),
            ("tool_choice", json!("none")),
            ("modalities", json!(["text"])),
            ("store", json!(false)),
            ("metadata", json!({"run": "ci"})),
        ] {
            assert!(
                checked(json!({ name: value }), Endpoint::Chat).is_ok(),
                "{name}"
            );
        }
        assert!(checked(json!({"best_of": 1, "echo": false}), Endpoint::Completion).is_ok());
        assert!(matches!(
            checked(json!({"echo": true}), Endpoint::Completion),
            Err(RequestError::Unsupported(_))
        ));
    }

    #[test]
    fn every_argument_the_gateway_reads_is_accepted() {
        let common = json!({"model": "m", "stream": true, "stream_options": {},
            "max_tokens": 1, "temperature": 0, "top_p": 1, "top_k": 1, "seed": 1,
            "stop": "x", "n": 1, "logprobs": null, "user": "u"});
        let mut completion = common.clone();
        completion["prompt"] = json!("hi");
        assert!(checked(completion, Endpoint::Completion).is_ok());
        let mut chat = common;
        for (name, value) in [
            ("messages", json!([])),
            ("max_completion_tokens", json!(1)),
            ("top_logprobs", json!(1)),
            ("response_format", json!({"type": "text"})),
        ] {
            chat[name] = value;
        }
        assert!(checked(chat, Endpoint::Chat).is_ok());
    }
}
