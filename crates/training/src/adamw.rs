//! AdamW (Loshchilov and Hutter, "Decoupled Weight Decay Regularization") written over
//! tensors, so its moments and step count can be saved to safetensors and restored exactly.
//!
//! One step, for each parameter θ with gradient g, at learning rate η:
//!
//! ```text
//! θ ← θ − η λ θ                       (decoupled weight decay, matrices only)
//! m ← β1 m + (1 − β1) g
//! v ← β2 v + (1 − β2) g²
//! θ ← θ − η · (m / (1 − β1ᵗ)) / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! the same order of operations as PyTorch's `torch.optim.AdamW`.

use std::collections::BTreeMap;
use std::path::Path;

use ferrite_model::safetensors::{self, SafetensorsError};
use tch::{Kind, Tensor};

/// Why optimizer state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum AdamWError {
    /// The state file could not be written or read.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The file does not match the parameters being optimised.
    #[error("optimizer state {path} does not match the model: {problem}")]
    Mismatch {
        /// The state file.
        path: String,
        /// What differs.
        problem: String,
    },
    /// libtorch refused an operation.
    #[error("optimizer tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the denominator for numerical safety.
    pub eps: f64,
    /// Decoupled weight decay λ, applied to parameters of two or more dimensions.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // The values GPT-style pretraining commonly uses.
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    parameter: Tensor,
    first_moment: Tensor,
    second_moment: Tensor,
    decays: bool,
}

