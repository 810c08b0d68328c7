//! Text generation with a KV cache: greedy and sampled decoding (temperature, top-k, top-p)
//! from a per-sequence seed, stop tokens and stop strings, log-probabilities, and batches of
//! prompts of different lengths.
//!
//! The unit of work is [`Batch::step`]: sample one token for every running sequence, report
//! what each sequence's caller may now see, then run one forward pass for the survivors.
//! Sequences can join ([`Batch::add`]) and leave between steps, which is what a server's
//! continuous batching needs; [`generate`] is the simple loop over it.
//!
//! Text is released under two rules: a character split across tokens is held until it is
//! complete, and text that could still grow into a stop string is held until it cannot, so a
//! streaming caller never sees a stop string or any prefix of one.

use tch::{Device, Kind, Tensor};

use crate::llama::{ForwardOptions, KvCache, Llama};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// Why generation could not start.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A prompt had no tokens; there is nothing to condition on.
    #[error("prompt {index} is empty")]
    EmptyPrompt {
        /// Position of the prompt in the request.
        index: usize,
    },
    /// A prompt token has no embedding row.
    #[error("prompt {index} contains token id {token}, outside the model's vocabulary of {vocab}")]
    TokenOutOfRange {
        /// Position of the prompt in the request.
        index: usize,
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: i64,
    },
    /// A sampling parameter is out of its range.
    #[error("invalid sampling parameter: {0}")]
    InvalidParameter(String),
}

/// Turns generated ids into text; implemented by the crate's tokenizer and by test decoders.
pub trait TextDecoder {
    /// The text of `ids`, special tokens skipped, incomplete UTF-8 as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;

    /// A decoder fed one id at a time. The default decodes the whole output again on every
    /// id (quadratic in its length), which suits small test decoders; real tokenizers
    /// override it with one that keeps only the bytes of an unfinished character.
    fn incremental(&self) -> Box<dyn IncrementalDecoder + '_> {
        Box::new(Redecode {
            decoder: self,
            ids: Vec::new(),
            emitted: 0,
        })
    }
}

/// Text of a growing id sequence, delivered as deltas.
pub trait IncrementalDecoder {
    /// Adds one id; returns the text it completes (possibly empty), never half a character.
    fn push(&mut self, id: u32) -> String;
    /// Ends the sequence: bytes still held can no longer form a character and come out as
    /// U+FFFD, as a full decode would show them.
    fn finish(&mut self) -> String;
}

/// The fallback [`IncrementalDecoder`]: decodes everything so far and returns what is new.
struct Redecode<'a, D: ?Sized> {
    decoder: &'a D,
    ids: Vec<u32>,
    /// Bytes of the stable decoded text already returned.
    emitted: usize,
}

impl<D: TextDecoder + ?Sized> IncrementalDecoder for Redecode<'_, D> {
    fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.decoder.decode(&self.ids);
        // A trailing U+FFFD may be a character still arriving; hold it until the next id.
        let stable = text.trim_end_matches('\u{FFFD}').len();
        let delta = text
            .get(self.emitted..stable)
            .unwrap_or_default()
            .to_string();
        self.emitted = stable.max(self.emitted);
        delta
    }

    fn finish(&mut self) -> String {
        let text = self.decoder.decode(&self.ids);
        let rest = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        rest
    }
}

impl TextDecoder for Tokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        // The embedding may have more rows than the tokenizer has ids (it is often padded);
        // an id past the tokenizer has no text.
        let size = self.vocab_size();
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < size)
            .collect();
        Tokenizer::decode(self, &known, true).unwrap_or_default()
    }

    fn incremental(&self) -> Box<dyn IncrementalDecoder + '_> {
        Box::new(self.stream_decoder(true))
    }
}

impl IncrementalDecoder for crate::tokenizer::StreamDecoder {
    fn push(&mut self, id: u32) -> String {
        // An id past the tokenizer (a padded embedding row) has no text.
        crate::tokenizer::StreamDecoder::push(self, id).unwrap_or_default()
    }

    fn finish(&mut self) -> String {
        crate::tokenizer::StreamDecoder::finish(self)
    }
}

