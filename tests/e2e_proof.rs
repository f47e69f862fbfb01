//! Proof against the real binary: `lethe audit verify` finds an audit event
//! that was edited, deleted or reordered in the database (SQLite and
//! PostgreSQL state), and an erasure certificate verifies with the public
//! key alone, fails after any change, and survives a key rotation.

mod support;

use serde_json::Value;
use sqlx::{Connection, Executor};
use support::{ada_and_neighbours, describe, lethe, Lab, Server, StateKind};

/// Runs `lethe audit verify` on the lab's store.
async fn audit_verify(lab: &Lab) -> std::process::Output {
    let config = lab.config.display().to_string();
    let mut cmd = tokio::process::Command::new(support::LETHE);
    cmd.args(["audit", "verify", "--config", &config]).current_dir(lab.root()).envs(lab.child_env());
    cmd.env("LETHE_LOG", "warn").env("NO_COLOR", "1");
    cmd.output().await.expect("run lethe audit verify")
}

/// Runs SQL against the lab's state store as someone with write access to
/// the database would, switching off the append-only triggers first.
async fn tamper(lab: &Lab, sql: &[&str]) {
    match &lab.state_db {
        Some(db) => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only").await.unwrap();
            for s in sql {
                conn.execute(*s).await.unwrap();
            }
            conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only").await.unwrap();
        }
        None => {
            let url = format!("sqlite://{}", lab.state_file.display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let triggers: Vec<(String, String)> = sqlx::query_as(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_events'",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            for (name, _) in &triggers {
                conn.execute(format!("DROP TRIGGER {name}").as_str()).await.unwrap();
            }
            for s in sql {
                conn.execute(*s).await.unwrap();
            }
            for (_, create) in &triggers {
                conn.execute(create.as_str()).await.unwrap();
            }
        }
    }
}

async fn audit_tampering_is_found(state: StateKind) {
    let lab = Lab::new(state, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;
    let answer = server.submit(serde_json::json!({"email": "ada@example.com"})).await;
    server.wait_final(answer["id"].as_str().unwrap()).await;
    let out = audit_verify(&lab).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit trail intact"), "{}", describe(&out));
    drop(server);

    // Edited: event 2's time moves by a millisecond; the chain names it.
    tamper(&lab, &["UPDATE audit_events SET at = at + 1 WHERE seq = 2"]).await;
    let out = audit_verify(&lab).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken at event 2") && err.contains("edited"), "{}", describe(&out));
    tamper(&lab, &["UPDATE audit_events SET at = at - 1 WHERE seq = 2"]).await;
    assert!(audit_verify(&lab).await.status.success(), "restored");

    // Reordered: events 3 and 4 swap places.
    tamper(
        &lab,
        &[
            "UPDATE audit_events SET seq = -3 WHERE seq = 3",
            "UPDATE audit_events SET seq = 3 WHERE seq = 4",
            "UPDATE audit_events SET seq = 4 WHERE seq = -3",
        ],
    )
    .await;
    let out = audit_verify(&lab).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("broken at event 3"), "{}", describe(&out));
    assert!(err.contains("removed or reordered"), "{}", describe(&out));
    tamper(
        &lab,
        &[
            "UPDATE audit_events SET seq = -3 WHERE seq = 3",
            "UPDATE audit_events SET seq = 3 WHERE seq = 4",
            "UPDATE audit_events SET seq = 4 WHERE seq = -3",
        ],
    )
    .await;
    assert!(audit_verify(&lab).await.status.success(), "restored");

    // Deleted: event 5 disappears.
    tamper(&lab, &["DELETE FROM audit_events WHERE seq = 5"]).await;
    let out = audit_verify(&lab).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("broken at event 5") && err.contains("missing"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tampering_is_found_on_sqlite() {
    audit_tampering_is_found(StateKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tampering_is_found_on_postgres() {
    audit_tampering_is_found(StateKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_verify_with_the_public_key_alone() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;
    let cwd = lab.root();
    let base = server.base.as_str();
    let answer = server.submit(serde_json::json!({"email": "ada@example.com"})).await;
    let id = answer["id"].as_str().unwrap().to_owned();
    server.wait_final(&id).await;

    let out = lethe(&["certificate", "get", &id, "--server", base], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let cert_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let cert: Value = serde_json::from_str(&cert_text).unwrap();
    assert_eq!(cert["payload"]["request_id"], id.as_str());
    assert_eq!(cert["payload"]["status"], "completed");
    assert!(cert["payload"]["systems"].as_array().unwrap().len() == 2, "{cert:#}");
    for person in &lab.people {
        assert!(!cert_text.to_ascii_lowercase().contains(&person.email), "no identifier: {cert_text}");
    }
    let cert_file = cwd.join("certificate.json");
    std::fs::write(&cert_file, &cert_text).unwrap();

    // The public keys need no token.
    let keys = support::plain_http_client().get(server.url("/v1/keys/certificate")).send().await.unwrap();
    assert_eq!(keys.status(), 200);
    let keys_file = cwd.join("keys.json");
    std::fs::write(&keys_file, keys.text().await.unwrap()).unwrap();

    // Verification is offline: no server address, no token.
    let verify = |file: &std::path::Path, keys: &std::path::Path| {
        let (file, keys) = (file.display().to_string(), keys.display().to_string());
        async move {
            let mut cmd = tokio::process::Command::new(support::LETHE);
            cmd.args(["certificate", "verify", &file, "--keys", &keys, "--server", "http://127.0.0.1:9"]);
            cmd.env_remove("LETHE_TOKEN").output().await.unwrap()
        }
    };
    let out = verify(&cert_file, &keys_file).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("certificate valid"), "{}", describe(&out));

    // One changed byte anywhere in what is certified fails.
    let tampered = cert_text.replacen("\"completed\"", "\"completex\"", 1);
    assert_ne!(tampered, cert_text);
    let bad_file = cwd.join("tampered.json");
    std::fs::write(&bad_file, &tampered).unwrap();
    let out = verify(&bad_file, &keys_file).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature does not match"), "{}", describe(&out));
    let deleted = cert_text.replacen("\"deleted\": 4", "\"deleted\": 5", 1);
    assert_ne!(deleted, cert_text, "the newsletter erased four e-mail events");
    std::fs::write(&bad_file, &deleted).unwrap();
    assert!(!verify(&bad_file, &keys_file).await.status.success());

    // Rotation: a new key signs from now on; the old certificate still
    // verifies with the published keys.
    drop(server);
    let config = lab.config.display().to_string();
    let mut cmd = tokio::process::Command::new(support::LETHE);
    cmd.args(["certificate", "rotate-key", "--config", &config]).current_dir(cwd).envs(lab.child_env());
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let server = Server::start(&lab).await;
    let keys: Value =
        server.http.get(server.url("/v1/keys/certificate")).send().await.unwrap().json().await.unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2, "{keys}");
    std::fs::write(&keys_file, keys.to_string()).unwrap();
    assert!(verify(&cert_file, &keys_file).await.status.success(), "the old certificate still verifies");
    let newer: Value = server
        .http
        .get(server.url(&format!("/v1/requests/{id}/certificate")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(newer["signature"]["key_id"], cert["signature"]["key_id"]);
    assert_eq!(newer["signature"]["key_id"], keys["keys"][0]["key_id"]);
}
