//! The HTTP API. [`app`] builds the whole router from its state, so tests
//! drive it with `oneshot` and the binary serves the same router.

pub mod batch;
pub mod connector;
pub mod holds;
pub mod plans;
pub mod problem;
pub mod proof;
pub mod requests;
mod subject;
pub mod ui;
pub mod webhooks;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts as _, State};
use axum::handler::Handler as _;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lethe_core::MasterKey;
use lethe_store::StateStore;
use serde::Serialize;
use tokio::sync::Notify;
use utoipa::{OpenApi, ToSchema};

use crate::auth::{Caller, ConnectorTokens, Scope};
use crate::clock::Clock;
use crate::planner::{Planner, SystemInfo};
use problem::Problem;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn StateStore>,
    pub master: MasterKey,
    pub planner: Arc<Planner>,
    pub clock: Arc<dyn Clock>,
    /// Wakes the dispatcher when new outbox rows were committed.
    pub wake: Arc<Notify>,
    /// Tokens of connector workers running in other processes.
    pub connector_tokens: Arc<ConnectorTokens>,
    /// Signs erasure certificates.
    pub certifier: crate::certificate::Certifier,
    /// Lets concurrent `/metrics` scrapes share the state store's counts.
    pub scrapes: Arc<Scrapes>,
}

/// The state store's gauges as last rendered, and when. `/metrics` needs
/// no token and counts over the request and task tables, so scrapes take
/// turns: one computes at a time, and a scrape that waited for one takes
/// its answer (finished after the scrape arrived) instead of computing
/// again. However many clients scrape, the store runs one count at a time.
#[derive(Default)]
pub struct Scrapes(tokio::sync::Mutex<Option<(std::time::Instant, Arc<String>)>>);

/// The coordinator's router.
pub fn app(state: AppState) -> Router {
    // The endpoints that take no query parameter refuse one, as those that
    // take some refuse one they do not know.
    let without_query = Router::new()
        .route(
            "/v1/requests:batch",
            post(batch::submit_batch).layer(DefaultBodyLimit::max(batch::MAX_BATCH_BYTES)),
        )
        .route("/v1/requests/{id}", get(requests::get_request))
        .route("/v1/requests/{id}/systems/{system}/retry", post(requests::retry_task))
        .route("/v1/requests/{id}/extend", post(requests::extend))
        .route("/v1/plans:explain", post(plans::explain))
        .route("/v1/holds/{id}", delete(holds::release))
        .route("/v1/requests/{id}/certificate", get(proof::certificate))
        .route("/v1/keys/certificate", get(proof::public_keys))
        .route("/v1/requests/{id}/events", get(ui::events))
        .route(
            "/v1/suppressions:check",
            post(proof::check_suppressions).layer(DefaultBodyLimit::max(proof::MAX_CHECK_BYTES)),
        )
        .route("/v1/systems", get(list_systems))
        .route("/v1/connector/keys", post(connector::task_key))
        .route(
            "/v1/connector/keys:batch",
            post(connector::task_keys).layer(DefaultBodyLimit::max(connector::MAX_KEYS_BYTES)),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), no_query));
    Router::new()
        // Listing takes query parameters; submitting and placing do not.
        .route(
            "/v1/requests",
            get(requests::list_requests)
                .post(requests::submit.layer(axum::middleware::from_fn_with_state(state.clone(), no_query))),
        )
        .route(
            "/v1/holds",
            get(holds::list)
                .post(holds::place.layer(axum::middleware::from_fn_with_state(state.clone(), no_query))),
        )
        .route("/ui", get(ui::page))
        .route("/v1/webhooks/deliveries", get(webhooks::deliveries))
        .merge(without_query)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { Problem::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(problem::as_problem))
        .with_state(state)
}

/// 422 for a query string on an endpoint that takes none.
async fn no_query(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().query().is_none_or(str::is_empty) {
        return next.run(request).await;
    }
    // A caller without a valid token hears 401 first, as everywhere else
    // (the endpoint refuses it before it reads anything); only the public
    // key list takes no token.
    if request.uri().path() != "/v1/keys/certificate" {
        let (mut parts, _) = request.into_parts();
        if let Err(refused) = Caller::from_request_parts(&mut parts, &state).await {
            return refused.into_response();
        }
    }
    Problem::invalid("this endpoint takes no query parameter").into_response()
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    status: &'static str,
}

