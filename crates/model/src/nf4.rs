//! 4-bit NormalFloat (NF4) weights, as QLoRA defines them: a 16-value code built from quantiles
//! of the standard normal, blockwise absmax scaling (64 weights a block), the absmax scales
//! themselves quantised to 8 bits in blocks of 256 ("double quantisation"), and a frozen
//! projection that dequantises on the fly in its forward pass.
//!
//! Storage per weight: 4 bits of code, 8/64 bits of quantised absmax, and 32/(64·256) bits of
//! the second-level scale, about 4.127 bits in all.

use tch::{Device, Kind, Tensor};

use tch::nn;

use crate::llama::{Dense, Llama, Projection};

/// Weights per first-level block (one absmax each).
pub const BLOCK_SIZE: usize = 64;
/// Absmax scales per second-level block (one f32 scale each).
pub const SCALE_BLOCK_SIZE: usize = 256;

/// The standard normal cumulative distribution, `Φ(x) = ½(1 + erf(x/√2))`.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// `erf` by its Maclaurin series, accurate to f64 rounding for |x| ≤ 3 (the series' terms
/// shrink past n ≈ x², and the quantiles NF4 needs stay below 1.9).
fn erf(x: f64) -> f64 {
    let mut term = x;
    let mut sum = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        let contribution = term / (2 * n + 1) as f64;
        sum += contribution;
        if contribution.abs() < 1e-17 * sum.abs() {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// `Φ⁻¹(p)` by bisection on [`normal_cdf`]; 200 halvings reach f64 resolution.
fn normal_quantile(p: f64) -> f64 {
    let (mut low, mut high) = (-8.0_f64, 8.0_f64);
    for _ in 0..200 {
        let middle = 0.5 * (low + high);
        if normal_cdf(middle) < p {
            low = middle;
        } else {
            high = middle;
        }
    }
    0.5 * (low + high)
}

/// Derives the NF4 code as the QLoRA paper does: 8 positive quantiles of N(0, 1) at
/// probabilities evenly spaced from `offset` down to ½, 7 negative ones from `offset` down to
/// ½, an exact zero, all divided by the largest. `offset = 1 − ½(1/30 + 1/32)` sits halfway
/// between the outermost quantiles of a 15- and a 16-level symmetric code, so ±1 are finite.
pub fn derive_code() -> [f32; 16] {
    let offset = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0);
    let spaced = |count: usize, index: usize| offset + (0.5 - offset) * index as f64 / count as f64;
    let mut values: Vec<f64> = Vec::with_capacity(16);
    values.extend((0..8).map(|index| normal_quantile(spaced(8, index))));
    values.push(0.0);
    values.extend((0..7).map(|index| -normal_quantile(spaced(7, index))));
    let largest = values.iter().fold(0.0_f64, |acc, v| acc.max(v.abs()));
    values.sort_by(f64::total_cmp);
    let mut code = [0.0_f32; 16];
    for (slot, value) in code.iter_mut().zip(values) {
        *slot = (value / largest) as f32;
    }
    code
}

/// The NF4 code, ascending; index `i` is the 4-bit value `i`.
pub fn code() -> &'static [f32; 16] {
    static CODE: std::sync::OnceLock<[f32; 16]> = std::sync::OnceLock::new();
    CODE.get_or_init(derive_code)
}

/// The index of the code value nearest to `normalised` (in [-1, 1]).
fn nearest_code(normalised: f32) -> u8 {
    let code = code();
    // The code is sorted, so the nearest value is at the first midpoint above `normalised`.
    let mut index = 0u8;
    for pair in code.windows(2) {
        if normalised > 0.5 * (pair[0] + pair[1]) {
            index += 1;
        } else {
            break;
        }
    }
    index
}

