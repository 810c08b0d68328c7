//! Supervised fine-tuning: record formats and their errors, labels on assistant tokens only
//! (EOS kept, padding ignored), packing that keeps documents apart, learning to stop, exact
//! resume, and the job seam writing a PEFT adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferrite_model::checkpoint;
use ferrite_model::llama::{ForwardOptions, Llama};
use ferrite_model::tokenizer::{ChatMessage, Role, Tokenizer, TrainConfig};
use ferrite_model::{ModelConfig, tokenizer};
use ferrite_training::job::{self, DatasetInput, DatasetRole, JobInputs, JobKind, JobObserver};
use ferrite_training::pretrain::initialise_weights;
use ferrite_training::sft::{self, Method, SftConfig, SftData, SftTrainer};
use ferrite_training::sft_data::{self, Example, IGNORE};
use tch::{Device, Kind, Tensor, nn};

const COLOURS: [&str; 8] = [
    "red", "blue", "green", "gold", "grey", "pink", "black", "white",
];
const THINGS: [&str; 8] = [
    "apple", "sky", "grass", "sun", "stone", "rose", "night", "snow",
];

/// Dropout draws from libtorch's process-wide generator, which the trainer reseeds every step;
/// tests that train hold this lock so a parallel test cannot draw in between. (A job runs in
/// a process of its own, so production runs need no lock.)
static TORCH_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn generator_lock() -> std::sync::MutexGuard<'static, ()> {
    TORCH_GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn corpus() -> Vec<String> {
    let mut lines = Vec::new();
    for (thing, colour) in THINGS.iter().zip(COLOURS) {
        lines.push(format!(
            "What colour is the {thing}? The {thing} is {colour}."
        ));
        lines.push(format!(
            "user\nWhat colour is the {thing}?\nassistant\n{colour}"
        ));
    }
    lines
}

/// A tiny base model folder with a tokenizer trained on the toy corpus.
fn base_folder(dir: &Path) -> Tokenizer {
    let tokenizer = Tokenizer::train(
        &TrainConfig {
            vocab_size: 400,
            min_frequency: 1,
        },
        corpus().into_iter(),
    )
    .expect("tokenizer trains");
    let config = ModelConfig::preset("tiny")
        .expect("tiny preset")
        .with_vocab_size(tokenizer.vocab_size() as i64)
        .with_special_tokens(tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id());
    let var_store = nn::VarStore::new(Device::Cpu);
    let _model = Llama::new(&var_store.root(), &config);
    initialise_weights(&var_store, 11);
    checkpoint::save(dir, &var_store, &config, Some(&tokenizer)).expect("base saves");
    tokenizer
}

/// Alpaca records whose answers are one word.
fn short_answers() -> Vec<serde_json::Value> {
    THINGS
        .iter()
        .zip(COLOURS)
        .map(|(thing, colour)| {
            serde_json::json!({
                "instruction": format!("What colour is the {thing}?"),
                "input": "",
                "output": colour,
            })
        })
        .collect()
}

fn examples(tokenizer: &Tokenizer, records: &[serde_json::Value]) -> Vec<Example> {
    let text = serde_json::to_string(records).expect("json");
    sft_data::parse_conversations(&text)
        .expect("parses")
        .iter()
        .filter_map(|messages| Example::encode(tokenizer, messages, 64).expect("encodes"))
        .collect()
}

fn config(steps: usize) -> SftConfig {
    SftConfig {
        batch_size: 4,
        max_length: 64,
        total_steps: steps,
        warmup_steps: 0,
        lr: 3e-3,
        min_lr: 3e-3,
        eval_interval: 0,
        checkpoint_interval: 0,
        lora_dropout: 0.1,
        threads: Some(1),
        ..SftConfig::default()
    }
}

