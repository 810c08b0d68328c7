//! Next-token pretraining: cross-entropy on shifted windows, AdamW with warmup and cosine
//! decay, gradient clipping and accumulation, held-out evaluation, metrics streamed to a
//! callback, and checkpoints that resume the exact same run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use ferrite_model::ModelConfig;
use ferrite_model::checkpoint::{self, CheckpointError};
use ferrite_model::llama::{ForwardOptions, Llama};
use ferrite_model::rng::Rng;
use ferrite_model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::adamw::{AdamW, AdamWConfig, AdamWError};
use crate::data::{self, DataError, RandomWindows};
use crate::schedule::WarmupCosine;
use crate::state_file::{self, StateFileError};

/// Why pretraining could not start, checkpoint or resume.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    /// The token data is unusable.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Writing or reading the model folder failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Writing or reading the optimizer state failed.
    #[error(transparent)]
    Optimizer(#[from] AdamWError),
    /// The trainer state file could not be written or read.
    #[error("trainer state {path}: {problem}")]
    State {
        /// The state file.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// A hyper-parameter is out of range.
    #[error("invalid pretraining config: {0}")]
    Invalid(String),
}

impl From<StateFileError> for PretrainError {
    fn from(error: StateFileError) -> Self {
        PretrainError::State {
            path: error.path,
            problem: error.problem,
        }
    }
}

/// Hyper-parameters of a pretraining run; keys left out take their defaults, unknown keys are
/// refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Windows per micro-batch.
    pub batch_size: usize,
    /// Tokens per window the model sees (targets are the same window shifted by one).
    pub sequence_length: usize,
    /// Micro-batches whose gradients are summed before one optimizer step.
    pub gradient_accumulation: usize,
    /// Optimizer steps in the run; the cosine reaches `min_lr` here.
    pub total_steps: usize,
    /// Steps of linear warmup.
    pub warmup_steps: usize,
    /// Learning rate after warmup.
    pub peak_lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the joint gradient norm to this; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Evaluate on held-out data every this many steps (and at the end); 0 disables.
    pub eval_interval: usize,
    /// Held-out windows per evaluation.
    pub eval_windows: usize,
    /// Seeds weight initialisation and the data order.
    pub seed: u64,
    /// Threads libtorch may use; `None` leaves its default.
    pub threads: Option<i32>,
    /// Run forward passes under bf16 autocast; only takes effect on a GPU.
    // TODO: never run on a GPU here (none on the development machines); untested there.
    pub bf16_autocast: bool,
    /// Keep only each block's input between the forward and backward pass and run the block
    /// again in backward: about a third more compute, activations of one block instead of all.
    pub gradient_checkpointing: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            sequence_length: 128,
            gradient_accumulation: 1,
            total_steps: 1000,
            warmup_steps: 50,
            peak_lr: 1e-3,
            min_lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
            eval_interval: 100,
            eval_windows: 32,
            seed: 0,
            threads: None,
            bf16_autocast: true,
            gradient_checkpointing: false,
        }
    }
}

