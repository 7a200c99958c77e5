//! OpenTelemetry traces (`--otlp-endpoint`), through `tracing` spans and
//! `tracing-opentelemetry`.
//!
//! Each RPC is a server span, its parent the W3C `traceparent` the caller
//! sent (tollgate's upstream span); under it, the database transaction. An
//! outbox event keeps the trace context of the transaction that wrote it,
//! and the relay's publish span is that context's child: the event reaches
//! Kafka with `traceparent` (and `tracestate`) headers naming the publish,
//! so a consumer continues the same trace. Sampling is parent-based, new
//! traces at `--trace-sample`. Spans go to the collector in batches from a
//! thread of their own; a full queue drops them, and a collector that fails
//! never slows a call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Whether spans are made at all (off unless an endpoint is set).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// How traces are exported.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector, `http://host:4317`.
    pub endpoint: String,
    /// The share of new traces sampled, 0 to 1.
    pub sample: f64,
    /// The spans' `service.name`.
    pub service_name: String,
}

/// Starts the exporter (inside a Tokio runtime: its gRPC channel runs on
/// it); the tracer goes to a `tracing-opentelemetry` layer, the provider is
/// shut down at exit to send what is queued.
pub fn start(c: &TraceConfig) -> Result<(SdkTracer, SdkTracerProvider), String> {
    if !(0.0..=1.0).contains(&c.sample) {
        return Err(format!(
            "--trace-sample {} must be between 0 and 1",
            c.sample
        ));
    }
    let uri: http::Uri = c
        .endpoint
        .parse()
        .map_err(|_| "--otlp-endpoint is not a URL; write e.g. http://127.0.0.1:4317".to_owned())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(
            "--otlp-endpoint must be an http:// URL with a host, e.g. http://127.0.0.1:4317 (https collectors are not supported: send to a local collector agent)"
                .into(),
        );
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(c.endpoint.clone())
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("--otlp-endpoint: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            c.sample,
        ))))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(c.service_name.clone())
                .build(),
        )
        .build();
    ENABLED.store(true, Ordering::Relaxed);
    Ok((provider.tracer("payment-backend"), provider))
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Reads W3C trace context from gRPC metadata.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// Reads W3C trace context from one stored `traceparent`.
struct Stored<'a>(&'a str);

impl Extractor for Stored<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The server span of one RPC, a child of the caller's trace context.
pub fn rpc(
    service: &'static str,
    method: &'static str,
    metadata: &tonic::metadata::MetadataMap,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
    let _ = span.set_parent(parent);
    span
}

/// Notes the RPC's outcome on its span (the current one).
pub fn rpc_ended(span: &Span, code: tonic::Code) {
    if span.is_none() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    use tonic::Code::*;
    if matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of one database transaction attempt, on `system`
/// (`postgresql`, `sqlite`).
pub fn transaction(system: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "transaction",
        otel.name = "transaction",
        otel.kind = "client",
        db.system = system,
    )
}

/// The `traceparent` of the current span, for an outbox event written now
/// (None when tracing is off; an unsampled span's says so, and its publish
/// stays unsampled).
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = Span::current().context();
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.remove("traceparent")
}

/// The span of publishing an event written under `stored` (its
/// `traceparent`) to `topic`, and the trace headers its Kafka record
/// carries: the publish span's context, or the stored one passed on when
/// this process does not trace.
pub fn publish(topic: &str, stored: Option<&str>) -> (Span, Vec<(String, String)>) {
    let Some(stored) = stored else {
        return (Span::none(), Vec::new());
    };
    if !enabled() {
        return (
            Span::none(),
            vec![("traceparent".to_owned(), stored.to_owned())],
        );
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("publish {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.destination.name = topic,
    );
    let propagator = TraceContextPropagator::new();
    let _ = span.set_parent(propagator.extract(&Stored(stored)));
    let mut out = HashMap::new();
    propagator.inject_context(&span.context(), &mut out);
    // An empty tracestate is no header.
    let mut headers: Vec<(String, String)> =
        out.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    headers.sort();
    (span, headers)
}
