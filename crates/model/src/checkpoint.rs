//! Hugging Face model folders: `config.json`, `model.safetensors`, `generation_config.json`
//! and the tokenizer's files, readable by `transformers` as `LlamaForCausalLM` and back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Tensor, nn};

use crate::config::{ConfigError, ModelConfig};
use crate::llama::{Llama, Projection};
use crate::nf4::Nf4Projection;
use crate::safetensors::{self, SafetensorsError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Why a checkpoint folder could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be created or read.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `config.json` is missing, malformed or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `model.safetensors` is missing, corrupt or truncated.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The tokenizer files could not be read or written.
    #[error("tokenizer in {path}: {source}")]
    Tokenizer {
        /// The folder involved.
        path: PathBuf,
        /// The tokenizer's error.
        source: TokenizerError,
    },
    /// The weights lack a tensor the config calls for.
    #[error("{path} has no tensor {name}, which the config requires")]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with the config.
    #[error("{path}: tensor {name} has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch {
        /// The weights file.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<i64>,
        /// The shape in the file.
        found: Vec<i64>,
    },
    /// The weights hold a tensor the model does not have.
    #[error("{path} has tensor {name}, which a Llama model with this config does not have")]
    UnexpectedTensor {
        /// The weights file.
        path: PathBuf,
        /// The unexpected name.
        name: String,
    },
    /// The tokenizer has ids the embedding has no row for.
    #[error(
        "{path}: the tokenizer has {tokenizer} ids but the embedding has only {embedding} rows"
    )]
    VocabularyMismatch {
        /// The folder involved.
        path: PathBuf,
        /// Tokenizer vocabulary size.
        tokenizer: i64,
        /// Embedding rows (`vocab_size`).
        embedding: i64,
    },
    /// libtorch refused to copy a tensor.
    #[error("copying tensor {name}: {source}")]
    Torch {
        /// The tensor's name.
        name: String,
        /// The libtorch error.
        source: tch::TchError,
    },
}

/// A model with its parameters, config and (when the folder has one) tokenizer.
#[derive(Debug)]
pub struct Checkpoint {
    /// Owns the parameters, under Hugging Face names.
    pub var_store: nn::VarStore,
    /// The model built over `var_store`.
    pub model: Llama,
    /// The model's config.
    pub config: ModelConfig,
    /// The tokenizer, when `tokenizer.json` is present.
    pub tokenizer: Option<Tokenizer>,
}

/// File names inside a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// Weights file name.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights: which shard file holds each tensor.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Generation defaults file name.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Every parameter in `var_store` by name, for saving.
pub fn named_tensors(var_store: &nn::VarStore) -> BTreeMap<String, Tensor> {
    var_store
        .variables()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.detach()))
        .collect()
}

/// The parameters that train (all of a plain model; adapters freeze their base), by name.
pub fn named_tensors_trainable(var_store: &nn::VarStore) -> BTreeMap<String, Tensor> {
    var_store
        .variables()
        .into_iter()
        .filter(|(_, tensor)| tensor.requires_grad())
        .collect()
}

