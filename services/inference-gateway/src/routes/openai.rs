//! `/v1/models`, `/v1/completions` and `/v1/chat/completions`, as OpenAI clients expect them.
//!
//! Every refusal happens before a stream starts: the body is read, the model found, the prompt
//! tokenized and checked against the context, and only then is the request queued. The
//! response names the registry version that served it in `x-ferrite-model-version`.

use std::collections::VecDeque;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use bytes::Bytes;
use ferrite_model::tokenizer::TokenizerError;
use ferrite_platform::ApiError;
use ferrite_platform::auth::Principal;
use ferrite_platform::http::Json;
use serde_json::{Value, json};

use crate::Gateway;
use crate::deployments::Deployment;
use crate::engine::{DeltaStream, EngineError, EngineRequest};
use crate::openai::request::{Body, LogprobsFormat, RequestError};
use crate::openai::response::{
    ChoiceText, ChunkWriter, Endpoint, Envelope, LogprobRenderer, Usage, whole,
};
use crate::openai::sse;

/// The header that names the registry version behind a response.
pub const VERSION_HEADER: &str = "x-ferrite-model-version";

/// The served deployments, in OpenAI's list shape.
#[utoipa::path(get, path = "/v1/models", tag = "inference-gateway",
    responses((status = 200, description = "`{object: list, data: [model]}`")),
    security(("bearer" = [])))]
pub async fn list_models(_principal: Principal, gateway: web::Data<Gateway>) -> HttpResponse {
    let data: Vec<serde_json::Value> = gateway
        .deployments
        .all()
        .iter()
        .map(|deployment| model_object(deployment))
        .collect();
    HttpResponse::Ok().json(json!({ "object": "list", "data": data }))
}