/// How one sequence is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep only the k most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p; `None` keeps all.
    pub top_p: Option<f64>,
    /// Seed of this sequence's own generator: the same seed gives the same tokens.
    pub seed: u64,
    /// Texts that end generation; the text returned stops right before the first one.
    pub stop: Vec<String>,
    /// Tokens that end generation (normally EOS); they are not part of the text.
    pub stop_token_ids: Vec<u32>,
    /// Whether to report each token's log-probability.
    pub logprobs: bool,
    /// How many most likely alternatives to report per position (with `logprobs`).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    fn validate(&self) -> Result<(), GenerateError> {
        let invalid = |message: String| Err(GenerateError::InvalidParameter(message));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return invalid(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return invalid(format!("top_p must lie in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return invalid("top_k must be at least 1".to_string());
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("a stop string is empty".to_string());
        }
        Ok(())
    }
}

/// The log-probability of a chosen token under the model (before temperature and filtering),
/// with the most likely alternatives at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string was produced.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// Identifies a sequence within a [`Batch`].
pub type SequenceId = u64;

/// What one step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The sequence.
    pub sequence: SequenceId,
    /// The token sampled this step.
    pub token: u32,
    /// Text newly safe to show: never half a character, never part of a stop string.
    pub text_delta: String,
    /// The token's log-probability, when requested.
    pub logprob: Option<TokenLogprob>,
    /// Set on the sequence's last step.
    pub finished: Option<FinishReason>,
}

/// A finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated tokens, including a final stop token if one ended the sequence.
    pub tokens: Vec<u32>,
    /// Generated text, cut before any stop string.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Per-token log-probabilities, when requested.
    pub logprobs: Vec<TokenLogprob>,
}

struct Sequence<'m> {
    id: SequenceId,
    params: SamplingParams,
    rng: Rng,
    generated: Vec<u32>,
    /// Turns each new token into text without decoding the whole output again.
    decoder: Box<dyn IncrementalDecoder + 'm>,
    /// Bytes of the decoded text already released to the caller.
    released: usize,
    /// Every complete character decoded so far (stop strings included until one is found).
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// Logits for this sequence's next token, from the last forward pass.
    next_logits: Vec<f32>,
    /// Rotary position of the next token.
    next_position: i64,
}

