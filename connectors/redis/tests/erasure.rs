//! The Redis connector against a real server: keys by template and by
//! pattern, hash fields, set and sorted-set members, treatments, verify.
//! Each test works under a key prefix of its own (see `common`).

mod common;

use chrono::{Duration, Utc};
use common::{closed_port, directive, erase, id, task_with, Space};
use lethe_connector::{Connector, Erasure, StillWanted};
use lethe_connector_redis::RedisConnector;
use lethe_core::{Action, DatasetReport, Directive, RetainedReport};
use sha2::{Digest, Sha256};

fn report(counts: &[(&str, u64)]) -> Vec<DatasetReport> {
    counts.iter().map(|(d, n)| DatasetReport::new(*d, *n, 0)).collect()
}

const KEYS: &str = r#"
[[datasets]]
name = "sessions"
category = "web.session"
key = "P:session:{customer_id}"

[[datasets]]
name = "profiles"
category = "web.profile"
key = "P:profile:{email|sha256}"
"#;

#[tokio::test]
async fn key_templates_delete_the_subjects_keys_only() {
    let mut s = Space::new().await;
    let redis = s.connector(KEYS);
    let ada_hash = hex::encode(Sha256::digest(b"ada@example.com"));
    let bob_hash = hex::encode(Sha256::digest(b"bob@example.com"));
    s.set("P:session:C-1", "ada's session").await;
    s.set("P:session:C-7", "ada's other account").await;
    s.set(&format!("P:profile:{ada_hash}"), "ada").await;
    s.set("P:session:C-2", "bob's session").await;
    s.set(&format!("P:profile:{bob_hash}"), "bob").await;

    // Two customer ids and a differently written email for one subject.
    let ada = erase(
        vec![id("customer_id", "C-1"), id("customer_id", "C-7"), id("email", " Ada@Example.com")],
        &["web.session", "web.profile"],
    );
    assert_eq!(redis.verify(&ada).await.unwrap(), 3);
    let erased = redis.erase(&ada).await.unwrap();
    assert_eq!(
        erased,
        Erasure { datasets: report(&[("sessions", 2), ("profiles", 1)]), ..Default::default() }
    );

    let bob_profile = format!("profile:{bob_hash}");
    let mut expected = vec![bob_profile, "session:C-2".to_owned()];
    expected.sort();
    assert_eq!(s.keys().await, expected);

    // Nothing left; a second run finds nothing and says so.
    assert_eq!(redis.verify(&ada).await.unwrap(), 0);
    let again = redis.erase(&ada).await.unwrap();
    assert_eq!(again.datasets, report(&[("sessions", 0), ("profiles", 0)]));
    assert_eq!(again.total(), 0);
    s.cleanup().await;
}

#[tokio::test]
async fn patterns_cover_many_keys_across_scan_batches() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
batch_size = 100

[[datasets]]
name = "carts"
category = "shop.cart"
pattern = "P:cart:{customer_id}:*"
"#,
    );
    let ada_keys: Vec<String> = (0..2_500).map(|i| format!("P:cart:C-1:{i}")).collect();
    s.set_many(&ada_keys).await;
    // A subject whose id starts like Ada's, and a key without the separator.
    let others: Vec<String> =
        (0..10).map(|i| format!("P:cart:C-10:{i}")).chain(["P:cart:C-1".to_owned()]).collect();
    s.set_many(&others).await;

    let ada = erase(vec![id("customer_id", "C-1")], &["shop.cart"]);
    assert_eq!(redis.verify(&ada).await.unwrap(), 2_500);
    assert_eq!(redis.erase(&ada).await.unwrap().datasets, report(&[("carts", 2_500)]));
    assert_eq!(redis.verify(&ada).await.unwrap(), 0);
    let mut left: Vec<String> = others.iter().map(|k| k.trim_start_matches("P:").to_owned()).collect();
    left.sort();
    assert_eq!(s.keys().await, left);
    assert_eq!(redis.erase(&ada).await.unwrap().total(), 0);
    s.cleanup().await;
}

/// A legal hold placed while a pattern's scan runs: the check between
/// removals says the attempt is withdrawn, the scan stops, the datasets
/// after it are left alone, and the report says what went.
#[tokio::test]
async fn a_withdrawn_attempt_stops_scanning() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
batch_size = 100

[[datasets]]
name = "carts"
category = "shop.cart"
pattern = "P:cart:{customer_id}:*"