/// One served deployment.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "inference-gateway",
    responses((status = 200), (status = 404, body = ferrite_platform::error::ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn get_model(
    _principal: Principal,
    gateway: web::Data<Gateway>,
    model: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let deployment = gateway
        .deployments
        .get(&model)
        .ok_or_else(|| RequestError::ModelNotFound(model.into_inner()))?;
    Ok(HttpResponse::Ok().json(model_object(&deployment)))
}

fn model_object(deployment: &Deployment) -> serde_json::Value {
    json!({
        "id": deployment.record.name,
        "object": "model",
        "created": deployment.record.created_at.timestamp(),
        "owned_by": "ferrite",
    })
}

/// Text completion of a prompt.
#[utoipa::path(post, path = "/v1/completions", tag = "inference-gateway",
    request_body(content = Object, description = "OpenAI completion request"),
    responses((status = 200, description = "a completion, or an event stream of chunks"),
        (status = 400, body = ferrite_platform::error::ErrorEnvelope),
        (status = 404, body = ferrite_platform::error::ErrorEnvelope),
        (status = 413, body = ferrite_platform::error::ErrorEnvelope),
        (status = 415, body = ferrite_platform::error::ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn completions(
    _principal: Principal,
    gateway: web::Data<Gateway>,
    body: Json<Value>,
) -> Result<HttpResponse, ApiError> {
    serve(&gateway, body.into_inner(), Endpoint::Completion).await
}

/// The assistant's reply to a conversation, rendered with the model's chat template.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference-gateway",
    request_body(content = Object, description = "OpenAI chat completion request"),
    responses((status = 200, description = "a chat completion, or an event stream of chunks"),
        (status = 400, body = ferrite_platform::error::ErrorEnvelope),
        (status = 404, body = ferrite_platform::error::ErrorEnvelope),
        (status = 413, body = ferrite_platform::error::ErrorEnvelope),
        (status = 415, body = ferrite_platform::error::ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn chat_completions(
    _principal: Principal,
    gateway: web::Data<Gateway>,
    body: Json<Value>,
) -> Result<HttpResponse, ApiError> {
    serve(&gateway, body.into_inner(), Endpoint::Chat).await
}

/// A request checked and tokenized, ready to queue.
struct Prepared {
    deployment: Arc<Deployment>,
    model: String,
    request: EngineRequest,
    stream: bool,
    include_usage: bool,
}

fn prepare(gateway: &Gateway, body: Value, endpoint: Endpoint) -> Result<Prepared, RequestError> {
    let body = Body::new(body)?;
    body.check_arguments(endpoint)?;
    let model = body.model()?;
    let stream = body.stream()?;
    let include_usage = body.include_usage()?;
    let deployment = gateway
        .deployments
        .get(&model)
        .ok_or_else(|| RequestError::ModelNotFound(model.clone()))?;
    let tokenizer = &deployment.info.tokenizer;
    // A prompt that cannot fit is refused by its size before it is encoded.
    let fits = |param: &'static str, bytes: usize| {
        let (limit, at_least) = (deployment.info.context_length, tokenizer.min_tokens(bytes));
        if at_least > limit {
            return Err(RequestError::PromptTooLong {
                param,
                limit,
                bytes,
                at_least,
            });
        }
        Ok(())
    };
    let (prompt, format) = match endpoint {
        Endpoint::Completion => {
            let text = body.prompt()?;
            fits("prompt", text.len())?;
            let ids = tokenizer
                .encode(&text, true)
                .map_err(RequestError::Tokenize)?;
            (ids, LogprobsFormat::Completion)
        }
        Endpoint::Chat => {
            body.response_format()?;
            let messages = body.messages()?;
            fits(
                "messages",
                messages.iter().map(|message| message.content.len()).sum(),
            )?;
            let rendered = tokenizer
                .render_chat(&messages, true)
                .map_err(|error| match error {
                    TokenizerError::NoChatTokens => RequestError::NoChatTemplate(model.clone()),
                    other => RequestError::Tokenize(other),
                })?;
            (rendered.ids, LogprobsFormat::Chat)
        }
    };
    let choices = body.sampling(format, &deployment.info, prompt.len())?;
    Ok(Prepared {
        deployment,
        model,
        request: EngineRequest { prompt, choices },
        stream,
        include_usage,
    })
}

async fn serve(
    gateway: &Gateway,
    body: Value,
    endpoint: Endpoint,
) -> Result<HttpResponse, ApiError> {
    let prepared = prepare(gateway, body, endpoint)?;
    let prompt_tokens = prepared.request.prompt.len();
    let choices = prepared.request.choices.len();
    let renderer = prepared
        .request
        .choices
        .first()
        .is_some_and(|params| params.logprobs)
        .then(|| LogprobRenderer {
            tokenizer: prepared.deployment.info.tokenizer.clone(),
            endpoint,
        });
    let deltas = prepared
        .deployment
        .engine
        .submit(prepared.request)
        .map_err(|error| match error {
            EngineError::Stopped => {
                ApiError::unavailable("the model is not serving; retry shortly")
            }
            other => ApiError::internal(&other),
        })?;
    let envelope = Envelope::new(endpoint, prepared.model);
    let version = prepared.deployment.record.version_id.to_string();

    if prepared.stream {
        let writer = ChunkWriter::new(envelope, prepared.include_usage, renderer, choices);
        let events = EventStream::new(deltas, writer, prompt_tokens, choices);
        return Ok(HttpResponse::Ok()
            .insert_header((VERSION_HEADER, version))
            .insert_header(("cache-control", "no-cache"))
            .content_type("text/event-stream")
            .streaming(events.into_stream()));
    }
    let (texts, usage) = collect(deltas, choices, prompt_tokens).await?;
    Ok(HttpResponse::Ok()
        .insert_header((VERSION_HEADER, version))
        .json(whole(&envelope, &texts, usage, renderer.as_ref())))
}

/// Waits for every choice to finish.
async fn collect(
    mut deltas: DeltaStream,
    choices: usize,
    prompt_tokens: usize,
) -> Result<(Vec<ChoiceText>, Usage), ApiError> {
    let mut texts = vec![ChoiceText::default(); choices];
    while let Some(delta) = deltas.recv().await {
        let delta = delta.map_err(|error| ApiError::internal(&error))?;
        if let Some(text) = texts.get_mut(delta.choice) {
            text.push(&delta);
        }
    }
    if texts.iter().any(|text| text.finish_reason.is_none()) {
        return Err(ApiError::internal(&EngineError::Stopped));
    }
    let completion_tokens = texts.iter().map(|text| text.tokens).sum();
    Ok((texts, usage(prompt_tokens, completion_tokens)))
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// Engine deltas turned into server-sent events.
struct EventStream {
    deltas: DeltaStream,
    writer: ChunkWriter,
    pending: VecDeque<Bytes>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Choices that have not sent their last chunk yet.
    unfinished: usize,
    ended: bool,
}

impl EventStream {
    fn new(deltas: DeltaStream, writer: ChunkWriter, prompt_tokens: usize, choices: usize) -> Self {
        let pending = writer.opening().iter().map(sse::event).collect();
        Self {
            deltas,
            writer,
            pending,
            prompt_tokens,
            completion_tokens: 0,
            unfinished: choices,
            ended: false,
        }
    }

    fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + 'static {
        futures::stream::unfold(self, |mut state| async move {
            loop {
                if let Some(frame) = state.pending.pop_front() {
                    return Some((Ok(frame), state));
                }
                if state.ended {
                    return None;
                }
                let next = state.deltas.recv().await;
                state.absorb(next);
            }
        })
    }

    /// Queues the frames one engine message (or the end of them) produces.
    fn absorb(&mut self, next: Option<Result<crate::engine::ChoiceDelta, EngineError>>) {
        match next {
            Some(Ok(delta)) => {
                self.completion_tokens += 1;
                if delta.finished.is_some() {
                    self.unfinished = self.unfinished.saturating_sub(1);
                }
                if let Some(chunk) = self.writer.delta(&delta) {
                    self.pending.push_back(sse::event(&chunk));
                }
            }
            Some(Err(error)) => self.fail(&error),
            // The engine went away with choices unfinished (its thread died).
            None if self.unfinished > 0 => self.fail(&EngineError::Stopped),
            None => {
                if self.writer.include_usage {
                    let usage = usage(self.prompt_tokens, self.completion_tokens);
                    self.pending
                        .push_back(sse::event(&self.writer.usage(usage)));
                }
                self.pending.push_back(sse::done());
                self.ended = true;
            }
        }
    }

    /// The status line is long gone; the error travels as an event, as OpenAI's do.
    fn fail(&mut self, error: &EngineError) {
        let api = ApiError::internal(error);
        let body = json!({ "error": api.body() });
        self.pending.push_back(sse::event(&body));
        self.pending.push_back(sse::done());
        self.ended = true;
    }
}
