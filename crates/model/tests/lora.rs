//! LoRA adapters: the scale, step-0 equality with the base, deterministic evaluation, merge and
//! unmerge, PEFT folders round-tripping, and refusal of adapters that do not fit the base.

use std::collections::BTreeMap;

use ferrite_model::ModelConfig;
use ferrite_model::adapter;
use ferrite_model::llama::{ForwardOptions, Llama};
use ferrite_model::lora::{LoraAdapter, LoraConfig, LoraError, TargetModules, peft_name};
use tch::{Device, Kind, Tensor, nn};

fn tiny() -> (nn::VarStore, Llama) {
    tch::manual_seed(7);
    let config = ModelConfig::preset("tiny").expect("tiny preset");
    let var_store = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&var_store.root(), &config);
    (var_store, model)
}

fn ids() -> Tensor {
    Tensor::from_slice(&[1_i64, 50, 600, 7, 1999, 42, 8, 9]).view([1, 8])
}

fn logits(model: &Llama) -> Tensor {
    tch::no_grad(|| model.forward(&ids(), &ForwardOptions::default(), None))
}

fn config(r: i64, alpha: f64, dropout: f64, use_rslora: bool) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora,
    }
}

/// Fills every `B` with small random values, as training would, so the adapter does something.
fn perturb(adapter: &LoraAdapter) {
    tch::no_grad(|| {
        for (name, mut tensor) in adapter.named_tensors() {
            if name.contains("lora_B") {
                tensor.copy_(&(Tensor::randn_like(&tensor) * 0.05));
            }
        }
    });
}

#[test]
fn scale_is_alpha_over_r_or_over_root_r_with_rslora() {
    // 16 / 8 = 2 exactly; 16 / √8 = 5.656854249492381 (√8 = 2.8284271247461903).
    assert_eq!(config(8, 16.0, 0.0, false).scale(), 2.0);
    assert_eq!(config(8, 16.0, 0.0, true).scale(), 16.0 / 8f64.sqrt());
    assert!((config(8, 16.0, 0.0, true).scale() - 5.656_854_249_492_381).abs() < 1e-15);
}

#[test]
fn adapted_layer_adds_the_scaled_low_rank_product() {
    let (_store, mut model) = tiny();
    let q_weight = model.layers[0]
        .self_attn
        .q_proj
        .forward(&Tensor::eye(128, (Kind::Float, Device::Cpu)));
    let adapter =
        LoraAdapter::attach(&mut model, config(4, 12.0, 0.0, false), 1).expect("attaches");
    perturb(&adapter);
    let tensors = adapter.named_tensors();
    let a = &tensors[&peft_name("model.layers.0.self_attn.q_proj", "lora_A")];
    let b = &tensors[&peft_name("model.layers.0.self_attn.q_proj", "lora_B")];
    let x = Tensor::randn([3, 128], (Kind::Float, Device::Cpu));
    // By hand: x Wᵀ + (12 / 4) x Aᵀ Bᵀ; q_weight above is I·Wᵀ = Wᵀ.
    let expected = x.matmul(&q_weight) + x.matmul(&a.tr()).matmul(&b.tr()) * 3.0;
    let got = tch::no_grad(|| model.layers[0].self_attn.q_proj.forward(&x));
    assert!(got.allclose(&expected, 1e-5, 1e-5, false));
}

#[test]
fn a_fresh_adapter_leaves_the_model_unchanged_at_step_zero() {
    let (_store, mut model) = tiny();
    let before = logits(&model);
    let adapter =
        LoraAdapter::attach(&mut model, config(8, 16.0, 0.0, false), 3).expect("attaches");
    // B is zero, so the update is exactly zero whatever A is.
    assert!(logits(&model).equal(&before));
    // A is not zero (else nothing could ever train): its entries lie in ±1/√128.
    let a = &adapter.named_tensors()[&peft_name("model.layers.1.self_attn.v_proj", "lora_A")];
    let largest = a.abs().max().double_value(&[]);
    assert!(largest > 0.0 && largest <= 1.0 / 128f64.sqrt());
}

#[test]
fn evaluation_mode_with_dropout_is_deterministic() {
    let (_store, mut model) = tiny();
    let adapter =
        LoraAdapter::attach(&mut model, config(8, 16.0, 0.5, false), 3).expect("attaches");
    perturb(&adapter);
    adapter.set_training(false);
    assert!(logits(&model).equal(&logits(&model)));
    // In training mode the same input gives different outputs, so the test above can fail.
    adapter.set_training(true);
    assert!(!logits(&model).equal(&logits(&model)));
}

#[test]
fn base_is_frozen_and_only_the_adapter_trains() {
    let (mut store, mut model) = tiny();
    store.freeze();
    let adapter =
        LoraAdapter::attach(&mut model, config(8, 16.0, 0.0, false), 3).expect("attaches");
    perturb(&adapter);
    let loss = model
        .forward(&ids(), &ForwardOptions::default(), None)
        .square()
        .mean(Kind::Float);
    loss.backward();
    for (name, tensor) in store.variables() {
        assert!(!tensor.grad().defined(), "{name} got a gradient");
    }
    for (name, tensor) in adapter.named_tensors() {
        assert!(tensor.grad().defined(), "{name} has no gradient");
    }
    // tiny: 4 layers x (q: 8·(128+128) + v: 8·(128+64)) = 4 x 3584 = 14,336 values.
    let per_layer =
        8 * (128 + 128) + 8 * (128 + model.config().kv_heads() * model.config().head_dim());
    assert_eq!(
        adapter.parameter_count(),
        model.config().num_hidden_layers * per_layer
    );
}

