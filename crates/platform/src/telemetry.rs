//! Logs and traces: JSON logs through `tracing`, OTLP export when configured, W3C trace context.
//!
//! Spans always carry OpenTelemetry ids, even without a collector, so a `traceparent` that
//! arrives on HTTP is passed on through the outbox and AMQP headers to the consumer; exporting
//! is the only part that depends on `FERRITE_OTLP_ENDPOINT`.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, TelemetrySettings};

/// Flushes pending spans when dropped; keep it alive for the life of the process.
#[must_use = "spans are flushed when the guard drops"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Errors here mean spans were lost at exit; there is nowhere left to report them.
        let _ = self.provider.shutdown();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}`: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber: logs, and spans exported over OTLP/gRPC when configured.
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource(&settings.service_name));
    if let Some(endpoint) = &settings.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.as_str())
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: endpoint.to_string(),
                source,
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    init_with_provider(settings, builder.build())
}

/// Installs the global subscriber over a given tracer provider (tests pass an in-memory one).
pub fn init_with_provider(
    settings: &TelemetrySettings,
    provider: SdkTracerProvider,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_new(&settings.log_filter).map_err(|source| TelemetryError::Filter {
            filter: settings.log_filter.clone(),
            source,
        })?;
    let logs = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().compact().boxed(),
    };
    let tracer = provider.tracer("ferrite");
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

fn resource(service_name: &str) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build()
}

/// The W3C trace context (`traceparent`, and `tracestate` when present) of the current span.
pub fn inject_context() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    headers
}

/// The remote context named by W3C headers; an empty context when they are absent or invalid.
pub fn extract_context(headers: &[(String, String)]) -> opentelemetry::Context {
    let carrier: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` a child of the remote context in `headers`, when they carry one.
pub fn set_remote_parent(span: &tracing::Span, headers: &[(String, String)]) {
    use opentelemetry::trace::TraceContextExt;
    let context = extract_context(headers);
    if context.span().span_context().is_valid() {
        // Without an OpenTelemetry layer installed there is nothing to link, and this is a no-op.
        span.set_parent(context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_valid_traceparent_is_extracted_with_its_ids() {
        // Example value from the W3C Trace Context recommendation, section 3.2.
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = extract_context(&[("traceparent".into(), header.into())]);
        let span = context.span();
        let ids = span.span_context();
        assert_eq!(
            ids.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(ids.span_id().to_string(), "00f067aa0ba902b7");
        assert!(ids.is_remote());
    }

    #[test]
    fn a_malformed_traceparent_yields_no_parent() {
        let context = extract_context(&[("traceparent".into(), "00-zz-11-01".into())]);
        assert!(!context.span().span_context().is_valid());
    }
}