/// Writes a folder `transformers` loads with `LlamaForCausalLM.from_pretrained`.
pub fn save(
    dir: &Path,
    var_store: &nn::VarStore,
    config: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    config.save(&dir.join(CONFIG_FILE))?;

    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::save(
        &dir.join(WEIGHTS_FILE),
        &named_tensors(var_store),
        &metadata,
    )?;

    let generation = serde_json::json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    });
    let path = dir.join(GENERATION_CONFIG_FILE);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&generation).unwrap_or_default(),
    )
    .map_err(|source| CheckpointError::Io { path, source })?;

    if let Some(tokenizer) = tokenizer {
        tokenizer
            .save(dir)
            .map_err(|source| CheckpointError::Tokenizer {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// Copies `tensors` (HF names) into the parameters of `var_store`, checking that every
/// parameter is present with the right shape and that nothing unknown is left over.
/// `source` names the origin in errors.
pub fn load_weights(
    var_store: &nn::VarStore,
    tensors: &BTreeMap<String, Tensor>,
    source: &Path,
    tied_embeddings: bool,
) -> Result<(), CheckpointError> {
    let variables = var_store.variables();
    for (name, variable) in &variables {
        let tensor = tensors.get(name).ok_or_else(|| missing(source, name))?;
        copy_into(variable, tensor, name, source)?;
    }
    check_leftovers(tensors.keys(), &variables, tied_embeddings, source)
}

/// As [`load_weights`], reading each tensor from `reader` only when it is copied, so the
/// files' contents are never in memory all at once. [`check_tensors`] has passed.
fn load_weights_from(
    var_store: &nn::VarStore,
    reader: &safetensors::Weights,
    source: &Path,
) -> Result<(), CheckpointError> {
    for (name, variable) in &var_store.variables() {
        copy_into(variable, &reader.read(name)?, name, source)?;
    }
    Ok(())
}

/// Checks from the headers alone, reading no tensor, that `weights` hold every tensor a
/// Llama model with `config` requires, each with the shape the config implies, and nothing
/// the model has no place for. The loader checks this before it reads anything, and the
/// model registry when a version is registered, so a folder one refuses the other does too.
pub fn check_tensors(
    config: &ModelConfig,
    weights: &safetensors::Weights,
) -> Result<(), CheckpointError> {
    let expected = Llama::parameter_shapes(config);
    for (name, shape) in &expected {
        let found = weights
            .shape(name)
            .ok_or_else(|| missing(weights.path(), name))?;
        if found != shape.as_slice() {
            let file = weights.file(name).unwrap_or(weights.path());
            return Err(shape_mismatch(file, name, shape.clone(), found.to_vec()));
        }
    }
    for name in weights.names() {
        if !expected.contains_key(name) && !derived(name, config.tie_word_embeddings) {
            return Err(CheckpointError::UnexpectedTensor {
                path: weights.file(name).unwrap_or(weights.path()).to_path_buf(),
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// Some exporters write the tied head anyway, and old Llama files carry the rotary
/// frequencies as a buffer; both are derived, not parameters, and are ignored.
fn derived(name: &str, tied_embeddings: bool) -> bool {
    (tied_embeddings && name == "lm_head.weight") || name.ends_with("rotary_emb.inv_freq")
}

fn missing(source: &Path, name: &str) -> CheckpointError {
    CheckpointError::MissingTensor {
        path: source.to_path_buf(),
        name: name.to_owned(),
    }
}

fn shape_mismatch(
    source: &Path,
    name: &str,
    expected: Vec<i64>,
    found: Vec<i64>,
) -> CheckpointError {
    CheckpointError::ShapeMismatch {
        path: source.to_path_buf(),
        name: name.to_owned(),
        expected,
        found,
    }
}

/// Copies `tensor` into the parameter `variable`, converting device and dtype.
fn copy_into(
    variable: &Tensor,
    tensor: &Tensor,
    name: &str,
    source: &Path,
) -> Result<(), CheckpointError> {
    if tensor.size() != variable.size() {
        return Err(shape_mismatch(source, name, variable.size(), tensor.size()));
    }
    let torch_error = |source| CheckpointError::Torch {
        name: name.to_owned(),
        source,
    };
    let converted = tensor
        .f_to_device(variable.device())
        .and_then(|t| t.f_to_kind(variable.kind()))
        .map_err(torch_error)?;
    let mut variable = variable.shallow_clone();
    tch::no_grad(|| variable.f_copy_(&converted)).map_err(torch_error)?;
    Ok(())
}

/// Refuses a file tensor the model has no parameter for.
fn check_leftovers<'a>(
    names: impl Iterator<Item = impl AsRef<str> + 'a>,
    variables: &std::collections::HashMap<String, Tensor>,
    tied_embeddings: bool,
    source: &Path,
) -> Result<(), CheckpointError> {
    for name in names {
        let name = name.as_ref();
        if !variables.contains_key(name) && !derived(name, tied_embeddings) {
            return Err(CheckpointError::UnexpectedTensor {
                path: source.to_path_buf(),
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// Builds a model on `device` from `config` and named tensors.
pub fn from_tensors(
    config: ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    source: &Path,
    device: Device,
) -> Result<(nn::VarStore, Llama), CheckpointError> {
    config.validate()?;
    let var_store = nn::VarStore::new(device);
    let model = Llama::new(&var_store.root(), &config);
    load_weights(&var_store, tensors, source, config.tie_word_embeddings)?;
    Ok((var_store, model))
}

/// Reads a Hugging Face Llama folder onto `device`, weights in f32, one tensor at a time,
/// from `model.safetensors` or the shards `model.safetensors.index.json` lists.
pub fn load(dir: &Path, device: Device) -> Result<Checkpoint, CheckpointError> {
    load_quantized(dir, device, |_| false)
}

/// Reads a Hugging Face Llama folder onto `device` with every projection `quantize` accepts
/// (by module name, e.g. `model.layers.0.mlp.up_proj`) stored in NF4 as it is read, the way
/// bitsandbytes' `load_in_4bit` loads a QLoRA base: the f32 copy of a quantised weight exists
/// only while it is being quantised. The other parameters load in f32 into the store; the
/// quantised ones are not in it, so the store alone no longer saves as a whole model.
pub fn load_quantized(
    dir: &Path,
    device: Device,
    quantize: impl Fn(&str) -> bool,
) -> Result<Checkpoint, CheckpointError> {
    let config = ModelConfig::load(&dir.join(CONFIG_FILE))?;
    config.validate()?;
    let reader = safetensors::Weights::open(dir, WEIGHTS_FILE, WEIGHTS_INDEX_FILE)?;
    check_tensors(&config, &reader)?;
    let weights_path = reader.path().to_path_buf();
    let var_store = nn::VarStore::new(device);
    let mut failure = None;
    let model = Llama::build(&var_store.root(), &config, |name, _, _, _| {
        if !quantize(name) || failure.is_some() {
            return None;
        }
        match reader.read(&format!("{name}.weight")) {
            Ok(weight) => {
                let weight = weight.to_device(device).to_kind(tch::Kind::Float);
                Some(Box::new(Nf4Projection::new(&weight)) as Box<dyn Projection>)
            }
            Err(error) => {
                failure = Some(error);
                None
            }
        }
    });
    if let Some(error) = failure {
        return Err(error.into());
    }
    load_weights_from(&var_store, &reader, &weights_path)?;
    let tokenizer = tokenizer_of(dir, &config)?;
    Ok(Checkpoint {
        var_store,
        model,
        config,
        tokenizer,
    })
}

/// The folder's tokenizer, when it has one, checked against the embedding's size.
fn tokenizer_of(dir: &Path, config: &ModelConfig) -> Result<Option<Tokenizer>, CheckpointError> {
    if !dir.join("tokenizer.json").exists() {
        return Ok(None);
    }
    let tokenizer = Tokenizer::load(dir).map_err(|source| CheckpointError::Tokenizer {
        path: dir.to_path_buf(),
        source,
    })?;
    let size = tokenizer.vocab_size() as i64;
    // An embedding padded past the tokenizer (to a multiple of 64, say) is common and
    // harmless; a tokenizer with ids the embedding cannot look up is not.
    if size > config.vocab_size {
        return Err(CheckpointError::VocabularyMismatch {
            path: dir.to_path_buf(),
            tokenizer: size,
            embedding: config.vocab_size,
        });
    }
    Ok(Some(tokenizer))
}

/// Builds a model from a GGUF import (see [`crate::gguf`]).
pub fn from_gguf(
    imported: crate::gguf::ImportedModel,
    device: Device,
) -> Result<Checkpoint, CheckpointError> {
    let config = ModelConfig::from_json_str(&imported.config.to_hf_json().to_string())?;
    let mut tensors = BTreeMap::new();
    for tensor in &imported.tensors {
        let shape: Vec<i64> = tensor.shape.iter().map(|&dim| dim as i64).collect();
        let value = Tensor::from_slice(&tensor.values)
            .f_reshape(&shape)
            .map_err(|source| CheckpointError::Torch {
                name: tensor.name.clone(),
                source,
            })?;
        tensors.insert(tensor.name.clone(), value);
    }
    let (var_store, model) = from_tensors(config.clone(), &tensors, Path::new("<gguf>"), device)?;
    Ok(Checkpoint {
        var_store,
        model,
        config,
        tokenizer: Some(imported.tokenizer),
    })
}
