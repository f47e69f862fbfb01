//! The connector SDK's conformance kit against a real Redis server.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::{closed_port, id, url, url_with_port, Space};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector_redis::RedisConnector;
use lethe_core::Identifier;
use tokio::sync::Mutex;

/// One dataset of each kind, all under the test's prefix.
const DATASETS: &str = r#"
batch_size = 10

[[datasets]]
name = "sessions"
category = "web.session"
key = "P:session:{customer_id}"

[[datasets]]
name = "carts"
category = "shop.cart"
pattern = "P:cart:{customer_id}:*"

[[datasets]]
name = "loyalty"
category = "shop.loyalty"
hash = "P:loyalty:index"
field = "{email}"

[[datasets]]
name = "newsletter"
category = "marketing.newsletter"
set = "P:newsletter:subscribers"
member = "{email}"
"#;

const CATEGORIES: [&str; 4] = ["web.session", "shop.cart", "shop.loyalty", "marketing.newsletter"];

struct Shop {
    space: Mutex<Space>,
}

#[async_trait]
impl Fixture for Shop {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let mut s = self.space.lock().await;
        let subject = || {
            let tag = uuid::Uuid::new_v4().simple().to_string();
            (format!("{tag}@example.com"), format!("C-{tag}"))
        };
        let subjects = [subject(), subject()];
        for (email, cid) in &subjects {
            s.set(&format!("P:session:{cid}"), "session").await;
            let carts: Vec<String> = (0..25).map(|i| format!("P:cart:{cid}:{i}")).collect();
            s.set_many(&carts).await;
            s.hset("P:loyalty:index", email, "gold").await;
            s.sadd("P:newsletter:subscribers", email).await;
        }
        let ids = |(email, cid): &(String, String)| vec![id("email", email), id("customer_id", cid)];
        Ok([ids(&subjects[0]), ids(&subjects[1])])
    }

    async fn faults(&self) -> Vec<Fault> {
        let mut s = self.space.lock().await;
        // A key declared as a hash that holds a string.
        s.set("P:wrongtype", "not a hash").await;
        let wrong_type = s.connector(
            r#"
[[datasets]]
name = "loyalty"
category = "shop.loyalty"
hash = "P:wrongtype"
field = "{email}"
"#,
        );
        let base = url();
        let (scheme, rest) = base.split_once("://").unwrap();
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let wrong_password = format!("{scheme}://nobody:wrong-password@{rest}");
        let fault = |name: &str, connector: RedisConnector, retryable| Fault {
            name: name.into(),
            connector: Arc::new(connector),
            retryable,
        };
        vec![
            fault(
                "unreachable",
                RedisConnector::new(s.config_at(&url_with_port(closed_port()), DATASETS)).unwrap(),
                true,
            ),
            fault(
                "wrong password",
                RedisConnector::new(s.config_at(&wrong_password, DATASETS)).unwrap(),
                false,
            ),
            fault("wrong type", wrong_type, false),
        ]
    }
}

#[tokio::test]
async fn passes_the_conformance_kit() {
    let space = Space::new().await;
    let connector = Arc::new(space.connector(DATASETS));
    let shop = Arc::new(Shop { space: Mutex::new(space) });
    let categories = CATEGORIES.iter().map(|c| (*c).to_owned()).collect();
    let report = Kit::new(connector, categories).with_fixture(SharedShop(shop.clone())).run().await;
    let space = Arc::try_unwrap(shop).ok().expect("the kit is done with the fixture").space.into_inner();
    space.cleanup().await;
    report.assert_passed();
}

/// The fixture, shared so that the test can clean up after the kit.
struct SharedShop(Arc<Shop>);

#[async_trait]
impl Fixture for SharedShop {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        self.0.seed().await
    }

    async fn faults(&self) -> Vec<Fault> {
        self.0.faults().await
    }
}
