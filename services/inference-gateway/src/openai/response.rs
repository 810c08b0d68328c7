//! OpenAI response bodies: whole completions, streamed chunks and the usage record, built from
//! the engine's deltas so that a stream and a whole response always say the same thing.

use std::sync::Arc;

use ferrite_model::generate::{FinishReason, TokenLogprob};
use ferrite_model::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::{Value, json};

use crate::engine::ChoiceDelta;

/// Which endpoint a response belongs to; the two spell the same content differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// The fields every body and chunk of one request shares.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub created: i64,
    /// The name the client asked for.
    pub model: String,
    pub endpoint: Endpoint,
}

impl Envelope {
    pub fn new(endpoint: Endpoint, model: String) -> Self {
        let prefix = match endpoint {
            Endpoint::Completion => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: chrono::Utc::now().timestamp(),
            model,
            endpoint,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completion, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, chunk: bool, choices: Vec<Value>) -> serde_json::Map<String, Value> {
        let mut body = serde_json::Map::new();
        body.insert("id".into(), json!(self.id));
        body.insert("object".into(), json!(self.object(chunk)));
        body.insert("created".into(), json!(self.created));
        body.insert("model".into(), json!(self.model));
        body.insert("choices".into(), Value::Array(choices));
        body
    }
}

fn finish_reason(reason: Option<FinishReason>) -> Value {
    match reason {
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        None => Value::Null,
    }
}

/// A choice put together from its deltas.
#[derive(Debug, Clone, Default)]
pub struct ChoiceText {
    pub text: String,
    pub tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
}

impl ChoiceText {
    pub fn push(&mut self, delta: &ChoiceDelta) {
        self.text.push_str(&delta.text);
        self.tokens += 1;
        if let Some(logprob) = &delta.logprob {
            self.logprobs.push(logprob.clone());
        }
        if delta.finished.is_some() {
            self.finish_reason = delta.finished;
        }
    }
}

/// Renders token-level log-probabilities in either endpoint's shape.
pub struct LogprobRenderer {
    pub tokenizer: Arc<Tokenizer>,
    pub endpoint: Endpoint,
}

impl LogprobRenderer {
    fn token_text(&self, id: u32) -> String {
        // TODO: a token holding part of a character shows as U+FFFD; the `bytes` field carries
        // the decoded text's bytes, not the token's raw bytes, so such tokens lose information.
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// `logprobs` for `entries`, the first of which starts at `offset` bytes into the text.
    pub fn render(&self, entries: &[TokenLogprob], offset: usize) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|entry| {
                        let top: Vec<Value> = entry
                            .top
                            .iter()
                            .map(|&(id, logprob)| self.chat_entry(id, logprob, None))
                            .collect();
                        self.chat_entry(entry.token, entry.logprob, Some(top))
                    })
                    .collect();
                json!({ "content": content })
            }
            Endpoint::Completion => {
                let mut text_offset = Vec::with_capacity(entries.len());
                let mut position = offset;
                let mut tokens = Vec::with_capacity(entries.len());
                for entry in entries {
                    let text = self.token_text(entry.token);
                    text_offset.push(position);
                    position += text.len();
                    tokens.push(text);
                }
                let top: Vec<Value> = entries
                    .iter()
                    .map(|entry| {
                        let map: serde_json::Map<String, Value> = entry
                            .top
                            .iter()
                            .map(|&(id, logprob)| (self.token_text(id), json!(logprob)))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                let token_logprobs: Vec<f32> = entries.iter().map(|entry| entry.logprob).collect();
                json!({
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }

    /// One chat entry; alternatives (`top: None`) carry no nested list of their own.
    fn chat_entry(&self, id: u32, logprob: f32, top: Option<Vec<Value>>) -> Value {
        let token = self.token_text(id);
        let bytes: Vec<u8> = token.as_bytes().to_vec();
        let mut entry = json!({ "token": token, "logprob": logprob, "bytes": bytes });
        if let (Some(top), Some(map)) = (top, entry.as_object_mut()) {
            map.insert("top_logprobs".into(), Value::Array(top));
        }
        entry
    }
}

/// The whole (non-streamed) response.
pub fn whole(
    envelope: &Envelope,
    choices: &[ChoiceText],
    usage: Usage,
    renderer: Option<&LogprobRenderer>,
) -> Value {
    let rendered = choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            let logprobs = renderer.map_or(Value::Null, |r| r.render(&choice.logprobs, 0));
            match envelope.endpoint {
                Endpoint::Completion => json!({
                    "index": index,
                    "text": choice.text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(choice.finish_reason),
                }),
                Endpoint::Chat => json!({
                    "index": index,
                    "message": { "role": "assistant", "content": choice.text },
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(choice.finish_reason),
                }),
            }
        })
        .collect();
    let mut body = envelope.wrap(false, rendered);
    body.insert("usage".into(), json!(usage));
    Value::Object(body)
}

/// Builds the chunks of a streamed response.
pub struct ChunkWriter {
    pub envelope: Envelope,
    pub include_usage: bool,
    pub renderer: Option<LogprobRenderer>,
    /// Bytes of text already sent per choice, for completion `text_offset`s.
    sent: Vec<usize>,
}

impl ChunkWriter {
    pub fn new(
        envelope: Envelope,
        include_usage: bool,
        renderer: Option<LogprobRenderer>,
        choices: usize,
    ) -> Self {
        Self {
            envelope,
            include_usage,
            renderer,
            sent: vec![0; choices],
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut body = self.envelope.wrap(true, choices);
        if self.include_usage {
            // Every chunk but the last carries `usage: null`, as OpenAI's do.
            body.insert("usage".into(), Value::Null);
        }
        Value::Object(body)
    }

    /// Chat streams open each choice with the assistant's role and no content.
    pub fn opening(&self) -> Vec<Value> {
        if self.envelope.endpoint != Endpoint::Chat {
            return Vec::new();
        }
        (0..self.sent.len())
            .map(|index| {
                self.chunk(vec![json!({
                    "index": index,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": Value::Null,
                    "finish_reason": Value::Null,
                })])
            })
            .collect()
    }

    /// The chunk for one delta, or `None` when it carries nothing a client would see.
    pub fn delta(&mut self, delta: &ChoiceDelta) -> Option<Value> {
        let has_logprob = delta.logprob.is_some() && self.renderer.is_some();
        if delta.text.is_empty() && delta.finished.is_none() && !has_logprob {
            return None;
        }
        let offset = self.sent.get(delta.choice).copied().unwrap_or(0);
        let logprobs = match (&self.renderer, &delta.logprob) {
            (Some(renderer), Some(entry)) => renderer.render(std::slice::from_ref(entry), offset),
            _ => Value::Null,
        };
        if let Some(sent) = self.sent.get_mut(delta.choice) {
            *sent += delta.text.len();
        }
        let choice = match self.envelope.endpoint {
            Endpoint::Completion => json!({
                "index": delta.choice,
                "text": delta.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(delta.finished),
            }),
            Endpoint::Chat => {
                let content = if delta.text.is_empty() && delta.finished.is_some() {
                    json!({})
                } else {
                    json!({ "content": delta.text })
                };
                json!({
                    "index": delta.choice,
                    "delta": content,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(delta.finished),
                })
            }
        };
        Some(self.chunk(vec![choice]))
    }

    /// The final usage chunk: no choices, only the counts.
    pub fn usage(&self, usage: Usage) -> Value {
        let mut body = self.envelope.wrap(true, Vec::new());
        body.insert("usage".into(), json!(usage));
        Value::Object(body)
    }
}
