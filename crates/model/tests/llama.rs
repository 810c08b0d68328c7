//! Behaviour of the decoder, checkpoints and generation on the `tiny` preset.

use std::collections::BTreeMap;
use std::path::Path;

use ferrite_model::checkpoint::{self, CheckpointError};
use ferrite_model::generate::{self, SamplingParams, TextDecoder};
use ferrite_model::llama::{ForwardOptions, KvCache, Llama};
use ferrite_model::{ModelConfig, safetensors};
use tch::{Device, Kind, Tensor, nn};

/// Reads ids below 256 as bytes, the simplest byte-level vocabulary.
struct ByteDecoder;

impl TextDecoder for ByteDecoder {
    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| id < 256)
            .map(|&id| id as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn tiny() -> (nn::VarStore, Llama) {
    tch::manual_seed(0);
    let config = ModelConfig::preset("tiny").expect("tiny preset exists");
    let var_store = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&var_store.root(), &config);
    (var_store, model)
}

fn ids(rows: &[&[i64]]) -> Tensor {
    let width = rows[0].len() as i64;
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, width])
}

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn parameter_names_are_the_hugging_face_ones() {
    let (var_store, _) = tiny();
    let names: Vec<String> = checkpoint::named_tensors(&var_store).into_keys().collect();
    // transformers' LlamaForCausalLM with tied embeddings has 2 + 9 per layer parameters.
    assert_eq!(names.len(), 2 + 9 * 4);
    for expected in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }
    // Grouped-query attention: 2 kv heads of 32 make k_proj [64, 128].
    let variables = var_store.variables();
    assert_eq!(
        variables["model.layers.0.self_attn.k_proj.weight"].size(),
        [64, 128]
    );
}

#[test]
fn decoding_with_the_cache_matches_a_full_forward_pass() {
    let (_store, model) = tiny();
    let sequence = ids(&[&[5, 17, 99, 3, 250, 7, 1000, 42]]);
    let full = tch::no_grad(|| model.forward(&sequence, &ForwardOptions::default(), None));

    let mut cache = KvCache::new(model.layers.len());
    let mut pieces = vec![tch::no_grad(|| {
        model.forward(
            &sequence.narrow(1, 0, 5),
            &ForwardOptions::default(),
            Some(&mut cache),
        )
    })];
    for position in 5..8 {
        let token = sequence.narrow(1, position, 1);
        pieces.push(tch::no_grad(|| {
            model.forward(&token, &ForwardOptions::default(), Some(&mut cache))
        }));
    }
    let incremental = Tensor::cat(&pieces, 1);
    assert_eq!(cache.len(), 8);
    // The same arithmetic in a different grouping: f32 rounding only.
    assert!(
        max_difference(&full, &incremental) < 1e-4,
        "{}",
        max_difference(&full, &incremental)
    );
}

#[test]
fn a_left_padded_row_gets_the_logits_it_gets_alone() {
    let (_store, model) = tiny();
    let short: &[i64] = &[9, 8, 7];
    let long: &[i64] = &[1, 2, 3, 4, 5, 6];
    let alone = tch::no_grad(|| model.forward(&ids(&[short]), &ForwardOptions::default(), None));

    let batch = ids(&[&[0, 0, 0, 9, 8, 7], long]);
    let mask = ids(&[&[0, 0, 0, 1, 1, 1], &[1, 1, 1, 1, 1, 1]]);
    let positions = ids(&[&[0, 0, 0, 0, 1, 2], &[0, 1, 2, 3, 4, 5]]);
    let options = ForwardOptions {
        attention_mask: Some(&mask),
        position_ids: Some(&positions),
    };
    let batched = tch::no_grad(|| model.forward(&batch, &options, None));
    let padded_row = batched.get(0).narrow(0, 3, 3);
    assert!(max_difference(&alone.get(0), &padded_row) < 1e-4);
    assert!(
        batched.isfinite().all().int64_value(&[]) == 1,
        "padding rows must not produce NaN"
    );
}

#[test]
fn greedy_generation_picks_the_argmax_of_an_uncached_forward_pass() {
    let (_store, model) = tiny();
    let prompt: Vec<u32> = vec![3, 14, 15, 92];
    let params = SamplingParams {
        max_tokens: 6,
        ..SamplingParams::default()
    };
    let completions = generate::generate(&model, &ByteDecoder, &[(prompt.clone(), params)], |_| {})
        .expect("generates");

    // Reference: recompute the whole sequence each step without a cache and take the argmax.
    let mut sequence: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    for _ in 0..6 {
        let logits =
            tch::no_grad(|| model.forward(&ids(&[&sequence]), &ForwardOptions::default(), None));
        sequence.push(
            logits
                .get(0)
                .get(sequence.len() as i64 - 1)
                .argmax(0, false)
                .int64_value(&[]),
        );
    }
    let expected: Vec<u32> = sequence[4..].iter().map(|&t| t as u32).collect();
    assert_eq!(completions[0].tokens, expected);
}

