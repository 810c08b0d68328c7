//! The model server behind a deployment: a request queue feeding one dedicated thread that
//! steps a [`Batch`], admitting waiting requests between steps (continuous batching).
//!
//! The HTTP side only sees the [`Engine`] trait: submit token ids with per-choice sampling
//! parameters, receive deltas. Quantised weights, hot-loaded adapters, canaries and remote
//! replicas are further implementations of it; the routes do not change.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ferrite_model::generate::{
    Batch, FinishReason, GenerateError, SamplingParams, SequenceId, StepOutput, TokenLogprob,
};
use ferrite_model::tokenizer::Tokenizer;
use ferrite_model::{Llama, checkpoint};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::EngineMetrics;

/// Why an engine could not start or take a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load the model from {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: Box<checkpoint::CheckpointError>,
    },
    #[error("the checkpoint in {0} has no tokenizer.json")]
    NoTokenizer(PathBuf),
    #[error("cannot apply the adapter in {path}: {source}")]
    Adapter {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the engine thread could not start: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the engine has stopped")]
    Stopped,
    #[error("generation failed: {0}")]
    Generate(#[from] GenerateError),
}

/// One request: a prompt and the sampling of each of its choices (`n` of them).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub choices: Vec<SamplingParams>,
}

/// What one step produced for one choice of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceDelta {
    /// The choice's index in the request.
    pub choice: usize,
    pub token: u32,
    /// Text now safe to show (see [`StepOutput::text_delta`]).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// Set on the choice's last delta.
    pub finished: Option<FinishReason>,
}

/// The deltas of one request, in order; ends after every choice has finished, or with an error.
pub type DeltaStream = mpsc::UnboundedReceiver<Result<ChoiceDelta, EngineError>>;

/// What the gateway needs to know about a loaded model to prepare requests.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub tokenizer: Arc<Tokenizer>,
    /// Longest prompt plus completion, in tokens.
    pub context_length: usize,
}

/// Serves generation requests for one deployment.
pub trait Engine: Send + Sync {
    /// Queues a request; deltas arrive on the returned stream. Dropping the stream cancels it.
    fn submit(&self, request: EngineRequest) -> Result<DeltaStream, EngineError>;
}

/// How a [`LocalEngine`] runs.
#[derive(Debug, Clone)]
pub struct LocalEngineConfig {
    /// A Hugging Face folder with config.json, model.safetensors and tokenizer.json.
    pub checkpoint_dir: PathBuf,
    /// A PEFT folder merged into the model after loading, when the deployment is an adapter.
    pub adapter_dir: Option<PathBuf>,
    /// Most sequences (choices) stepped together.
    pub max_batch_sequences: usize,
    pub metrics: EngineMetrics,
}

/// An engine in this process: a thread that owns the model.
pub struct LocalEngine {
    queue: mpsc::UnboundedSender<Queued>,
    metrics: EngineMetrics,
}

struct Queued {
    request: EngineRequest,
    enqueued_at: Instant,
    deltas: mpsc::UnboundedSender<Result<ChoiceDelta, EngineError>>,
}

impl LocalEngine {
    /// Starts the thread, which loads the checkpoint; returns once the model is ready.
    pub async fn start(config: LocalEngineConfig) -> Result<(Self, ModelInfo), EngineError> {
        let (queue, requests) = mpsc::unbounded_channel();
        let (ready, loaded) = oneshot::channel();
        let metrics = config.metrics.clone();
        std::thread::Builder::new()
            .name("ferrite-engine".to_string())
            .spawn(move || run_thread(config, requests, ready))?;
        let info = loaded.await.map_err(|_| EngineError::Stopped)??;
        Ok((Self { queue, metrics }, info))
    }
}

impl Engine for LocalEngine {
    fn submit(&self, request: EngineRequest) -> Result<DeltaStream, EngineError> {
        let (deltas, stream) = mpsc::unbounded_channel();
        let queued = Queued {
            request,
            enqueued_at: Instant::now(),
            deltas,
        };
        self.queue.send(queued).map_err(|_| EngineError::Stopped)?;
        self.metrics.waiting.inc();
        Ok(stream)
    }
}

