//! Serving benchmark: time to first token, inter-token latency and end-to-end latency (p50,
//! p99) and output tokens/s at concurrency 1 and 8, through the gateway over HTTP (streamed
//! completions) and by calling the engine directly in the same process, then the ratios
//! gateway / direct: the gateway's overhead. Numbers depend on the machine; nothing here is
//! asserted.
//!
//! Serves SmolLM2-135M-Instruct when data/ has it, else the tiny chain model of the tests.
//! Needs Postgres and RabbitMQ on loopback, as the tests do. Run by scripts/bench-serving.sh.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ferrite_inference_gateway::engine::{
    Engine, EngineRequest, LocalEngine, LocalEngineConfig, ModelInfo,
};
use ferrite_inference_gateway::metrics::EngineMetrics;
use ferrite_model::generate::SamplingParams;
use ferrite_model::{checkpoint, gguf};
use futures::StreamExt;
use serde_json::json;
use support::{ADMIN_TOKEN, TestGateway};

const PROMPT: &str = "Once upon a time, in a quiet village by the sea,";
const MAX_TOKENS: usize = 32;

/// What one request measured, in seconds.
#[derive(Debug, Default)]
struct Sample {
    ttft: f64,
    gaps: Vec<f64>,
    e2e: f64,
    tokens: usize,
}

/// One side at one concurrency.
#[derive(Debug)]
struct Summary {
    ttft: (f64, f64),
    itl: (f64, f64),
    e2e: (f64, f64),
    tokens_per_second: f64,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn summarise(samples: &[Sample], wall: f64) -> Summary {
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.gaps.clone()).collect();
    let mut e2e: Vec<f64> = samples.iter().map(|s| s.e2e).collect();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    Summary {
        ttft: (percentile(&mut ttft, 0.5), percentile(&mut ttft, 0.99)),
        itl: (percentile(&mut itl, 0.5), percentile(&mut itl, 0.99)),
        e2e: (percentile(&mut e2e, 0.5), percentile(&mut e2e, 0.99)),
        tokens_per_second: tokens as f64 / wall,
    }
}

fn params(info: &ModelInfo) -> SamplingParams {
    SamplingParams {
        max_tokens: MAX_TOKENS,
        stop_token_ids: info.tokenizer.stop_ids(),
        ..SamplingParams::default()
    }
}

/// One request straight into the engine, timed from submission.
async fn direct(engine: Arc<LocalEngine>, prompt: Vec<u32>, params: SamplingParams) -> Sample {
    let start = Instant::now();
    let mut deltas = engine
        .submit(EngineRequest {
            prompt,
            choices: vec![params],
        })
        .expect("the engine takes requests");
    let mut sample = Sample::default();
    let mut last = start;
    while let Some(delta) = deltas.recv().await {
        delta.expect("generation succeeds");
        record(&mut sample, start, &mut last);
    }
    sample.e2e = start.elapsed().as_secs_f64();
    sample
}

fn record(sample: &mut Sample, start: Instant, last: &mut Instant) {
    let now = Instant::now();
    if sample.tokens == 0 {
        sample.ttft = now.duration_since(start).as_secs_f64();
    } else {
        sample.gaps.push(now.duration_since(*last).as_secs_f64());
    }
    sample.tokens += 1;
    *last = now;
}

/// One streamed completion through HTTP; every chunk with a choice counts as one token.
async fn over_http(client: reqwest::Client, url: String, model: String) -> Sample {
    let body = json!({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                      "temperature": 0, "stream": true});
    let start = Instant::now();
    let response = client
        .post(url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers");
    assert!(response.status().is_success(), "{}", response.status());
    let mut sample = Sample::default();
    let mut last = start;
    let mut buffer = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(piece) = bytes.next().await {
        buffer.push_str(&String::from_utf8_lossy(&piece.expect("the stream reads")));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if event.starts_with("data: {") && event.contains("\"index\"") {
                record(&mut sample, start, &mut last);
            }
        }
    }
    sample.e2e = start.elapsed().as_secs_f64();
    sample
}

async fn run_side<F, Fut>(concurrency: usize, requests: usize, make: F) -> Summary
where
    F: Fn() -> Fut,
    Fut: Future<Output = Sample> + Send + 'static,
{
    // One request first, unmeasured, so neither side pays for warming caches.
    make().await;
    let start = Instant::now();
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests.div_ceil(concurrency) {
        let wave: Vec<_> = (0..concurrency).map(|_| tokio::spawn(make())).collect();
        for handle in wave {
            samples.push(handle.await.expect("the request task finishes"));
        }
    }
    summarise(&samples, start.elapsed().as_secs_f64())
}

