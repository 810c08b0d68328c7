//! The engine on its own: sequences leaving a running batch, and requests whose client went
//! away, on the chain model (greedy output CHAIN after any prompt, see `support`).

mod support;

use ferrite_inference_gateway::engine::{Engine, EngineRequest, LocalEngine, LocalEngineConfig};
use ferrite_inference_gateway::metrics::EngineMetrics;
use ferrite_model::checkpoint;
use ferrite_model::generate::{Batch, SamplingParams};
use support::{CHAIN, save_chain_model};

fn greedy(stop_token_ids: Vec<u32>) -> SamplingParams {
    SamplingParams {
        max_tokens: 40,
        stop_token_ids,
        ..SamplingParams::default()
    }
}

#[test]
fn a_removed_sequence_stops_while_the_others_decode_as_they_would_alone() {
    let dir = tempfile::tempdir().expect("a temp dir");
    save_chain_model(dir.path());
    let loaded = checkpoint::load(dir.path(), tch::Device::Cpu).expect("loads");
    let tokenizer = loaded.tokenizer.as_ref().expect("a tokenizer");
    let prompt = |text: &str| tokenizer.encode(text, true).expect("encodes");
    let params = greedy(tokenizer.stop_ids());

    let mut batch = Batch::new(&loaded.model, tokenizer);
    let ids = batch
        .add(&[(prompt("a"), params.clone()), (prompt("bb"), params)])
        .expect("adds");
    let mut kept_text = String::new();
    for _ in 0..3 {
        for output in batch.step() {
            if output.sequence == ids[1] {
                kept_text.push_str(&output.text_delta);
            }
        }
    }
    batch.remove(&ids[..1]);
    assert_eq!(batch.running(), [ids[1]]);
    while !batch.is_empty() {
        for output in batch.step() {
            assert_eq!(
                output.sequence, ids[1],
                "the removed sequence produced a token"
            );
            kept_text.push_str(&output.text_delta);
        }
    }
    assert_eq!(kept_text, CHAIN);
}

#[tokio::test]
async fn a_request_whose_client_left_is_dropped_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().expect("a temp dir");
    save_chain_model(dir.path());
    let metrics = EngineMetrics::unregistered();
    let (engine, info) = LocalEngine::start(LocalEngineConfig {
        checkpoint_dir: dir.path().to_path_buf(),
        adapter_dir: None,
        max_batch_sequences: 8,
        metrics: metrics.clone(),
    })
    .await
    .expect("starts");
    let request = EngineRequest {
        prompt: info.tokenizer.encode("Hi", true).expect("encodes"),
        choices: vec![greedy(info.tokenizer.stop_ids()); 2],
    };
    let mut abandoned = engine.submit(request.clone()).expect("queued");
    abandoned
        .recv()
        .await
        .expect("a first delta")
        .expect("no error");
    drop(abandoned);

    let mut deltas = engine.submit(request).expect("queued");
    let mut texts = [String::new(), String::new()];
    while let Some(delta) = deltas.recv().await {
        let delta = delta.expect("no error");
        texts[delta.choice].push_str(&delta.text);
    }
    assert_eq!(texts, [CHAIN, CHAIN]);
    // Both requests are retired: the finished one, and the abandoned one when its next
    // delta found nobody listening.
    assert_eq!(metrics.running.get(), 0);
    assert_eq!(metrics.waiting.get(), 0);
}
