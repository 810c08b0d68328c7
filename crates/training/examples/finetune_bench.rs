//! Fine-tuning benchmarks: peak memory and tokens/s of full, LoRA and QLoRA training on one
//! preset (one method per process, so each peak is its own), and held-out loss after the same
//! steps on the same data for the three methods.
//!
//! `scripts/bench-finetune.sh` runs it end to end and prints the ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrite_model::ModelConfig;
use ferrite_model::checkpoint;
use ferrite_model::llama::Llama;
use ferrite_model::rng::Rng;
use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
use ferrite_training::sft::{self, Method, SftConfig, SftData, SftTrainer, Targets};
use ferrite_training::sft_data::{self, Example};
use tch::{Device, nn};

#[derive(Debug, Parser)]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a freshly initialised preset, with a placeholder tokenizer, as a model folder
    /// for `memory` to load.
    Base {
        #[arg(long, default_value = "gpt2")]
        preset: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Loads the model folder `base` as a fine-tuning job does for `method` and trains it on
    /// random tokens; prints one JSON line with the peak resident memory, tokens/s and
    /// trainable parameters.
    Memory {
        #[arg(long)]
        method: String,
        #[arg(long)]
        base: PathBuf,
        /// Recompute blocks in backward; unset takes the trainer's default (on for qlora).
        #[arg(long)]
        gradient_checkpointing: Option<bool>,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        sequence_length: usize,
        #[arg(long, default_value_t = 1)]
        threads: i32,
    },
    /// Fine-tunes the model in `base` on `data` with full, LoRA and QLoRA for the same steps;
    /// prints one JSON line per method with the base and final held-out loss.
    Quality {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 100)]
        steps: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value_t = 256)]
        max_length: usize,
        #[arg(long, default_value_t = 1)]
        threads: i32,
    },
}

fn method(name: &str) -> anyhow::Result<Method> {
    Ok(match name {
        "full" => Method::Full,
        "lora" => Method::Lora,
        "qlora" => Method::Qlora,
        other => anyhow::bail!("unknown method {other}; expected full, lora or qlora"),
    })
}

/// Peak resident set size of this process (`VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn random_examples(count: usize, length: usize, vocab: i64, seed: u64) -> Vec<Example> {
    let mut rng = Rng::seed(seed);
    (0..count)
        .map(|_| Example {
            ids: (0..length)
                .map(|_| rng.below(vocab as u64) as u32)
                .collect(),
            trained: vec![true; length],
        })
        .collect()
}

struct MemoryRun {
    method: Method,
    base: PathBuf,
    gradient_checkpointing: Option<bool>,
    steps: usize,
    batch_size: usize,
    sequence_length: usize,
}

fn base(preset: &str, out: &Path) -> anyhow::Result<()> {
    let config = ModelConfig::preset(preset)?;
    // The trainer wants a tokenizer; its ids are never used since the data is random tokens.
    let tokenizer = Tokenizer::train(
        &TrainConfig {
            vocab_size: 300,
            min_frequency: 1,
        },
        ["a small corpus for a placeholder tokenizer"].into_iter(),
    )?;
    let var_store = nn::VarStore::new(Device::Cpu);
    let _model = Llama::new(&var_store.root(), &config);
    checkpoint::save(out, &var_store, &config, Some(&tokenizer))?;
    Ok(())
}

fn memory(run: MemoryRun) -> anyhow::Result<()> {
    let checkpoint = sft::load_base(&run.base, run.method, Device::Cpu)?;
    let config = checkpoint.config.clone();
    let length = run.sequence_length + 1;
    let data = SftData {
        train: random_examples(64, length, config.vocab_size, 1),
        eval: random_examples(1, length, config.vocab_size, 2),
    };
    let sft_config = SftConfig {
        batch_size: run.batch_size,
        max_length: length,
        total_steps: run.steps + 1,
        target_modules: Targets::Many(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        ),
        gradient_checkpointing: run.gradient_checkpointing,
        ..SftConfig::default()
    };
    let mut trainer = SftTrainer::new(checkpoint, run.method, sft_config, data)?;
    // The first step allocates gradients and moments; time the rest.
    trainer.train_step();
    let started = Instant::now();
    let mut tokens = 0u64;
    for _ in 0..run.steps {
        tokens = trainer.train_step().tokens_seen;
    }
    let seconds = started.elapsed().as_secs_f64();
    let first_step_tokens = (run.batch_size * run.sequence_length) as u64;
    let total = config.parameter_count();
    println!(
        "{}",
        serde_json::json!({
            "kind": "memory",
            "method": format!("{:?}", run.method).to_lowercase(),
            "base": run.base.display().to_string(),
            "gradient_checkpointing": trainer.gradient_checkpointing(),
            "peak_rss_mib": peak_rss_mib(),
            "tokens_per_second": (tokens - first_step_tokens) as f64 / seconds,
            "trainable_parameters": trainer.trainable_parameters(),
            "parameters": total,
            "trainable_fraction": trainer.trainable_parameters() as f64 / total as f64,
        })
    );
    Ok(())
}

struct QualityRun {
    base: PathBuf,
    data: PathBuf,
    steps: usize,
    batch_size: usize,
    max_length: usize,
}

fn quality(run: QualityRun) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::load(&run.base)?;
    let text = std::fs::read_to_string(&run.data)
        .with_context(|| format!("cannot read {}", run.data.display()))?;
    let mut examples = Vec::new();
    for messages in sft_data::parse_conversations(&text)? {
        examples.extend(Example::encode(&tokenizer, &messages, run.max_length)?);
    }
    let (train, eval) = sft::hold_out(examples, 0.1, 0);
    for name in ["full", "lora", "qlora"] {
        let method = method(name)?;
        let config = SftConfig {
            batch_size: run.batch_size,
            max_length: run.max_length,
            total_steps: run.steps,
            warmup_steps: run.steps / 10,
            // Adapters train a few values from zero and take a larger step than full weights.
            lr: if method == Method::Full { 3e-4 } else { 2e-3 },
            lora_dropout: 0.0,
            target_modules: Targets::One("all-linear".into()),
            eval_interval: 0,
            ..SftConfig::default()
        };
        let loaded = checkpoint::load(&run.base, Device::Cpu)?;
        let data = SftData {
            train: train.clone(),
            eval: eval.clone(),
        };
        let started = Instant::now();
        let mut trainer = SftTrainer::new(loaded, method, config, data)?;
        for _ in 0..run.steps {
            trainer.train_step();
        }
        println!(
            "{}",
            serde_json::json!({
                "kind": "quality",
                "method": name,
                "steps": run.steps,
                "train_examples": train.len(),
                "eval_examples": eval.len(),
                "base_eval_loss": trainer.base_eval_loss(),
                "eval_loss": trainer.evaluate(),
                "trainable_parameters": trainer.trainable_parameters(),
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Arguments::parse().command {
        Command::Base { preset, out } => base(&preset, &out),
        Command::Memory {
            method: name,
            base,
            gradient_checkpointing,
            steps,
            batch_size,
            sequence_length,
            threads,
        } => {
            tch::set_num_threads(threads);
            memory(MemoryRun {
                method: method(&name)?,
                base,
                gradient_checkpointing,
                steps,
                batch_size,
                sequence_length,
            })
        }
        Command::Quality {
            base,
            data,
            steps,
            batch_size,
            max_length,
            threads,
        } => {
            tch::set_num_threads(threads);
            quality(QualityRun {
                base,
                data,
                steps,
                batch_size,
                max_length,
            })
        }
    }
}