/// First-level blockwise quantisation: one 4-bit index per value and one f32 absmax per block.
/// The tail is padded with zeros to a whole block, so a tensor smaller than a block works.
pub fn quantize_blocks(values: &[f32], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let block_size = block_size.max(1);
    let blocks = values.len().div_ceil(block_size).max(1);
    let mut indices = Vec::with_capacity(blocks * block_size);
    let mut absmax = Vec::with_capacity(blocks);
    for block in 0..blocks {
        let start = block * block_size;
        let end = (start + block_size).min(values.len());
        let chunk = &values[start.min(end)..end];
        let largest = chunk.iter().fold(0.0_f32, |acc, v| acc.max(v.abs()));
        let scale = if largest > 0.0 { largest } else { 1.0 };
        indices.extend(chunk.iter().map(|value| nearest_code(value / scale)));
        // Zero padding maps to the code's exact zero.
        indices.extend(std::iter::repeat_n(7u8, block_size - chunk.len()));
        absmax.push(largest);
    }
    (indices, absmax)
}

/// Reverses [`quantize_blocks`] for the first `len` values.
pub fn dequantize_blocks(
    indices: &[u8],
    absmax: &[f32],
    block_size: usize,
    len: usize,
) -> Vec<f32> {
    let code = code();
    indices
        .iter()
        .take(len)
        .enumerate()
        .map(|(position, &index)| code[usize::from(index)] * absmax[position / block_size])
        .collect()
}

/// Absmax scales quantised to 8 bits: the mean is taken out, then each block of 256 is
/// scaled by its own largest magnitude to signed bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedScales {
    /// One byte per first-level block.
    pub values: Vec<i8>,
    /// One f32 per block of [`SCALE_BLOCK_SIZE`] bytes.
    pub scales: Vec<f32>,
    /// The mean subtracted before quantising (absmax values are all positive, so centring them
    /// doubles the resolution).
    pub mean: f32,
}

impl QuantizedScales {
    /// Double-quantises `absmax`.
    pub fn quantize(absmax: &[f32]) -> Self {
        let mean = absmax.iter().sum::<f32>() / absmax.len().max(1) as f32;
        let mut values = Vec::with_capacity(absmax.len());
        let mut scales = Vec::with_capacity(absmax.len().div_ceil(SCALE_BLOCK_SIZE));
        for chunk in absmax.chunks(SCALE_BLOCK_SIZE) {
            let largest = chunk
                .iter()
                .fold(0.0_f32, |acc, v| acc.max((v - mean).abs()));
            let scale = if largest > 0.0 { largest / 127.0 } else { 1.0 };
            values.extend(
                chunk
                    .iter()
                    .map(|v| ((v - mean) / scale).round().clamp(-127.0, 127.0) as i8),
            );
            scales.push(scale);
        }
        Self {
            values,
            scales,
            mean,
        }
    }

    /// The absmax values back, to within half a step of their block.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                f32::from(value) * self.scales[index / SCALE_BLOCK_SIZE] + self.mean
            })
            .collect()
    }
}

/// A weight matrix in NF4 with double-quantised scales.
#[derive(Debug)]
pub struct Nf4Weight {
    /// Two 4-bit indices a byte, high nibble first.
    packed: Tensor,
    /// Signed bytes, one per block.
    scale_values: Tensor,
    /// f32, one per block of 256 scales.
    scale_scales: Tensor,
    scale_mean: f64,
    /// The 16 code values, f32, on the weight's device.
    code: Tensor,
    shape: Vec<i64>,
    numel: i64,
    block_size: i64,
}

