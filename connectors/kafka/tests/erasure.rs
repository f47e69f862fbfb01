//! The Kafka compacted-topic connector against a real broker (see `common`):
//! tombstones land where the subject's values are and nowhere else, a second
//! erase writes nothing, the compaction figures are reported with their
//! source, treatments are followed, errors are classified, and an attempt
//! withdrawn while the topics are read writes nothing.

mod common;

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use common::*;
use lethe_connector::{Connector, Erasure};
use lethe_connector_kafka::{Compaction, DatasetConfig, Figure, KafkaConnector, Source};
use lethe_core::{Action, DatasetReport, Directive, RetainedReport};

/// The erasure without its purge dates, which are checked on their own.
fn undated(mut erasure: Erasure) -> Erasure {
    for d in &mut erasure.datasets {
        d.purge_by = None;
    }
    erasure
}

fn deleted(dataset: &str, n: u64) -> DatasetReport {
    DatasetReport::new(dataset, n, 0)
}

/// A subject id unique to this run.
fn subject(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

#[tokio::test]
async fn erases_the_subjects_keys_and_nothing_else() {
    let topic = compacted_topic("profiles", 3).await;
    let (ada, bob, carol) = (subject("ada"), subject("bob"), subject("carol"));
    let (ka, kb, kc) = (format!("customer:{ada}"), format!("customer:{bob}"), format!("customer:{carol}"));
    // Ada's key on two partitions, as when producers with different
    // partitioners wrote the topic; Carol was erased before.
    produce(
        &topic,
        &[
            (&ka, Some(0), Some("ada v1")),
            (&kb, Some(0), Some("bob v1")),
            (&ka, Some(0), Some("ada v2")),
            (&ka, Some(2), Some("ada from another producer")),
            (&kb, Some(1), Some("bob elsewhere")),
            (&kc, Some(1), Some("carol v1")),
            (&kc, Some(1), None),
            ("unrelated", None, Some("x")),
        ],
    )
    .await;
    let before = latest(&topic);
    let kafka = connector(vec![dataset("profiles", "identity.profile", &topic, "customer:{customer_id}")]);
    let erase_ada = erase_customer(&ada, &["identity.profile"]);

    assert_eq!(kafka.verify(&erase_ada).await.unwrap(), 2, "Ada's key is live in two partitions");
    let erased = undated(kafka.erase(&erase_ada).await.unwrap());
    assert_eq!(erased, Erasure { datasets: vec![deleted("profiles", 2)], retained: vec![] });

    // A consumer of our own sees tombstones as the latest records of Ada's
    // key, where her values were, and everything else as it was.
    let after = latest(&topic);
    let mut expected = before.clone();
    expected.insert((ka.clone(), 0), None);
    expected.insert((ka.clone(), 2), None);
    assert_eq!(after, expected);
    assert_eq!(after[&(kb.clone(), 0)].as_deref(), Some("bob v1"));
    assert_eq!(after[&(kc.clone(), 1)], None, "Carol's earlier tombstone is untouched");

    assert_eq!(kafka.verify(&erase_ada).await.unwrap(), 0);
    let erase_bob = erase_customer(&bob, &["identity.profile"]);
    assert_eq!(kafka.verify(&erase_bob).await.unwrap(), 2, "Bob's values are still there");
    let erase_carol = erase_customer(&carol, &["identity.profile"]);
    assert_eq!(kafka.verify(&erase_carol).await.unwrap(), 0);

    // Idempotent: a second erase finds only tombstones and writes nothing.
    let records = record_count(&topic);
    let again = undated(kafka.erase(&erase_ada).await.unwrap());
    assert_eq!(again, Erasure { datasets: vec![deleted("profiles", 0)], retained: vec![] });
    assert_eq!(record_count(&topic), records, "no record was written");
    assert_eq!(latest(&topic), expected);
}

#[tokio::test]
async fn reports_when_the_data_physically_disappears() {
    let topic = compacted_topic("purge", 1).await;
    let ada = subject("ada");
    let key = format!("customer:{ada}");
    produce(&topic, &[(&key, None, Some("ada"))]).await;
    // Declared values that differ from the topic's: used only if the broker
    // does not describe the topic.
    let declared = DatasetConfig {
        max_compaction_lag_ms: Some(7_200_000),
        delete_retention_ms: Some(60_000),
        ..dataset("profiles", "identity.profile", &topic, "customer:{customer_id}")
    };
    let kafka = connector(vec![declared]);
    let task = erase_customer(&ada, &["identity.profile"]);

    let started = Utc::now();
    let detailed = kafka.erase_detailed(&task).await.unwrap();
    let finished = Utc::now();
    assert_eq!(undated(detailed.erasure.clone()).datasets, vec![deleted("profiles", 1)]);
    let [purge] = detailed.purges.as_slice() else { panic!("one purge expected: {:?}", detailed.purges) };
    assert_eq!(
        (purge.dataset.as_str(), purge.topic.as_str(), purge.tombstones),
        ("profiles", topic.as_str(), 1)
    );
    let p = purge.purge;
    assert_eq!(detailed.erasure.datasets[0].purge_by, p.tombstones_by, "the outcome says when all is gone");
    assert!(started <= p.written_at && p.written_at <= finished, "written when the broker acknowledged");

    // The figures come from the broker when it answers DescribeConfigs,
    // else from the declaration; both are checked against a direct call.
    let broker = describe(&topic).await;
    let (lag, retention) = match broker.get("max.compaction.lag.ms") {
        Some(lag) => {
            assert_eq!(p.figures.max_compaction_lag.source, Source::Broker);
            assert_eq!(lag, &LAG_MS.to_string(), "the broker describes the value the topic was created with");
            (LAG_MS as i64, RETENTION_MS as i64)
        }
        None => {
            assert_eq!(p.figures.max_compaction_lag.source, Source::Declared);
            assert_eq!(p.figures.delete_retention.source, Source::Declared);
            (7_200_000, 60_000)
        }
    };
    assert_eq!(p.values_by, Some(p.written_at + Duration::milliseconds(lag)));
    assert_eq!(p.tombstones_by, Some(p.written_at + Duration::milliseconds(lag + retention)));
    assert!(p.describe().contains("tombstones removed by"));

    // A second erase writes nothing, and still says when the earlier
    // tombstone's data disappears, counted from that tombstone.
    let again = kafka.erase_detailed(&task).await.unwrap();
    assert_eq!(undated(again.erasure.clone()).datasets, vec![deleted("profiles", 0)]);
    let [purge] = again.purges.as_slice() else { panic!("one purge expected: {:?}", again.purges) };
    assert_eq!(again.erasure.datasets[0].purge_by, purge.purge.tombstones_by);
    assert_eq!(purge.tombstones, 0);
    assert!(purge.purge.written_at <= p.written_at);
    assert!(purge.purge.written_at >= started - Duration::seconds(5), "the tombstone's own timestamp");
}

/// The figure a dataset should report for `setting`, by a direct
/// DescribeConfigs call: the broker's value when it gives one (Kafka's
/// `Long.MAX_VALUE` meaning no bound), else the declared one, else unknown.
fn expected(broker: &BTreeMap<String, String>, setting: &str, declared: Option<u64>) -> Figure {
    match (broker.get(setting), declared) {
        (Some(v), _) => {
            let ms: u64 = v.parse().unwrap();
            Figure { ms: (ms < i64::MAX as u64).then_some(ms), source: Source::Broker }
        }
        (None, Some(ms)) => Figure { ms: Some(ms), source: Source::Declared },
        (None, None) => Figure::UNKNOWN,
    }
}

#[tokio::test]
async fn falls_back_to_declared_figures_where_the_broker_gives_none() {
    // A compacted topic created without the two settings: a broker that
    // describes defaults reports its defaults, one that describes only what
    // was set says nothing about them, and the declaration is used.
    let topic = unique("undeclared");
    create_topic(&topic, 1, &[("cleanup.policy", "compact")]).await;
    let broker = describe(&topic).await;
    for (lag, retention) in [(Some(7_200_000), Some(60_000)), (None, None)] {
        let ada = subject("ada");
        let key = format!("customer:{ada}");
        produce(&topic, &[(&key, None, Some("ada"))]).await;
        let kafka = connector(vec![DatasetConfig {
            max_compaction_lag_ms: lag,
            delete_retention_ms: retention,
            ..dataset("profiles", "identity.profile", &topic, "customer:{customer_id}")
        }]);
        let erased = kafka.erase_detailed(&erase_customer(&ada, &["identity.profile"])).await.unwrap();
        let p = erased.purges[0].purge;
        let figures = Compaction {
            max_compaction_lag: expected(&broker, "max.compaction.lag.ms", lag),
            delete_retention: expected(&broker, "delete.retention.ms", retention),
        };
        assert_eq!(p.figures, figures, "declared {lag:?}/{retention:?}, broker {broker:?}");
        assert_eq!(p, figures.purge(p.written_at));
        if figures.max_compaction_lag.ms.is_none() {
            assert_eq!((p.values_by, p.tombstones_by), (None, None), "no bound is claimed");
            assert!(p.describe().contains("no bound"));
        }
    }
}

#[tokio::test]
async fn follows_the_treatment_of_each_category() {
    let profiles = compacted_topic("profiles", 2).await;
    let invoices = compacted_topic("invoices", 2).await;
    let prefs = compacted_topic("prefs", 1).await;
    let ada = subject("ada");
    let email = format!("{ada}@example.com");
    let (kp, ki) = (format!("customer:{ada}"), format!("invoice-owner:{ada}"));
    produce(&profiles, &[(&kp, Some(1), Some("profile"))]).await;
    produce(&invoices, &[(&ki, Some(0), Some("inv 1")), (&ki, Some(1), Some("inv 2"))]).await;
    produce(&prefs, &[(&email, None, Some("newsletter"))]).await;
    let kafka = connector(vec![
        dataset("profiles", "identity.profile", &profiles, "customer:{customer_id}"),
        dataset("invoices", "billing.invoice", &invoices, "invoice-owner:{customer_id}"),
        dataset("preferences", "marketing.preferences", &prefs, "{email}"),
        dataset("devices", "identity.device", &profiles, "device:{device_id}"),
    ]);
    let until = Utc::now() + Duration::days(3650);
    let task = task(
        vec![id("customer_id", &ada), id("email", &email)],
        vec![
            directive("identity.profile", Action::Anonymize),
            Directive {
                basis: Some("tax law".into()),
                until: Some(until),
                ..directive("billing.invoice", Action::Retain)
            },
            directive("identity.device", Action::Erase),
        ],
    );

    let erased = undated(kafka.erase(&task).await.unwrap());
    assert_eq!(
        erased,
        Erasure {
            // Anonymising a log record is deleting it; the devices dataset
            // needs a device id the task does not carry: not searched.
            datasets: vec![deleted("profiles", 1), DatasetReport::unsearched("devices")],
            retained: vec![RetainedReport {
                dataset: "invoices".into(),
                category: Some("billing.invoice".into()),
                count: 2,
                basis: "tax law".into(),
                until: Some(until),
                first_until: None,
            }],
        }
    );
    assert_eq!(latest(&profiles)[&(kp, 1)], None);
    assert!(latest(&invoices).values().all(Option::is_some), "kept invoices are untouched");
    assert_eq!(latest(&prefs)[&(email.clone(), 0)].as_deref(), Some("newsletter"), "no directive: untouched");
    assert_eq!(kafka.verify(&task).await.unwrap(), 0, "kept and untouched data is not residue");

    // Once the retention has ended, the invoices go too.
    let mut later = task.clone();
    later.issued_at = until + Duration::days(1);
    let erased = undated(kafka.erase(&later).await.unwrap());
    assert_eq!(
        erased.datasets,
        vec![deleted("profiles", 0), deleted("invoices", 2), DatasetReport::unsearched("devices")]
    );
    assert!(erased.retained.is_empty());
    assert!(latest(&invoices).values().all(Option::is_none));
}

#[tokio::test]
async fn a_key_that_a_kept_dataset_shares_is_kept() {
    // One topic, two datasets with the same keys: the profile is to be
    // erased, the identity check is under a legal hold. A tombstone would
    // erase both, so the key is kept and reported as kept.
    let topic = compacted_topic("shared", 1).await;
    let ada = subject("ada");
    let key = format!("customer:{ada}");
    produce(&topic, &[(&key, None, Some("profile and kyc"))]).await;
    let kafka = connector(vec![
        dataset("profiles", "identity.profile", &topic, "customer:{customer_id}"),
        dataset("identity-checks", "compliance.kyc", &topic, "customer:{customer_id}"),
    ]);
    let task = task(
        vec![id("customer_id", &ada)],
        vec![
            directive("identity.profile", Action::Erase),
            Directive { basis: Some("case 7".into()), ..directive("compliance.kyc", Action::Hold) },
        ],
    );
    let erased = undated(kafka.erase(&task).await.unwrap());
    assert_eq!(erased.datasets, vec![deleted("profiles", 0)]);
    assert_eq!(
        erased.retained,
        vec![RetainedReport {
            dataset: "identity-checks".into(),
            category: Some("compliance.kyc".into()),
            count: 1,
            basis: "case 7".into(),
            until: None,
            first_until: None,
        }]
    );
    assert_eq!(latest(&topic)[&(key, 0)].as_deref(), Some("profile and kyc"));
    assert_eq!(kafka.verify(&task).await.unwrap(), 0);
}

#[tokio::test]
async fn unreachable_brokers_are_retryable() {
    let mut config =
        config(vec![dataset("profiles", "identity.profile", "profiles", "customer:{customer_id}")]);
    config.brokers = "127.0.0.1:1".into();
    config.timeout_ms = 2_000;
    let kafka = KafkaConnector::new(config).unwrap();
    let task = erase_customer("c-1", &["identity.profile"]);
    for (call, result) in [
        ("erase", kafka.erase(&task).await.map(|_| ())),
        ("verify", kafka.verify(&task).await.map(|_| ())),
        ("health", kafka.health().await),
    ] {
        let e = result.expect_err(call);
        assert!(e.retryable, "{call}: {e}");
        assert!(!e.message.contains("c-1"), "{call}: {e}");
    }
}

#[tokio::test]
async fn a_missing_topic_is_permanent() {
    let topic = compacted_topic("present", 1).await;
    let missing = unique("missing");
    let kafka = connector(vec![
        dataset("present", "identity.profile", &topic, "customer:{customer_id}"),
        dataset("missing", "identity.profile", &missing, "customer:{customer_id}"),
    ]);
    let task = erase_customer("c-1", &["identity.profile"]);
    for (call, result) in [
        ("erase", kafka.erase(&task).await.map(|_| ())),
        ("verify", kafka.verify(&task).await.map(|_| ())),
        ("health", kafka.health().await),
    ] {
        let e = result.expect_err(call);
        assert!(!e.retryable, "{call}: {e}");
        assert!(e.message.contains(&missing) && e.message.contains("does not exist"), "{call}: {e}");
    }
    let present = connector(vec![dataset("present", "identity.profile", &topic, "customer:{customer_id}")]);
    present.health().await.unwrap();
    // Each call above asked for the missing topic's metadata and found it
    // still missing: asking does not create it.
}

#[tokio::test]
async fn a_topic_that_is_not_compacted_is_refused_where_the_broker_says_so() {
    let topic = unique("plain");
    create_topic(&topic, 1, &[("cleanup.policy", "delete")]).await;
    let ada = subject("ada");
    let key = format!("customer:{ada}");
    produce(&topic, &[(&key, None, Some("ada"))]).await;
    let kafka = connector(vec![dataset("profiles", "identity.profile", &topic, "customer:{customer_id}")]);
    let task = erase_customer(&ada, &["identity.profile"]);
    if describe(&topic).await.get("cleanup.policy").map(String::as_str) == Some("delete") {
        let e = kafka.health().await.unwrap_err();
        assert!(!e.retryable && e.message.contains("not compacted"), "{e}");
        let e = kafka.erase(&task).await.unwrap_err();
        assert!(!e.retryable && e.message.contains("not compacted"), "{e}");
        assert_eq!(latest(&topic)[&(key, 0)].as_deref(), Some("ada"), "nothing was written");
    } else {
        // A broker that does not describe topics cannot tell; the topic is
        // then taken as declared.
        kafka.health().await.unwrap();
    }
}

#[tokio::test]
async fn a_task_without_the_keys_identifier_type_does_not_search_the_dataset() {
    let topic = compacted_topic("profiles", 1).await;
    let kafka = connector(vec![dataset("profiles", "identity.profile", &topic, "customer:{customer_id}")]);
    let only_email =
        task(vec![id("email", "someone@example.com")], vec![directive("identity.profile", Action::Erase)]);
    let unsearched = Erasure { datasets: vec![DatasetReport::unsearched("profiles")], retained: vec![] };
    assert_eq!(undated(kafka.erase(&only_email).await.unwrap()), unsearched);
    assert_eq!(kafka.verify(&only_email).await.unwrap(), 0);
    assert!(latest(&topic).is_empty());
}

#[tokio::test]
async fn a_withdrawn_attempt_writes_no_tombstone() {
    let topic = compacted_topic("withdrawn", 1).await;
    let ada = subject("ada");
    let key = format!("customer:{ada}");
    produce(&topic, &[(&key, Some(0), Some("ada v1"))]).await;
    let before = latest(&topic);
    let records = record_count(&topic);
    let kafka = connector(vec![dataset("profiles", "identity.profile", &topic, "customer:{customer_id}")]);

    // A legal hold placed while the topic is read: the coordinator no
    // longer asks for the attempt when the tombstones would go out.
    let mut erase_ada = erase_customer(&ada, &["identity.profile"]);
    erase_ada.wanted = lethe_connector::StillWanted::withdrawn_after(0);
    assert_eq!(kafka.erase(&erase_ada).await.unwrap(), Erasure::default());
    assert!(erase_ada.wanted.withdrawn());
    assert_eq!(record_count(&topic), records, "no record was written");
    assert_eq!(latest(&topic), before);
    assert_eq!(kafka.verify(&erase_ada).await.unwrap(), 1, "Ada's value is still there");
}
