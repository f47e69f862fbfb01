//! Failures against a real server, and at unreachable or silent addresses:
//! each is classified retryable or permanent, and no message names a key.

mod common;

use common::{closed_port, erase, id, url_with_port, Space};
use lethe_connector::{Connector, ConnectorError};
use lethe_connector_redis::RedisConnector;

const SESSIONS: &str = r#"
[[datasets]]
name = "sessions"
category = "web.session"
key = "P:session:{email}"
"#;

const EMAIL: &str = "secret.subject@example.com";

fn assert_clean(e: &ConnectorError, prefix: &str) {
    let text = format!("{e} {e:?}");
    assert!(!text.contains("secret.subject"), "identifier in {text}");
    assert!(!text.contains(prefix), "key in {text}");
}

#[tokio::test]
async fn an_unreachable_server_is_retryable() {
    let s = Space::new().await;
    let redis = RedisConnector::new(s.config_at(&url_with_port(closed_port()), SESSIONS)).unwrap();
    let t = erase(vec![id("email", EMAIL)], &["web.session"]);
    for e in [
        redis.erase(&t).await.unwrap_err(),
        redis.verify(&t).await.unwrap_err(),
        redis.health().await.unwrap_err(),
    ] {
        assert!(e.retryable, "{e}");
        assert_eq!(e.message, "connecting failed: connection refused");
        assert_clean(&e, &s.prefix);
    }
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_retryably() {
    let s = Space::new().await;
    // Accepts connections and reads nothing back.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let config = format!("timeout_secs = 1\n{SESSIONS}");
    let redis = RedisConnector::new(s.config_at(&url_with_port(port), &config)).unwrap();
    let started = std::time::Instant::now();
    let e = redis.health().await.unwrap_err();
    assert!(e.retryable, "{e}");
    assert!(e.message.contains("timed out"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    silent.abort();
}

#[tokio::test]
async fn a_key_of_another_type_is_permanent() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
[[datasets]]
name = "loyalty"
category = "shop.loyalty"
hash = "P:loyalty:{email}"
field = "points"
"#,
    );
    // The subject's "hash" is a plain string.
    s.set(&format!("P:loyalty:{EMAIL}"), "100").await;
    let t = erase(vec![id("email", EMAIL)], &["shop.loyalty"]);
    for e in [redis.erase(&t).await.unwrap_err(), redis.verify(&t).await.unwrap_err()] {
        assert!(!e.retryable, "{e}");
        assert!(e.message.contains("dataset loyalty") && e.message.contains("WRONGTYPE"), "{e}");
        assert_clean(&e, &s.prefix);
    }
    assert!(s.exists(&format!("P:loyalty:{EMAIL}")).await, "nothing else was done to it");
    // The connection is still good for the next call.
    redis.health().await.unwrap();
    s.cleanup().await;
}

#[tokio::test]
async fn health_checks_the_type_of_fixed_collection_keys() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
[[datasets]]
name = "newsletter"
category = "marketing.newsletter"
set = "P:newsletter"
member = "{email}"
"#,
    );
    redis.health().await.expect("a missing key is fine");
    s.sadd("P:newsletter", "someone@example.com").await;
    redis.health().await.expect("a set is what is declared");
    s.del("P:newsletter").await;
    s.hset("P:newsletter", "f", "v").await;
    let e = redis.health().await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "health check on dataset newsletter failed: its key holds a hash, not a set");
    s.cleanup().await;
}

#[tokio::test]
async fn bad_credentials_and_databases_are_permanent() {
    let s = Space::new().await;
    let base = common::url();
    let (scheme, rest) = base.split_once("://").unwrap();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let wrong_password = format!("{scheme}://nobody:wrong-password@{rest}");
    let authority = rest.split('/').next().unwrap();
    let no_such_db = format!("{scheme}://{authority}/9999");
    let t = erase(vec![id("email", EMAIL)], &["web.session"]);
    for url in [wrong_password, no_such_db] {
        let redis = RedisConnector::new(s.config_at(&url, SESSIONS)).unwrap();
        for e in [redis.erase(&t).await.unwrap_err(), redis.health().await.unwrap_err()] {
            assert!(!e.retryable, "{e}");
            assert!(e.message.starts_with("connecting failed: "), "{e}");
            assert!(!e.message.contains("wrong-password"), "{e}");
            assert_clean(&e, &s.prefix);
        }
    }
}

#[tokio::test]
async fn configuration_errors_are_permanent() {
    let s = Space::new().await;
    let bad = s.config(
        r#"
[[datasets]]
name = "everyone"
category = "web.session"
key = "P:global"
"#,
    );
    let e = RedisConnector::new(bad).unwrap_err();
    assert!(!e.retryable);
    assert!(e.message.contains("no identifier placeholder"), "{e}");
}