[[datasets]]
name = "sessions"
category = "web.session"
key = "P:session:{customer_id}"
"#,
    );
    let ada_keys: Vec<String> = (0..2_500).map(|i| format!("P:cart:C-1:{i}")).collect();
    s.set_many(&ada_keys).await;
    s.set("P:session:C-1", "ada's session").await;

    let mut ada = erase(vec![id("customer_id", "C-1")], &["shop.cart", "web.session"]);
    // Wanted for the first two checks.
    ada.wanted = StillWanted::withdrawn_after(2);
    let report = redis.erase(&ada).await.unwrap();
    assert!(ada.wanted.withdrawn());
    let removed = report.datasets[0].deleted;
    assert!(removed < 2_500, "{report:?}");
    assert_eq!(report.datasets.len(), 1, "sessions was not reached: {report:?}");
    let fresh = erase(vec![id("customer_id", "C-1")], &["shop.cart", "web.session"]);
    assert_eq!(redis.verify(&fresh).await.unwrap(), 2_500 - removed + 1);
    s.cleanup().await;
}

#[tokio::test]
async fn glob_characters_in_identifiers_match_only_themselves() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
[[datasets]]
name = "carts"
category = "shop.cart"
pattern = "P:cart:{customer_id}:*"
"#,
    );
    let ids = ["*", "C-?", "[C]-1", "C\\-2", "C-1"];
    for i in ids {
        s.set(&format!("P:cart:{i}:items"), "x").await;
    }
    s.set("P:cart:C-2:items", "x").await;
    s.set("P:cart:C-3:items", "x").await;

    for (n, value) in ["*", "C-?", "[C]-1", "C\\-2"].into_iter().enumerate() {
        let t = erase(vec![id("customer_id", value)], &["shop.cart"]);
        assert_eq!(redis.verify(&t).await.unwrap(), 1, "{value} counts only its own key");
        assert_eq!(redis.erase(&t).await.unwrap().total(), 1, "{value} deletes only its own key");
        assert!(!s.exists(&format!("P:cart:{value}:items")).await);
        assert_eq!(s.keys().await.len(), 7 - n - 1, "after {value}");
    }
    assert_eq!(s.keys().await, ["cart:C-1:items", "cart:C-2:items", "cart:C-3:items"]);
    s.cleanup().await;
}

const MEMBERS: &str = r#"
[[datasets]]
name = "loyalty"
category = "shop.loyalty"
hash = "P:loyalty:index"
field = "{email}"

[[datasets]]
name = "accounts"
category = "shop.loyalty"
hash = "P:user:{customer_id}"
field = "email"

[[datasets]]
name = "newsletter"
category = "marketing.newsletter"
set = "P:newsletter:subscribers"
member = "{email}"

[[datasets]]
name = "leaderboard"
category = "shop.loyalty"
zset = "P:leaderboard"
member = "{customer_id}"
"#;

async fn seed_members(s: &mut Space) {
    for (email, cid) in [("ada@example.com", "C-1"), ("bob@example.com", "C-2")] {
        s.hset("P:loyalty:index", email, "gold").await;
        s.hset(&format!("P:user:{cid}"), "email", email).await;
        s.hset(&format!("P:user:{cid}"), "plan", "basic").await;
        s.sadd("P:newsletter:subscribers", email).await;
        s.zadd("P:leaderboard", cid, 42.0).await;
    }
}

#[tokio::test]
async fn hash_fields_and_set_members_of_the_subject_go() {
    let mut s = Space::new().await;
    seed_members(&mut s).await;
    let redis = s.connector(MEMBERS);
    let ada = erase(
        vec![id("email", "ada@example.com"), id("customer_id", "C-1")],
        &["shop.loyalty", "marketing.newsletter"],
    );
    assert_eq!(redis.verify(&ada).await.unwrap(), 4);
    assert_eq!(
        redis.erase(&ada).await.unwrap().datasets,
        report(&[("loyalty", 1), ("accounts", 1), ("newsletter", 1), ("leaderboard", 1)])
    );
    assert!(!s.hexists("P:loyalty:index", "ada@example.com").await);
    assert!(!s.hexists("P:user:C-1", "email").await);
    assert!(s.hexists("P:user:C-1", "plan").await, "other fields of the hash stay");
    assert!(!s.sismember("P:newsletter:subscribers", "ada@example.com").await);
    assert_eq!(s.zscore("P:leaderboard", "C-1").await, None);

    assert!(s.hexists("P:loyalty:index", "bob@example.com").await);
    assert!(s.hexists("P:user:C-2", "email").await);
    assert!(s.sismember("P:newsletter:subscribers", "bob@example.com").await);
    assert_eq!(s.zscore("P:leaderboard", "C-2").await, Some(42.0));

    assert_eq!(redis.verify(&ada).await.unwrap(), 0);
    assert_eq!(redis.erase(&ada).await.unwrap().total(), 0);
    s.cleanup().await;
}