#[test]
fn every_format_reads_into_the_same_conversation() {
    let lines = [
        r#"{"instruction": "Add", "input": "1 and 2", "output": "3"}"#,
        r#"{"messages": [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]}"#,
        r#"{"conversations": [{"from": "human", "value": "Add\n\n1 and 2"}, {"from": "gpt", "value": "3"}]}"#,
        r#"{"prompt": "Add\n\n1 and 2", "completion": "3"}"#,
    ];
    let conversations = sft_data::parse_conversations(&lines.join("\n")).expect("parses");
    let expected = vec![
        ChatMessage::new(Role::User, "Add\n\n1 and 2"),
        ChatMessage::new(Role::Assistant, "3"),
    ];
    assert_eq!(conversations.len(), 4);
    for conversation in conversations {
        assert_eq!(conversation, expected);
    }
}

#[test]
fn a_bad_row_is_reported_with_its_line_and_field() {
    let jsonl = "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\"}\n";
    let error = sft_data::parse_conversations(jsonl).expect_err("line 3 lacks output");
    assert_eq!(error.to_string(), "line 3: output: is missing");

    let array = r#"[{"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}]"#;
    let error = sft_data::parse_conversations(array).expect_err("record 2 has a number");
    assert_eq!(
        error.to_string(),
        "record 2: messages[1].content: is missing or not a string"
    );

    let error = sft_data::parse_conversations(r#"{"messages": [{"role": "bot", "content": "x"}]}"#)
        .expect_err("unknown role");
    assert!(
        error.to_string().starts_with("line 1: messages[0].role:"),
        "{error}"
    );
}

#[test]
fn eos_stays_a_label_when_padding_uses_the_same_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = base_folder(dir.path());
    let im_end = tokenizer
        .token_to_id(tokenizer::IM_END_TOKEN)
        .expect("chat tokens");
    let long = examples(&tokenizer, &short_answers()[..1]);
    let short = Example {
        ids: long[0].ids[..long[0].ids.len() - 3].to_vec(),
        trained: long[0].trained[..long[0].trained.len() - 3].to_vec(),
    };
    // Padding with <|im_end|> itself: a mask built by comparing ids with the pad id would
    // drop the reply's own end-of-turn label.
    let batch = sft_data::padded_batch(&[&long[0], &short], im_end, Device::Cpu);
    let labels: Vec<i64> = Vec::try_from(batch.labels.get(0)).expect("labels");
    let inputs: Vec<i64> = Vec::try_from(batch.input_ids.get(0)).expect("ids");
    let example = &long[0];
    // The reply is "red" + <|im_end|>, then "\n" which is not the assistant's.
    let end = example
        .ids
        .iter()
        .rposition(|&id| id == im_end)
        .expect("im_end");
    assert_eq!(
        labels[end - 1],
        i64::from(im_end),
        "the EOS label was dropped"
    );
    assert_eq!(
        labels[end], IGNORE,
        "the newline after the turn is no label"
    );
    // Labels exist exactly where the assistant wrote, shifted by one.
    for (position, label) in labels.iter().enumerate() {
        let trained = example.trained[position + 1];
        assert_eq!(*label != IGNORE, trained, "position {position}");
    }
    // The shorter row is padded with im_end inputs that carry no label and no attention.
    let short_labels: Vec<i64> = Vec::try_from(batch.labels.get(1)).expect("labels");
    let mask: Vec<i64> =
        Vec::try_from(batch.attention_mask.as_ref().expect("mask").get(1)).expect("mask");
    let real = short.ids.len() - 1;
    assert!(short_labels[real..].iter().all(|&label| label == IGNORE));
    assert!(mask[real..].iter().all(|&m| m == 0));
    assert_eq!(inputs.len(), labels.len());
}

