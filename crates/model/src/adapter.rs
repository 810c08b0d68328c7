//! PEFT adapter folders: `adapter_config.json` and `adapter_model.safetensors` under the
//! names Python `peft` writes and reads, so an adapter crosses between the two unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::llama::Llama;
use crate::lora::{LoraAdapter, LoraConfig, LoraError, TargetModules};
use crate::safetensors::{self, SafetensorsError};

/// The adapter's config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Why an adapter folder could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file could not be created or read.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `adapter_config.json` is not a LoRA config Ferrite understands.
    #[error("{path}: {problem}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The offending field and what is wrong with it.
        problem: String,
    },
    /// The weights file is unreadable.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The adapter does not fit the model.
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// What `adapter_config.json` says beyond the LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub config: LoraConfig,
    /// The base model the adapter was trained on (a path, a registry reference or a hub id).
    pub base_model_name_or_path: String,
}

/// Writes `adapter` as a PEFT folder.
pub fn save(dir: &Path, adapter: &LoraAdapter, base_model: &str) -> Result<(), AdapterError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = adapter.config();
    let targets = match &config.target_modules {
        TargetModules::AllLinear => json!("all-linear"),
        TargetModules::Names(names) => json!(names),
    };
    // The fields peft's LoraConfig reads; everything else takes peft's defaults.
    let body = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&body).unwrap_or_default();
    std::fs::write(&path, text).map_err(io(&path))?;

    let tensors = adapter
        .named_tensors()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.detach()))
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::save(&dir.join(WEIGHTS_FILE), &tensors, &metadata)?;
    Ok(())
}

/// Reads `adapter_config.json`.
pub fn read_info(dir: &Path) -> Result<AdapterInfo, AdapterError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| AdapterError::Io {
        path: path.clone(),
        source,
    })?;
    let problem = |problem: String| AdapterError::Config {
        path: path.clone(),
        problem,
    };
    let body: Value = serde_json::from_str(&text).map_err(|error| problem(error.to_string()))?;
    parse_info(&body).map_err(problem)
}

fn parse_info(body: &Value) -> Result<AdapterInfo, String> {
    let peft_type = body["peft_type"].as_str().unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(format!(
            "peft_type is `{peft_type}`; only LORA is supported"
        ));
    }
    let number = |key: &str, default: Option<f64>| match &body[key] {
        Value::Null => default.ok_or_else(|| format!("{key} is missing")),
        value => value
            .as_f64()
            .ok_or_else(|| format!("{key} must be a number, found {value}")),
    };
    let r = number("r", Some(8.0))?;
    if r.fract() != 0.0 || r < 1.0 {
        return Err(format!("r must be a positive integer, found {r}"));
    }
    let target_modules = match &body["target_modules"] {
        Value::String(name) if name == "all-linear" => TargetModules::AllLinear,
        Value::Array(names) => TargetModules::Names(
            names
                .iter()
                .map(|name| {
                    name.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("target_modules holds a non-string {name}"))
                })
                .collect::<Result<_, _>>()?,
        ),
        other => {
            return Err(format!(
                "target_modules must be a list of names or \"all-linear\", found {other}"
            ));
        }
    };
    if body["fan_in_fan_out"].as_bool() == Some(true) {
        return Err("fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported".into());
    }
    if !matches!(body["bias"].as_str(), None | Some("none")) {
        return Err("bias must be \"none\"; trained biases are not supported".into());
    }
    Ok(AdapterInfo {
        config: LoraConfig {
            r: r as i64,
            alpha: number("lora_alpha", Some(8.0))?,
            dropout: number("lora_dropout", Some(0.0))?,
            target_modules,
            use_rslora: body["use_rslora"].as_bool().unwrap_or(false),
        },
        base_model_name_or_path: body["base_model_name_or_path"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// Reads a PEFT folder and attaches it to `model`, refusing tensors that do not fit the base
/// (by name and shape).
pub fn load(dir: &Path, model: &mut Llama) -> Result<(LoraAdapter, AdapterInfo), AdapterError> {
    let info = read_info(dir)?;
    let loaded = safetensors::load(&dir.join(WEIGHTS_FILE))?;
    let adapter = LoraAdapter::attach_from(model, info.config.clone(), &loaded.tensors)?;
    Ok((adapter, info))
}