/// The configured systems.
#[utoipa::path(get, path = "/v1/systems", tag = "systems", security(("bearer" = ["requests:read"]), ("bearer" = ["requests:submit"]), ("bearer" = ["holds:write"])), responses((status = 200, body = Vec<SystemInfo>)))]
async fn list_systems(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<SystemInfo>>, Problem> {
    caller.require_any(&[Scope::RequestsRead, Scope::RequestsSubmit, Scope::HoldsWrite])?;
    Ok(Json(state.planner.systems().to_vec()))
}

/// How long a scrape waits for the state store's gauges (Prometheus waits
/// 10 s for the whole page by default).
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Prometheus metrics: counters and histograms of this process, and gauges
/// read from the state store. No label is ever an identifier. With the
/// store unreadable, the process's own metrics are still served, with
/// `lethe_state_gauges_up 0` in place of the gauges: a failed scrape would
/// drop every series, and an alert on overdue requests would resolve just
/// when the store is down.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    let asked = std::time::Instant::now();
    let gauges = {
        let mut last = state.scrapes.0.lock().await;
        match &*last {
            Some((at, gauges)) if *at >= asked => gauges.clone(),
            // Bounded: with the database down, the pool waits for a
            // connection longer than a scraper waits for the page.
            _ => {
                let stats = state.store.stats(state.clock.now(), crate::scheduler::DUE_SOON);
                let read = match tokio::time::timeout(STATS_TIMEOUT, stats).await {
                    Ok(read) => read.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {} s", STATS_TIMEOUT.as_secs())),
                };
                match read {
                    Ok(stats) => {
                        let gauges = Arc::new(crate::metrics::state_gauges(&stats));
                        *last = Some((std::time::Instant::now(), gauges.clone()));
                        gauges
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: the state store gauges cannot be read");
                        Arc::new(crate::metrics::state_gauges_up(false))
                    }
                }
            }
        }
    };
    let mut text = crate::metrics::prometheus().render();
    text.push_str(&gauges);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the state store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(Health { status: "ready" })),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "state store unavailable" }))
        }
    }
}

/// Declares the bearer-token scheme; each operation lists the scopes that
/// grant it (any one of them suffices).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An API token (`lethe token create`) or a system's connector token"))
            .build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// What operations can answer besides what each declares: with a token,
/// 401 and 403 (see [`crate::auth`]), 422 (a query parameter the operation
/// does not take, or a value out of range) and 503 while the state store is
/// unavailable; with a JSON body, what reading it can refuse (400, 413,
/// 415, 422, see [`problem::StrictJson`]); the public key list reads the
/// state store too.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let problem = |text: &str| {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ProblemBody"))).build();
            ResponseBuilder::new().description(text).content("application/problem+json", content).build()
        };
        const UNAVAILABLE: (&str, &str) = ("503", "The state store is unavailable; try again");
        const INVALID: (&str, &str) = (
            "422",
            "A query parameter the operation does not take, a value out of range, or a body field invalid",
        );
        let secured = [
            ("401", "No token, or an unknown or revoked one"),
            ("403", "The token lacks the scope this operation needs"),
            INVALID,
            UNAVAILABLE,
        ];
        let with_body = [
            ("400", "The body is not valid JSON"),
            ("413", "The body is larger than this operation takes"),
            ("415", "The body is not application/json"),
            INVALID,
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch]
                .into_iter()
                .flatten()
            {
                let mut add: Vec<(&str, &str)> = Vec::new();
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    add.extend(secured);
                } else if path == "/v1/keys/certificate" {
                    add.extend([("422", "This operation takes no query parameter"), UNAVAILABLE]);
                }
                if op.request_body.is_some() {
                    add.extend(with_body);
                }
                for (status, text) in add {
                    op.responses.responses.entry(status.to_owned()).or_insert_with(|| problem(text).into());
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    modifiers(&BearerAuth, &CommonResponses),
    info(title = "Lethe", description = "Right-to-be-forgotten erasure orchestrator"),
    paths(
        requests::submit,
        batch::submit_batch,
        requests::get_request,
        requests::list_requests,
        requests::retry_task,
        requests::extend,
        plans::explain,
        holds::place,
        holds::release,
        holds::list,
        proof::certificate,
        proof::public_keys,
        proof::check_suppressions,
        ui::events,
        connector::task_key,
        connector::task_keys,
        webhooks::deliveries,
        list_systems,
        healthz,
        metrics_text,
        readyz
    ),
    components(schemas(lethe_core::Outcome, lethe_core::DatasetReport, lethe_core::RetainedReport))
)]
struct ApiDoc;

/// The OpenAPI document, generated from the handlers and types.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> impl IntoResponse {
    Json(openapi_document())
}