#[test]
fn packed_documents_do_not_see_each_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = base_folder(dir.path());
    let loaded = checkpoint::load(dir.path(), Device::Cpu).expect("loads");
    let batch_examples = examples(&tokenizer, &short_answers()[..3]);
    let refs: Vec<&Example> = batch_examples.iter().collect();
    let packed = sft_data::packed_batch(&refs, tokenizer.pad_id(), 64, Device::Cpu);
    assert_eq!(
        packed.input_ids.size()[0],
        1,
        "three short chats fit one row"
    );
    let logits = tch::no_grad(|| {
        loaded.model.forward_packed(
            &packed.input_ids,
            packed.position_ids.as_ref().expect("positions"),
            packed.document_ids.as_ref().expect("documents"),
        )
    });
    // Each document alone, through the ordinary causal path, must give the same logits.
    let mut offset = 0;
    for example in &batch_examples {
        let length = example.ids.len() as i64 - 1;
        let ids: Vec<i64> = example.ids[..length as usize]
            .iter()
            .map(|&id| i64::from(id))
            .collect();
        let alone = tch::no_grad(|| {
            loaded.model.forward(
                &Tensor::from_slice(&ids).view([1, length]),
                &ForwardOptions::default(),
                None,
            )
        });
        let part = logits.narrow(1, offset, length);
        assert!(
            part.allclose(&alone, 1e-5, 1e-5, false),
            "document at {offset}"
        );
        offset += length;
    }
    // Same labels whichever way they are batched.
    let padded = sft_data::padded_batch(&refs, tokenizer.pad_id(), Device::Cpu);
    assert_eq!(packed.label_count, padded.label_count);
}

/// Probability the model gives `<|im_end|>` right after each one-word answer.
fn stop_probability(model: &Llama, tokenizer: &Tokenizer, examples: &[Example]) -> f64 {
    let im_end = tokenizer
        .token_to_id(tokenizer::IM_END_TOKEN)
        .expect("chat tokens");
    let mut total = 0.0;
    for example in examples {
        let end = example
            .ids
            .iter()
            .rposition(|&id| id == im_end)
            .expect("im_end");
        let ids: Vec<i64> = example.ids[..end].iter().map(|&id| i64::from(id)).collect();
        let input = Tensor::from_slice(&ids).view([1, end as i64]);
        let logits = tch::no_grad(|| model.forward(&input, &ForwardOptions::default(), None));
        let last = logits.get(0).get(end as i64 - 1).softmax(-1, Kind::Float);
        total += last.double_value(&[i64::from(im_end)]);
    }
    total / examples.len() as f64
}

#[test]
fn a_model_trained_on_short_answers_learns_to_stop() {
    let _generator = generator_lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = base_folder(dir.path());
    let all = examples(&tokenizer, &short_answers());
    let loaded = checkpoint::load(dir.path(), Device::Cpu).expect("loads");
    let data = held_out_first_two(&all);
    let mut trainer = SftTrainer::new(loaded, Method::Full, config(60), data).expect("starts");
    let before = stop_probability(trainer.model(), &tokenizer, &all);
    for _ in 0..60 {
        trainer.train_step();
    }
    let after = stop_probability(trainer.model(), &tokenizer, &all);
    println!("P(<|im_end|> after the answer): before {before:.4}, after {after:.4}");
    // Untrained, the model spreads probability over ~400 ids (about 1/400 each); every
    // training reply ends right after its word, so a model that learned stops there.
    assert!(before < 0.05, "{before}");
    assert!(after > 0.5, "{after}");
    assert!(trainer.evaluate() < trainer.base_eval_loss());
}

/// Every example to train on, the first two also held out (the tests measure learning, not
/// generalisation).
fn held_out_first_two(all: &[Example]) -> SftData {
    SftData {
        train: all.to_vec(),
        eval: all[..2].to_vec(),
    }
}

fn train_for(trainer: &mut SftTrainer, steps: usize) {
    for _ in 0..steps {
        trainer.train_step();
    }
}