#[test]
fn merge_keeps_the_adapted_logits_and_unmerge_restores_the_base() {
    let (store, mut model) = tiny();
    let base_weight = store.variables()["model.layers.0.self_attn.q_proj.weight"].copy();
    let adapter = LoraAdapter::attach(&mut model, config(8, 16.0, 0.0, true), 3).expect("attaches");
    perturb(&adapter);
    let adapted = logits(&model);
    adapter.merge().expect("dense base merges");
    let merged = logits(&model);
    assert!(merged.allclose(&adapted, 1e-5, 1e-5, false));
    let weight = store.variables()["model.layers.0.self_attn.q_proj.weight"].copy();
    assert!(
        !weight.allclose(&base_weight, 1e-6, 1e-6, false),
        "merge changed nothing"
    );
    adapter.unmerge().expect("unmerges");
    let weight = store.variables()["model.layers.0.self_attn.q_proj.weight"].copy();
    assert!(weight.allclose(&base_weight, 1e-6, 1e-6, false));
    assert!(logits(&model).allclose(&adapted, 1e-5, 1e-5, false));
}

#[test]
fn all_linear_targets_every_block_projection_but_not_the_head() {
    let targets = TargetModules::AllLinear;
    assert!(targets.matches("model.layers.3.mlp.down_proj"));
    assert!(!targets.matches("lm_head"));
    let names = TargetModules::Names(vec!["q_proj".into()]);
    assert!(names.matches("model.layers.0.self_attn.q_proj"));
    assert!(!names.matches("model.layers.0.self_attn.xq_proj"));
}

#[test]
fn peft_folder_round_trips_the_adapter() {
    let (store, mut model) = tiny();
    let adapter = LoraAdapter::attach(&mut model, config(4, 8.0, 0.1, true), 3).expect("attaches");
    perturb(&adapter);
    adapter.set_training(false);
    let expected = logits(&model);
    let dir = tempfile::tempdir().expect("temp dir");
    adapter::save(dir.path(), &adapter, "tiny-base").expect("saves");

    // Tests share libtorch's generator across threads, so the base is copied, not re-seeded.
    let (mut store2, mut fresh) = tiny();
    store2.copy(&store).expect("same parameters");
    let (loaded, info) = adapter::load(dir.path(), &mut fresh).expect("loads");
    assert_eq!(info.base_model_name_or_path, "tiny-base");
    assert_eq!(info.config, *adapter.config());
    loaded.set_training(false);
    assert!(logits(&fresh).allclose(&expected, 1e-6, 1e-6, false));
}

#[test]
fn an_adapter_for_another_base_is_refused_naming_the_tensor() {
    let (_store, mut model) = tiny();
    let adapter = LoraAdapter::attach(&mut model, config(4, 8.0, 0.0, false), 3).expect("attaches");
    let mut tensors: BTreeMap<String, Tensor> = adapter.named_tensors();
    let wrong = peft_name("model.layers.2.self_attn.v_proj", "lora_A");
    tensors.insert(
        wrong.clone(),
        Tensor::zeros([4, 96], (Kind::Float, Device::Cpu)),
    );
    let (_store2, mut fresh) = tiny();
    let error = LoraAdapter::attach_from(&mut fresh, adapter.config().clone(), &tensors)
        .expect_err("a [4, 96] A cannot wrap a 128-wide input");
    assert!(
        matches!(&error, LoraError::BaseMismatch { tensor, .. } if *tensor == wrong),
        "{error}"
    );

    let mut tensors = adapter.named_tensors();
    let extra = peft_name("model.layers.9.self_attn.q_proj", "lora_A");
    tensors.insert(
        extra.clone(),
        Tensor::zeros([4, 128], (Kind::Float, Device::Cpu)),
    );
    let (_store3, mut fresh) = tiny();
    let error = LoraAdapter::attach_from(&mut fresh, adapter.config().clone(), &tensors)
        .expect_err("tiny has 4 layers, not 10");
    assert!(error.to_string().contains(&extra), "{error}");
}

#[test]
fn lora_on_attention_trains_under_one_percent_of_gpt2_preset() {
    // r = 8 on q, k, v, o: per layer 8·(in + out) for each projection, over the whole
    // parameter count of the preset (which the config computes the same way transformers does).
    let config = ModelConfig::preset("gpt2").expect("gpt2 preset");
    let (hidden, kv) = (config.hidden_size, config.kv_heads() * config.head_dim());
    let q_out = config.num_attention_heads * config.head_dim();
    let per_layer = 8 * ((hidden + q_out) + 2 * (hidden + kv) + (q_out + hidden));
    let trainable = per_layer * config.num_hidden_layers;
    let total = config.parameter_count();
    let fraction = trainable as f64 / total as f64;
    println!(
        "gpt2 preset: {trainable} LoRA values over {total} = {:.3}%",
        100.0 * fraction
    );
    assert!(fraction < 0.01);
}