#[test]
fn batched_prompts_of_different_lengths_decode_as_they_do_alone() {
    let (_store, model) = tiny();
    let params = SamplingParams {
        max_tokens: 5,
        ..SamplingParams::default()
    };
    let prompts = vec![
        (vec![7u32, 8, 9], params.clone()),
        (vec![100u32, 200, 300, 400, 500, 600, 700], params.clone()),
    ];
    let together = generate::generate(&model, &ByteDecoder, &prompts, |_| {}).expect("generates");
    for (index, prompt) in prompts.iter().enumerate() {
        let alone = generate::generate(&model, &ByteDecoder, std::slice::from_ref(prompt), |_| {})
            .expect("generates");
        assert_eq!(together[index].tokens, alone[0].tokens, "prompt {index}");
    }
}

#[test]
fn the_same_seed_samples_the_same_tokens_and_another_seed_differs() {
    let (_store, model) = tiny();
    let params = |seed| SamplingParams {
        max_tokens: 12,
        temperature: 1.5,
        top_k: Some(200),
        top_p: Some(0.95),
        seed,
        ..SamplingParams::default()
    };
    let run = |seed| {
        generate::generate(
            &model,
            &ByteDecoder,
            &[(vec![1, 2, 3], params(seed))],
            |_| {},
        )
        .expect("generates")[0]
            .tokens
            .clone()
    };
    // libtorch's global generator must not matter.
    tch::manual_seed(1);
    let first = run(11);
    tch::manual_seed(2);
    assert_eq!(first, run(11));
    // At temperature 1.5 over ~2000 ids, 12 identical draws from another seed are vanishingly unlikely.
    assert_ne!(first, run(12));
}

#[test]
fn logprobs_are_the_model_log_softmax() {
    let (_store, model) = tiny();
    let params = SamplingParams {
        max_tokens: 1,
        logprobs: true,
        top_logprobs: 3,
        ..SamplingParams::default()
    };
    let completion = &generate::generate(&model, &ByteDecoder, &[(vec![4, 5, 6], params)], |_| {})
        .expect("generates")[0];
    let logits =
        tch::no_grad(|| model.forward(&ids(&[&[4, 5, 6]]), &ForwardOptions::default(), None));
    let reference = logits.get(0).get(2).log_softmax(0, Kind::Float);
    let logprob = &completion.logprobs[0];
    let token = i64::from(logprob.token);
    assert!((f64::from(logprob.logprob) - reference.double_value(&[token])).abs() < 1e-5);
    // Greedy picks the most likely token, so it heads the top list.
    assert_eq!(logprob.top[0].0, logprob.token);
    assert_eq!(logprob.top.len(), 3);
    assert!(logprob.top.windows(2).all(|pair| pair[0].1 >= pair[1].1));
}

fn short_logits(model: &Llama) -> Tensor {
    tch::no_grad(|| model.forward(&ids(&[&[1, 2, 3, 4]]), &ForwardOptions::default(), None))
}

fn save_tiny(dir: &Path) -> (nn::VarStore, Llama) {
    let (var_store, model) = tiny();
    let config = model.config().clone();
    checkpoint::save(dir, &var_store, &config, None).expect("saves");
    (var_store, model)
}

#[test]
fn a_saved_checkpoint_loads_back_with_identical_logits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_store, model) = save_tiny(dir.path());
    let loaded = checkpoint::load(dir.path(), Device::Cpu).expect("loads");
    let (before, after) = (short_logits(&model), short_logits(&loaded.model));
    assert!(before.equal(&after));
    let weights = safetensors::load(&dir.path().join(checkpoint::WEIGHTS_FILE)).expect("reads");
    assert_eq!(
        weights.metadata.get("format").map(String::as_str),
        Some("pt")
    );
    assert!(dir.path().join(checkpoint::GENERATION_CONFIG_FILE).exists());
}

