//! Ferrite's LoRA adapters against Python peft: peft loads a Ferrite adapter over Ferrite's
//! exported base and gets the same logits; a merged-then-saved model matches the adapter; and
//! Ferrite loads an adapter peft made. Needs the venv from `scripts/setup-python.sh`; without
//! it the test prints why it skipped and passes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ferrite_model::adapter;
use ferrite_model::checkpoint;
use ferrite_model::llama::{ForwardOptions, Llama};
use ferrite_model::lora::{LoraAdapter, LoraConfig, TargetModules};
use ferrite_model::{ModelConfig, safetensors};
use tch::{Device, Tensor, nn};

#[path = "support/python.rs"]
mod python_venv;

fn logits(model: &Llama, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(ids, &ForwardOptions::default(), None))
}

#[test]
fn ferrite_and_peft_adapters_give_the_same_logits_both_ways() {
    let Some(python) = python_venv::venv_python() else {
        return;
    };
    tch::manual_seed(5);
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path();
    let config = ModelConfig::preset("tiny").expect("tiny preset");
    let var_store = nn::VarStore::new(Device::Cpu);
    let mut model = Llama::new(&var_store.root(), &config);
    checkpoint::save(&folder.join("base"), &var_store, &config, None).expect("base saves");

    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        target_modules: TargetModules::Names(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]),
        use_rslora: false,
    };
    let adapter = LoraAdapter::attach(&mut model, lora, 9).expect("attaches");
    tch::no_grad(|| {
        for (_, mut tensor) in adapter.named_tensors() {
            tensor.copy_(&(Tensor::randn_like(&tensor) * 0.05));
        }
    });
    adapter.set_training(false);
    adapter::save(&folder.join("adapter"), &adapter, "base").expect("adapter saves");
    let ids = Tensor::from_slice(&[1_i64, 50, 600, 7, 1999, 42, 8, 9, 300, 301]).view([1, 10]);
    let adapted = logits(&model, &ids);
    let outputs = BTreeMap::from([
        ("input_ids".to_string(), ids.shallow_clone()),
        ("logits".to_string(), adapted.shallow_clone()),
    ]);
    safetensors::save(
        &folder.join("ferrite_outputs.safetensors"),
        &outputs,
        &BTreeMap::new(),
    )
    .expect("outputs save");
    adapter.merge().expect("merges");
    checkpoint::save(&folder.join("merged"), &var_store, &config, None).expect("merged saves");

    let output = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/compare_peft.py"))
        .arg(folder)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "peft disagrees:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The other way: peft's own adapter (rsLoRA, all linear layers) on a fresh copy of the base.
    let mut loaded = checkpoint::load(&folder.join("base"), Device::Cpu).expect("base loads");
    let (peft_adapter, info) =
        adapter::load(&folder.join("peft_adapter"), &mut loaded.model).expect("peft adapter loads");
    assert!(info.config.use_rslora);
    // peft writes `all-linear` out as the seven projection names; tiny has 4 layers of 7.
    assert_eq!(peft_adapter.modules().count(), 28);
    peft_adapter.set_training(false);
    let expected = safetensors::load(&folder.join("peft_outputs.safetensors")).expect("outputs");
    let got = logits(&loaded.model, &expected.tensors["input_ids"]);
    let difference = (got - &expected.tensors["logits"])
        .abs()
        .max()
        .double_value(&[]);
    println!("ferrite vs peft-made adapter: {difference:e}");
    assert!(difference <= 1e-5, "{difference}");
}
