//! Trace context flows from an HTTP request through the outbox and RabbitMQ to the consumer.
//!
//! This file holds one test because it installs the process-wide tracing subscriber.

mod common;

use std::time::Duration;

use common::app::{ADMIN_TOKEN, spawn_app};
use common::eventually;
use ferrite_platform::settings::{LogFormat, TelemetrySettings};
use ferrite_platform::telemetry;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

#[tokio::test]
async fn a_traceparent_sent_over_http_is_the_ancestor_of_the_consumers_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let settings = TelemetrySettings {
        otlp_endpoint: None,
        log_format: LogFormat::Pretty,
        log_filter: "info".into(),
        service_name: "tracing-test".into(),
    };
    let _guard = telemetry::init_with_provider(&settings, provider.clone()).expect("installs");

    let app = spawn_app(&[]).await;
    // An arbitrary caller span; its trace id must reach the consumer.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let response = app
        .client
        .post(app.url("/v1/probe/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"note": "traced"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 202);

    let find = |name: &'static str| {
        let exporter = exporter.clone();
        move || {
            exporter
                .get_finished_spans()
                .unwrap_or_default()
                .into_iter()
                .find(|s| {
                    s.name == name
                        && s.span_context.trace_id()
                            == TraceId::from_hex(trace_id).unwrap_or(TraceId::INVALID)
                })
        }
    };
    let find_consume = find("amqp.consume");
    eventually(
        Duration::from_secs(60),
        "the consumer's span to end",
        || {
            let found = find_consume().is_some();
            async move { found }
        },
    )
    .await;

    let http = find("http.request")().expect("the request's span is exported");
    let consume = find_consume().expect("the consumer's span is exported");
    assert_eq!(
        http.parent_span_id,
        SpanId::from_hex(caller_span).expect("hex"),
        "the server span is a child of the caller's span"
    );
    assert_eq!(
        consume.span_context.trace_id(),
        http.span_context.trace_id(),
        "the consumer's span is in the caller's trace"
    );
    // The consumer's parent is a span inside the request (the request span or one beneath it).
    let spans = exporter.get_finished_spans().expect("spans");
    let mut ancestor = consume.parent_span_id;
    let mut chain = Vec::new();
    while let Some(parent) = spans.iter().find(|s| s.span_context.span_id() == ancestor) {
        chain.push(parent.name.to_string());
        ancestor = parent.parent_span_id;
    }
    assert!(
        chain.contains(&"http.request".to_owned()),
        "ancestors: {chain:?}"
    );
    assert_eq!(
        ancestor,
        SpanId::from_hex(caller_span).expect("hex"),
        "the chain ends at the caller"
    );

    app.stop().await;
}