#[test]
fn gradient_checkpointing_takes_the_same_steps() {
    let _generator = generator_lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = base_folder(dir.path());
    let all = examples(&tokenizer, &short_answers());
    for method in [Method::Full, Method::Lora, Method::Qlora] {
        let run = |gradient_checkpointing| {
            let config = SftConfig {
                gradient_checkpointing: Some(gradient_checkpointing),
                ..config(4)
            };
            let data = held_out_first_two(&all);
            let base = sft::load_base(dir.path(), method, Device::Cpu).expect("loads");
            let mut trainer = SftTrainer::new(base, method, config, data).expect("starts");
            assert_eq!(trainer.gradient_checkpointing(), gradient_checkpointing);
            train_for(&mut trainer, 4);
            sft::trained_tensors(&trainer)
        };
        let (plain, checkpointed) = (run(false), run(true));
        for (name, expected) in &plain {
            // Recomputed blocks repeat the same float operations with the same dropout masks
            // (lora_dropout is 0.1 here), so four steps agree to rounding; a gradient dropped
            // or doubled anywhere would differ by the size of an update (~lr = 3e-3).
            let difference = (expected - &checkpointed[name])
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                difference < 1e-5,
                "{method:?}: {name} differs by {difference}"
            );
        }
    }
}

#[test]
fn lora_and_qlora_runs_resume_exactly() {
    let _generator = generator_lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = base_folder(dir.path());
    let all = examples(&tokenizer, &short_answers());
    let data = || held_out_first_two(&all);
    for method in [Method::Lora, Method::Qlora] {
        let load = || checkpoint::load(dir.path(), Device::Cpu).expect("loads");
        let mut straight = SftTrainer::new(load(), method, config(6), data()).expect("starts");
        train_for(&mut straight, 6);

        let mut first = SftTrainer::new(load(), method, config(6), data()).expect("starts");
        train_for(&mut first, 3);
        let saved = tempfile::tempdir().expect("temp dir");
        first.save_checkpoint(saved.path(), "base").expect("saves");
        drop(first);
        let mut resumed =
            SftTrainer::resume(saved.path(), dir.path(), data(), Device::Cpu).expect("resumes");
        assert_eq!(resumed.step_count(), 3);
        train_for(&mut resumed, 3);

        let expected = sft::trained_tensors(&straight);
        let got = sft::trained_tensors(&resumed);
        assert_eq!(expected.len(), got.len());
        for (name, tensor) in &expected {
            // Same data order, same dropout masks, same moments: bit-identical updates.
            assert!(
                tensor.equal(&got[name]),
                "{method:?}: {name} differs after resume"
            );
        }
        assert!(
            resumed.evaluate() < resumed.base_eval_loss(),
            "{method:?} did not learn"
        );
    }
}

struct Recorder {
    metrics: Vec<(u64, BTreeMap<String, f64>)>,
    checkpoints: Vec<PathBuf>,
}