/// Splits the saved `model.safetensors` into two shards (layers 0 and 1 and everything
/// outside the layers in the first, the rest in the second) with the index `transformers`
/// writes, and returns the index as JSON for tests to alter.
fn shard_in_two(dir: &Path) -> serde_json::Value {
    let single = dir.join(checkpoint::WEIGHTS_FILE);
    let tensors = safetensors::load(&single).expect("reads").tensors;
    std::fs::remove_file(&single).expect("removes the single file");
    let (mut first, mut second) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, tensor) in tensors {
        let late = ["model.layers.2.", "model.layers.3."]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        let (file, shard) = if late {
            ("model-00002-of-00002.safetensors", &mut second)
        } else {
            ("model-00001-of-00002.safetensors", &mut first)
        };
        weight_map.insert(name.clone(), serde_json::json!(file));
        shard.insert(name, tensor);
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    for (file, shard) in [
        ("model-00001-of-00002.safetensors", &first),
        ("model-00002-of-00002.safetensors", &second),
    ] {
        assert!(!shard.is_empty(), "{file} would be empty");
        safetensors::save(&dir.join(file), shard, &metadata).expect("writes a shard");
    }
    serde_json::json!({"metadata": {}, "weight_map": weight_map})
}

fn write_index(dir: &Path, index: &serde_json::Value) {
    std::fs::write(dir.join(checkpoint::WEIGHTS_INDEX_FILE), index.to_string())
        .expect("writes the index");
}

#[test]
fn sharded_weights_load_with_the_logits_of_one_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_store, model) = save_tiny(dir.path());
    let index = shard_in_two(dir.path());
    write_index(dir.path(), &index);
    let loaded = checkpoint::load(dir.path(), Device::Cpu).expect("loads the shards");
    let (before, after) = (short_logits(&model), short_logits(&loaded.model));
    // The same bytes, only split across files: identical weights, identical logits.
    assert!(before.equal(&after));
}

#[test]
fn a_shard_index_that_leaves_the_folder_or_misplaces_a_tensor_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    save_tiny(dir.path());
    let index = shard_in_two(dir.path());

    let mut escaping = index.clone();
    escaping["weight_map"]["model.norm.weight"] = serde_json::json!("../model.safetensors");
    write_index(dir.path(), &escaping);
    let error = checkpoint::load(dir.path(), Device::Cpu).expect_err("a path, not a file name");
    assert!(
        error
            .to_string()
            .contains("\"../model.safetensors\" is not a file name"),
        "{error}"
    );

    let mut misplaced = index;
    misplaced["weight_map"]["model.norm.weight"] =
        serde_json::json!("model-00002-of-00002.safetensors");
    write_index(dir.path(), &misplaced);
    let error = checkpoint::load(dir.path(), Device::Cpu).expect_err("the norm is in shard 1");
    let message = error.to_string();
    assert!(
        message.contains(checkpoint::WEIGHTS_INDEX_FILE)
            && message.contains("model.norm.weight in model-00002-of-00002.safetensors"),
        "{message}"
    );
}

#[test]
fn a_truncated_weights_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    save_tiny(dir.path());
    let path = dir.path().join(checkpoint::WEIGHTS_FILE);
    let bytes = std::fs::read(&path).expect("reads");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncates");
    let error = checkpoint::load(dir.path(), Device::Cpu).expect_err("half the bytes are gone");
    assert!(error.to_string().contains("model.safetensors"), "{error}");
    assert!(matches!(error, CheckpointError::Safetensors(_)), "{error}");
}

#[test]
fn a_config_missing_a_field_is_an_error_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    save_tiny(dir.path());
    let path = dir.path().join(checkpoint::CONFIG_FILE);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reads")).expect("json");
    json.as_object_mut()
        .expect("object")
        .remove("num_hidden_layers");
    std::fs::write(&path, json.to_string()).expect("writes");
    let error = checkpoint::load(dir.path(), Device::Cpu).expect_err("field removed");
    let message = error.to_string();
    assert!(
        message.contains("config.json") && message.contains("num_hidden_layers"),
        "{message}"
    );
}

#[test]
fn weights_of_the_wrong_shape_are_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().expect("temp dir");
    save_tiny(dir.path());
    let path = dir.path().join(checkpoint::WEIGHTS_FILE);
    let mut weights = safetensors::load(&path).expect("reads").tensors;
    weights.insert(
        "model.norm.weight".to_string(),
        Tensor::ones([7], (Kind::Float, Device::Cpu)),
    );
    safetensors::save(&path, &weights, &BTreeMap::new()).expect("writes");
    let error = checkpoint::load(dir.path(), Device::Cpu).expect_err("norm has 128 entries");
    assert!(error.to_string().contains("model.norm.weight"), "{error}");
}