/// The thread's body: load, report readiness, then serve until every sender is gone.
fn run_thread(
    config: LocalEngineConfig,
    requests: mpsc::UnboundedReceiver<Queued>,
    ready: oneshot::Sender<Result<ModelInfo, EngineError>>,
) {
    // Requests share the machine's cores with HTTP workers; one torch thread per engine keeps
    // latency predictable on small machines.
    tch::set_num_threads(1);
    let checkpoint = match load_model(&config) {
        Ok(checkpoint) => checkpoint,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let Some(tokenizer) = checkpoint.tokenizer.clone() else {
        let _ = ready.send(Err(EngineError::NoTokenizer(config.checkpoint_dir)));
        return;
    };
    let info = ModelInfo {
        tokenizer: Arc::new(tokenizer.clone()),
        context_length: usize::try_from(checkpoint.config.max_position_embeddings).unwrap_or(0),
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    let mut server = Server::new(&checkpoint.model, &tokenizer, &config);
    server.serve(requests);
}

/// The base model, with the adapter (if any) merged into its weights: serving then costs
/// what the base costs.
// TODO: engines run on the CPU in f32 only; serving on a GPU or with int8/NF4 weights needs a
// device and quantisation in the deployment, which this slice does not take yet.
fn load_model(config: &LocalEngineConfig) -> Result<checkpoint::Checkpoint, EngineError> {
    let mut checkpoint =
        checkpoint::load(&config.checkpoint_dir, tch::Device::Cpu).map_err(|source| {
            EngineError::Load {
                path: config.checkpoint_dir.clone(),
                source: Box::new(source),
            }
        })?;
    if let Some(dir) = &config.adapter_dir {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| EngineError::Adapter {
            path: dir.clone(),
            source,
        };
        let (adapter, _) = ferrite_model::adapter::load(dir, &mut checkpoint.model)
            .map_err(|e| failed(Box::new(e)))?;
        adapter.merge().map_err(|e| failed(Box::new(e)))?;
    }
    Ok(checkpoint)
}

/// A request being generated.
struct Active {
    enqueued_at: Instant,
    deltas: mpsc::UnboundedSender<Result<ChoiceDelta, EngineError>>,
    first_token_seen: bool,
    /// When each choice last produced a token.
    last_token_at: Vec<Instant>,
    sequences: Vec<SequenceId>,
    unfinished: usize,
}

/// The loop state on the engine thread.
struct Server<'m> {
    batch: Batch<'m>,
    waiting: VecDeque<Queued>,
    requests: Requests,
    max_batch_sequences: usize,
    metrics: EngineMetrics,
}

/// The requests in the batch and the sequences each owns.
struct Requests {
    active: HashMap<u64, Active>,
    /// Which request and choice each running sequence belongs to.
    owners: HashMap<SequenceId, (u64, usize)>,
    next_request: u64,
    metrics: EngineMetrics,
}

impl<'m> Server<'m> {
    fn new(model: &'m Llama, tokenizer: &'m Tokenizer, config: &LocalEngineConfig) -> Self {
        Self {
            batch: Batch::new(model, tokenizer),
            waiting: VecDeque::new(),
            requests: Requests {
                active: HashMap::new(),
                owners: HashMap::new(),
                next_request: 0,
                metrics: config.metrics.clone(),
            },
            max_batch_sequences: config.max_batch_sequences.max(1),
            metrics: config.metrics.clone(),
        }
    }

    fn serve(&mut self, mut requests: mpsc::UnboundedReceiver<Queued>) {
        loop {
            if self.batch.is_empty() && self.waiting.is_empty() {
                // Idle: sleep until a request arrives or the engine is dropped.
                match requests.blocking_recv() {
                    Some(queued) => self.waiting.push_back(queued),
                    None => return,
                }
            }
            while let Ok(queued) = requests.try_recv() {
                self.waiting.push_back(queued);
            }
            self.admit();
            if self.batch.is_empty() {
                continue;
            }
            // Tokens go out as soon as they are sampled, before the forward pass that prepares
            // the next step, so no client waits for a pass its token does not need.
            let book = &mut self.requests;
            let mut abandoned = Vec::new();
            self.batch
                .step_with(|outputs| abandoned = book.dispatch(outputs));
            // Completions are reported through the deltas; drop the batch's copies.
            self.batch.take_completions();
            for key in abandoned {
                // The client went away: stop spending compute on its sequences.
                if let Some(sequences) = self.requests.abandon(key) {
                    self.batch.remove(&sequences);
                }
            }
        }
    }

    /// Moves waiting requests into the batch while their choices fit (one always may), with
    /// one prefill for all of them.
    fn admit(&mut self) {
        let mut admitted = Vec::new();
        let mut sequences = self.batch.len();
        while let Some(front) = self.waiting.front() {
            let choices = front.request.choices.len();
            if sequences + choices > self.max_batch_sequences && sequences > 0 {
                break;
            }
            let Some(queued) = self.waiting.pop_front() else {
                break;
            };
            self.metrics.waiting.dec();
            if queued.deltas.is_closed() {
                continue;
            }
            sequences += choices;
            self.metrics
                .queue_time
                .observe(queued.enqueued_at.elapsed().as_secs_f64());
            self.metrics
                .prompt_tokens
                .inc_by(queued.request.prompt.len() as u64);
            admitted.push(queued);
        }
        if admitted.len() <= 1 {
            if let Some(queued) = admitted.pop() {
                self.add_alone(queued);
            }
            return;
        }
        let prompts: Vec<(Vec<u32>, SamplingParams)> = admitted
            .iter()
            .flat_map(|queued| {
                let prompt = &queued.request.prompt;
                queued
                    .request
                    .choices
                    .iter()
                    .map(move |params| (prompt.clone(), params.clone()))
            })
            .collect();
        match self.batch.add(&prompts) {
            Ok(ids) => {
                let mut ids = ids.into_iter();
                for queued in admitted {
                    let count = queued.request.choices.len();
                    let own: Vec<SequenceId> = ids.by_ref().take(count).collect();
                    self.requests.activate(queued, own);
                }
            }
            // A request the batch refuses (an id outside the vocabulary, say) must not sink
            // the others: add each alone, so only the culprit gets the error.
            Err(_) => {
                for queued in admitted {
                    self.add_alone(queued);
                }
            }
        }
    }

    fn add_alone(&mut self, queued: Queued) {
        let prompts: Vec<(Vec<u32>, SamplingParams)> = queued
            .request
            .choices
            .iter()
            .map(|params| (queued.request.prompt.clone(), params.clone()))
            .collect();
        match self.batch.add(&prompts) {
            Ok(ids) => self.requests.activate(queued, ids),
            Err(error) => {
                let _ = queued.deltas.send(Err(error.into()));
            }
        }
    }
}

impl Requests {
    fn activate(&mut self, queued: Queued, sequences: Vec<SequenceId>) {
        let key = self.next_request;
        self.next_request += 1;
        for (choice, &sequence) in sequences.iter().enumerate() {
            self.owners.insert(sequence, (key, choice));
        }
        let now = Instant::now();
        self.metrics.running.inc();
        self.active.insert(
            key,
            Active {
                enqueued_at: queued.enqueued_at,
                deltas: queued.deltas,
                first_token_seen: false,
                last_token_at: vec![now; sequences.len()],
                unfinished: sequences.len(),
                sequences,
            },
        );
    }

    /// Sends each output to its request, measures latencies and retires finished requests;
    /// returns the requests whose client went away.
    fn dispatch(&mut self, outputs: &[StepOutput]) -> Vec<u64> {
        let now = Instant::now();
        let mut abandoned = Vec::new();
        for output in outputs {
            let Some(&(key, choice)) = self.owners.get(&output.sequence) else {
                continue;
            };
            if output.finished.is_some() {
                self.owners.remove(&output.sequence);
            }
            let Some(active) = self.active.get_mut(&key) else {
                continue;
            };
            self.metrics.generated_tokens.inc();
            if active.first_token_seen {
                let gap = now.duration_since(active.last_token_at[choice]);
                self.metrics.inter_token_latency.observe(gap.as_secs_f64());
            } else {
                active.first_token_seen = true;
                let ttft = now.duration_since(active.enqueued_at);
                self.metrics.time_to_first_token.observe(ttft.as_secs_f64());
            }
            active.last_token_at[choice] = now;
            let delta = ChoiceDelta {
                choice,
                token: output.token,
                text: output.text_delta.clone(),
                logprob: output.logprob.clone(),
                finished: output.finished,
            };
            if active.deltas.send(Ok(delta)).is_err() {
                abandoned.push(key);
                continue;
            }
            if output.finished.is_some() {
                active.unfinished -= 1;
                if active.unfinished == 0 {
                    let e2e = now.duration_since(active.enqueued_at);
                    self.metrics.e2e_latency.observe(e2e.as_secs_f64());
                    self.retire(key);
                }
            }
        }
        abandoned
    }

    /// Forgets a request whose client left; returns its sequences to drop from the batch.
    fn abandon(&mut self, key: u64) -> Option<Vec<SequenceId>> {
        let sequences = self.active.get(&key)?.sequences.clone();
        for sequence in &sequences {
            self.owners.remove(sequence);
        }
        self.retire(key);
        Some(sequences)
    }

    fn retire(&mut self, key: u64) {
        let retired = self.active.remove(&key);
        if retired.is_some() {
            self.metrics.running.dec();
        }
        // Dropping the request closes its stream; the gauge is right before the client knows.
        drop(retired);
    }
}
