//! Weights for tests: the smallest Llama that has every kind of tensor, and its tensors as
//! safetensors. Shared by the crate's unit tests and its integration tests.

use std::collections::BTreeMap;

use ferrite_model::config::ModelConfig;

/// The smallest Llama config with every kind of tensor: one layer, two query heads sharing
/// one key/value head, an untied head. Its weights are a few kilobytes.
pub fn mini_config() -> ModelConfig {
    let mut config = ModelConfig::preset("tiny")
        .expect("tiny is a preset")
        .with_vocab_size(16);
    (config.hidden_size, config.intermediate_size) = (8, 16);
    (config.num_hidden_layers, config.num_attention_heads) = (1, 2);
    (config.num_key_value_heads, config.head_dim) = (Some(1), Some(4));
    config.tie_word_embeddings = false;
    config
}

/// The bytes of a safetensors file of f32 zeros in `shapes`, from the loader's own writer.
pub fn zeros_safetensors(shapes: &BTreeMap<String, Vec<i64>>) -> Vec<u8> {
    let tensors = shapes
        .iter()
        .map(|(name, shape)| {
            (
                name.clone(),
                tch::Tensor::zeros(shape, tch::kind::FLOAT_CPU),
            )
        })
        .collect();
    let dir = tempfile::tempdir().expect("a scratch folder");
    let path = dir.path().join("w.safetensors");
    ferrite_model::safetensors::save(&path, &tensors, &BTreeMap::new()).expect("writes");
    std::fs::read(&path).expect("reads back")
}