impl PretrainConfig {
    /// The first out-of-range value, as (field, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        for (name, value) in [
            ("batch_size", self.batch_size),
            ("sequence_length", self.sequence_length),
            ("gradient_accumulation", self.gradient_accumulation),
            ("total_steps", self.total_steps),
        ] {
            if value == 0 {
                return Err((name, "must be positive"));
            }
        }
        // Upper bounds: far above any preset's run, far below what would exhaust a worker's
        // memory before the first step (a batch of 1e9 once asked for a terabyte).
        if self.batch_size > 4096 {
            return Err(("batch_size", "must be at most 4096"));
        }
        if self.sequence_length > 131_072 {
            return Err(("sequence_length", "must be at most 131072"));
        }
        if self.batch_size * self.sequence_length > 1 << 20 {
            return Err((
                "batch_size",
                "times sequence_length must be at most 1048576",
            ));
        }
        if self.gradient_accumulation > 4096 {
            return Err(("gradient_accumulation", "must be at most 4096"));
        }
        if self.peak_lr <= 0.0 || !self.peak_lr.is_finite() {
            return Err(("peak_lr", "must be positive and finite"));
        }
        // No useful learning rate reaches 1; a larger one only produces NaNs.
        if self.peak_lr > 1.0 {
            return Err(("peak_lr", "must be at most 1"));
        }
        if self
            .threads
            .is_some_and(|threads| !(1..=1024).contains(&threads))
        {
            return Err(("threads", "must lie in 1..=1024 when set"));
        }
        if self.min_lr.is_nan() || self.min_lr < 0.0 || self.min_lr > self.peak_lr {
            return Err(("min_lr", "must lie in [0, peak_lr]"));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(("beta1", "must lie in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(("beta2", "must lie in [0, 1)"));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(("eps", "must be positive"));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(("weight_decay", "must be non-negative"));
        }
        if self
            .max_grad_norm
            .is_some_and(|norm| norm.is_nan() || norm <= 0.0)
        {
            return Err(("max_grad_norm", "must be positive when set"));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), PretrainError> {
        self.check()
            .map_err(|(name, message)| PretrainError::Invalid(format!("{name} {message}")))
    }

    fn schedule(&self) -> WarmupCosine {
        WarmupCosine {
            peak: self.peak_lr,
            floor: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
        }
    }
}

/// Measurements of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainMetrics {
    /// Optimizer steps completed, this one included.
    pub step: usize,
    /// Mean next-token cross-entropy (nats) over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Joint gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens processed per second during this step.
    pub tokens_per_second: f64,
    /// Training tokens processed since the run began.
    pub tokens_seen: u64,
}

/// Measurements of one held-out evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalMetrics {
    /// Optimizer steps completed when evaluated.
    pub step: usize,
    /// Mean next-token cross-entropy (nats) on held-out windows.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// What the run reports to its observer (the CLI's progress bar, a job runner's metrics stream).
#[derive(Debug, Clone, PartialEq)]
pub enum Metrics {
    /// After every optimizer step.
    Train(TrainMetrics),
    /// After every held-out evaluation.
    Eval(EvalMetrics),
}

/// Trainer state beyond the weights and optimizer moments, stored as `trainer_state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    tokens_seen: u64,
    windows_drawn: u64,
    /// As strings: JSON readers other than serde lose integers past 2^53.
    data_rng_state: [String; 4],
    config: PretrainConfig,
}

/// File names a pretraining checkpoint adds to the model folder.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Mean next-token cross-entropy of `model` on `windows` `[batch, time + 1]`.
pub fn next_token_loss(model: &Llama, windows: &Tensor, bf16_autocast: bool) -> Tensor {
    let (inputs, targets) = split_windows(windows);
    let autocast = bf16_autocast && windows.device().is_cuda();
    tch::autocast(autocast, || {
        let inputs = model.prepare(&inputs, &ForwardOptions::default());
        mean_cross_entropy(model, &model.run_blocks(&inputs, None), &targets)
    })
}

/// As [`next_token_loss`] followed by `backward()` on the loss times `scale`, with gradient
/// checkpointing (see [`Llama::backward_checkpointed`]); returns the unscaled loss.
fn next_token_loss_checkpointed(
    model: &Llama,
    windows: &Tensor,
    bf16_autocast: bool,
    scale: f64,
) -> Tensor {
    let (inputs, targets) = split_windows(windows);
    let autocast = bf16_autocast && windows.device().is_cuda();
    tch::autocast(autocast, || {
        let inputs = model.prepare(&inputs, &ForwardOptions::default());
        let scaled = model.backward_checkpointed(&inputs, None, |hidden| {
            mean_cross_entropy(model, hidden, &targets) * scale
        });
        scaled / scale
    })
}

/// Inputs and next-token targets of `windows` `[batch, time + 1]`.
fn split_windows(windows: &Tensor) -> (Tensor, Tensor) {
    let time = windows.size()[1] - 1;
    (windows.narrow(1, 0, time), windows.narrow(1, 1, time))
}

fn mean_cross_entropy(model: &Llama, hidden: &Tensor, targets: &Tensor) -> Tensor {
    let logits = model.logits_from_hidden(hidden);
    let vocab = logits.size()[2];
    logits
        .to_kind(Kind::Float)
        .view([-1, vocab])
        .cross_entropy_for_logits(&targets.reshape([-1]))
}

