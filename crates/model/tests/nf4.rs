//! NF4 quantisation: the code against the QLoRA paper, round-trip error against the bound the
//! construction implies, storage cost, and the frozen projection's forward pass.

use ferrite_model::llama::Projection;
use ferrite_model::nf4::{self, Nf4Projection, Nf4Weight, QuantizedScales};
use ferrite_model::rng::Rng;
use tch::{Kind, Tensor};

/// Appendix E of Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023),
/// lists the NF4 data type as these 16 values.
const PAPER_NF4: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

fn normal_values(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::seed(seed);
    (0..count)
        .map(|_| {
            let u1 = 1.0 - rng.next_f64();
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

#[test]
fn derived_code_equals_the_papers_sixteen_values() {
    // The paper's values were computed in f32 (torch.linspace, then scipy's ppf), so agreement
    // to a few f32 ulps at 1.0 is what an exact derivation can reach.
    for (derived, published) in nf4::derive_code().iter().zip(PAPER_NF4) {
        assert!(
            (f64::from(*derived) - published).abs() < 2e-6,
            "derived {derived}, published {published}"
        );
    }
}

#[test]
fn round_trip_error_stays_within_half_the_widest_code_gap() {
    // Rounding to the nearest code value errs by at most half the gap around it, times the
    // block's absmax; the widest gap is between -1 and the next value.
    let code = nf4::code();
    let half_gap = code
        .windows(2)
        .map(|pair| f64::from(pair[1] - pair[0]) / 2.0)
        .fold(0.0, f64::max);
    let values = normal_values(64 * 100, 1);
    let (indices, absmax) = nf4::quantize_blocks(&values, 64);
    let restored = nf4::dequantize_blocks(&indices, &absmax, 64, values.len());
    for (position, (original, back)) in values.iter().zip(&restored).enumerate() {
        let bound = half_gap * f64::from(absmax[position / 64]) + 1e-6;
        assert!(f64::from((original - back).abs()) <= bound);
    }
    // Every block's absmax is itself exact (code value ±1).
    for (block, &largest) in absmax.iter().enumerate() {
        let chunk = &restored[block * 64..block * 64 + 64];
        let restored_max = chunk.iter().fold(0.0_f32, |acc, v| acc.max(v.abs()));
        assert_eq!(restored_max, largest);
    }
}

fn rms_error(values: &[f32], block_size: usize) -> f64 {
    let weight = Tensor::from_slice(values);
    let restored = Nf4Weight::quantize(&weight, block_size).dequantize(Kind::Float);
    (restored - weight)
        .square()
        .mean(Kind::Double)
        .sqrt()
        .double_value(&[])
}

#[test]
fn round_trip_error_grows_smoothly_with_block_size() {
    // The error scales with each block's absmax, whose expectation for B normal values grows
    // like √(2 ln B): from B = 16 on, about 4-9% per doubling. So each doubling must cost
    // more, but never a jump (20% bounds it with room for sampling noise).
    let values = normal_values(1 << 16, 2);
    let sizes = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
    let errors: Vec<f64> = sizes.iter().map(|&size| rms_error(&values, size)).collect();
    println!(
        "rms error by block size: {:?}",
        sizes.iter().zip(&errors).collect::<Vec<_>>()
    );
    for pair in errors.windows(2) {
        let ratio = pair[1] / pair[0];
        assert!((1.0..1.2).contains(&ratio), "ratio {ratio} in {errors:?}");
    }
    // With blocks of 64, the QLoRA setting, the RMS error on N(0, 1) is near 0.1 of one
    // standard deviation (half a mean gap of ~0.13 times an absmax of ~2.4, over √3 for a
    // uniform rounding error): it must be well under 0.15.
    assert!(errors[2] < 0.15, "{}", errors[2]);
}

#[test]
fn double_quantised_scales_err_by_at_most_half_a_step() {
    let absmax: Vec<f32> = normal_values(1000, 3)
        .iter()
        .map(|v| 2.0 + v.abs())
        .collect();
    let quantised = QuantizedScales::quantize(&absmax);
    let restored = quantised.dequantize();
    for (index, (original, back)) in absmax.iter().zip(&restored).enumerate() {
        let step = quantised.scales[index / nf4::SCALE_BLOCK_SIZE];
        assert!((original - back).abs() <= step / 2.0 + 1e-6);
    }
    assert_eq!(quantised.scales.len(), 4, "1000 scales in blocks of 256");
}

#[test]
fn a_quantised_base_stores_about_4_127_bits_per_parameter() {
    // 4 bits of code + 8 bits of absmax per 64 weights + 32 bits of f32 scale per 64·256
    // weights = 4 + 0.125 + 0.00195 = 4.127 bits; the one f32 mean per tensor adds 32 bits
    // over the whole 512x512 matrix.
    let weight = Tensor::randn([512, 512], (Kind::Float, tch::Device::Cpu));
    let quantised = Nf4Weight::quantize(&weight, nf4::BLOCK_SIZE);
    let n = 512.0 * 512.0;
    let expected = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0) + 32.0 / n;
    let bits = quantised.storage_bytes() as f64 * 8.0 / n;
    assert!((bits - expected).abs() < 1e-12, "{bits} vs {expected}");
    assert!((bits - 4.127).abs() < 1e-3, "{bits}");
}

#[test]
fn a_tensor_smaller_than_a_block_is_padded_not_refused() {
    let weight = Tensor::from_slice(&[0.5_f32, -1.0, 0.25, 0.0, 0.75, -0.1]).view([2, 3]);
    let quantised = Nf4Weight::quantize(&weight, nf4::BLOCK_SIZE);
    let restored = quantised.dequantize(Kind::Float);
    assert_eq!(restored.size(), vec![2, 3]);
    // Absmax 1.0: -1.0 and 0.0 are code values; the rest are within half a gap (0.152).
    let error = (restored - &weight).abs().max().double_value(&[]);
    assert!(error < 0.16, "{error}");
}

#[test]
fn nf4_projection_computes_with_the_dequantised_weight() {
    let weight = Tensor::randn([48, 80], (Kind::Float, tch::Device::Cpu));
    let projection = Nf4Projection::new(&weight);
    let x = Tensor::randn([2, 5, 80], (Kind::Float, tch::Device::Cpu));
    let expected = x.matmul(&projection.weight.dequantize(Kind::Float).tr());
    let got = projection.forward(&x);
    assert!(got.allclose(&expected, 1e-6, 1e-6, false));
    // And it approximates the dense layer it replaced: relative error near NF4's ~10%.
    let dense = x.matmul(&weight.tr());
    let relative = ((&got - &dense).norm().double_value(&[])) / dense.norm().double_value(&[]);
    assert!(relative < 0.15, "{relative}");
}