impl Nf4Weight {
    /// Quantises `weight` (any shape, any float kind) with blocks of `block_size`.
    pub fn quantize(weight: &Tensor, block_size: usize) -> Self {
        let device = weight.device();
        let flat: Vec<f32> = Vec::try_from(
            weight
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .reshape([-1]),
        )
        .unwrap_or_default();
        let (indices, absmax) = quantize_blocks(&flat, block_size);
        let scales = QuantizedScales::quantize(&absmax);
        let packed: Vec<u8> = indices
            .chunks(2)
            .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(7))
            .collect();
        Self {
            packed: Tensor::from_slice(&packed).to_device(device),
            scale_values: Tensor::from_slice(&scales.values).to_device(device),
            scale_scales: Tensor::from_slice(&scales.scales).to_device(device),
            scale_mean: f64::from(scales.mean),
            code: Tensor::from_slice(code()).to_device(device),
            shape: weight.size(),
            numel: flat.len() as i64,
            block_size: block_size as i64,
        }
    }

    /// Bytes held: packed codes, 8-bit scales, f32 second-level scales and the f32 mean.
    pub fn storage_bytes(&self) -> usize {
        self.packed.numel() + self.scale_values.numel() + 4 * self.scale_scales.numel() + 4
    }

    /// Number of weights represented.
    pub fn numel(&self) -> i64 {
        self.numel
    }

    /// The shape of the original weight.
    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    /// Where the quantised weight lives.
    pub fn device(&self) -> Device {
        self.packed.device()
    }

    /// The weight back in `kind`, computed on the weight's device.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let packed = self.packed.to_kind(Kind::Int64);
        let high = packed.floor_divide_scalar(16);
        let low = packed.remainder(16);
        let indices = Tensor::stack(&[high, low], 1).reshape([-1]);
        let values = self.code.index_select(0, &indices);

        let scale_blocks = SCALE_BLOCK_SIZE as i64;
        let blocks = self.scale_values.size()[0];
        let second = self
            .scale_scales
            .repeat_interleave_self_int(scale_blocks, 0, None)
            .narrow(0, 0, blocks);
        let absmax = self.scale_values.to_kind(Kind::Float) * second + self.scale_mean;
        let weights = values.view([blocks, self.block_size]) * absmax.unsqueeze(1);
        weights
            .reshape([-1])
            .narrow(0, 0, self.numel)
            .view(self.shape.as_slice())
            .to_kind(kind)
    }
}

/// A frozen projection whose weight is stored in NF4 and dequantised in every forward pass.
/// Compute is in f32 on the CPU and bf16 on a GPU, with the result in the input's kind.
#[derive(Debug)]
pub struct Nf4Projection {
    /// The quantised `[out, in]` weight.
    pub weight: Nf4Weight,
}

impl Nf4Projection {
    /// Quantises a dense `[out, in]` weight with the standard block size.
    pub fn new(weight: &Tensor) -> Self {
        Self {
            weight: Nf4Weight::quantize(weight, BLOCK_SIZE),
        }
    }
}

impl Projection for Nf4Projection {
    // TODO: the bf16 GPU branch has never run here (no GPU on the development machines).
    // Autograd keeps the dequantised weight until backward (to form the input's gradient).
    // bitsandbytes dequantises a second time in backward instead, which tch cannot express
    // (no custom autograd functions); gradient checkpointing (`Llama::backward_checkpointed`,
    // on by default for QLoRA) bounds what is kept to one block's weights instead.
    fn forward(&self, x: &Tensor) -> Tensor {
        let compute = if x.device().is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let weight = self.weight.dequantize(compute);
        x.to_kind(compute).matmul(&weight.tr()).to_kind(x.kind())
    }
}

/// Replaces every dense projection of `model` whose name `select` accepts by an NF4 one and
/// drops its f32 weight from `var_store`, so the memory is actually returned. Returns how many
/// projections were quantised. The store can no longer be saved as a whole model afterwards.
pub fn quantize_projections(
    model: &mut Llama,
    var_store: &nn::VarStore,
    select: impl Fn(&str) -> bool,
) -> usize {
    let mut quantised = Vec::new();
    model.map_projections(|name, projection| {
        if !select(name) {
            return projection;
        }
        let any = projection.as_ref() as &dyn std::any::Any;
        let Some(dense) = any.downcast_ref::<Dense>() else {
            return projection;
        };
        quantised.push(format!("{name}.weight"));
        // The dense layer is dropped on return; the store's handle goes below.
        Box::new(Nf4Projection::new(&dense.weight))
    });
    if let Ok(mut variables) = var_store.variables_.lock() {
        let mut dropped = Vec::new();
        for name in &quantised {
            if let Some(tensor) = variables.named_variables.remove(name) {
                dropped.push(tensor.data_ptr());
            }
        }
        variables
            .trainable_variables
            .retain(|var| !dropped.contains(&var.tensor.data_ptr()));
    }
    quantised.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_code_picks_exact_values_and_zero() {
        for (index, &value) in code().iter().enumerate() {
            assert_eq!(usize::from(nearest_code(value)), index);
        }
        assert_eq!(code()[7], 0.0);
    }

    #[test]
    fn erf_matches_known_values() {
        // erf(1) = 0.8427007929497149 (Abramowitz and Stegun, table 7.1).
        assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
        // Φ⁻¹(0.975) = 1.959963984540054, the familiar two-sided 95% point.
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
    }
}
