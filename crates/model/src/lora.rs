//! LoRA adapters (Hu et al.): a frozen projection `W` plus a trainable low-rank update,
//! `y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ`, with `A` `[r, in]` random, `B` `[out, r]` zero (so the
//! adapted model starts exactly at the base), and `s = alpha / r`, or `alpha / √r` with
//! rsLoRA. Layers slot into a [`Llama`] through [`Llama::map_projections`]; tensors carry
//! PEFT's names so the folder [`crate::adapter`] writes is a PEFT adapter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use crate::llama::{Dense, Llama, Projection};
use crate::nf4::Nf4Projection;
use crate::rng::Rng;

/// Which projections get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names matched against the last component (`q_proj`) or the full name.
    Names(Vec<String>),
    /// Every linear layer of the decoder blocks (PEFT's `all-linear`: the output head is left
    /// out, since it is tied or needs a full update to matter).
    AllLinear,
}

impl TargetModules {
    /// Whether the projection called `module` (a full HF module name) is targeted.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Self::AllLinear => module != "lm_head",
            Self::Names(names) => names.iter().any(|name| {
                module == name
                    || module
                        .strip_suffix(name.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            }),
        }
    }
}

/// Hyper-parameters of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: i64,
    /// Numerator of the scale.
    pub alpha: f64,
    /// Dropout on the adapter's input, training only.
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// Scale by `alpha / √r` instead of `alpha / r` (Kalajdzievski, rank-stabilised LoRA).
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor the low-rank product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Why an adapter could not be attached, merged or loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// No projection matched the target modules.
    #[error("no projection matches the target modules {0:?}")]
    NoTargets(TargetModules),
    /// A hyper-parameter is out of range.
    #[error("invalid LoRA config: {0}")]
    Invalid(String),
    /// Merging needs a dense base weight; a quantised one cannot absorb the update.
    #[error("cannot merge into {module}: its base weight is quantised")]
    NotMergeable {
        /// The module involved.
        module: String,
    },
    /// The adapter names a projection the model lacks, or holds a tensor of the wrong shape.
    #[error("adapter tensor {tensor} does not fit the base model: {problem}")]
    BaseMismatch {
        /// The adapter's tensor name.
        tensor: String,
        /// What does not fit.
        problem: String,
    },
}

/// Switches shared by every layer of one adapter.
#[derive(Debug, Default)]
struct Flags {
    training: AtomicBool,
    merged: AtomicBool,
}

/// One adapted projection: the frozen base and `A`, `B`.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn Projection>,
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    flags: Arc<Flags>,
}

impl Projection for LoraLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let base = self.base.forward(x);
        if self.flags.merged.load(Ordering::Relaxed) {
            return base;
        }
        let training = self.flags.training.load(Ordering::Relaxed);
        let input = if training && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let kind = self.a.kind();
        let update = input
            .to_kind(kind)
            .matmul(&self.a.tr())
            .matmul(&self.b.tr())
            * self.scale;
        let kind = base.kind();
        base + update.to_kind(kind)
    }
}

/// The tensors of one adapted module.
#[derive(Debug)]
struct Module {
    a: Tensor,
    b: Tensor,
    /// The base weight's storage when it is dense, so merging can update it in place.
    dense_weight: Option<Tensor>,
}

/// An adapter attached to a model: its trainable tensors by PEFT name, and the switches for
/// training mode and merging.
#[derive(Debug)]
pub struct LoraAdapter {
    config: LoraConfig,
    modules: BTreeMap<String, Module>,
    flags: Arc<Flags>,
}

/// The PEFT tensor name of `A` or `B` for a module.
pub fn peft_name(module: &str, matrix: &str) -> String {
    format!("base_model.model.{module}.{matrix}.weight")
}

/// The `[out, in]` shape, device and (when dense) weight storage of a projection an adapter
/// can wrap; `None` for anything else (another adapter, say).
fn describe(projection: &dyn Projection) -> Option<(i64, i64, Device, Option<Tensor>)> {
    let any = projection as &dyn std::any::Any;
    if let Some(dense) = any.downcast_ref::<Dense>() {
        let size = dense.weight.size();
        let weight = dense.weight.shallow_clone();
        return Some((size[0], size[1], weight.device(), Some(weight)));
    }
    any.downcast_ref::<Nf4Projection>().map(|nf4| {
        let shape = nf4.weight.shape();
        (shape[0], shape[1], nf4.weight.device(), None)
    })
}

/// Makes `A` and `B` for one module from its name and `[out, in]` shape.
type Initialiser<'a> = dyn FnMut(&str, i64, i64) -> Result<(Tensor, Tensor), LoraError> + 'a;

impl LoraAdapter {
    /// Wraps every targeted projection of `model` with a fresh adapter: `A` uniform in
    /// ±1/√in (the bound of PyTorch's default Kaiming-uniform init for a linear layer, which
    /// PEFT keeps) drawn from `seed`, `B` zero. Freezing the base is the caller's job.
    pub fn attach(model: &mut Llama, config: LoraConfig, seed: u64) -> Result<Self, LoraError> {
        let mut rng = Rng::seed(seed);
        let rank = config.r;
        Self::attach_with(model, config, &mut |_, out_features, in_features| {
            let bound = 1.0 / (in_features as f64).sqrt();
            let values: Vec<f32> = (0..rank * in_features)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a = Tensor::from_slice(&values).view([rank, in_features]);
            Ok((
                a,
                Tensor::zeros([out_features, rank], (Kind::Float, Device::Cpu)),
            ))
        })
    }

