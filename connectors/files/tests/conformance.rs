//! The files connector on a real directory: the conformance kit, and
//! retention keeping a file.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::{Connector, ConnectorKind, Identifier};
use lethe_connector_files::FilesKind;
use lethe_core::IdentifierKind;

fn config(root: &std::path::Path) -> toml::Table {
    toml::from_str(&format!(
        r#"
        root = "{}"
        datasets = [
            {{ name = "exports", category = "exports", path = "exports-{{customer_id}}.json" }},
            {{ name = "avatars", category = "profile", path = "avatar-{{email}}.png" }},
        ]"#,
        root.display()
    ))
    .unwrap()
}

async fn connector(root: &std::path::Path) -> Arc<dyn Connector> {
    FilesKind.build(&config(root)).await.unwrap()
}

struct Dir(tempfile::TempDir);

#[async_trait]
impl Fixture for Dir {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let mut subjects = Vec::new();
        for who in ["a", "b"] {
            let tag = format!("{who}{}", uuid::Uuid::new_v4().simple());
            let email = format!("{tag}@example.com");
            std::fs::write(self.0.path().join(format!("exports-{tag}.json")), "{}").unwrap();
            std::fs::write(self.0.path().join(format!("avatar-{email}.png")), "png").unwrap();
            subjects.push(vec![
                Identifier::parse(IdentifierKind::CustomerId, &tag).unwrap(),
                Identifier::parse(IdentifierKind::Email, &email).unwrap(),
            ]);
        }
        Ok(subjects.try_into().unwrap())
    }

    async fn faults(&self) -> Vec<Fault> {
        let missing = self.0.path().join("no-such-directory");
        vec![Fault { name: "missing root".into(), connector: connector(&missing).await, retryable: false }]
    }
}

#[tokio::test]
async fn files_connector_passes_the_conformance_kit() {
    let dir = tempfile::tempdir().unwrap();
    let categories = FilesKind.categories(&config(dir.path())).unwrap();
    assert_eq!(categories, ["exports", "profile"]);
    Kit::new(connector(dir.path()).await, categories).with_fixture(Dir(dir)).run().await.assert_passed();
}

#[tokio::test]
async fn identifiers_cannot_reach_outside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("exports-x.json"), "{}").unwrap();
    let kit = Kit::new(connector(&root).await, vec!["exports".into()]);
    let task = kit.task(vec![Identifier::parse(IdentifierKind::CustomerId, "../exports-x").unwrap()]);
    let erasure = connector(&root).await.erase(&task).await.unwrap();
    assert_eq!(erasure.total(), 0);
    assert!(dir.path().join("exports-x.json").exists());
}
