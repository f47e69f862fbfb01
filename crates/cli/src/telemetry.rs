//! Logs on stderr (text or JSON) and, when an OTLP endpoint is configured
//! through the standard OpenTelemetry variables, traces exported over
//! OTLP/HTTP: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `http/json`), `OTEL_SERVICE_NAME`.
//! Every span about a request has the request id as its trace id, so one
//! request is one trace across the coordinator and the connector workers.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::LogFormat;

/// Flushes the exporter when dropped (at the end of `main`).
pub struct Telemetry(Option<SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: could not flush traces: {e}");
            }
        }
    }
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs the subscriber: `LETHE_LOG` filter (else `default`), the log
/// format, and the OTLP trace exporter when configured.
pub fn init(format: LogFormat, default: &str, service: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LETHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let json = matches!(format, LogFormat::Json);
    let text_layer =
        (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
    let json_layer = json.then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr));
    let provider = if otlp_configured() { exporter(service) } else { None };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("lethe")));
    tracing_subscriber::registry().with(filter).with(text_layer).with(json_layer).with(otel).init();
    std::panic::set_hook(Box::new(log_panic));
    if provider.is_some() {
        lethe_bus::trace::set_request_span_hook(join_request_trace);
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry(provider)
}

/// Reports a panic without its message: the message may quote whatever
/// value the code choked on (a slice of an e-mail address, a `Debug` of a
/// row), and logs must not hold identifiers. Where it happened, and the
/// backtrace when `RUST_BACKTRACE` asks for one, point to the bug.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
    let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = match backtrace.status() {
        std::backtrace::BacktraceStatus::Captured => format!("\n{backtrace}"),
        _ => String::new(),
    };
    tracing::error!(%location, %thread, "panicked (the message is not logged: it may quote data){backtrace}");
}

fn exporter(service: &str) -> Option<SdkTracerProvider> {
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        _ => Protocol::HttpBinary,
    };
    let exporter =
        match opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(protocol).build() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("warning: OTLP trace export is configured but cannot start: {e}");
                return None;
            }
        };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Makes `span` a child of the request's trace: trace id = request id, the
/// parent a span id derived from it (the same in every process).
fn join_request_trace(span: &tracing::Span, request: uuid::Uuid) {
    let bytes = request.into_bytes();
    let mut parent = [0u8; 8];
    parent.copy_from_slice(&bytes[8..]);
    let remote = SpanContext::new(
        TraceId::from_bytes(bytes),
        SpanId::from_bytes(parent),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

#[cfg(test)]
mod tests {
    use lethe_connector::conformance::LogBuffer;

    #[test]
    fn a_panic_is_logged_with_its_place_and_without_its_message() {
        let log = LogBuffer::default();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(log.clone()).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(super::log_panic));
        let email = String::from("ada@example.com");
        let caught = std::panic::catch_unwind(|| panic!("byte index 2 is inside `{email}`"));
        std::panic::set_hook(previous);
        assert!(caught.is_err());
        let text = log.contents();
        assert!(text.contains("panicked") && text.contains("telemetry.rs:"), "{text}");
        assert!(!text.contains("ada@"), "{text}");
    }
}