/// AdamW over named parameters (a model's variable store, typically).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// Optimises `parameters`, given by name; names order the state file.
    pub fn new(parameters: BTreeMap<String, Tensor>, config: AdamWConfig) -> Self {
        let slots = parameters
            .into_iter()
            .filter(|(_, parameter)| parameter.requires_grad())
            .map(|(name, parameter)| Slot {
                first_moment: parameter.zeros_like().to_kind(Kind::Float),
                second_moment: parameter.zeros_like().to_kind(Kind::Float),
                // Norm gains (and biases) are vectors; decaying them toward zero only hurts.
                decays: parameter.dim() >= 2,
                name,
                parameter,
            })
            .collect();
        Self {
            config,
            slots,
            step: 0,
        }
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            let mut gradient = slot.parameter.grad();
            if gradient.defined() {
                let _ = gradient.zero_();
            }
        }
    }

    /// The L2 norm of all gradients together.
    pub fn gradient_norm(&self) -> f64 {
        let squares: Vec<Tensor> = self
            .slots
            .iter()
            .map(|slot| slot.parameter.grad())
            .filter(Tensor::defined)
            .map(|gradient| gradient.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        Tensor::stack(&squares, 0)
            .sum(Kind::Float)
            .sqrt()
            .double_value(&[])
    }

    /// Scales gradients so their joint norm is at most `max_norm`; returns the norm before.
    pub fn clip_gradient_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.gradient_norm();
        // PyTorch's clip_grad_norm_ adds 1e-6 so a zero norm cannot divide by zero.
        let scale = max_norm / (norm + 1e-6);
        if scale < 1.0 {
            for slot in &mut self.slots {
                let mut gradient = slot.parameter.grad();
                if gradient.defined() {
                    let _ = gradient.g_mul_scalar_(scale);
                }
            }
        }
        norm
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let gradient = slot.parameter.grad();
                if !gradient.defined() {
                    continue;
                }
                let gradient = gradient.to_kind(Kind::Float);
                if slot.decays && weight_decay != 0.0 {
                    let _ = slot.parameter.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = slot.first_moment.g_mul_scalar_(beta1);
                let _ = slot.first_moment.g_add_(&(&gradient * (1.0 - beta1)));
                let _ = slot.second_moment.g_mul_scalar_(beta2);
                let _ = slot
                    .second_moment
                    .g_add_(&(gradient.square() * (1.0 - beta2)));
                let denominator = slot.second_moment.sqrt() / bias_correction2.sqrt() + eps;
                let update = (&slot.first_moment / &denominator) * (lr / bias_correction1);
                let _ = slot
                    .parameter
                    .g_sub_(&update.to_kind(slot.parameter.kind()));
            }
        });
    }

    /// Writes the moments (as `m.<name>` and `v.<name>`) and the step count to `path`.
    pub fn save(&self, path: &Path) -> Result<(), AdamWError> {
        let mut tensors = BTreeMap::new();
        for slot in &self.slots {
            tensors.insert(
                format!("m.{}", slot.name),
                slot.first_moment.shallow_clone(),
            );
            tensors.insert(
                format!("v.{}", slot.name),
                slot.second_moment.shallow_clone(),
            );
        }
        let metadata = BTreeMap::from([
            ("step".to_string(), self.step.to_string()),
            ("optimizer".to_string(), "adamw".to_string()),
        ]);
        safetensors::save(path, &tensors, &metadata)?;
        Ok(())
    }

    /// Restores moments and step count written by [`AdamW::save`] for the same parameters.
    pub fn load(&mut self, path: &Path) -> Result<(), AdamWError> {
        let shown = path.display().to_string();
        let mismatch = |problem: String| AdamWError::Mismatch {
            path: shown.clone(),
            problem,
        };
        let loaded = safetensors::load(path)?;
        let step = loaded
            .metadata
            .get("step")
            .and_then(|step| step.parse().ok())
            .ok_or_else(|| mismatch("no step count in the metadata".to_string()))?;
        if loaded.tensors.len() != 2 * self.slots.len() {
            return Err(mismatch(format!(
                "{} tensors for {} parameters",
                loaded.tensors.len(),
                self.slots.len()
            )));
        }
        for slot in &mut self.slots {
            for (prefix, moment) in [
                ("m", &mut slot.first_moment),
                ("v", &mut slot.second_moment),
            ] {
                let name = format!("{prefix}.{}", slot.name);
                let saved = loaded
                    .tensors
                    .get(&name)
                    .ok_or_else(|| mismatch(format!("{name} is missing")))?;
                if saved.size() != moment.size() {
                    return Err(mismatch(format!(
                        "{name} has shape {:?}, expected {:?}",
                        saved.size(),
                        moment.size()
                    )));
                }
                *moment = saved.to_device(moment.device()).to_kind(Kind::Float);
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_steps_match_a_hand_computed_update() {
        // One scalar weight θ = 1 with loss θ², so g = 2θ; lr 0.1, β = (0.9, 0.999),
        // ε = 1e-8, λ = 0 (a scalar would not decay anyway).
        // Step 1: g = 2, m = 0.2, v = 0.004, m̂ = 2, v̂ = 4, θ = 1 − 0.1 · 2 / 2 = 0.9.
        // Step 2: g = 1.8, m = 0.36, v = 0.007236, m̂ = 0.36 / 0.19 = 1.894737,
        //         v̂ = 0.007236 / 0.001999 = 3.619810, θ = 0.9 − 0.1 · 1.894737 / 1.902580 = 0.800412.
        let weight = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut optimizer = AdamW::new(
            BTreeMap::from([("w".to_string(), weight.shallow_clone())]),
            config,
        );
        let mut values = Vec::new();
        for _ in 0..2 {
            optimizer.zero_grad();
            weight.square().sum(Kind::Float).backward();
            optimizer.step(0.1);
            values.push(weight.double_value(&[0]));
        }
        assert!((values[0] - 0.9).abs() < 1e-6, "{values:?}");
        assert!((values[1] - 0.800_412).abs() < 1e-5, "{values:?}");
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_gradient() {
        // With a zero gradient Adam's update is 0 / (0 + ε) = 0, so only the decay acts:
        // θ = 2 · (1 − lr · λ) = 2 · (1 − 0.5 · 0.1) = 1.9 for a matrix, unchanged for a vector.
        let matrix =
            Tensor::full([1, 1], 2.0, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let vector =
            Tensor::full([1], 2.0, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let parameters = BTreeMap::from([
            ("a".to_string(), matrix.shallow_clone()),
            ("b".to_string(), vector.shallow_clone()),
        ]);
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut optimizer = AdamW::new(parameters, config);
        ((&matrix + &vector) * 0.0).sum(Kind::Float).backward();
        optimizer.step(0.5);
        assert!((matrix.double_value(&[0, 0]) - 1.9).abs() < 1e-6);
        assert!((vector.double_value(&[0]) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_gradients_to_the_maximum_norm() {
        // Gradient (3, 4) has norm 5; clipped to 1 it becomes (0.6, 0.8).
        let weight = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        let mut optimizer = AdamW::new(
            BTreeMap::from([("w".to_string(), weight.shallow_clone())]),
            AdamWConfig::default(),
        );
        (&weight * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        let norm = optimizer.clip_gradient_norm(1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = Vec::<f32>::try_from(&weight.grad()).expect("two floats");
        assert!(
            (clipped[0] - 0.6).abs() < 1e-5 && (clipped[1] - 0.8).abs() < 1e-5,
            "{clipped:?}"
        );
    }
}
