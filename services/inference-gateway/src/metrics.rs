//! Serving metrics under the names serving users know, measured at the engine.

use ferrite_platform::metrics::Metrics;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts};

/// One deployment's serving metrics, labelled with its name.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// From the request entering the queue to its first generated token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of one choice.
    pub inter_token_latency: Histogram,
    /// From the request entering the queue to its last token.
    pub e2e_latency: Histogram,
    /// From entering the queue to joining the running batch.
    pub queue_time: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub generated_tokens: IntCounter,
    pub prompt_tokens: IntCounter,
}

/// Latency buckets from 1 ms to about 65 s, doubling.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}

impl EngineMetrics {
    /// Metrics for `deployment`, registered in the process's registry.
    pub fn register(metrics: &Metrics, deployment: &str) -> Self {
        let label = |opts: Opts| opts.const_label("deployment", deployment);
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help)
                .const_label("deployment", deployment)
                .buckets(latency_buckets());
            let histogram = Histogram::with_opts(opts).expect("constant metric definition");
            metrics.register(Box::new(histogram.clone()));
            histogram
        };
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::with_opts(label(Opts::new(name, help)))
                .expect("constant metric definition");
            metrics.register(Box::new(gauge.clone()));
            gauge
        };
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::with_opts(label(Opts::new(name, help)))
                .expect("constant metric definition");
            metrics.register(Box::new(counter.clone()));
            counter
        };
        Self {
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "Time from a request's arrival to its first generated token.",
            ),
            inter_token_latency: histogram(
                "inter_token_latency_seconds",
                "Time between consecutive tokens of one choice.",
            ),
            e2e_latency: histogram(
                "e2e_request_latency_seconds",
                "Time from a request's arrival to its last token.",
            ),
            queue_time: histogram(
                "request_queue_time_seconds",
                "Time a request waited before joining the running batch.",
            ),
            running: gauge("num_requests_running", "Requests in the running batch."),
            waiting: gauge("num_requests_waiting", "Requests queued for the batch."),
            generated_tokens: counter("generation_tokens_total", "Tokens generated."),
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens prefilled."),
        }
    }

    /// Metrics kept out of any registry (benchmarks, engine tests).
    pub fn unregistered() -> Self {
        Self::register(&Metrics::new(), "unregistered")
    }
}