fn model_folder(dir: &Path) -> &'static str {
    let data = std::env::var_os("FERRITE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    let gguf_path = data.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf_path.exists() {
        support::save_chain_model(dir);
        return "chain";
    }
    let imported = gguf::import(&gguf_path).expect("SmolLM2 imports");
    let loaded = checkpoint::from_gguf(imported, tch::Device::Cpu).expect("builds");
    checkpoint::save(
        dir,
        &loaded.var_store,
        &loaded.config,
        loaded.tokenizer.as_ref(),
    )
    .expect("saves");
    "smollm2"
}

fn keep_best(best: &mut Option<Summary>, candidate: Summary) {
    if best
        .as_ref()
        .is_none_or(|kept| candidate.e2e.0 < kept.e2e.0)
    {
        *best = Some(candidate);
    }
}

fn print_row(label: &str, concurrency: usize, s: &Summary) {
    println!(
        "{label:<8} c={concurrency}  ttft p50 {:>7.1} ms p99 {:>7.1} ms | itl p50 {:>6.1} ms p99 {:>6.1} ms | e2e p50 {:>7.1} ms p99 {:>7.1} ms | {:>7.1} tok/s",
        s.ttft.0 * 1e3,
        s.ttft.1 * 1e3,
        s.itl.0 * 1e3,
        s.itl.1 * 1e3,
        s.e2e.0 * 1e3,
        s.e2e.1 * 1e3,
        s.tokens_per_second
    );
}

fn print_ratios(concurrency: usize, http: &Summary, direct: &Summary) {
    println!(
        "ratio    c={concurrency}  ttft p50 {:.2} p99 {:.2} | itl p50 {:.2} p99 {:.2} | e2e p50 {:.2} p99 {:.2} | tok/s {:.2}   (gateway / direct)",
        http.ttft.0 / direct.ttft.0,
        http.ttft.1 / direct.ttft.1,
        http.itl.0 / direct.itl.0,
        http.itl.1 / direct.itl.1,
        http.e2e.0 / direct.e2e.0,
        http.e2e.1 / direct.e2e.1,
        http.tokens_per_second / direct.tokens_per_second
    );
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::var("FERRITE_BENCH_REQUESTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(16);
    let gateway = TestGateway::spawn().await;
    let folder = tempfile::tempdir().expect("a temp dir");
    let model = model_folder(folder.path());
    gateway.register_folder(model, folder.path()).await;
    gateway.deploy(model).await;

    let (engine, info) = LocalEngine::start(LocalEngineConfig {
        checkpoint_dir: folder.path().to_path_buf(),
        adapter_dir: None,
        max_batch_sequences: 8,
        metrics: EngineMetrics::unregistered(),
    })
    .await
    .expect("the engine starts");
    let engine = Arc::new(engine);
    let prompt = info.tokenizer.encode(PROMPT, true).expect("encodes");
    let params = params(&info);
    println!(
        "model {model}, prompt {} tokens, {MAX_TOKENS} new tokens, {requests} requests per row, greedy",
        prompt.len()
    );

    // Other work on a shared machine slows whichever side runs beside it, so the sides
    // alternate for several rounds and each keeps its best round (by median end-to-end).
    let rounds: usize = std::env::var("FERRITE_BENCH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let client = reqwest::Client::new();
    let url = gateway.url("/v1/completions");
    for concurrency in [1, 8] {
        let mut best: (Option<Summary>, Option<Summary>) = (None, None);
        for _ in 0..rounds {
            let direct_summary = run_side(concurrency, requests, || {
                direct(engine.clone(), prompt.clone(), params.clone())
            })
            .await;
            let http_summary = run_side(concurrency, requests, || {
                over_http(client.clone(), url.clone(), model.to_owned())
            })
            .await;
            keep_best(&mut best.0, direct_summary);
            keep_best(&mut best.1, http_summary);
        }
        let (Some(direct_summary), Some(http_summary)) = best else {
            continue;
        };
        print_row("direct", concurrency, &direct_summary);
        print_row("gateway", concurrency, &http_summary);
        print_ratios(concurrency, &http_summary, &direct_summary);
    }
    drop(engine);
    gateway.stop().await;
}
