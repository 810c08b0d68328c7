//! Pretrains a model preset on a text corpus and reports held-out loss against the unigram
//! baseline of the same tokenizer, with greedy and sampled continuations.
//!
//! `cargo run --release -p ferrite-training --example pretrain -- --help`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ferrite_model::ModelConfig;
use ferrite_model::generate::{self, SamplingParams};
use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
use ferrite_training::data;
use ferrite_training::pretrain::{Metrics, PretrainConfig, Pretrainer};
use tch::Device;

#[derive(Debug, Parser)]
// Later flags win, so scripts/pretrain-small.sh can pass defaults and the caller override them.
#[command(args_override_self = true)]
struct Arguments {
    /// Text to train on.
    #[arg(long, default_value = "data/corpus/corpus.txt")]
    corpus: PathBuf,
    /// Folder for the tokenizer and the final checkpoint.
    #[arg(long, default_value = "out/pretrain-small")]
    out: PathBuf,
    /// Model preset.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Tokenizer vocabulary size (also the model's).
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    sequence_length: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// libtorch threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_interval: usize,
    /// Use at most this many bytes of the corpus (0: all of it).
    #[arg(long, default_value_t = 0)]
    max_bytes: usize,
    /// Seed of initialisation, data order and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    tch::set_num_threads(arguments.threads);
    let mut text = std::fs::read_to_string(&arguments.corpus)
        .with_context(|| format!("cannot read corpus {}", arguments.corpus.display()))?;
    if arguments.max_bytes > 0 && text.len() > arguments.max_bytes {
        let mut end = arguments.max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    std::fs::create_dir_all(&arguments.out)
        .with_context(|| format!("cannot create {}", arguments.out.display()))?;

    let started = Instant::now();
    let tokenizer_dir = arguments.out.join("tokenizer");
    let tokenizer = match Tokenizer::load(&tokenizer_dir) {
        Ok(tokenizer) if tokenizer.vocab_size() == arguments.vocab_size => tokenizer,
        _ => {
            let config = TrainConfig {
                vocab_size: arguments.vocab_size,
                ..TrainConfig::default()
            };
            let tokenizer =
                Tokenizer::train(&config, text.lines()).context("tokenizer training failed")?;
            tokenizer
                .save(&tokenizer_dir)
                .context("cannot save the tokenizer")?;
            tokenizer
        }
    };
    let mut tokens = Vec::new();
    for paragraph in text.split("\n\n") {
        tokens.extend(
            tokenizer
                .encode(paragraph, false)
                .context("encoding failed")?,
        );
        tokens.push(tokenizer.eos_id());
    }
    println!(
        "corpus: {} bytes, {} tokens ({:.2} bytes/token), tokenizer of {} ids ready in {:.1}s",
        text.len(),
        tokens.len(),
        text.len() as f64 / tokens.len() as f64,
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64()
    );

    let (train, held_out) = data::split_held_out_blocks(&tokens, 4096, 50);
    let vocab = tokenizer.vocab_size();
    let unigram = data::unigram_cross_entropy(&train, &held_out, vocab);

    let model_config = ModelConfig::preset(&arguments.preset)?
        .with_vocab_size(vocab as i64)
        .with_special_tokens(tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id());
    println!(
        "model: {} preset, {:.1}M parameters; {} train / {} held-out tokens",
        arguments.preset,
        model_config.parameter_count() as f64 / 1e6,
        train.len(),
        held_out.len()
    );
    let config = PretrainConfig {
        batch_size: arguments.batch_size,
        sequence_length: arguments.sequence_length,
        total_steps: arguments.steps,
        warmup_steps: (arguments.steps / 20).max(1),
        peak_lr: arguments.lr,
        min_lr: arguments.lr / 10.0,
        eval_interval: arguments.eval_interval,
        eval_windows: 64,
        seed: arguments.seed,
        threads: Some(arguments.threads),
        ..PretrainConfig::default()
    };
    let mut trainer = Pretrainer::new(model_config, config, train, &held_out, Device::Cpu)?;
    let training_started = Instant::now();
    let mut final_loss = f64::NAN;
    trainer.run(&mut |metrics| match metrics {
        Metrics::Train(train) if train.step % 20 == 0 || train.step == 1 => println!(
            "step {:>5}  loss {:.3}  lr {:.2e}  grad-norm {:.2}  {:.0} tokens/s",
            train.step, train.loss, train.lr, train.grad_norm, train.tokens_per_second
        ),
        Metrics::Eval(eval) => {
            final_loss = eval.loss;
            println!(
                "step {:>5}  held-out loss {:.3}  perplexity {:.1}  (unigram baseline {:.3})",
                eval.step, eval.loss, eval.perplexity, unigram
            );
        }
        Metrics::Train(_) => {}
    });
    let seconds = training_started.elapsed().as_secs_f64();
    println!(
        "\nheld-out loss {final_loss:.3} nats/token vs unigram baseline {unigram:.3} ({:.3} nats better) after {} steps in {seconds:.0}s",
        unigram - final_loss,
        trainer.step_count()
    );
    trainer.save(&arguments.out, Some(&tokenizer))?;
    println!("checkpoint written to {}", arguments.out.display());

    for prompt in [
        "And God said unto",
        "It is a truth universally acknowledged",
        "The jury said",
    ] {
        let ids = tokenizer.encode(prompt, false)?;
        let greedy = SamplingParams {
            max_tokens: 40,
            stop_token_ids: vec![tokenizer.eos_id()],
            ..SamplingParams::default()
        };
        let sampled = SamplingParams {
            temperature: 0.8,
            top_p: Some(0.95),
            seed: arguments.seed,
            ..greedy.clone()
        };
        let completions = generate::generate(
            trainer.model(),
            &tokenizer,
            &[(ids.clone(), greedy), (ids, sampled)],
            |_| {},
        )?;
        println!("\nprompt : {prompt}");
        println!(
            "greedy : {prompt}{}",
            completions[0].text.replace('\n', " / ")
        );
        println!(
            "sampled: {prompt}{}",
            completions[1].text.replace('\n', " / ")
        );
    }
    Ok(())
}