impl JobObserver for Recorder {
    fn metrics(&mut self, step: u64, _total: u64, values: &BTreeMap<String, f64>) {
        self.metrics.push((step, values.clone()));
    }
    fn checkpoint(&mut self, _step: u64, dir: &Path) -> Result<(), String> {
        self.checkpoints.push(dir.to_path_buf());
        Ok(())
    }
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// A base model folder and the short answers as a JSONL dataset under `dir`, as a worker lays
/// them out for a job.
fn job_folder(dir: &Path) -> JobInputs {
    base_folder(&dir.join("base"));
    let records: Vec<String> = short_answers()
        .iter()
        .map(|record| record.to_string())
        .collect();
    let data_path = dir.join("train.jsonl");
    std::fs::write(&data_path, records.join("\n") + "\n").expect("writes");
    JobInputs {
        base_model: Some(dir.join("base")),
        datasets: vec![DatasetInput {
            version_id: "v1".into(),
            kind: "sft".into(),
            role: DatasetRole::Train,
            path: data_path,
        }],
        output_dir: dir.join("out"),
        checkpoint_dir: dir.join("checkpoints"),
        resume_from: None,
        device: Device::Cpu,
    }
}

#[test]
fn a_base_with_non_finite_weights_fails_the_job_for_good() {
    let _generator = generator_lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let inputs = job_folder(dir.path());
    // One NaN in the final norm makes every logit NaN, hence the loss.
    let weights = dir.path().join("base").join(checkpoint::WEIGHTS_FILE);
    let mut tensors = ferrite_model::safetensors::load(&weights)
        .expect("reads")
        .tensors;
    let norm = tensors.get_mut("model.norm.weight").expect("a final norm");
    let _ = norm.get(0).fill_(f64::NAN);
    ferrite_model::safetensors::save(&weights, &tensors, &BTreeMap::new()).expect("writes");

    let hyper = serde_json::json!({"total_steps": 2, "batch_size": 2, "threads": 1});
    let mut recorder = Recorder {
        metrics: Vec::new(),
        checkpoints: Vec::new(),
    };
    for kind in [JobKind::Sft, JobKind::Qlora] {
        let error = job::run(kind, &hyper, &inputs, &mut recorder).expect_err("NaN base");
        // Invalid is the kind the runner does not retry; nothing may be written as output.
        match error {
            job::JobError::Invalid(message) => {
                assert!(message.contains("not finite"), "{kind:?}: {message}")
            }
            other => panic!("{kind:?}: expected a permanent failure, got {other}"),
        }
        assert!(!inputs.output_dir.join("adapter_config.json").exists());
        assert!(!inputs.output_dir.join(checkpoint::WEIGHTS_FILE).exists());
    }
}

#[test]
fn a_qlora_job_writes_a_peft_adapter_and_reports_the_gain() {
    let _generator = generator_lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let inputs = job_folder(dir.path());
    let hyper = serde_json::json!({
        "total_steps": 30, "batch_size": 4, "lr": 5e-3, "warmup_steps": 0,
        "checkpoint_interval": 10, "eval_fraction": 0.25, "target_modules": "all-linear",
        "threads": 1
    });
    job::validate(JobKind::Qlora, &hyper).expect("valid");
    let mut recorder = Recorder {
        metrics: Vec::new(),
        checkpoints: Vec::new(),
    };
    let output = job::run(JobKind::Qlora, &hyper, &inputs, &mut recorder).expect("runs");
    assert!(output.artifact_dir.join("adapter_config.json").exists());
    assert!(
        output
            .artifact_dir
            .join("adapter_model.safetensors")
            .exists()
    );
    let base_loss = output.final_metrics["base_eval_loss"];
    let eval_loss = output.final_metrics["eval_loss"];
    assert!(eval_loss < base_loss, "{eval_loss} vs base {base_loss}");
    assert_eq!(recorder.checkpoints.len(), 2, "steps 10 and 20");
    assert!(
        recorder
            .metrics
            .iter()
            .any(|(_, values)| values.contains_key("loss"))
    );
}

#[test]
fn bad_hyper_parameters_name_their_field() {
    let error = job::validate(JobKind::Lora, &serde_json::json!({"lora_r": 0})).expect_err("zero");
    assert_eq!(error.field, "hyper_parameters.lora_r");
    let error =
        job::validate(JobKind::Sft, &serde_json::json!({"batch_size": "8"})).expect_err("a string");
    assert_eq!(error.field, "hyper_parameters.batch_size");
    let error = job::validate(JobKind::Sft, &serde_json::json!({"learning_rate": 1e-4}))
        .expect_err("unknown key");
    assert!(error.message.contains("learning_rate"), "{error:?}");
}

#[test]
fn the_fetched_alpaca_and_chat_data_read_without_error() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let alpaca = root.join("sft/alpaca_en_demo.json");
    let chat = root.join("chat/chitchat.jsonl");
    if !alpaca.exists() || !chat.exists() {
        eprintln!("SKIPPED: run scripts/fetch-data.sh for {}", root.display());
        return;
    }
    // data/README.md: 999 Alpaca records (a JSON array) and 4,017 chats of two or more turns.
    let read = |path: &Path| {
        let text = std::fs::read_to_string(path).expect("reads");
        sft_data::parse_conversations(&text).expect("every record parses")
    };
    assert_eq!(read(&alpaca).len(), 999);
    let chats = read(&chat);
    assert_eq!(chats.len(), 4017);
    assert!(chats.iter().all(|chat| chat.len() >= 2));
}