#[tokio::test]
async fn treatments_follow_the_directive_of_each_category() {
    let mut s = Space::new().await;
    seed_members(&mut s).await;
    s.set("P:session:C-1", "x").await;
    let redis = s.connector(&format!("{MEMBERS}{KEYS}"));
    let until = Utc::now() + Duration::days(365);
    let retain = Directive {
        category: "shop.loyalty".into(),
        action: Action::Retain,
        basis: Some("HGB §257".into()),
        period: None,
        cutoff: None,
        until: Some(until),
    };
    let ada_ids = || vec![id("email", "ada@example.com"), id("customer_id", "C-1")];

    // Loyalty retained, newsletter anonymised (deleted: Redis cannot
    // anonymise), sessions held, profiles without directive.
    let t = task_with(
        ada_ids(),
        vec![
            retain.clone(),
            directive("marketing.newsletter", Action::Anonymize),
            directive("web.session", Action::Hold),
        ],
    );
    let erased = redis.erase(&t).await.unwrap();
    assert_eq!(erased.datasets, report(&[("newsletter", 1)]));
    let kept = |dataset: &str, category: &str, count: u64, basis: &str, until| RetainedReport {
        dataset: dataset.into(),
        category: Some(category.into()),
        count,
        basis: basis.into(),
        until,
        first_until: None,
    };
    assert_eq!(
        erased.retained,
        vec![
            kept("loyalty", "shop.loyalty", 1, "HGB §257", Some(until)),
            kept("accounts", "shop.loyalty", 1, "HGB §257", Some(until)),
            kept("leaderboard", "shop.loyalty", 1, "HGB §257", Some(until)),
            kept("sessions", "web.session", 1, "legal obligation", None),
        ]
    );
    assert!(s.hexists("P:loyalty:index", "ada@example.com").await);
    assert!(s.exists("P:session:C-1").await);
    assert!(!s.sismember("P:newsletter:subscribers", "ada@example.com").await);
    // What is kept is not a residual.
    assert_eq!(redis.verify(&t).await.unwrap(), 0);

    // Once the retention has ended (as of the task), the data goes.
    let ended = Directive { until: Some(Utc::now() - Duration::days(1)), ..retain };
    let later = task_with(ada_ids(), vec![ended]);
    assert_eq!(redis.verify(&later).await.unwrap(), 3);
    let erased = redis.erase(&later).await.unwrap();
    assert_eq!(erased.datasets, report(&[("loyalty", 1), ("accounts", 1), ("leaderboard", 1)]));
    assert!(erased.retained.is_empty());
    assert!(s.exists("P:session:C-1").await, "no directive for sessions: untouched");
    s.cleanup().await;
}

#[tokio::test]
async fn verify_counts_what_is_left() {
    let mut s = Space::new().await;
    seed_members(&mut s).await;
    s.set("P:session:C-1", "x").await;
    let redis = s.connector(&format!("{MEMBERS}{KEYS}"));
    let ada = erase(
        vec![id("email", "ada@example.com"), id("customer_id", "C-1")],
        &["shop.loyalty", "marketing.newsletter", "web.session"],
    );
    assert_eq!(redis.verify(&ada).await.unwrap(), 5);
    // Data written after an erase (a new session) is a residual.
    redis.erase(&ada).await.unwrap();
    s.set("P:session:C-1", "new").await;
    s.sadd("P:newsletter:subscribers", "ada@example.com").await;
    assert_eq!(redis.verify(&ada).await.unwrap(), 2);
    s.cleanup().await;
}

