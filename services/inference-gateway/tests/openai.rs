//! The OpenAI surface against a running gateway serving the chain model (see `support`), whose
//! greedy output after any prompt is `CHAIN` then EOS: every expected text below follows from
//! that construction.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, CHAIN, TestGateway, chain_tokenizer, events};

const MODEL: &str = "chain";

/// The text a streamed response spells, per choice, and each choice's finish reasons in order.
fn reassemble(events: &[Value], chat: bool) -> (Vec<String>, Vec<Vec<Value>>) {
    let mut texts: Vec<String> = Vec::new();
    let mut reasons: Vec<Vec<Value>> = Vec::new();
    for event in events {
        for choice in event["choices"].as_array().expect("choices") {
            let index = choice["index"].as_u64().expect("an index") as usize;
            if texts.len() <= index {
                texts.resize(index + 1, String::new());
                reasons.resize(index + 1, Vec::new());
            }
            let piece = if chat {
                choice["delta"]["content"].as_str().unwrap_or_default()
            } else {
                choice["text"].as_str().expect("text")
            };
            texts[index].push_str(piece);
            reasons[index].push(choice["finish_reason"].clone());
        }
    }
    (texts, reasons)
}

/// POSTs `raw` bytes as a JSON body to `/v1/completions`; the status and the error body.
async fn post_raw(gateway: &TestGateway, raw: String) -> (reqwest::StatusCode, Value) {
    post_typed(gateway, "/v1/completions", Some("application/json"), raw).await
}

/// POSTs `raw` bytes to `path` with `content_type` (none when `None`); status and body.
async fn post_typed(
    gateway: &TestGateway,
    path: &str,
    content_type: Option<&str>,
    raw: String,
) -> (reqwest::StatusCode, Value) {
    let mut request = gateway
        .client
        .post(gateway.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .body(raw);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.expect("answers");
    let status = response.status();
    (status, response.json().await.expect("an error body"))
}

async fn stream(gateway: &TestGateway, path: &str, body: &Value) -> Vec<Value> {
    let (status, headers, text) = gateway
        .send(Method::POST, path, ADMIN_TOKEN, Some(body))
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["content-type"], "text/event-stream");
    events(&text)
}

#[tokio::test]
async fn greedy_completion_follows_the_chain_and_counts_tokens() {
    let gateway = TestGateway::spawn().await;
    let version = gateway.deploy_chain_model(MODEL).await;
    let client = gateway.token("client").await;

    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 40, "temperature": 0});
    let (status, headers, text) = gateway
        .send(Method::POST, "/v1/completions", &client, Some(&body))
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        headers["x-ferrite-model-version"],
        version["id"].as_str().expect("an id")
    );
    let response: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(response["object"], "text_completion");
    assert_eq!(response["choices"][0]["text"], CHAIN);
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    // Prompt tokens as the model's own tokenizer counts them; the completion is one token per
    // byte of CHAIN (no merges) plus the EOS that ended it.
    let tokenizer = chain_tokenizer();
    let prompt_tokens = tokenizer.encode("Hello", true).expect("encodes").len();
    let completion_tokens = CHAIN.len() + 1;
    assert_eq!(
        response["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": prompt_tokens + completion_tokens})
    );

    // max_tokens 2 stops at "\nZ", the chain's first two bytes.
    let (_, short) = gateway
        .post(
            "/v1/completions",
            &client,
            &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(short["choices"][0]["text"], "\nZ");
    assert_eq!(short["choices"][0]["finish_reason"], "length");
    gateway.stop().await;
}

