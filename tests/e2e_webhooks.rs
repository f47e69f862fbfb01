//! Webhooks from the real `lethe serve` to a receiver in the test: every
//! delivery carries a valid `Lethe-Signature` (recomputed here from the
//! documented recipe, with the 5-minute replay window), the first two
//! deliveries answered 500 are retried and the delivery log shows it, each
//! request's `request.received` and `request.completed` arrive in order,
//! and no payload holds an identifier (the endpoint does not ask for them).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::{ada_and_neighbours, Lab, LabOptions, Server, StateKind};

const SECRET: &str = "whsec_e2e-0123456789abcdef";
const REPLAY_WINDOW_SECS: u64 = 300;

/// What a receiver must do with a delivery, following the README: split
/// `t=…,v1=…`, refuse a timestamp more than 5 minutes from now, recompute
/// HMAC-SHA256(secret, "<t>.<raw body>") and compare in constant time.
fn verify(secret: &str, header: &str, body: &[u8], now: u64) -> Result<(), &'static str> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1.push(hex::decode(v).map_err(|_| "v1 is not hex")?),
            _ => return Err("malformed header"),
        }
    }
    let t = t.ok_or("no timestamp")?;
    if now.abs_diff(t) > REPLAY_WINDOW_SECS {
        return Err("timestamp outside the replay window");
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    if v1.iter().any(|tag| mac.clone().verify_slice(tag).is_ok()) {
        Ok(())
    } else {
        Err("signature mismatch")
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

#[derive(Debug, Clone)]
struct Hit {
    signature: String,
    event_id: String,
    event_type: String,
    body: Bytes,
    verified: Result<(), &'static str>,
    answered: u16,
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Answer 503 to everything (an outage of the portal).
    down: Arc<AtomicBool>,
}

/// Verifies, then answers 500 to the first two deliveries and 200 after
/// (401 to a delivery that fails verification).
async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let signature = h("lethe-signature");
    let verified = verify(SECRET, &signature, &body, unix_now());
    let mut hits = r.hits.lock().expect("lock");
    let answer = if verified.is_err() {
        StatusCode::UNAUTHORIZED
    } else if hits.len() < 2 {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if r.down.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    hits.push(Hit {
        signature,
        event_id: h("lethe-event-id"),
        event_type: h("lethe-event-type"),
        body,
        verified,
        answered: answer.as_u16(),
    });
    answer
}

impl Receiver {
    /// Starts the receiver on a free loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
        let url = format!("http://{}/hooks/lethe", listener.local_addr().expect("address"));
        let routes =
            axum::Router::new().route("/hooks/lethe", axum::routing::post(receive)).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, routes).await.expect("receiver") });
        url
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }

    /// (request id, event type) of every accepted delivery, in order.
    fn accepted(&self) -> Vec<(String, String)> {
        self.hits()
            .iter()
            .filter(|h| h.answered == 200)
            .map(|h| {
                let payload: Value = serde_json::from_slice(&h.body).expect("JSON payload");
                (payload["request"]["id"].as_str().unwrap_or_default().to_owned(), h.event_type.clone())
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_through_sqlite_state() {
    webhooks(StateKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_through_postgres_state() {
    webhooks(StateKind::Postgres).await;
}

async fn webhooks(state: StateKind) {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let options = LabOptions {
        extra_config: format!(
            "\n[[webhooks]]\nname = \"portal\"\nurl = \"{url}\"\nsecret = \"${{LETHE_TEST_WEBHOOK_SECRET}}\"\n\
             max_attempts = 6\ntimeout_secs = 2\nretry_initial_delay_ms = 100\nretry_max_delay_ms = 400\n"
        ),
        extra_env: vec![("LETHE_TEST_WEBHOOK_SECRET".into(), SECRET.into())],
        // A restarted server takes the endpoint over when the killed one's
        // claim runs out: max(lease, 2 x timeout) = 4 s.
        lease_secs: Some(3),
        ..LabOptions::default()
    };
    let people = ada_and_neighbours();
    let lab = Lab::with_options(state, people.clone(), options).await;
    let mut server = Server::start(&lab).await;

    let mut requests = Vec::new();
    for email in ["ada@example.com", "bob@example.com", "carol@example.com"] {
        let answer = server.submit(json!({ "email": email })).await;
        requests.push(answer["id"].as_str().expect("id").to_owned());
    }
    let mut finals = Vec::new();
    for id in &requests {
        finals.push(server.wait_final(id).await["status"].as_str().expect("status").to_owned());
    }

    // Each request's received and final events arrive, in order.
    let started = Instant::now();
    let expected = |id: &str, status: &str| {
        vec![(id.to_owned(), "request.received".to_owned()), (id.to_owned(), format!("request.{status}"))]
    };
    loop {
        let accepted = receiver.accepted();
        let done = requests.iter().zip(&finals).all(|(id, status)| {
            accepted.iter().filter(|(r, _)| r == id).cloned().collect::<Vec<_>>() == expected(id, status)
        });
        if done {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "events missing; accepted: {accepted:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(finals.iter().all(|s| s == "completed"), "{finals:?}");

    // Every delivery was signed correctly and recently; the verifier
    // refuses a tampered body, a wrong secret and an old timestamp.
    let hits = receiver.hits();
    for hit in &hits {
        assert_eq!(hit.verified, Ok(()), "{}: {}", hit.event_type, String::from_utf8_lossy(&hit.body));
        let payload: Value = serde_json::from_slice(&hit.body).expect("JSON payload");
        assert_eq!(payload["id"], hit.event_id.as_str());
        assert_eq!(payload["type"], hit.event_type.as_str());
        assert_eq!(payload["request"]["regulation"], "gdpr");
        assert!(payload["request"]["due_at"].is_string() && payload["request"]["received_at"].is_string());
    }
    let first = &hits[0];
    let tampered = String::from_utf8_lossy(&first.body).replace("request.received", "request.completed");
    assert_ne!(tampered.as_bytes(), &first.body[..]);
    assert_eq!(verify(SECRET, &first.signature, tampered.as_bytes(), unix_now()), Err("signature mismatch"));
    assert_eq!(
        verify("whsec_other-secret-000000", &first.signature, &first.body, unix_now()),
        Err("signature mismatch")
    );
    assert_eq!(
        verify(SECRET, &first.signature, &first.body, unix_now() + REPLAY_WINDOW_SECS + 60),
        Err("timestamp outside the replay window")
    );

    // The first event was refused twice, then accepted: same event id,
    // three deliveries; the delivery log shows the failed attempts first.
    let first_id = &first.event_id;
    let same: Vec<u16> = hits.iter().filter(|h| &h.event_id == first_id).map(|h| h.answered).collect();
    assert_eq!(same, [500, 500, 200], "answers to the first event");
    let (status, log) = server.get_json("/v1/webhooks/deliveries?endpoint=portal&limit=1000").await;
    assert_eq!(status, 200, "{log}");
    let mut attempts: Vec<&Value> = log["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|d| d["event_id"] == first_id.as_str())
        .collect();
    attempts.reverse();
    let summary: Vec<(u64, Option<u64>, bool)> = attempts
        .iter()
        .map(|d| {
            (d["attempt"].as_u64().unwrap(), d["status_code"].as_u64(), d["delivered"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(summary, [(1, Some(500), false), (2, Some(500), false), (3, Some(200), true)], "{log:#}");
    assert!(attempts[0]["next_attempt_at"].is_string() && attempts[2]["next_attempt_at"].is_null());
    assert_eq!(attempts[0]["error"], "HTTP 500");
    let delivered = log["items"].as_array().unwrap().iter().filter(|d| d["delivered"] == true).count();
    assert_eq!(delivered, 2 * requests.len(), "{log:#}");
    let (_, by_request) =
        server.get_json(&format!("/v1/webhooks/deliveries?request_id={}", requests[1])).await;
    let types: Vec<&str> =
        by_request["items"].as_array().unwrap().iter().map(|d| d["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["request.completed", "request.received"]);
    let anonymous = support::plain_http_client();
    let r = anonymous.get(server.url("/v1/webhooks/deliveries")).send().await.expect("GET");
    assert_eq!(r.status(), 401);

    // No identifier in any payload (the endpoint does not ask for them),
    // nor the secret or the URL in the delivery log or the server's log.
    for hit in &hits {
        let text = String::from_utf8_lossy(&hit.body).to_lowercase();
        for p in &people {
            assert!(!text.contains(&p.email), "{} in a {} payload: {text}", p.email, hit.event_type);
        }
        assert!(!text.contains("@example"), "{text}");
    }
    let log_text = log.to_string();
    assert!(!log_text.contains(SECRET) && !log_text.contains(&url), "{log_text}");
    assert!(!server.log_text().contains(SECRET), "the secret is in the server's log");

    // A crash while an event waits for its retry loses nothing: after a
    // restart the event is delivered, and earlier ones are not sent again.
    receiver.down.store(true, Ordering::SeqCst);
    let late = server.submit(json!({ "email": "xada@example.com" })).await["id"].as_str().unwrap().to_owned();
    server.wait_final(&late).await;
    let started = Instant::now();
    while !receiver.hits().iter().any(|h| h.answered == 503) {
        assert!(started.elapsed() < Duration::from_secs(30), "no delivery attempt during the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill9().await;
    receiver.down.store(false, Ordering::SeqCst);
    let server = Server::start(&lab).await;
    let started = Instant::now();
    loop {
        let accepted = receiver.accepted();
        if accepted.iter().filter(|(r, _)| r == &late).cloned().collect::<Vec<_>>()
            == expected(&late, "completed")
        {
            let earlier = accepted.iter().filter(|(r, _)| requests.contains(r)).count();
            assert_eq!(earlier, 2 * requests.len(), "earlier events sent again: {accepted:#?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not delivered after the restart: {accepted:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.hits().iter().all(|h| h.verified.is_ok()));
    drop(server);
}