/// Running sequences sharing one KV cache, left-padded to a common length.
pub struct Batch<'m> {
    model: &'m Llama,
    decoder: &'m dyn TextDecoder,
    cache: KvCache,
    /// `[rows, cached]`, 1 where a cached position is a real token.
    mask: Option<Tensor>,
    padded: bool,
    sequences: Vec<Sequence<'m>>,
    completions: Vec<(SequenceId, Completion)>,
    next_id: SequenceId,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("sequences", &self.sequences.len())
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl<'m> Batch<'m> {
    /// An empty batch over `model`, decoding text with `decoder`.
    pub fn new(model: &'m Llama, decoder: &'m dyn TextDecoder) -> Self {
        Self {
            model,
            decoder,
            cache: KvCache::new(model.layers.len()),
            mask: None,
            padded: false,
            sequences: Vec::new(),
            completions: Vec::new(),
            next_id: 0,
        }
    }

    /// Number of running sequences.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether no sequence is running.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Prefills `prompts` together (left-padded to the longest) and adds them to the batch;
    /// returns their ids in order. Their first tokens are sampled by the next [`Batch::step`].
    pub fn add(
        &mut self,
        prompts: &[(Vec<u32>, SamplingParams)],
    ) -> Result<Vec<SequenceId>, GenerateError> {
        let vocab = self.model.config().vocab_size;
        for (index, (prompt, params)) in prompts.iter().enumerate() {
            params.validate()?;
            if prompt.is_empty() {
                return Err(GenerateError::EmptyPrompt { index });
            }
            if let Some(&token) = prompt.iter().find(|&&token| i64::from(token) >= vocab) {
                return Err(GenerateError::TokenOutOfRange {
                    index,
                    token,
                    vocab,
                });
            }
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }

        let device = self.model.embed_tokens().device();
        let longest = prompts
            .iter()
            .map(|(prompt, _)| prompt.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(prompts.len() * longest);
        let mut mask = Vec::with_capacity(prompts.len() * longest);
        for (prompt, _) in prompts {
            let padding = longest - prompt.len();
            ids.extend(
                std::iter::repeat_n(0i64, padding).chain(prompt.iter().map(|&t| i64::from(t))),
            );
            mask.extend(
                std::iter::repeat_n(0i64, padding).chain(std::iter::repeat_n(1i64, prompt.len())),
            );
        }
        let shape = [prompts.len() as i64, longest as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(device);
        // Positions count real tokens only, so a left-padded prompt gets the positions it
        // would have alone; padding slots get 0, which the mask hides anyway.
        let positions = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
        let any_padding = prompts.iter().any(|(prompt, _)| prompt.len() < longest);

        let mut cache = KvCache::new(self.model.layers.len());
        let logits = tch::no_grad(|| {
            let options = ForwardOptions {
                attention_mask: any_padding.then_some(&mask),
                position_ids: Some(&positions),
            };
            self.model
                .forward(&ids, &options, Some(&mut cache))
                .select(1, -1)
        });
        let logits = rows_to_vecs(&logits);

        let mut ids_out = Vec::with_capacity(prompts.len());
        for ((prompt, params), next_logits) in prompts.iter().zip(logits) {
            let id = self.next_id;
            self.next_id += 1;
            ids_out.push(id);
            self.sequences.push(Sequence {
                id,
                params: params.clone(),
                rng: Rng::seed(params.seed),
                generated: Vec::new(),
                decoder: self.decoder.incremental(),
                released: 0,
                text: String::new(),
                logprobs: Vec::new(),
                next_logits,
                next_position: prompt.len() as i64,
            });
        }
        self.merge(cache, mask, any_padding);
        Ok(ids_out)
    }

    /// Stacks a freshly prefilled group under the running rows, left-padding the shorter side.
    fn merge(&mut self, mut cache: KvCache, mut mask: Tensor, padded: bool) {
        let Some(mut current_mask) = self.mask.take() else {
            self.cache = cache;
            self.mask = Some(mask);
            self.padded = padded;
            return;
        };
        let (current, incoming) = (self.cache.len(), cache.len());
        self.padded = self.padded || padded || current != incoming;
        if current < incoming {
            self.cache.pad_left(incoming - current);
            current_mask = current_mask.constant_pad_nd([incoming - current, 0]);
        } else {
            cache.pad_left(current - incoming);
            mask = mask.constant_pad_nd([current - incoming, 0]);
        }
        self.cache.append_rows(&cache);
        self.mask = Some(Tensor::cat(&[current_mask, mask], 0));
    }

    /// Samples one token for every sequence, returns what each produced, drops the finished
    /// ones and runs the forward pass that prepares the next step.
    pub fn step(&mut self) -> Vec<StepOutput> {
        self.step_with(|_| {})
    }

    /// [`Batch::step`], handing the outputs to `deliver` as soon as they are sampled, before
    /// the forward pass that prepares the next step: a server streams them without making
    /// clients wait for that pass.
    pub fn step_with(&mut self, deliver: impl FnOnce(&[StepOutput])) -> Vec<StepOutput> {
        let outputs: Vec<StepOutput> = self.sequences.iter_mut().map(Sequence::advance).collect();
        deliver(&outputs);

        let keep: Vec<i64> = outputs
            .iter()
            .enumerate()
            .filter(|(_, output)| output.finished.is_none())
            .map(|(row, _)| row as i64)
            .collect();
        if keep.len() < self.sequences.len() {
            for (sequence, output) in self.sequences.iter_mut().zip(&outputs) {
                if let Some(finish_reason) = output.finished {
                    let completion = Completion {
                        tokens: std::mem::take(&mut sequence.generated),
                        text: std::mem::take(&mut sequence.text),
                        finish_reason,
                        logprobs: std::mem::take(&mut sequence.logprobs),
                    };
                    self.completions.push((sequence.id, completion));
                }
            }
            self.retain_rows(&keep);
        }
        if !self.sequences.is_empty() {
            self.decode_forward();
        }
        outputs
    }

    /// Drops running sequences whose caller no longer wants them; unknown ids are ignored.
    pub fn remove(&mut self, ids: &[SequenceId]) {
        let keep: Vec<i64> = self
            .sequences
            .iter()
            .enumerate()
            .filter(|(_, sequence)| !ids.contains(&sequence.id))
            .map(|(row, _)| row as i64)
            .collect();
        if keep.len() < self.sequences.len() {
            self.retain_rows(&keep);
        }
    }

    fn retain_rows(&mut self, keep: &[i64]) {
        let mut row = 0;
        self.sequences.retain(|_| {
            let kept = keep.contains(&row);
            row += 1;
            kept
        });
        if self.sequences.is_empty() {
            self.cache = KvCache::new(self.model.layers.len());
            self.mask = None;
            self.padded = false;
            return;
        }
        let device = self.model.embed_tokens().device();
        let rows = Tensor::from_slice(keep).to_device(device);
        self.cache.select_rows(&rows);
        if let Some(mask) = self.mask.as_mut() {
            *mask = mask.index_select(0, &rows);
            // Columns that are padding in every surviving row hold nothing anyone attends to.
            let real_per_column = mask.sum_dim_intlist(0, false, Kind::Int64);
            let leading_empty = Vec::<i64>::try_from(&real_per_column.to_device(Device::Cpu))
                .unwrap_or_default()
                .iter()
                .take_while(|&&count| count == 0)
                .count() as i64;
            if leading_empty > 0 {
                let width = mask.size()[1] - leading_empty;
                *mask = mask.narrow(1, leading_empty, width);
                self.cache.narrow_front(leading_empty);
            }
        }
    }

    fn decode_forward(&mut self) {
        let device = self.model.embed_tokens().device();
        let rows = self.sequences.len() as i64;
        let last: Vec<i64> = self
            .sequences
            .iter()
            .map(|sequence| {
                sequence
                    .generated
                    .last()
                    .map_or(0, |&token| i64::from(token))
            })
            .collect();
        let positions: Vec<i64> = self
            .sequences
            .iter()
            .map(|sequence| sequence.next_position)
            .collect();
        let ids = Tensor::from_slice(&last).view([rows, 1]).to_device(device);
        let positions = Tensor::from_slice(&positions)
            .view([rows, 1])
            .to_device(device);
        let mask = match self.mask.take() {
            Some(mask) => Tensor::cat(&[mask, Tensor::ones([rows, 1], (Kind::Int64, device))], 1),
            None => Tensor::ones([rows, 1], (Kind::Int64, device)),
        };
        let logits = tch::no_grad(|| {
            let options = ForwardOptions {
                // Without padding every row sees its whole cache, and the kernel needs no mask.
                attention_mask: self.padded.then_some(&mask),
                position_ids: Some(&positions),
            };
            self.model
                .forward(&ids, &options, Some(&mut self.cache))
                .select(1, -1)
        });
        self.mask = Some(mask);
        for (sequence, next_logits) in self.sequences.iter_mut().zip(rows_to_vecs(&logits)) {
            sequence.next_logits = next_logits;
            sequence.next_position += 1;
        }
    }

    /// Ids of the sequences still running.
    pub fn running(&self) -> Vec<SequenceId> {
        self.sequences.iter().map(|sequence| sequence.id).collect()
    }

    /// Removes and returns the sequences that finished so far, with their ids.
    pub fn take_completions(&mut self) -> Vec<(SequenceId, Completion)> {
        std::mem::take(&mut self.completions)
    }
}

/// `[rows, vocab]` logits as one f32 vector per row, on the CPU.
fn rows_to_vecs(logits: &Tensor) -> Vec<Vec<f32>> {
    let logits = logits.to_kind(Kind::Float).to_device(Device::Cpu);
    let rows = logits.size()[0];
    (0..rows)
        .map(|row| Vec::<f32>::try_from(&logits.get(row)).unwrap_or_default())
        .collect()
}

impl Sequence<'_> {
    /// Samples the next token, updates the text and decides whether the sequence is done.
    fn advance(&mut self) -> StepOutput {
        let token = sample(&self.next_logits, &self.params, &mut self.rng);
        let logprob = self
            .params
            .logprobs
            .then(|| token_logprob(&self.next_logits, token, self.params.top_logprobs));
        if let Some(logprob) = &logprob {
            self.logprobs.push(logprob.clone());
        }
        self.generated.push(token);

        let stop_token = self.params.stop_token_ids.contains(&token);
        let length = self.generated.len() >= self.params.max_tokens;
        if !stop_token {
            let piece = self.decoder.push(token);
            self.text.push_str(&piece);
        }
        if stop_token || length {
            // Nothing follows, so a character still incomplete never will be.
            let rest = self.decoder.finish();
            self.text.push_str(&rest);
        }

        let (release_to, finished) = match find_stop(&self.text, &self.params.stop, self.released) {
            Some(stop_at) => (stop_at, Some(FinishReason::Stop)),
            None if stop_token => (self.text.len(), Some(FinishReason::Stop)),
            None if length => (self.text.len(), Some(FinishReason::Length)),
            None => (
                hold_back_stop_prefix(&self.text, &self.params.stop, self.released),
                None,
            ),
        };
        let text_delta = self
            .text
            .get(self.released..release_to)
            .unwrap_or_default()
            .to_string();
        self.released = release_to.max(self.released);
        if finished.is_some() {
            self.text.truncate(release_to);
        }
        StepOutput {
            sequence: self.id,
            token,
            text_delta,
            logprob,
            finished,
        }
    }
}

/// Byte index where the earliest stop string begins, searching text not yet released.
fn find_stop(text: &str, stops: &[String], released: usize) -> Option<usize> {
    // Released text never ends inside a stop string's prefix (see `safe_release_point`), so a
    // stop can only begin at or after the release point... except that it may overlap it by
    // up to its length minus one when the released text ended just before it; search from
    // a little earlier to be safe, then clamp.
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let mut from = released.saturating_sub(longest);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter_map(|stop| text[from..].find(stop.as_str()).map(|at| from + at))
        .min()
        .map(|at| at.max(released))
}

/// How far text may be released: not into a tail that a stop string begins with. The
/// decoder already holds back incomplete characters, so all of `text` is whole characters.
fn hold_back_stop_prefix(text: &str, stops: &[String], released: usize) -> usize {
    if stops.is_empty() {
        return text.len().max(released);
    }
    // Only the last (longest stop - 1) bytes can be the start of a stop string.
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let from = text.len().saturating_sub(longest).max(released);
    let held = (from..text.len())
        .filter(|&start| text.is_char_boundary(start))
        .find(|&start| {
            let tail = &text[start..];
            stops.iter().any(|stop| stop.starts_with(tail))
        });
    held.unwrap_or(text.len()).max(released)
}

/// Picks the next token from raw logits according to `params`.
///
/// Only the candidates a filter can keep are ever sorted: top-k selects its k in linear time,
/// and top-p grows a partially selected head until it holds the nucleus (for a peaked
/// distribution, a few dozen tokens of a vocabulary of 50k).
fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature == 0.0 || params.top_k == Some(1) {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Unnormalised probabilities after temperature, shifted by the maximum for stability.
    let mut candidates: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| {
            (
                id as u32,
                (f64::from(logit - max) / params.temperature).exp(),
            )
        })
        .collect();
    if let Some(k) = params.top_k {
        keep_most_likely(&mut candidates, k);
    }
    if let Some(p) = params.top_p {
        keep_nucleus(&mut candidates, p);
    }

    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let mut threshold = rng.next_f64() * total;
    for &(id, weight) in &candidates {
        threshold -= weight;
        if threshold < 0.0 {
            return id;
        }
    }
    // Rounding can leave a sliver past the last candidate; it belongs to the last one.
    candidates.last().map_or(0, |c| c.0)
}

