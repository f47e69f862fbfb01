//! The conformance kit against the Kafka compacted-topic connector on a real
//! broker: two datasets (keyed by customer id and by email) on two
//! compacted topics; faults: brokers out of reach (retryable) and a missing
//! topic (permanent).

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::Connector;
use lethe_connector_kafka::KafkaConnector;
use lethe_core::Identifier;

struct Topics {
    profiles: String,
    preferences: String,
}

#[async_trait]
impl Fixture for Topics {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let mut subjects = Vec::new();
        for _ in 0..2 {
            let customer = format!("c-{}", uuid::Uuid::new_v4().simple());
            let email = format!("{customer}@example.com");
            let key = format!("customer:{customer}");
            produce(&self.profiles, &[(&key, None, Some("v1")), (&key, None, Some("v2"))]).await;
            produce(&self.preferences, &[(&email, None, Some("newsletter"))]).await;
            subjects.push(vec![id("customer_id", &customer), id("email", &email)]);
        }
        let [a, b]: [Vec<Identifier>; 2] = subjects.try_into().map_err(|_| "two subjects".to_owned())?;
        Ok([a, b])
    }

    async fn faults(&self) -> Vec<Fault> {
        let mut unreachable = config(datasets(&self.profiles, &self.preferences));
        unreachable.brokers = "127.0.0.1:1".into();
        unreachable.timeout_ms = 2_000;
        let missing = config(datasets(&self.profiles, &unique("missing")));
        let build = |c| Arc::new(KafkaConnector::new(c).expect("connector")) as Arc<dyn Connector>;
        vec![
            Fault { name: "brokers out of reach".into(), connector: build(unreachable), retryable: true },
            Fault { name: "missing topic".into(), connector: build(missing), retryable: false },
        ]
    }
}

fn datasets(profiles: &str, preferences: &str) -> Vec<lethe_connector_kafka::DatasetConfig> {
    vec![
        dataset("profiles", "identity.profile", profiles, "customer:{customer_id}"),
        dataset("preferences", "marketing.preferences", preferences, "{email}"),
    ]
}

#[tokio::test]
async fn passes_the_conformance_kit() {
    let topics = Topics {
        profiles: compacted_topic("kit-profiles", 3).await,
        preferences: compacted_topic("kit-prefs", 2).await,
    };
    let kafka = Arc::new(connector(datasets(&topics.profiles, &topics.preferences)));
    Kit::new(kafka, vec!["identity.profile".into(), "marketing.preferences".into()])
        .with_fixture(topics)
        .run()
        .await
        .assert_passed();
}
