//! A pretraining run stopped, saved and resumed continues exactly where it left off.

use ferrite_model::ModelConfig;
use ferrite_training::pretrain::{Metrics, PretrainConfig, Pretrainer};
use tch::Device;

fn corpus() -> (Vec<u32>, Vec<u32>) {
    // Any fixed token stream works; a repeating pattern with some variety gives a loss that moves.
    let tokens: Vec<u32> = (0..6000u32).map(|i| (i * 7 + i / 13) % 300).collect();
    (tokens[..5000].to_vec(), tokens[5000..].to_vec())
}

fn config() -> PretrainConfig {
    PretrainConfig {
        batch_size: 2,
        sequence_length: 16,
        gradient_accumulation: 2,
        total_steps: 6,
        warmup_steps: 2,
        peak_lr: 3e-3,
        min_lr: 3e-4,
        eval_interval: 0,
        eval_windows: 4,
        seed: 5,
        threads: Some(1),
        ..PretrainConfig::default()
    }
}

fn model_config() -> ModelConfig {
    ModelConfig::preset("tiny")
        .expect("tiny preset exists")
        .with_vocab_size(300)
}

fn losses(trainer: &mut Pretrainer, until: usize) -> Vec<f64> {
    let mut losses = Vec::new();
    trainer.run_until(until, &mut |metrics| {
        if let Metrics::Train(train) = metrics {
            losses.push(train.loss);
        }
    });
    losses
}

#[test]
fn training_three_steps_saving_and_resuming_matches_six_straight_steps() {
    let (train, held_out) = corpus();
    let mut straight = Pretrainer::new(
        model_config(),
        config(),
        train.clone(),
        &held_out,
        Device::Cpu,
    )
    .expect("starts");
    let reference = losses(&mut straight, 6);

    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = Pretrainer::new(
        model_config(),
        config(),
        train.clone(),
        &held_out,
        Device::Cpu,
    )
    .expect("starts");
    let mut resumed_losses = losses(&mut first, 3);
    first.save(dir.path(), None).expect("saves");
    drop(first);
    let mut second =
        Pretrainer::resume(dir.path(), train, &held_out, Device::Cpu).expect("resumes");
    assert_eq!(second.step_count(), 3);
    resumed_losses.extend(losses(&mut second, 6));

    // Same arithmetic on the same data with state restored bit for bit (f32 safetensors), so
    // the curves agree to float rounding; a lost moment, step or data position would show up
    // as a difference of order the loss's step-to-step change (>1e-3 here).
    assert_eq!(reference.len(), 6);
    for (step, (a, b)) in reference.iter().zip(&resumed_losses).enumerate() {
        assert!(
            (a - b).abs() < 1e-6,
            "step {step}: straight {a}, resumed {b}"
        );
    }
    let held_out_straight = straight.evaluate().loss;
    assert!((held_out_straight - second.evaluate().loss).abs() < 1e-6);
}

#[test]
fn a_resumed_run_rejects_a_missing_optimizer_state_by_name() {
    let (train, held_out) = corpus();
    let dir = tempfile::tempdir().expect("temp dir");
    let trainer = Pretrainer::new(
        model_config(),
        config(),
        train.clone(),
        &held_out,
        Device::Cpu,
    )
    .expect("starts");
    trainer.save(dir.path(), None).expect("saves");
    std::fs::remove_file(dir.path().join("optimizer.safetensors")).expect("removes");
    let error =
        Pretrainer::resume(dir.path(), train, &held_out, Device::Cpu).expect_err("state is gone");
    assert!(
        error.to_string().contains("optimizer.safetensors"),
        "{error}"
    );
}

#[test]
fn gradient_checkpointing_trains_the_same_curve() {
    let (train, held_out) = corpus();
    let run = |gradient_checkpointing| {
        let config = PretrainConfig {
            gradient_checkpointing,
            ..config()
        };
        let mut trainer = Pretrainer::new(
            model_config(),
            config,
            train.clone(),
            &held_out,
            Device::Cpu,
        )
        .expect("starts");
        losses(&mut trainer, 6)
    };
    let (plain, checkpointed) = (run(false), run(true));
    // Recomputing a block repeats its float operations exactly, so both runs take the same
    // steps; a gradient lost or counted twice would move the curve by far more than 1e-6 after
    // six steps at lr 3e-3.
    for (step, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
        assert!(
            (a - b).abs() < 1e-6,
            "step {step}: plain {a}, checkpointed {b}"
        );
    }
}
