//! Prometheus metrics: one registry per process, HTTP metrics every service shares.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The process's metric registry and the HTTP metrics recorded by the request middleware.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("ferrite".into()), None)
            .expect("a constant prefix is a valid metric name");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route pattern and status.",
            ),
            &["method", "route", "status"],
        )
        .expect("constant metric definition is valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency.")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap_or_default()),
            &["method", "route"],
        )
        .expect("constant metric definition is valid");
        let metrics = Self {
            registry,
            http_requests,
            http_duration,
        };
        metrics.register(Box::new(metrics.http_requests.clone()));
        metrics.register(Box::new(metrics.http_duration.clone()));
        metrics
    }

    /// Adds a service's own collector. A name registered twice is a programming error, logged.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(collector) {
            tracing::warn!(error = %e, "metric registered twice");
        }
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        // Clients choose the method, so any non-standard one shares a single label value;
        // otherwise anyone could grow the exposition without bound.
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => method,
            _ => "OTHER",
        };
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }

    /// The text exposition format Prometheus scrapes.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label_so_series_stay_bounded() {
        let metrics = Metrics::new();
        for i in 0..50 {
            metrics.observe_http(&format!("X{i}"), "/healthz", 404, 0.001);
        }
        let text = metrics.render();
        // 50 requests with 50 invented methods: one series holding all 50.
        assert!(
            text.contains(
                r#"ferrite_http_requests_total{method="OTHER",route="/healthz",status="404"} 50"#
            ),
            "{text}"
        );
        assert!(!text.contains("X1"), "{text}");
    }

    #[test]
    fn http_observations_appear_in_the_exposition() {
        let metrics = Metrics::new();
        metrics.observe_http("GET", "/healthz", 200, 0.001);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"ferrite_http_requests_total{method="GET",route="/healthz",status="200"} 1"#
            ),
            "{text}"
        );
    }
}
