//! One trace per request. The trace id of every span about a request is the
//! request id (as in the `traceparent` header on the bus), so the spans of
//! the coordinator, the connector workers and the coordinator again form
//! one trace without any state shared between processes. This crate only
//! offers the hook; the binary installs the OpenTelemetry implementation
//! when an OTLP endpoint is configured.

use std::sync::OnceLock;

use lethe_core::RequestId;

type Hook = fn(&tracing::Span, uuid::Uuid);

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs what [`link`] does (once per process).
pub fn set_request_span_hook(hook: Hook) {
    let _ = HOOK.set(hook);
}

/// Puts `span` into the trace of `request`.
pub fn link(span: &tracing::Span, request: RequestId) {
    if let Some(hook) = HOOK.get() {
        hook(span, request.0);
    }
}