#[tokio::test]
async fn a_dataset_without_the_tasks_identifier_types_is_left_alone() {
    let s = Space::new().await;
    // Nothing to do means no connection is needed: this server is down.
    let down = RedisConnector::new(s.config_at(&common::url_with_port(closed_port()), KEYS)).unwrap();
    let t = erase(vec![id("phone", "+44 20 7946 0958")], &["web.session", "web.profile"]);
    let erased = down.erase(&t).await.unwrap();
    assert_eq!(erased.datasets, ["sessions", "profiles"].map(DatasetReport::unsearched));
    assert_eq!(down.verify(&t).await.unwrap(), 0);
    // Kept, it is not searched either: what it keeps is not known.
    let kept = Directive {
        basis: Some("contract".into()),
        until: Some(Utc::now() + Duration::days(30)),
        ..directive("web.session", Action::Retain)
    };
    let t = task_with(vec![id("phone", "+44 20 7946 0958")], vec![kept]);
    let erased = down.erase(&t).await.unwrap();
    assert_eq!((erased.datasets, erased.retained), (vec![DatasetReport::unsearched("sessions")], vec![]));
    s.cleanup().await;
}

#[tokio::test]
async fn what_a_kept_dataset_names_survives_an_erased_dataset_that_names_it_too() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
[[datasets]]
name = "users"
category = "web.profile"
key = "P:user:{customer_id}"

[[datasets]]
name = "carts"
category = "web.session"
pattern = "P:cart:{customer_id}:*"

[[datasets]]
name = "loyalty"
category = "shop.loyalty"
hash = "P:user:{customer_id}"
field = "loyalty"

[[datasets]]
name = "saved"
category = "shop.loyalty"
key = "P:cart:{customer_id}:saved"
"#,
    );
    s.hset("P:user:C-1", "loyalty", "gold").await;
    s.hset("P:user:C-1", "plan", "basic").await;
    s.set("P:cart:C-1:open", "x").await;
    s.set("P:cart:C-1:saved", "x").await;
    s.hset("P:user:C-2", "loyalty", "gold").await;
    let ada = || vec![id("customer_id", "C-1")];

    // Loyalty data is under a legal hold: the user hash that holds the
    // loyalty field is not removed whole, nor the saved cart the pattern
    // also matches.
    let held = task_with(
        ada(),
        vec![
            directive("web.profile", Action::Erase),
            directive("web.session", Action::Erase),
            directive("shop.loyalty", Action::Hold),
        ],
    );
    let erased = redis.erase(&held).await.unwrap();
    assert_eq!(erased.datasets, report(&[("users", 0), ("carts", 1)]));
    let kept: Vec<(&str, u64)> = erased.retained.iter().map(|r| (r.dataset.as_str(), r.count)).collect();
    assert_eq!(kept, [("loyalty", 1), ("saved", 1)]);
    assert!(s.hexists("P:user:C-1", "loyalty").await);
    assert!(s.exists("P:cart:C-1:saved").await);
    assert!(!s.exists("P:cart:C-1:open").await);
    assert_eq!(redis.verify(&held).await.unwrap(), 0, "what is held is not a residual");

    // Once the hold is gone, everything of the subject goes.
    let all = erase(ada(), &["web.profile", "web.session", "shop.loyalty"]);
    // The saved cart counts in both datasets that name it.
    assert_eq!(redis.verify(&all).await.unwrap(), 4);
    assert_eq!(redis.erase(&all).await.unwrap().total(), 2, "the user hash and the saved cart");
    assert_eq!(redis.verify(&all).await.unwrap(), 0);
    assert_eq!(s.keys().await, ["user:C-2"]);
    s.cleanup().await;
}

#[tokio::test]
async fn a_value_holding_a_patterns_separator_is_refused() {
    let mut s = Space::new().await;
    let redis = s.connector(
        r#"
[[datasets]]
name = "carts"
category = "shop.cart"
pattern = "P:cart:{customer_id}:*"
"#,
    );
    s.set("P:cart:acme:1", "x").await;
    s.set("P:cart:acme:eu:1", "x").await;
    // `cart:acme:eu:*` would also match customer acme's key `cart:acme:eu:1`.
    let t = erase(vec![id("customer_id", "acme:eu")], &["shop.cart"]);
    for e in [redis.erase(&t).await.unwrap_err(), redis.verify(&t).await.unwrap_err()] {
        assert!(!e.retryable, "{e:?}");
        assert!(e.message.contains("carts") && e.message.contains("customer_id"), "{}", e.message);
        assert!(e.message.contains("':'") && !e.message.contains("acme"), "{}", e.message);
    }
    assert_eq!(s.keys().await, ["cart:acme:1", "cart:acme:eu:1"], "nothing deleted");
    s.cleanup().await;
}