/// Keeps the `k` heaviest candidates, heaviest first, in O(V + k log k).
fn keep_most_likely(candidates: &mut Vec<(u32, f64)>, k: usize) {
    let k = k.clamp(1, candidates.len().max(1));
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(k);
    }
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
}

/// Keeps the shortest heaviest-first prefix whose share of the mass reaches `p`.
fn keep_nucleus(candidates: &mut Vec<(u32, f64)>, p: f64) {
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let mut head = 64.min(candidates.len());
    loop {
        // Select and sort a head only; the nucleus is usually far smaller than the vocabulary.
        if head < candidates.len() {
            candidates.select_nth_unstable_by(head - 1, |a, b| b.1.total_cmp(&a.1));
        }
        candidates[..head].sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut mass = 0.0;
        for (index, candidate) in candidates[..head].iter().enumerate() {
            mass += candidate.1 / total;
            if mass >= p {
                candidates.truncate(index + 1);
                return;
            }
        }
        if head == candidates.len() {
            return;
        }
        head = (head * 4).min(candidates.len());
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>()
        .ln();
    let logprob = |id: usize| (f64::from(logits[id] - max) - log_total) as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(logits.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        order.truncate(top);
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    }
    TokenLogprob {
        token,
        logprob: logprob(token as usize),
        top: if top > 0 {
            order.iter().map(|&id| (id as u32, logprob(id))).collect()
        } else {
            Vec::new()
        },
    }
}

/// Generates completions for `prompts` in one batch, calling `on_step` with every step's
/// outputs (for streaming), and returns the completions in prompt order.
pub fn generate(
    model: &Llama,
    decoder: &dyn TextDecoder,
    prompts: &[(Vec<u32>, SamplingParams)],
    mut on_step: impl FnMut(&StepOutput),
) -> Result<Vec<Completion>, GenerateError> {
    let mut batch = Batch::new(model, decoder);
    let ids = batch.add(prompts)?;
    while !batch.is_empty() {
        batch.step().iter().for_each(&mut on_step);
    }
    let mut done = batch.take_completions();
    done.sort_by_key(|(id, _)| ids.iter().position(|known| known == id));
    Ok(done.into_iter().map(|(_, completion)| completion).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids below 256 are bytes.
    struct Bytes;

    impl TextDecoder for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    /// Feeds `tokens` through a sequence by making each the only likely one, returning the
    /// deltas, the final text and the finish reason.
    fn script(
        tokens: &[u32],
        params: SamplingParams,
    ) -> (Vec<String>, String, Option<FinishReason>) {
        let mut sequence = Sequence {
            id: 0,
            rng: Rng::seed(params.seed),
            params,
            generated: Vec::new(),
            decoder: Bytes.incremental(),
            released: 0,
            text: String::new(),
            logprobs: Vec::new(),
            next_logits: Vec::new(),
            next_position: 0,
        };
        let mut deltas = Vec::new();
        for &token in tokens {
            let mut logits = vec![0.0f32; 256];
            logits[token as usize] = 100.0;
            sequence.next_logits = logits;
            let output = sequence.advance();
            deltas.push(output.text_delta);
            if output.finished.is_some() {
                return (deltas, sequence.text, output.finished);
            }
        }
        (deltas, sequence.text, None)
    }

    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn a_stop_string_spanning_tokens_ends_the_text_before_it_and_is_never_streamed() {
        let params = SamplingParams {
            max_tokens: 100,
            stop: vec!["END".to_string()],
            ..SamplingParams::default()
        };
        let (deltas, text, finished) = script(&bytes("abEN ENxEND tail"), params);
        assert_eq!(text, "abEN ENx");
        assert_eq!(finished, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), "abEN ENx");
        // "E" then "EN" were held back while they could still become "END", then released.
        assert_eq!(deltas, ["a", "b", "", "", "EN ", "", "", "ENx", "", "", ""]);
    }

    #[test]
    fn a_multibyte_character_is_never_split_across_deltas() {
        // "é" is C3 A9 and "😀" is F0 9F 98 80: each comes out whole on its last byte.
        let params = SamplingParams {
            max_tokens: 100,
            ..SamplingParams::default()
        };
        let (deltas, _, _) = script(&bytes("é😀!"), params);
        assert_eq!(deltas, ["", "é", "", "", "", "😀", "!"]);
    }

    #[test]
    fn a_stop_token_ends_generation_and_adds_no_text() {
        let params = SamplingParams {
            max_tokens: 100,
            stop_token_ids: vec![0],
            stop: vec!["zzz".to_string()],
            ..SamplingParams::default()
        };
        let (deltas, text, finished) = script(&[b'h' as u32, b'z' as u32, 0], params);
        assert_eq!(finished, Some(FinishReason::Stop));
        // The held-back "z" is released once nothing more can follow it.
        assert_eq!(text, "hz");
        assert_eq!(deltas, ["h", "", "z"]);
    }

    #[test]
    fn max_tokens_ends_with_length() {
        let params = SamplingParams {
            max_tokens: 3,
            ..SamplingParams::default()
        };
        let (_, text, finished) = script(&bytes("abcdef"), params);
        assert_eq!(
            (text.as_str(), finished),
            ("abc", Some(FinishReason::Length))
        );
    }

    #[test]
    fn top_k_of_one_is_greedy_whatever_the_temperature() {
        let logits = [0.1f32, 2.0, 1.9, -3.0];
        let params = SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            ..SamplingParams::default()
        };
        let mut rng = Rng::seed(1);
        assert!((0..50).all(|_| sample(&logits, &params, &mut rng) == 1));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2 (logits are their logs): p = 0.75 keeps {0, 1}, since
        // 0.5 < 0.75 <= 0.8; token 2 must never be drawn.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.75),
            ..SamplingParams::default()
        };
        let mut rng = Rng::seed(9);
        let draws: Vec<u32> = (0..2000)
            .map(|_| sample(&logits, &params, &mut rng))
            .collect();
        assert!(!draws.contains(&2));
        // Renormalised, token 0 has 0.5 / 0.8 = 0.625; 2000 draws put the share within
        // ±0.04 (about 3.7 standard deviations).
        let share = draws.iter().filter(|&&t| t == 0).count() as f64 / 2000.0;
        assert!((share - 0.625).abs() < 0.04, "{share}");
    }

    #[test]
    fn top_k_keeps_exactly_the_k_largest_as_a_full_sort_would() {
        // 1000 distinct weights in a scrambled order (37 is coprime with 1000): the 5 largest
        // are the ids whose weight is 995..999, whatever order selection leaves them in.
        let mut candidates: Vec<(u32, f64)> = (0..1000u32)
            .map(|id| (id, f64::from((id * 37) % 1000)))
            .collect();
        keep_most_likely(&mut candidates, 5);
        let weights: Vec<f64> = candidates.iter().map(|c| c.1).collect();
        assert_eq!(weights, [999.0, 998.0, 997.0, 996.0, 995.0]);
    }

    #[test]
    fn the_nucleus_grows_past_the_first_selected_head_when_mass_is_spread() {
        // 200 equal weights: p = 0.5 needs exactly 100 of them, more than the first head of 64.
        let mut candidates: Vec<(u32, f64)> = (0..200u32).map(|id| (id, 1.0)).collect();
        keep_nucleus(&mut candidates, 0.5);
        assert_eq!(candidates.len(), 100);
    }

    #[test]
    fn a_stop_string_longer_than_the_text_so_far_holds_all_of_it() {
        // "ab" could still become "abc": nothing is released yet.
        assert_eq!(hold_back_stop_prefix("ab", &["abc".to_string()], 0), 0);
        // "xa" can only grow into "abc" from the "a": the "x" is released.
        assert_eq!(hold_back_stop_prefix("xa", &["abc".to_string()], 0), 1);
    }

    #[test]
    fn the_tokenizer_decodes_incrementally_to_what_a_full_decode_gives() {
        use crate::tokenizer::TrainConfig;
        let text = "héllo wörld 😀 héllo";
        let config = TrainConfig {
            vocab_size: 300,
            min_frequency: 1,
        };
        let tokenizer = Tokenizer::train(&config, [text].into_iter()).expect("trains");
        let ids = tokenizer.encode(text, false).expect("encodes");
        let mut incremental = TextDecoder::incremental(&tokenizer);
        let mut pieces: Vec<String> = ids.iter().map(|&id| incremental.push(id)).collect();
        pieces.push(incremental.finish());
        assert!(pieces.iter().all(|piece| !piece.contains('\u{FFFD}')));
        assert_eq!(pieces.concat(), TextDecoder::decode(&tokenizer, &ids));
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn invalid_parameters_are_refused() {
        for params in [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: Some(0.0),
                ..SamplingParams::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..SamplingParams::default()
            },
            SamplingParams {
                stop: vec![String::new()],
                ..SamplingParams::default()
            },
        ] {
            assert!(params.validate().is_err(), "{params:?}");
        }
    }
}
