//! Token streams for pretraining: a train/held-out split and random windows drawn from a
//! seeded generator whose state is part of a checkpoint.

use ferrite_model::rng::Rng;
use tch::{Device, Tensor};

/// Why token data cannot be used for training.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A split is shorter than one window.
    #[error("the {split} split has {tokens} tokens, fewer than one window of {needed}")]
    TooShort {
        /// `train` or `held-out`.
        split: &'static str,
        /// Tokens available.
        tokens: usize,
        /// Tokens one window needs (sequence length + 1).
        needed: usize,
    },
}

/// Splits tokens into a training part and the last `held_out_fraction` for evaluation.
pub fn split_held_out(tokens: &[u32], held_out_fraction: f64) -> (Vec<u32>, Vec<u32>) {
    let held_out = ((tokens.len() as f64) * held_out_fraction.clamp(0.0, 1.0)) as usize;
    let boundary = tokens.len() - held_out;
    (tokens[..boundary].to_vec(), tokens[boundary..].to_vec())
}

/// Splits tokens into blocks of `block` and holds out every `every`-th block, so the held-out
/// set samples the whole corpus rather than its last document.
pub fn split_held_out_blocks(tokens: &[u32], block: usize, every: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for (index, chunk) in tokens.chunks(block.max(1)).enumerate() {
        if every > 0 && index % every == every - 1 {
            held_out.extend_from_slice(chunk);
        } else {
            train.extend_from_slice(chunk);
        }
    }
    (train, held_out)
}

/// Draws training batches of `[batch, sequence_length + 1]` windows at random offsets.
#[derive(Debug, Clone)]
pub struct RandomWindows {
    tokens: Vec<u32>,
    window: usize,
    rng: Rng,
    drawn: u64,
}

impl RandomWindows {
    /// Windows of `sequence_length + 1` tokens over `tokens`, in an order fixed by `seed`.
    pub fn new(tokens: Vec<u32>, sequence_length: usize, seed: u64) -> Result<Self, DataError> {
        let window = sequence_length + 1;
        if tokens.len() < window {
            return Err(DataError::TooShort {
                split: "train",
                tokens: tokens.len(),
                needed: window,
            });
        }
        Ok(Self {
            tokens,
            window,
            rng: Rng::seed(seed),
            drawn: 0,
        })
    }

    /// The next `batch` windows as an int64 tensor `[batch, sequence_length + 1]`.
    pub fn next_batch(&mut self, batch: usize, device: Device) -> Tensor {
        let starts = (self.tokens.len() - self.window + 1) as u64;
        let mut ids = Vec::with_capacity(batch * self.window);
        for _ in 0..batch {
            let start = self.rng.below(starts) as usize;
            ids.extend(
                self.tokens[start..start + self.window]
                    .iter()
                    .map(|&t| i64::from(t)),
            );
        }
        self.drawn += batch as u64;
        Tensor::from_slice(&ids)
            .view([batch as i64, self.window as i64])
            .to_device(device)
    }

    /// Windows drawn so far (the data position), for checkpoints and reporting.
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    /// The generator's state, for checkpoints.
    pub fn rng_state(&self) -> [u64; 4] {
        self.rng.state()
    }

    /// Continues from a checkpointed position and generator state.
    pub fn restore(&mut self, drawn: u64, rng_state: [u64; 4]) {
        self.drawn = drawn;
        self.rng = Rng::from_state(rng_state);
    }
}

/// Consecutive, non-overlapping windows of the held-out split, the same every evaluation.
pub fn held_out_windows(
    tokens: &[u32],
    sequence_length: usize,
    most: usize,
) -> Result<Vec<Vec<i64>>, DataError> {
    let window = sequence_length + 1;
    if tokens.len() < window {
        return Err(DataError::TooShort {
            split: "held-out",
            tokens: tokens.len(),
            needed: window,
        });
    }
    Ok(tokens
        .chunks_exact(window)
        .take(most)
        .map(|chunk| chunk.iter().map(|&t| i64::from(t)).collect())
        .collect())
}

/// Entropy in nats per token of `held_out` under a unigram model of `train` with add-one
/// smoothing over `vocab_size` ids: the loss a model that ignores context would reach.
pub fn unigram_cross_entropy(train: &[u32], held_out: &[u32], vocab_size: usize) -> f64 {
    let mut counts = vec![0u64; vocab_size];
    for &token in train {
        if let Some(count) = counts.get_mut(token as usize) {
            *count += 1;
        }
    }
    let total = train.len() as f64 + vocab_size as f64;
    let nats: f64 = held_out
        .iter()
        .map(|&token| {
            let count = counts.get(token as usize).copied().unwrap_or(0) as f64;
            -((count + 1.0) / total).ln()
        })
        .sum();
    nats / held_out.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_entropy_matches_a_hand_computation() {
        // Train counts over a vocabulary of 3: token 0 twice, token 1 once, token 2 never.
        // Smoothed: p0 = 3/6, p1 = 2/6, p2 = 1/6. Held out [0, 2]: (ln 2 + ln 6) / 2.
        let entropy = unigram_cross_entropy(&[0, 0, 1], &[0, 2], 3);
        let expected = (2f64.ln() + 6f64.ln()) / 2.0;
        assert!(
            (entropy - expected).abs() < 1e-12,
            "{entropy} vs {expected}"
        );
    }

    #[test]
    fn every_nth_block_is_held_out() {
        // Blocks of 2 over 0..10: [0,1] [2,3] [4,5] [6,7] [8,9]; every 2nd held out.
        let tokens: Vec<u32> = (0..10).collect();
        let (train, held_out) = split_held_out_blocks(&tokens, 2, 2);
        assert_eq!(held_out, [2, 3, 6, 7]);
        assert_eq!(train, [0, 1, 4, 5, 8, 9]);
    }

    #[test]
    fn a_restored_stream_draws_the_same_windows() {
        let tokens: Vec<u32> = (0..1000).collect();
        let mut windows = RandomWindows::new(tokens, 8, 3).expect("long enough");
        let _ = windows.next_batch(2, Device::Cpu);
        let mut resumed = RandomWindows::new((0..1000).collect(), 8, 99).expect("long enough");
        resumed.restore(windows.drawn(), windows.rng_state());
        assert!(
            windows
                .next_batch(4, Device::Cpu)
                .equal(&resumed.next_batch(4, Device::Cpu))
        );
        assert_eq!(resumed.drawn(), 6);
    }

    #[test]
    fn windows_are_consecutive_tokens() {
        // Each window must be a contiguous run so targets are the inputs shifted by one.
        let mut windows = RandomWindows::new((0..50).collect(), 4, 1).expect("long enough");
        let batch =
            Vec::<i64>::try_from(windows.next_batch(1, Device::Cpu).view([-1])).expect("ints");
        assert!(
            batch.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "{batch:?}"
        );
    }
}