/// Initialises weights as `transformers` does for Llama (N(0, 0.02) matrices, unit norm gains)
/// from `seed` through this crate's generator, so a run does not depend on libtorch's global one.
pub fn initialise_weights(var_store: &nn::VarStore, seed: u64) {
    let mut rng = Rng::seed(seed);
    let variables: BTreeMap<String, Tensor> = var_store.variables().into_iter().collect();
    for (name, variable) in variables {
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; variable.numel()]
        } else {
            (0..variable.numel())
                .map(|_| 0.02 * standard_normal(&mut rng) as f32)
                .collect()
        };
        let initial = Tensor::from_slice(&values)
            .view(variable.size().as_slice())
            .to_device(variable.device())
            .to_kind(variable.kind());
        let mut variable = variable;
        tch::no_grad(|| variable.copy_(&initial));
    }
}

/// A standard normal draw by the Box-Muller transform.
fn standard_normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A pretraining run: model, optimizer, data stream and position.
#[derive(Debug)]
pub struct Pretrainer {
    config: PretrainConfig,
    model_config: ModelConfig,
    var_store: nn::VarStore,
    model: Llama,
    optimizer: AdamW,
    train: RandomWindows,
    held_out: Tensor,
    step: usize,
    tokens_seen: u64,
}

impl Pretrainer {
    /// A fresh run of a newly initialised model.
    pub fn new(
        model_config: ModelConfig,
        config: PretrainConfig,
        train_tokens: Vec<u32>,
        held_out_tokens: &[u32],
        device: Device,
    ) -> Result<Self, PretrainError> {
        config.validate()?;
        model_config
            .validate()
            .map_err(|error| PretrainError::Invalid(error.to_string()))?;
        if let Some(threads) = config.threads {
            tch::set_num_threads(threads);
        }
        let var_store = nn::VarStore::new(device);
        let model = Llama::new(&var_store.root(), &model_config);
        initialise_weights(&var_store, config.seed);
        Self::assemble(
            model_config,
            config,
            var_store,
            model,
            train_tokens,
            held_out_tokens,
        )
    }