#[tokio::test]
async fn a_stop_string_spanning_tokens_never_leaks_streamed_or_not() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    // "STOP" is four tokens and "😀" four bytes-tokens; each must end the text before it.
    for (stop, expected) in [("STOP", "\nZé😀 "), ("😀", "\nZé")] {
        let body = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 40, "temperature": 0, "stop": [stop, "never"]});
        let (_, whole) = gateway.post("/v1/completions", ADMIN_TOKEN, &body).await;
        assert_eq!(whole["choices"][0]["text"], expected, "{stop}");
        assert_eq!(whole["choices"][0]["finish_reason"], "stop");

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = stream(&gateway, "/v1/completions", &streamed).await;
        let (texts, _) = reassemble(&events, false);
        assert_eq!(texts, [expected], "{stop}");
        for event in &events {
            let piece = event["choices"][0]["text"].as_str().unwrap_or_default();
            // No chunk holds the stop string or any prefix of it ("S", "ST", ...).
            let first = stop.chars().next().expect("non-empty");
            assert!(!piece.contains(first), "{stop}: leaked {piece:?}");
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn streams_frame_events_hold_finish_reasons_to_the_end_and_match_the_whole_response() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    for (path, chat) in [("/v1/completions", false), ("/v1/chat/completions", true)] {
        let mut body = json!({"model": MODEL, "max_tokens": 40, "temperature": 0,
                              "stream_options": {"include_usage": true}});
        if chat {
            body["messages"] = json!([{"role": "user", "content": "Say something"}]);
        } else {
            body["prompt"] = json!("Say something");
        }
        let (_, whole) = gateway.post(path, ADMIN_TOKEN, &body).await;
        body["stream"] = json!(true);
        let events = stream(&gateway, path, &body).await;

        // Exactly one chunk carries usage, the last, with no choices; it equals the whole
        // response's usage. Every other chunk says `usage: null`.
        let with_usage: Vec<&Value> = events.iter().filter(|e| !e["usage"].is_null()).collect();
        assert_eq!(with_usage.len(), 1, "{path}");
        let last = events.last().expect("events");
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], whole["usage"], "{path}");

        let (texts, reasons) = reassemble(&events[..events.len() - 1], chat);
        let expected_text = if chat {
            whole["choices"][0]["message"]["content"].clone()
        } else {
            whole["choices"][0]["text"].clone()
        };
        assert_eq!(json!(texts[0]), expected_text, "{path}");
        // The chat template ends with "assistant\n", whose successor starts the chain at "Z".
        let chain_text = if chat { &CHAIN[1..] } else { CHAIN };
        assert_eq!(texts[0].as_bytes(), chain_text.as_bytes(), "{path}");
        // "é" and "😀" arrive over two and four tokens, yet no chunk holds half of one.
        let pieces = events
            .iter()
            .flat_map(|event| event["choices"].as_array().cloned().unwrap_or_default());
        for choice in pieces {
            let piece = choice["text"]
                .as_str()
                .or(choice["delta"]["content"].as_str())
                .unwrap_or_default();
            assert!(
                !piece.contains('\u{FFFD}'),
                "{path}: a chunk split a character"
            );
        }
        let (last_reason, earlier) = reasons[0].split_last().expect("chunks");
        assert_eq!(last_reason, "stop", "{path}");
        assert!(earlier.iter().all(Value::is_null), "{path}: {earlier:?}");
        if chat {
            assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(events[0]["object"], "chat.completion.chunk");
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn three_streamed_choices_reassemble_to_the_whole_three() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    // Temperature 2 makes the chain model wander (its margin is about 9 nats, 4.5 after
    // temperature, over 260 alternatives), so the three choices differ; the seed fixes them.
    let body = json!({"model": MODEL, "prompt": "Once", "max_tokens": 12, "temperature": 2.0,
                      "seed": 11, "n": 3, "stream_options": {"include_usage": true}});
    let (status, whole) = gateway.post("/v1/completions", ADMIN_TOKEN, &body).await;
    assert_eq!(status, 200, "{whole}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = stream(&gateway, "/v1/completions", &streamed).await;
    let (texts, reasons) = reassemble(&events[..events.len() - 1], false);
    assert_eq!(texts.len(), 3);
    for (index, text) in texts.iter().enumerate() {
        let choice = &whole["choices"][index];
        assert_eq!(choice["text"], json!(text), "choice {index}");
        assert_eq!(reasons[index].last(), Some(&choice["finish_reason"]));
    }
    assert_eq!(events.last().expect("usage")["usage"], whole["usage"]);
    let distinct: std::collections::BTreeSet<&String> = texts.iter().collect();
    assert!(distinct.len() > 1, "seeds per choice differ: {texts:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn temperature_zero_is_deterministic_equals_top_k_one_and_logprobs_are_at_most_zero() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    let greedy =
        json!({"model": MODEL, "prompt": "Dawn", "max_tokens": 8, "temperature": 0, "logprobs": 3});
    let (_, first) = gateway.post("/v1/completions", ADMIN_TOKEN, &greedy).await;
    let (_, second) = gateway.post("/v1/completions", ADMIN_TOKEN, &greedy).await;
    assert_eq!(first["choices"], second["choices"]);
    let top_k = json!({"model": MODEL, "prompt": "Dawn", "max_tokens": 8, "temperature": 2.0, "top_k": 1, "seed": 3});
    let (_, by_top_k) = gateway.post("/v1/completions", ADMIN_TOKEN, &top_k).await;
    assert_eq!(first["choices"][0]["text"], by_top_k["choices"][0]["text"]);

    let logprobs = &first["choices"][0]["logprobs"];
    let values = logprobs["token_logprobs"]
        .as_array()
        .expect("token_logprobs");
    assert_eq!(values.len(), 8);
    for value in values {
        let value = value.as_f64().expect("a number");
        assert!(value.is_finite() && value <= 0.0, "{value}");
    }
    // Keyed by token text: alternatives that are lone bytes of a character all read "\u{FFFD}"
    // and share one key, so a position lists between one and three.
    let alternatives = logprobs["top_logprobs"][0]
        .as_object()
        .expect("a map")
        .len();
    assert!((1..=3).contains(&alternatives), "{alternatives}");

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, reply) = gateway
        .post("/v1/chat/completions", ADMIN_TOKEN, &chat)
        .await;
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    assert_eq!(content.len(), 4);
    for entry in content {
        let value = entry["logprob"].as_f64().expect("a number");
        assert!(value.is_finite() && value <= 0.0, "{value}");
        assert_eq!(
            entry["top_logprobs"]
                .as_array()
                .expect("alternatives")
                .len(),
            2
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_before_any_stream_and_the_server_keeps_serving() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    let completion = |extra: Value| {
        let mut body = json!({"model": MODEL, "prompt": "Hi", "stream": true});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    };
    let (status, body) = gateway
        .post(
            "/v1/completions",
            ADMIN_TOKEN,
            &completion(json!({"model": "nope"})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["error"]["code"]),
        (404, &json!("model_not_found"))
    );

    for max_tokens in [json!(0), json!(-1), json!(1.5), json!("10")] {
        let (status, body) = gateway
            .post(
                "/v1/completions",
                ADMIN_TOKEN,
                &completion(json!({"max_tokens": max_tokens})),
            )
            .await;
        assert_eq!(status, 400, "{max_tokens}: {body}");
        assert_eq!(body["error"]["param"], "max_tokens", "{max_tokens}");
    }

    // 300 bytes are 300 tokens (no merges), one more with BOS; the tiny preset's context is 256.
    // The prompt is short enough that only counting its tokens shows it too long (a far longer
    // one is refused by its size alone, below), so the message gives the counted length.
    for bytes in [300] {
        let long = "x".repeat(bytes);
        let expected_length = chain_tokenizer()
            .encode(&long, true)
            .expect("encodes")
            .len();
        let (status, body) = gateway
            .post(
                "/v1/completions",
                ADMIN_TOKEN,
                &completion(json!({"prompt": long})),
            )
            .await;
        assert_eq!(
            (status.as_u16(), &body["error"]["code"]),
            (400, &json!("context_length_exceeded")),
            "{bytes} bytes"
        );
        let message = body["error"]["message"].as_str().expect("a message");
        assert!(
            message.contains("256") && message.contains(&expected_length.to_string()),
            "{message}"
        );
    }

    let (status, body) = gateway
        .post(
            "/v1/completions",
            ADMIN_TOKEN,
            &completion(json!({"prompt": ""})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["error"]["param"]),
        (400, &json!("prompt"))
    );
    let (status, body) = gateway
        .post(
            "/v1/chat/completions",
            ADMIN_TOKEN,
            &json!({"model": MODEL, "messages": []}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["error"]["param"]),
        (400, &json!("messages"))
    );

    for raw in ["{\"model\": ", "[1, 2]", "\"text\""] {
        let (status, body) = post_raw(&gateway, raw.to_owned()).await;
        assert_eq!(status, 400, "{raw}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // The body ends after the space that follows the colon, the 10th character of line 1.
    let (_, body) = post_raw(&gateway, "{\"model\": ".to_owned()).await;
    assert_eq!(body["error"]["param"], "line 1, column 10", "{body}");

    // Regression: a valid request declared as another type, or as none, was served. It is a
    // 415 in the OpenAI shape: `curl -d` declares the form type, a browser's `fetch` of a
    // string `text/plain`.
    let messages = json!([{"role": "user", "content": "the cat"}]);
    let chat = json!({"model": MODEL, "messages": messages, "max_tokens": 1});
    for (path, content_type) in [
        (
            "/v1/chat/completions",
            Some("application/x-www-form-urlencoded"),
        ),
        ("/v1/completions", Some("text/plain;charset=UTF-8")),
        ("/v1/chat/completions", None),
    ] {
        let (status, body) = post_typed(&gateway, path, content_type, chat.to_string()).await;
        assert_eq!(status, 415, "{content_type:?}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_content_type");
    }
    let (status, body) = post_typed(
        &gateway,
        "/v1/chat/completions",
        Some("application/json; charset=utf-8"),
        chat.to_string(),
    )
    .await;
    assert_eq!(status, 200, "a charset is allowed: {body}");

    // Regression: a response format the engine cannot honour was ignored, and JSON asked
    // for came back as free text; `text` is what it always does.
    for (kind, expected) in [("json_object", 400), ("json_schema", 400), ("text", 200)] {
        let (status, body) = gateway
            .post(
                "/v1/chat/completions",
                ADMIN_TOKEN,
                &json!({"model": MODEL, "messages": messages, "max_tokens": 1,
                    "response_format": {"type": kind}}),
            )
            .await;
        assert_eq!(status.as_u16(), expected, "{kind}: {body}");
        if expected == 400 {
            assert_eq!(body["error"]["param"], "response_format.type", "{kind}");
            assert_eq!(body["error"]["code"], "invalid_value", "{kind}");
        }
    }

    // Regression: a bad message was blamed on `messages` as a whole. Index 1 is the second
    // message, the one whose content is a number and whose role is unknown.
    let first = json!({"role": "user", "content": "the cat"});
    for (second, param) in [
        (json!({"role": "user", "content": 5}), "messages[1].content"),
        (
            json!({"role": "root", "content": "sat"}),
            "messages[1].role",
        ),
    ] {
        let (status, body) = gateway
            .post(
                "/v1/chat/completions",
                ADMIN_TOKEN,
                &json!({"model": MODEL, "messages": [first, second]}),
            )
            .await;
        assert_eq!(
            (status.as_u16(), &body["error"]["param"]),
            (400, &json!(param)),
            "{body}"
        );
        assert_eq!(body["error"]["code"], "invalid_value");
    }

    // The OpenAI routes are POST only: GET is a 405 that says so, not a 404.
    let (status, headers, text) = gateway
        .send(Method::GET, "/v1/chat/completions", ADMIN_TOKEN, None)
        .await;
    assert_eq!(status, 405, "{text}");
    assert_eq!(headers["allow"], "POST");
    let body: Value = serde_json::from_str(&text).expect("a JSON error");
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // u64::MAX tokens asked: the prompt plus it overflowed usize and panicked the worker; it
    // must be the 400 naming the field, for both spellings of the field.
    for (path, field) in [
        ("/v1/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
    ] {
        let mut request = if path == "/v1/completions" {
            json!({"model": MODEL, "prompt": "the cat"})
        } else {
            json!({"model": MODEL, "messages": [{"role": "user", "content": "the cat"}]})
        };
        request[field] = json!(u64::MAX);
        let (status, body) = gateway.post(path, ADMIN_TOKEN, &request).await;
        assert_eq!(status, 400, "{field}: {body}");
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{field}");
        assert_eq!(body["error"]["param"], field);
    }

    // Regression: a prompt far past the context was encoded whole before the context check,
    // seconds and gigabytes for 16 MB. Its size alone shows it cannot fit (the message speaks of
    // bytes, not of counted tokens), so it is refused before encoding, on both endpoints.
    // 8 MiB, and 300 KiB: over actix's own 256 KiB body default but under the configured
    // 16 MiB limit, so it reaches this check, not a 413.
    for long in ["a b ".repeat(2 << 20), "x".repeat(300 * 1024)] {
        for (path, request, param) in [
            (
                "/v1/completions",
                json!({"model": MODEL, "prompt": &long, "max_tokens": 1}),
                "prompt",
            ),
            (
                "/v1/chat/completions",
                json!({"model": MODEL, "max_tokens": 1,
                   "messages": [{"role": "user", "content": &long}]}),
                "messages",
            ),
        ] {
            let (status, body) = gateway.post(path, ADMIN_TOKEN, &request).await;
            assert_eq!(status, 400, "{path}: {body}");
            assert_eq!(body["error"]["code"], "context_length_exceeded", "{path}");
            assert_eq!(body["error"]["param"], param, "{path}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("{} bytes", long.len())),
                "{message}"
            );
        }
    }

    // A prompt of 16 MiB alone puts the body past the 16,777,216-byte limit: a 413 in the
    // OpenAI shape, not actix's text.
    let oversized = format!(
        "{{\"model\": \"{MODEL}\", \"prompt\": \"{}\"}}",
        "x".repeat(16 << 20)
    );
    let (status, body) = post_raw(&gateway, oversized).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "body_too_large");

    // A query string that does not parse is the shaped 400, not actix's text/plain.
    let (status, _, text) = gateway
        .send(
            reqwest::Method::GET,
            "/v1/deployments?version_id=garbage",
            ADMIN_TOKEN,
            None,
        )
        .await;
    assert_eq!(status, 400, "{text}");
    let body: Value = serde_json::from_str(&text).expect("a JSON error");
    assert_eq!(body["error"]["code"], "invalid_query");

    let (status, body) = gateway
        .post(
            "/v1/completions",
            ADMIN_TOKEN,
            &json!({"model": MODEL, "prompt": "Hi", "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "still serving: {body}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_the_engine_would_ignore_and_repeated_keys_are_refused_by_name() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "max_tokens": 1,
            "messages": [{"role": "user", "content": "the cat"}]});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    };
    let completion = json!({"model": MODEL, "prompt": "the cat", "max_tokens": 1});

    // Regression: each of these was ignored and answered 200, the client none the wiser that
    // its tools, bias or penalty never reached the engine, or that `max_token` was misspelled
    // (it got the default 16 tokens).
    let tool = json!([{"type": "function", "function": {"name": "weather"}}]);
    for (path, body, param, code) in [
        (
            "/v1/chat/completions",
            chat(json!({"tools": tool})),
            "tools",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tool_choice": "auto"})),
            "tool_choice",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {"17": 100}})),
            "logit_bias",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"frequency_penalty": 0.5})),
            "frequency_penalty",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_token": 5})),
            "max_token",
            "unknown_parameter",
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "the cat",
            "response_format": {"type": "text"}}),
            "response_format",
            "unknown_parameter",
        ),
    ] {
        let (status, body) = gateway.post(path, ADMIN_TOKEN, &body).await;
        assert_eq!(status, 400, "{param}: {body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
    }
    let (_, body) = gateway
        .post(
            "/v1/chat/completions",
            ADMIN_TOKEN,
            &chat(json!({"max_token": 5})),
        )
        .await;
    assert_eq!(
        body["error"]["message"],
        "unrecognized request argument `max_token`"
    );

    // What the official client sends, and values that ask for nothing, are still served.
    for extra in [
        json!({"user": "ci", "seed": 5, "n": 2, "stop": ["x"], "stream_options": null}),
        json!({"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}),
        json!({"logprobs": true, "top_logprobs": 2, "metadata": {"run": "ci"}}),
    ] {
        let (status, body) = gateway
            .post("/v1/chat/completions", ADMIN_TOKEN, &chat(extra.clone()))
            .await;
        assert_eq!(status, 200, "{extra}: {body}");
    }
    let (status, body) = gateway
        .post("/v1/completions", ADMIN_TOKEN, &completion)
        .await;
    assert_eq!(status, 200, "{body}");

    // Regression: a repeated key kept its last value, so a JSON format the engine cannot
    // honour passed as `text`, and a proxy routing on the first `model` disagreed with the
    // gateway, which served the second.
    let messages = r#""messages": [{"role": "user", "content": "the cat"}]"#;
    for (raw, param) in [
        (
            format!(
                r#"{{"model": "{MODEL}", {messages},
                    "response_format": {{"type": "json_object", "type": "text"}}}}"#
            ),
            "response_format.type",
        ),
        (
            format!(r#"{{"model": "nope", "model": "{MODEL}", {messages}}}"#),
            "model",
        ),
    ] {
        let (status, body) = post_typed(
            &gateway,
            "/v1/chat/completions",
            Some("application/json"),
            raw,
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["code"], "invalid_value", "{body}");
    }

    // A top-level array is JSON of the wrong type: `invalid_value`, as every service says.
    let (status, body) = post_raw(&gateway, "[1, 2]".to_owned()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_value", "{body}");
    gateway.stop().await;
}

#[tokio::test]
async fn deployments_are_listed_filtered_guarded_deleted_and_reloaded_after_a_restart() {
    let gateway = TestGateway::spawn().await;
    let version = gateway.deploy_chain_model(MODEL).await;
    let client = gateway.token("client").await;

    let (status, _) = gateway
        .post(
            "/v1/deployments",
            &client,
            &json!({"name": "other", "model": MODEL}),
        )
        .await;
    assert_eq!(status, 403, "clients cannot deploy");
    let (status, body) = gateway
        .post(
            "/v1/deployments",
            ADMIN_TOKEN,
            &json!({"name": "other", "model": "missing:9"}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["error"]["code"]),
        (404, &json!("model_not_found"))
    );
    let (status, _) = gateway
        .post(
            "/v1/deployments",
            ADMIN_TOKEN,
            &json!({"name": MODEL, "model": MODEL}),
        )
        .await;
    assert_eq!(status, 409);

    let (_, _, models) = gateway.send(Method::GET, "/v1/models", &client, None).await;
    let models: Value = serde_json::from_str(&models).expect("JSON");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);

    let id = version["id"].as_str().expect("an id");
    let by_version = format!("/v1/deployments?version_id={id}");
    let (_, _, listed) = gateway
        .send(Method::GET, &by_version, ADMIN_TOKEN, None)
        .await;
    let listed: Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(listed["data"][0]["name"], MODEL);
    let other = format!("/v1/deployments?version_id={}", uuid::Uuid::now_v7());
    let (_, _, none) = gateway.send(Method::GET, &other, ADMIN_TOKEN, None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&none).expect("JSON")["data"],
        json!([])
    );

    let (status, _, one) = gateway
        .send(
            Method::GET,
            &format!("/v1/deployments/{MODEL}"),
            ADMIN_TOKEN,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let one: Value = serde_json::from_str(&one).expect("JSON");
    assert_eq!(one["version_id"], version["id"]);
    let (status, _, _) = gateway
        .send(Method::GET, "/v1/deployments/nope", ADMIN_TOKEN, None)
        .await;
    assert_eq!(status, 404);

    // A new process on the same database loads the deployment again, from storage alone.
    let gateway = gateway.restart().await;
    let request = json!({"model": MODEL, "prompt": "Hi", "temperature": 0, "max_tokens": 3});
    let mut served = false;
    for _ in 0..200 {
        let (status, _) = gateway.post("/v1/completions", ADMIN_TOKEN, &request).await;
        if status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(served, "the deployment came back after the restart");

    let (status, _, _) = gateway
        .send(
            Method::DELETE,
            &format!("/v1/deployments/{MODEL}"),
            ADMIN_TOKEN,
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, body) = gateway.post("/v1/completions", ADMIN_TOKEN, &request).await;
    assert_eq!(
        (status.as_u16(), &body["error"]["code"]),
        (404, &json!("model_not_found"))
    );
    gateway.stop().await;
}

#[tokio::test]
async fn serving_metrics_appear_on_the_metrics_route() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    let body = json!({"model": MODEL, "prompt": "Hi", "temperature": 0, "max_tokens": 5});
    let (status, _) = gateway.post("/v1/completions", ADMIN_TOKEN, &body).await;
    assert_eq!(status, 200);
    let text = gateway
        .client
        .get(gateway.url("/metrics"))
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    for name in [
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_queue_time_seconds_count",
        "num_requests_running",
        "num_requests_waiting",
    ] {
        assert!(
            text.contains(&format!("ferrite_{name}{{deployment=\"{MODEL}\"}}")),
            "{name} missing:\n{text}"
        );
    }
    // Five tokens generated: one first token and four gaps between tokens.
    assert!(
        text.contains(&format!(
            "ferrite_generation_tokens_total{{deployment=\"{MODEL}\"}} 5"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ferrite_inter_token_latency_seconds_count{{deployment=\"{MODEL}\"}} 4"
        )),
        "{text}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn concurrent_requests_share_the_batch_and_each_gets_its_own_answer() {
    let gateway = TestGateway::spawn().await;
    gateway.deploy_chain_model(MODEL).await;
    // Six requests of two choices each are twelve sequences, more than the eight an engine
    // steps together, so some wait in the queue and join the running batch later. The chain
    // model has no attention, so each greedy choice is CHAIN whatever it shares a batch with.
    let requests = (0..6).map(|index| {
        let gateway = &gateway;
        async move {
            let prompt = "p".repeat(index + 1);
            let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "n": 2});
            gateway.post("/v1/completions", ADMIN_TOKEN, &body).await
        }
    });
    for (status, body) in futures::future::join_all(requests).await {
        assert_eq!(status, 200, "{body}");
        for choice in body["choices"].as_array().expect("choices") {
            assert_eq!(choice["text"], CHAIN);
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_the_gateway_routes() {
    let gateway = TestGateway::spawn().await;
    let document: Value = gateway
        .client
        .get(gateway.url("/openapi.json"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    for path in [
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/deployments",
        "/v1/deployments/{name}",
    ] {
        assert!(document["paths"][path].is_object(), "{path} missing");
    }
    gateway.stop().await;
}
