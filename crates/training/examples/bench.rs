//! Throughput measurements for scripts/bench-model.sh: training tokens/s, single-stream and
//! batched decode tokens/s, and peak resident memory, each printed as one JSON line.
//!
//! `bench init DIR` writes a randomly initialised `small` checkpoint for both sides to load;
//! `bench train DIR` and `bench decode DIR` measure on it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrite_model::ModelConfig;
use ferrite_model::checkpoint;
use ferrite_model::generate::{self, SamplingParams, TextDecoder};
use ferrite_training::adamw::{AdamW, AdamWConfig};
use ferrite_training::pretrain::{initialise_weights, next_token_loss};
use tch::{Device, Kind, Tensor, nn};

#[derive(Debug, Parser)]
struct Arguments {
    #[command(subcommand)]
    command: Mode,
    /// libtorch threads.
    #[arg(long, default_value_t = 2, global = true)]
    threads: i32,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Writes a randomly initialised checkpoint of `preset`.
    Init {
        dir: PathBuf,
        #[arg(long, default_value = "small")]
        preset: String,
    },
    /// Times training steps (forward, backward, AdamW) on random tokens.
    Train {
        dir: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: i64,
        #[arg(long, default_value_t = 128)]
        sequence_length: i64,
        #[arg(long, default_value_t = 8)]
        steps: usize,
    },
    /// Times greedy decoding of one stream and of a batch.
    Decode {
        dir: PathBuf,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
}

struct NoText;

impl TextDecoder for NoText {
    fn decode(&self, _ids: &[u32]) -> String {
        String::new()
    }
}

/// Peak resident set size of this process in MiB, from the kernel's own accounting.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|kib| kib.parse::<f64>().ok())
                })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    tch::set_num_threads(arguments.threads);
    match arguments.command {
        Mode::Init { dir, preset } => {
            let config = ModelConfig::preset(&preset)?;
            let var_store = nn::VarStore::new(Device::Cpu);
            let _model = ferrite_model::Llama::new(&var_store.root(), &config);
            initialise_weights(&var_store, 0);
            checkpoint::save(&dir, &var_store, &config, None)?;
        }
        Mode::Train {
            dir,
            batch_size,
            sequence_length,
            steps,
        } => {
            let loaded =
                checkpoint::load(&dir, Device::Cpu).context("loading the bench checkpoint")?;
            let mut optimizer = AdamW::new(
                checkpoint::named_tensors_trainable(&loaded.var_store),
                AdamWConfig::default(),
            );
            let vocab = loaded.config.vocab_size;
            tch::manual_seed(0);
            let batch = Tensor::randint(
                vocab,
                [batch_size, sequence_length + 1],
                (Kind::Int64, Device::Cpu),
            );
            let mut step = || {
                optimizer.zero_grad();
                next_token_loss(&loaded.model, &batch, false).backward();
                optimizer.clip_gradient_norm(1.0);
                optimizer.step(1e-4);
            };
            // One untimed step lets libtorch allocate and pick kernels.
            step();
            let started = Instant::now();
            for _ in 0..steps {
                step();
            }
            let seconds = started.elapsed().as_secs_f64();
            let tokens = (steps as i64 * batch_size * sequence_length) as f64;
            println!(
                "{}",
                serde_json::json!({"bench": "train", "impl": "ferrite", "tokens_per_second": tokens / seconds, "peak_rss_mib": peak_rss_mib()})
            );
        }
        Mode::Decode {
            dir,
            new_tokens,
            batch,
        } => {
            let loaded =
                checkpoint::load(&dir, Device::Cpu).context("loading the bench checkpoint")?;
            let prompt: Vec<u32> = (1..=16).collect();
            let params = SamplingParams {
                max_tokens: new_tokens,
                ..SamplingParams::default()
            };
            let run = |prompts: &[(Vec<u32>, SamplingParams)]| -> anyhow::Result<f64> {
                let started = Instant::now();
                let completions = generate::generate(&loaded.model, &NoText, prompts, |_| {})?;
                let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
                Ok(tokens as f64 / started.elapsed().as_secs_f64())
            };
            run(&[(prompt.clone(), params.clone())])?;
            let single = run(&[(prompt.clone(), params.clone())])?;
            // Different lengths, so the batch really is left-padded.
            let prompts: Vec<(Vec<u32>, SamplingParams)> = (0..batch)
                .map(|row| ((1..=(16 + row as u32)).collect(), params.clone()))
                .collect();
            let batched = run(&prompts)?;
            println!(
                "{}",
                serde_json::json!({"bench": "decode", "impl": "ferrite", "single_tokens_per_second": single, "batched_tokens_per_second": batched, "batch": batch})
            );
        }
    }
    Ok(())
}