    fn assemble(
        model_config: ModelConfig,
        config: PretrainConfig,
        var_store: nn::VarStore,
        model: Llama,
        train_tokens: Vec<u32>,
        held_out_tokens: &[u32],
    ) -> Result<Self, PretrainError> {
        let adamw = AdamWConfig {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
        };
        let optimizer = AdamW::new(checkpoint::named_tensors_trainable(&var_store), adamw);
        // A different stream from the weights' so changing one never shifts the other.
        let train = RandomWindows::new(
            train_tokens,
            config.sequence_length,
            config.seed ^ 0x5eed_da7a,
        )?;
        let windows = data::held_out_windows(
            held_out_tokens,
            config.sequence_length,
            config.eval_windows.max(1),
        )?;
        let rows = windows.len() as i64;
        let held_out = Tensor::from_slice(&windows.concat())
            .view([rows, config.sequence_length as i64 + 1])
            .to_device(var_store.device());
        Ok(Self {
            config,
            model_config,
            var_store,
            model,
            optimizer,
            train,
            held_out,
            step: 0,
            tokens_seen: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model's parameters.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.var_store
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The run's hyper-parameters.
    pub fn config(&self) -> &PretrainConfig {
        &self.config
    }

    /// One optimizer step over `gradient_accumulation` micro-batches.
    pub fn train_step(&mut self) -> TrainMetrics {
        let started = Instant::now();
        let device = self.var_store.device();
        let micro_batches = self.config.gradient_accumulation;
        self.optimizer.zero_grad();
        let mut loss_sum = 0.0;
        for _ in 0..micro_batches {
            let windows = self.train.next_batch(self.config.batch_size, device);
            // Dividing each micro-batch's mean by their count makes the summed gradient the
            // gradient of the mean over the whole step's tokens.
            let scale = 1.0 / micro_batches as f64;
            let autocast = self.config.bf16_autocast;
            let loss = if self.config.gradient_checkpointing {
                next_token_loss_checkpointed(&self.model, &windows, autocast, scale)
            } else {
                let loss = next_token_loss(&self.model, &windows, autocast);
                (&loss * scale).backward();
                loss
            };
            loss_sum += loss.double_value(&[]);
        }
        let grad_norm = match self.config.max_grad_norm {
            Some(max_norm) => self.optimizer.clip_gradient_norm(max_norm),
            None => self.optimizer.gradient_norm(),
        };
        let lr = self.config.schedule().at(self.step);
        self.optimizer.step(lr);
        self.step += 1;

        let tokens = (micro_batches * self.config.batch_size * self.config.sequence_length) as u64;
        self.tokens_seen += tokens;
        TrainMetrics {
            step: self.step,
            loss: loss_sum / micro_batches as f64,
            lr,
            grad_norm,
            tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            tokens_seen: self.tokens_seen,
        }
    }

    /// Mean loss and perplexity on the held-out windows.
    pub fn evaluate(&self) -> EvalMetrics {
        let batch = self.config.batch_size.max(1) as i64;
        let rows = self.held_out.size()[0];
        let mut weighted = 0.0;
        tch::no_grad(|| {
            for start in (0..rows).step_by(batch as usize) {
                let windows = self.held_out.narrow(0, start, batch.min(rows - start));
                let count = windows.size()[0] as f64;
                weighted += count
                    * next_token_loss(&self.model, &windows, self.config.bf16_autocast)
                        .double_value(&[]);
            }
        });
        let loss = weighted / rows as f64;
        EvalMetrics {
            step: self.step,
            loss,
            perplexity: loss.exp(),
        }
    }

    /// Trains until `total_steps`, evaluating every `eval_interval` steps and at the end.
    pub fn run(&mut self, on_metrics: &mut dyn FnMut(&Metrics)) {
        self.run_until(self.config.total_steps, on_metrics);
    }

    /// Trains until `step` optimizer steps are done (useful for stopping to checkpoint).
    pub fn run_until(&mut self, step: usize, on_metrics: &mut dyn FnMut(&Metrics)) {
        while self.step < step {
            let metrics = self.train_step();
            on_metrics(&Metrics::Train(metrics));
            let interval = self.config.eval_interval;
            let due = interval > 0 && self.step.is_multiple_of(interval);
            if due || self.step == self.config.total_steps {
                on_metrics(&Metrics::Eval(self.evaluate()));
            }
        }
    }

    /// Writes a Hugging Face model folder plus the optimizer state and trainer position.
    pub fn save(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<(), PretrainError> {
        checkpoint::save(dir, &self.var_store, &self.model_config, tokenizer)?;
        self.optimizer.save(&dir.join(OPTIMIZER_FILE))?;
        let state = TrainerState {
            step: self.step,
            tokens_seen: self.tokens_seen,
            windows_drawn: self.train.drawn(),
            data_rng_state: self.train.rng_state().map(|word| word.to_string()),
            config: self.config.clone(),
        };
        state_file::write(dir, &state)?;
        tracing::info!(step = self.step, dir = %dir.display(), "pretraining checkpoint written");
        Ok(())
    }

    /// Continues a run saved by [`Pretrainer::save`] on the same data: weights, optimizer
    /// moments, step, data position and generator state all come back, so the loss curve
    /// continues as if the run had never stopped.
    pub fn resume(
        dir: &Path,
        train_tokens: Vec<u32>,
        held_out_tokens: &[u32],
        device: Device,
    ) -> Result<Self, PretrainError> {
        let state: TrainerState = state_file::read(dir)?;
        let mut rng_state = [0u64; 4];
        for (word, saved) in rng_state.iter_mut().zip(&state.data_rng_state) {
            *word = saved.parse().map_err(|_| {
                StateFileError::at(dir, format!("data_rng_state word {saved:?} is not a u64"))
            })?;
        }

        state.config.validate()?;
        if let Some(threads) = state.config.threads {
            tch::set_num_threads(threads);
        }
        let loaded = checkpoint::load(dir, device)?;
        let mut trainer = Self::assemble(
            loaded.config,
            state.config,
            loaded.var_store,
            loaded.model,
            train_tokens,
            held_out_tokens,
        )?;
        trainer.optimizer.load(&dir.join(OPTIMIZER_FILE))?;
        trainer.train.restore(state.windows_drawn, rng_state);
        trainer.step = state.step;
        trainer.tokens_seen = state.tokens_seen;
        Ok(trainer)
    }
}