#[test]
fn a_tokenizer_with_more_ids_than_the_embedding_has_rows_is_refused() {
    use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
    let config = TrainConfig {
        vocab_size: 300,
        min_frequency: 1,
    };
    let tokenizer = Tokenizer::train(
        &config,
        ["the cat sat on the mat", "the dog sat on the log"].into_iter(),
    )
    .expect("trains");
    // 256 byte tokens plus specials already exceed an embedding of 260 rows.
    assert!(tokenizer.vocab_size() > 260);
    let model_config = ModelConfig::preset("tiny")
        .expect("tiny preset exists")
        .with_vocab_size(260);
    let var_store = nn::VarStore::new(Device::Cpu);
    let _model = Llama::new(&var_store.root(), &model_config);
    let dir = tempfile::tempdir().expect("temp dir");
    checkpoint::save(dir.path(), &var_store, &model_config, Some(&tokenizer)).expect("saves");
    let error =
        checkpoint::load(dir.path(), Device::Cpu).expect_err("ids past row 259 cannot be embedded");
    assert!(
        matches!(
            error,
            CheckpointError::VocabularyMismatch { embedding: 260, .. }
        ),
        "{error}"
    );
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    }
}

fn alone(model: &Llama, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    generate::generate(
        model,
        &ByteDecoder,
        &[(prompt.to_vec(), greedy(max_tokens))],
        |_| {},
    )
    .expect("generates")
    .remove(0)
    .tokens
}

#[test]
fn sequences_joining_and_leaving_a_running_batch_decode_as_they_do_alone() {
    // Continuous batching: B joins after A has run three steps, left-padded to A's 10 cached
    // positions; A leaves early, its row goes and so do the 7 leading columns that were only
    // B's padding; C joins later still, padded to B's length. Greedy decoding makes each sequence's tokens a function of its
    // prompt alone, so any mask, position or cache slip shows up as a different token.
    let (_store, model) = tiny();
    let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) = (
        vec![21, 22, 23, 24, 25, 26, 27],
        vec![11, 12, 13],
        vec![31, 32],
    );
    let mut batch = generate::Batch::new(&model, &ByteDecoder);
    let mut tokens: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut record = |outputs: Vec<generate::StepOutput>| {
        for output in outputs {
            tokens
                .entry(output.sequence)
                .or_default()
                .push(output.token);
        }
    };
    let id_a = batch.add(&[(a.clone(), greedy(5))]).expect("adds")[0];
    for _ in 0..3 {
        record(batch.step());
    }
    let id_b = batch.add(&[(b.clone(), greedy(10))]).expect("adds")[0];
    for _ in 0..4 {
        record(batch.step());
    }
    assert_eq!(batch.running(), [id_b], "A stopped after its 5 tokens");
    let id_c = batch.add(&[(c.clone(), greedy(6))]).expect("adds")[0];
    while !batch.is_empty() {
        record(batch.step());
    }
    assert_eq!(tokens[&id_a], alone(&model, &a, 5));
    assert_eq!(tokens[&id_b], alone(&model, &b, 10));
    assert_eq!(tokens[&id_c], alone(&model, &c, 6));
    assert_eq!(batch.take_completions().len(), 3);
}

/// Wraps a projection and scales its output, as an adapter would add to it.
#[derive(Debug)]
struct Scaled {
    inner: Box<dyn ferrite_model::llama::Projection>,
    scale: f64,
}

impl ferrite_model::llama::Projection for Scaled {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.inner.forward(x) * self.scale
    }
}

#[test]
fn projections_can_be_wrapped_by_name_as_adapters_will_be() {
    let (_store, mut model) = tiny();
    let input = ids(&[&[3, 1, 4, 1, 5]]);
    let before = tch::no_grad(|| model.forward(&input, &ForwardOptions::default(), None));

    let mut names = Vec::new();
    model.map_projections(|name, inner| {
        names.push(name.to_string());
        // Silencing every block's output projections leaves only the embedding in the
        // residual stream.
        let silenced = name.ends_with("o_proj") || name.ends_with("down_proj");
        Box::new(Scaled {
            inner,
            scale: if silenced { 0.0 } else { 1.0 },
        })
    });
    // Seven projections per layer, and no lm_head because tiny ties it to the embedding.
    assert_eq!(names.len(), 7 * 4);
    assert!(names.contains(&"model.layers.3.mlp.gate_proj".to_string()));

    // Expected by hand: logits = RMSNorm(E[x]) · Eᵀ, with the norm's gain still 1.
    let after = tch::no_grad(|| model.forward(&input, &ForwardOptions::default(), None));
    let embedding = model.embed_tokens();
    let embedded = Tensor::embedding(embedding, &input, -1, false, false);
    let eps = model.config().rms_norm_eps;
    let normed = &embedded * (embedded.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt();
    let expected = tch::no_grad(|| normed.matmul(&embedding.tr()));
    assert!(
        max_difference(&after, &expected) < 1e-5,
        "{}",
        max_difference(&after, &expected)
    );
    assert!(
        max_difference(&before, &after) > 1e-3,
        "the blocks did contribute before"
    );
}