    /// Attaches an adapter whose `A` and `B` come from `tensors` (PEFT names), refusing a
    /// tensor that is missing, that names a projection the model lacks or is not targeted,
    /// or whose shape does not fit the base; the error names the tensor.
    pub fn attach_from(
        model: &mut Llama,
        config: LoraConfig,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self, LoraError> {
        let rank = config.r;
        let adapter =
            Self::attach_with(model, config, &mut |module, out_features, in_features| {
                let a = adapter_tensor(tensors, module, "lora_A", &[rank, in_features])?;
                let b = adapter_tensor(tensors, module, "lora_B", &[out_features, rank])?;
                Ok((a, b))
            })?;
        let known = adapter.named_tensors();
        if let Some(unknown) = tensors.keys().find(|name| !known.contains_key(*name)) {
            return Err(LoraError::BaseMismatch {
                tensor: unknown.clone(),
                problem: "names no targeted projection of the base model".into(),
            });
        }
        Ok(adapter)
    }

    fn attach_with(
        model: &mut Llama,
        config: LoraConfig,
        initial: &mut Initialiser<'_>,
    ) -> Result<Self, LoraError> {
        if config.r <= 0 {
            return Err(LoraError::Invalid("r must be positive".into()));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(LoraError::Invalid("dropout must lie in [0, 1)".into()));
        }
        let flags = Arc::new(Flags::default());
        let mut modules = BTreeMap::new();
        let mut failure = None;
        model.map_projections(|name, projection| {
            if failure.is_some() || !config.target_modules.matches(name) {
                return projection;
            }
            let Some((out_features, in_features, device, dense_weight)) =
                describe(projection.as_ref())
            else {
                return projection;
            };
            let (a, b) = match initial(name, out_features, in_features) {
                Ok(pair) => pair,
                Err(error) => {
                    failure = Some(error);
                    return projection;
                }
            };
            let trainable = |t: Tensor| {
                t.to_kind(Kind::Float)
                    .to_device(device)
                    .detach()
                    .set_requires_grad(true)
            };
            let (a, b) = (trainable(a), trainable(b));
            modules.insert(
                name.to_string(),
                Module {
                    a: a.shallow_clone(),
                    b: b.shallow_clone(),
                    dense_weight,
                },
            );
            Box::new(LoraLinear {
                base: projection,
                a,
                b,
                scale: config.scale(),
                dropout: config.dropout,
                flags: Arc::clone(&flags),
            })
        });
        if let Some(error) = failure {
            return Err(error);
        }
        if modules.is_empty() {
            return Err(LoraError::NoTargets(config.target_modules));
        }
        Ok(Self {
            config,
            modules,
            flags,
        })
    }

    /// The adapter's hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The trainable tensors by PEFT name (`base_model.model.<module>.lora_A.weight`); they
    /// share storage with the layers, so an optimizer over them trains the adapter.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut named = BTreeMap::new();
        for (module, parts) in &self.modules {
            named.insert(peft_name(module, "lora_A"), parts.a.shallow_clone());
            named.insert(peft_name(module, "lora_B"), parts.b.shallow_clone());
        }
        named
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> i64 {
        self.modules
            .values()
            .map(|parts| parts.a.numel() as i64 + parts.b.numel() as i64)
            .sum()
    }

    /// The adapted modules' names.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// Training mode enables dropout; evaluation mode is deterministic.
    pub fn set_training(&self, training: bool) {
        self.flags.training.store(training, Ordering::Relaxed);
    }

    /// Whether the update is folded into the base weights.
    pub fn is_merged(&self) -> bool {
        self.flags.merged.load(Ordering::Relaxed)
    }

    /// Adds `s · B A` into each dense base weight, after which the layers skip the low-rank
    /// path; the model then computes the same function at the cost of a plain one.
    pub fn merge(&self) -> Result<(), LoraError> {
        if self.is_merged() {
            return Ok(());
        }
        self.fold(1.0)?;
        self.flags.merged.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Subtracts what [`LoraAdapter::merge`] added, restoring the base (up to rounding).
    pub fn unmerge(&self) -> Result<(), LoraError> {
        if !self.is_merged() {
            return Ok(());
        }
        self.fold(-1.0)?;
        self.flags.merged.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn fold(&self, sign: f64) -> Result<(), LoraError> {
        for (module, parts) in &self.modules {
            if parts.dense_weight.is_none() {
                return Err(LoraError::NotMergeable {
                    module: module.clone(),
                });
            }
        }
        let scale = sign * self.config.scale();
        tch::no_grad(|| {
            for parts in self.modules.values() {
                if let Some(weight) = &parts.dense_weight {
                    let delta = parts.b.matmul(&parts.a) * scale;
                    let mut weight = weight.shallow_clone();
                    let _ = weight.g_add_(&delta.to_kind(weight.kind()));
                }
            }
        });
        Ok(())
    }
}

/// The adapter's `A` or `B` for `module`, checked against the shape the base implies.
fn adapter_tensor(
    tensors: &BTreeMap<String, Tensor>,
    module: &str,
    matrix: &str,
    expected: &[i64],
) -> Result<Tensor, LoraError> {
    let name = peft_name(module, matrix);
    let tensor = tensors.get(&name).ok_or_else(|| LoraError::BaseMismatch {
        tensor: name.clone(),
        problem: "missing from the adapter, though the config targets its module".into(),
    })?;
    if tensor.size() != expected {
        return Err(LoraError::BaseMismatch {
            tensor: name,
            problem: format!(
                "shape {:?}, but the base projection implies {expected:?}",
                tensor.size()
            ),
        });
    }
    Ok(tensor.shallow_clone())
}
