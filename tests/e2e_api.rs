//! The HTTP API of the real `lethe serve` refuses bad input with
//! `application/problem+json` and the right status, never echoes an
//! identifier, creates nothing for a refused submission, and honours
//! `Idempotency-Key`.

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::{ada_and_neighbours, Lab, Server, StateKind};

/// Sends `body` as `application/json`; returns status, content type and body.
async fn post_raw(server: &Server, body: impl Into<reqwest::Body>) -> (u16, String, String) {
    let r = server
        .http
        .post(server.url("/v1/requests"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST /v1/requests");
    let status = r.status().as_u16();
    let content_type =
        r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (status, content_type, r.text().await.expect("body"))
}

/// Asserts a problem+json answer with `status`; returns its body.
async fn expect_problem(server: &Server, what: &str, body: impl Into<reqwest::Body>, status: u16) -> Value {
    let (got, content_type, text) = post_raw(server, body).await;
    assert_eq!(got, status, "{what}: {text}");
    assert_eq!(content_type, "application/problem+json", "{what}: {text}");
    let problem: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    assert_eq!(problem["status"], status, "{what}: {problem}");
    assert!(problem["title"].is_string(), "{what}: {problem}");
    assert!(problem["detail"].is_string(), "{what}: {problem}");
    assert!(problem["type"].is_string(), "{what}: {problem}");
    problem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_over_the_real_server() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;

    expect_problem(&server, "malformed JSON", r#"{"subject": {"email": "#, 400).await;
    expect_problem(&server, "not an object", "[1, 2, 3]", 422).await;
    let p = expect_problem(
        &server,
        "unknown regulation",
        json!({"subject": {"email": "ada@example.com"}, "regulation": "martian-law"}).to_string(),
        422,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("regulation"), "{p}");
    expect_problem(&server, "empty subject", json!({"subject": {}, "regulation": "gdpr"}).to_string(), 422)
        .await;
    expect_problem(&server, "missing subject", json!({"regulation": "gdpr"}).to_string(), 422).await;
    let body = json!({"subject": {"email": "secret-value-no-at"}, "regulation": "gdpr"}).to_string();
    let (status, _, text) = post_raw(&server, body.clone()).await;
    assert_eq!(status, 422, "{text}");
    assert!(!text.contains("secret-value"), "the answer echoes the identifier: {text}");
    let p = expect_problem(&server, "invalid email", body, 422).await;
    assert!(!p.to_string().contains("secret"), "{p}");
    let p = expect_problem(
        &server,
        "unknown identifier type value",
        json!({"subject": {"phone": "call-me-secret-value"}, "regulation": "gdpr"}).to_string(),
        422,
    )
    .await;
    assert!(!p.to_string().contains("secret-value"), "{p}");
    let p = expect_problem(
        &server,
        "unknown field",
        json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr", "colour": "blue"}).to_string(),
        422,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("colour"), "{p}");
    // A misspelt identifier type would find nothing anywhere and pass for
    // an erasure.
    let p = expect_problem(
        &server,
        "identifier type no system uses",
        json!({"subject": {"e_mail": "secret-value@example.com"}, "regulation": "gdpr"}).to_string(),
        422,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("the systems use: "), "{p}");
    assert!(!p.to_string().contains("secret-value"), "{p}");
    // A type given twice would keep only one of the values.
    let p = expect_problem(
        &server,
        "identifier type given twice",
        r#"{"subject": {"email": "secret-value@example.com", "email": "ada@example.com"}, "regulation": "gdpr"}"#,
        422,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("more than once"), "{p}");
    // A zero-width space pasted with the address.
    let p = expect_problem(
        &server,
        "invisible character",
        json!({"subject": {"email": "secret-value@example.com\u{200B}"}, "regulation": "gdpr"}).to_string(),
        422,
    )
    .await;
    assert!(!p.to_string().contains("secret-value"), "{p}");
    let huge = json!({
        "subject": {"email": "ada@example.com"},
        "regulation": "gdpr",
        "external_ref": "x".repeat(70 * 1024),
    })
    .to_string();
    assert!(huge.len() > 64 * 1024);
    expect_problem(&server, "oversized body", huge, 413).await;

    // Not JSON at all.
    let r = server
        .http
        .post(server.url("/v1/requests"))
        .header("content-type", "text/plain")
        .body("email=ada@example.com")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 415);

    // Unknown request ids and endpoints.
    let (status, body) = server.get_json("/v1/requests/not-a-uuid").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get_json("/v1/requests/00000000-0000-0000-0000-000000000000").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get_json("/v1/requests?limit=0").await;
    assert_eq!(status, 422, "{body}");
    // What the router answers itself is a problem too, quoting nothing.
    for (method, path, status) in [
        (reqwest::Method::DELETE, "/v1/requests", 405),
        (reqwest::Method::GET, "/v1/requests/%FFsecret-value", 400),
        (reqwest::Method::GET, "/v1/requests?limit=secret-value", 422),
    ] {
        let r = server.http.request(method.clone(), server.url(path)).send().await.expect("call");
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let kind = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert_eq!(kind, "application/problem+json", "{method} {path}");
        let text = r.text().await.expect("body");
        assert!(!text.contains("secret-value"), "{method} {path}: {text}");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(body["status"], status, "{body}");
    }

    // Nothing refused was created, and no system was touched.
    assert!(server.list().await.is_empty());
    let nobody = BTreeSet::new();
    lab.assert_rows_after(&nobody, &nobody).await;
    let log = server.log_text();
    assert!(!log.contains("secret-value"), "the server log echoes a refused identifier");
}

fn same_millisecond(a: &Value, b: &Value) -> bool {
    let ms = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp"))
            .expect("RFC 3339")
            .timestamp_millis()
    };
    ms(a) == ms(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_request() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;
    let body = json!({"subject": {"email": "bob@example.com"}, "regulation": "gdpr"});
    let post = |key: &'static str| {
        server.http.post(server.url("/v1/requests")).header("Idempotency-Key", key).json(&body).send()
    };

    let first = post("portal-ticket-4711").await.expect("POST");
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.expect("JSON");
    let second = post("portal-ticket-4711").await.expect("POST");
    assert_eq!(second.status(), 202);
    assert_eq!(second.headers().get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    let second: Value = second.json().await.expect("JSON");
    assert_eq!(first["id"], second["id"], "{first} vs {second}");
    // The store keeps milliseconds; the first answer carries the clock's
    // full precision (nanoseconds), the replay the stored value. Same
    // instant to the millisecond.
    assert!(same_millisecond(&first["due_at"], &second["due_at"]), "{first} vs {second}");

    let other: Value = post("portal-ticket-4712").await.expect("POST").json().await.expect("JSON");
    assert_ne!(other["id"], first["id"]);

    // After completion the same key still answers with the same request.
    let id = first["id"].as_str().unwrap();
    let view = server.wait_final(id).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    server.wait_final(other["id"].as_str().unwrap()).await;
    let third: Value = post("portal-ticket-4711").await.expect("POST").json().await.expect("JSON");
    assert_eq!(third["id"], first["id"]);
    assert_eq!(third["status"], "completed", "{third}");

    let listed: BTreeSet<String> =
        server.list().await.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, BTreeSet::from([id.to_owned(), other["id"].as_str().unwrap().to_owned()]));
    let bob = BTreeSet::from([2]);
    lab.assert_rows_after(&bob, &bob).await;
}
