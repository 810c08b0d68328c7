//! The two things that keep a QLoRA step small: gradient checkpointing (blocks recomputed in
//! the backward pass) must give the gradients plain backpropagation gives, and a base loaded
//! with its projections quantised as they are read must be the model that quantising after a
//! full load gives.

use std::collections::BTreeMap;

use ferrite_model::ModelConfig;
use ferrite_model::checkpoint::{self, CheckpointError};
use ferrite_model::llama::{ForwardOptions, Llama};
use ferrite_model::lora::{LoraAdapter, LoraConfig, TargetModules};
use ferrite_model::nf4;
use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
use tch::{Device, Kind, Tensor, nn};

/// libtorch's generator is process-wide and the tests of this file run on parallel threads;
/// each test holds this while it seeds and draws, so no other test's draws fall in between.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn generator() -> std::sync::MutexGuard<'static, ()> {
    GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tiny(seed: i64) -> (nn::VarStore, Llama) {
    tch::manual_seed(seed);
    let config = ModelConfig::preset("tiny").expect("tiny preset");
    let var_store = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&var_store.root(), &config);
    (var_store, model)
}

fn ids() -> Tensor {
    Tensor::from_slice(&[1_i64, 50, 600, 7, 1999, 42, 8, 9, 300, 4, 17, 1200]).view([2, 6])
}

/// Mean squared logits: a loss that reaches every parameter, embeddings included.
fn loss_of_hidden(model: &Llama) -> impl Fn(&Tensor) -> Tensor + '_ {
    |hidden| model.logits_from_hidden(hidden).square().mean(Kind::Float)
}

/// Gradients of `tensors`, taken out so the next pass starts from zero.
fn take_gradients(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .map(|(name, tensor)| {
            let mut gradient = tensor.grad();
            let copy = gradient.copy();
            let _ = gradient.zero_();
            (name.clone(), copy)
        })
        .collect()
}

/// Runs one plain and one checkpointed backward pass with the same layer seed and checks that
/// every gradient agrees. Both passes do the same float operations on the same values in the
/// same order, so they agree to rounding; 1e-6 allows for accumulation order alone.
fn assert_same_gradients(model: &Llama, parameters: &BTreeMap<String, Tensor>) {
    let inputs = model.prepare(&ids(), &ForwardOptions::default());
    let plain_loss = loss_of_hidden(model)(&model.run_blocks(&inputs, Some(11)));
    plain_loss.backward();
    let plain = take_gradients(parameters);
    let inputs = model.prepare(&ids(), &ForwardOptions::default());
    let checkpointed_loss = model.backward_checkpointed(&inputs, Some(11), loss_of_hidden(model));
    let checkpointed = take_gradients(parameters);

    assert!(
        (plain_loss.double_value(&[]) - checkpointed_loss.double_value(&[])).abs() < 1e-7,
        "the loss itself differs"
    );
    for (name, expected) in &plain {
        let found = &checkpointed[name];
        assert!(
            expected.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name} got no gradient, so the comparison would prove nothing"
        );
        let difference = (found - expected).abs().max().double_value(&[]);
        assert!(
            difference < 1e-6,
            "{name}: gradients differ by {difference}"
        );
    }
}

#[test]
fn checkpointing_gives_full_fine_tuning_the_same_gradients() {
    let _generator = generator();
    let (store, model) = tiny(3);
    // Every parameter, the tied embedding (reached through the input and the head) included.
    let parameters: BTreeMap<String, Tensor> = store.variables().into_iter().collect();
    assert_same_gradients(&model, &parameters);
}

#[test]
fn checkpointing_gives_a_lora_adapter_under_dropout_the_same_gradients() {
    let _generator = generator();
    let (mut store, mut model) = tiny(5);
    store.freeze();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        // Dropout makes the comparison strict: unless the recomputed blocks draw the masks
        // of the first pass, the gradients differ everywhere.
        dropout: 0.5,
        target_modules: TargetModules::AllLinear,
        use_rslora: false,
    };
    let adapter = LoraAdapter::attach(&mut model, config, 9).expect("attaches");
    // B starts at zero, which would zero every A gradient; give it values as training would.
    tch::no_grad(|| {
        for (name, mut tensor) in adapter.named_tensors() {
            if name.contains("lora_B") {
                tensor.copy_(&(Tensor::randn_like(&tensor) * 0.05));
            }
        }
    });
    adapter.set_training(true);
    assert_same_gradients(&model, &adapter.named_tensors());
    for (name, tensor) in store.variables() {
        assert!(!tensor.grad().defined(), "frozen {name} got a gradient");
    }
}

fn saved_tiny(dir: &std::path::Path) -> ModelConfig {
    let (store, model) = tiny(13);
    let tokenizer = Tokenizer::train(
        &TrainConfig {
            vocab_size: 300,
            min_frequency: 1,
        },
        ["a few words for a tokenizer"].into_iter(),
    )
    .expect("tokenizer");
    checkpoint::save(dir, &store, model.config(), Some(&tokenizer)).expect("saves");
    model.config().clone()
}

#[test]
fn quantising_while_loading_equals_quantising_after_loading() {
    let _generator = generator();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = saved_tiny(dir.path());
    let all_linear = |name: &str| TargetModules::AllLinear.matches(name);

    let mut after = checkpoint::load(dir.path(), Device::Cpu).expect("loads");
    let quantised = nf4::quantize_projections(&mut after.model, &after.var_store, all_linear);
    let during =
        checkpoint::load_quantized(dir.path(), Device::Cpu, all_linear).expect("loads quantised");

    // tiny: 4 blocks of 7 projections, all quantised either way.
    assert_eq!(quantised, 4 * 7);
    // Same weights through the same quantiser: identical codes and scales, identical logits.
    let logits =
        |model: &Llama| tch::no_grad(|| model.forward(&ids(), &ForwardOptions::default(), None));
    assert!(logits(&after.model).equal(&logits(&during.model)));
    // What stays in f32 is the embedding and the norms: 2 per block and the final one.
    let names: Vec<String> = during.var_store.variables().into_keys().collect();
    assert_eq!(
        names.len(),
        1 + 2 * config.num_hidden_layers as usize + 1,
        "{names:?}"
    );
    assert!(names.iter().all(|name| !name.contains("proj")), "{names:?}");
    assert!(during.tokenizer.is_some());
}

#[test]
fn a_quantised_load_names_the_tensor_whose_shape_disagrees() {
    let _generator = generator();
    let dir = tempfile::tempdir().expect("temp dir");
    saved_tiny(dir.path());
    // A config that claims a wider MLP than the file holds.
    let path = dir.path().join(checkpoint::CONFIG_FILE);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reads")).expect("json");
    config["intermediate_size"] = serde_json::json!(384);
    std::fs::write(&path, config.to_string()).expect("writes");

    let error = checkpoint::load_quantized(dir.path(), Device::Cpu, |name| {
        TargetModules::AllLinear.matches(name)
    })
    .expect_err("the file's MLP is 352 wide");
    match error {
        CheckpointError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            // Every shape is checked from the headers, by name, before any tensor is read: the
            // first name that disagrees is layer 0's down projection, [hidden, intermediate].
            assert_eq!(name, "model.layers.0.mlp.down_proj.weight");
            assert_eq!(expected, vec![128, 384]);
            assert_eq!(found, vec![128, 352]);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}
