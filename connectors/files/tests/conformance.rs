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
async fn an_identifier_that_could_leave_the_root_is_refused_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("exports-x.json"), "{}").unwrap();
    let kit = Kit::new(connector(&root).await, vec!["exports".into()]);
    let task = kit.task(vec![Identifier::parse(IdentifierKind::CustomerId, "../exports-x").unwrap()]);
    let error = connector(&root).await.erase(&task).await.unwrap_err();
    assert!(!error.retryable, "{error}");
    assert!(!error.message.contains("exports-x"), "{error}");
    assert!(connector(&root).await.verify(&task).await.is_err(), "no false 'nothing left'");
    assert!(dir.path().join("exports-x.json").exists());
}

#[tokio::test]
async fn every_value_of_an_identifier_type_is_erased() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["avatar-a@example.com.png", "avatar-b@example.com.png", "avatar-c@example.com.png"] {
        std::fs::write(dir.path().join(name), "png").unwrap();
    }
    let kit = Kit::new(connector(dir.path()).await, vec!["profile".into()]);
    let emails =
        ["a@example.com", "b@example.com"].map(|e| Identifier::parse(IdentifierKind::Email, e).unwrap());
    let task = kit.task(emails.to_vec());
    let files = connector(dir.path()).await;
    assert_eq!(files.verify(&task).await.unwrap(), 2);
    assert_eq!(files.erase(&task).await.unwrap().total(), 2);
    assert_eq!(files.verify(&task).await.unwrap(), 0);
    assert!(dir.path().join("avatar-c@example.com.png").exists());
}

/// A path that names a directory fails for good, not on every retry.
#[tokio::test]
async fn a_directory_in_place_of_a_file_fails_permanently() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("avatar-ada@example.com.png")).unwrap();
    let kit = Kit::new(connector(dir.path()).await, vec!["profile".into()]);
    let task = kit.task(vec![Identifier::parse(IdentifierKind::Email, "ada@example.com").unwrap()]);
    let error = connector(dir.path()).await.erase(&task).await.unwrap_err();
    assert!(!error.retryable, "{error}");
    assert!(!error.message.contains("ada@"), "{error}");
}

/// A directory named after the subject names it too: it goes with the
/// subject's last file in it, and an empty one left behind counts in
/// verify. One that still holds data the task leaves alone stays.
#[tokio::test]
async fn a_directory_named_after_the_subject_goes_once_empty() {
    let dir = tempfile::tempdir().unwrap();
    let config: toml::Table = toml::from_str(&format!(
        r#"
        root = "{}"
        datasets = [
            {{ name = "exports", category = "exports", path = "users/{{customer_id}}/export.json" }},
            {{ name = "notes", category = "notes", path = "users/{{customer_id}}/notes.txt" }},
        ]"#,
        dir.path().display()
    ))
    .unwrap();
    let files = FilesKind.build(&config).await.unwrap();
    let users = dir.path().join("users");
    for who in ["C-1", "C-2"] {
        std::fs::create_dir_all(users.join(who)).unwrap();
        std::fs::write(users.join(who).join("export.json"), "{}").unwrap();
    }
    std::fs::write(users.join("C-2").join("notes.txt"), "kept").unwrap();
    std::fs::create_dir_all(users.join("C-3")).unwrap();
    let kit = Kit::new(files.clone(), vec!["exports".into()]);
    let task = |id: &str| kit.task(vec![Identifier::parse(IdentifierKind::CustomerId, id).unwrap()]);

    assert_eq!(files.erase(&task("C-1")).await.unwrap().total(), 1);
    assert!(!users.join("C-1").exists(), "the subject's directory went with its file");
    assert!(users.exists(), "a directory not named after anyone stays");
    assert_eq!(files.verify(&task("C-1")).await.unwrap(), 0);

    // Notes are left alone (no directive for their category): the
    // directory holding them stays, and is no residue of the export.
    assert_eq!(files.erase(&task("C-2")).await.unwrap().total(), 1);
    assert!(users.join("C-2").join("notes.txt").exists());
    assert_eq!(files.verify(&task("C-2")).await.unwrap(), 0);

    // An empty directory named after a subject is found, and removed.
    assert_eq!(files.verify(&task("C-3")).await.unwrap(), 1);
    assert_eq!(files.erase(&task("C-3")).await.unwrap().total(), 0);
    assert!(!users.join("C-3").exists());
    assert_eq!(files.verify(&task("C-3")).await.unwrap(), 0);
}

/// An identifier longer than a file name may be cannot name a file: there
/// is nothing to erase, not an error to retry until the attempts run out.
#[tokio::test]
async fn a_name_too_long_for_the_file_system_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let kit = Kit::new(connector(dir.path()).await, vec!["exports".into()]);
    let long = "c".repeat(300);
    let task = kit.task(vec![Identifier::parse(IdentifierKind::CustomerId, &long).unwrap()]);
    let files = connector(dir.path()).await;
    assert_eq!(files.erase(&task).await.unwrap().total(), 0);
    assert_eq!(files.verify(&task).await.unwrap(), 0);
}

/// Two datasets may name one file: kept by one (retention, a hold), it
/// stays whatever the other asks, is reported kept, and is no residue.
#[tokio::test]
async fn a_file_kept_by_one_dataset_is_not_erased_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let config: toml::Table = toml::from_str(&format!(
        r#"
        root = "{}"
        datasets = [
            {{ name = "profile", category = "profile", path = "users/{{customer_id}}.json" }},
            {{ name = "invoices", category = "billing.invoice", path = "users/{{customer_id}}.json" }},
        ]"#,
        dir.path().display()
    ))
    .unwrap();
    let files = FilesKind.build(&config).await.unwrap();
    std::fs::create_dir(dir.path().join("users")).unwrap();
    let file = dir.path().join("users/C-1.json");
    std::fs::write(&file, "{}").unwrap();
    let kit = Kit::new(files.clone(), vec!["profile".into(), "billing.invoice".into()]);
    let mut task = kit.task(vec![Identifier::parse(IdentifierKind::CustomerId, "C-1").unwrap()]);
    let until = chrono::Utc::now() + chrono::Duration::days(365);
    for d in task.directives.iter_mut().filter(|d| d.category == "billing.invoice") {
        d.action = lethe_core::Action::Retain;
        d.basis = Some("HGB §257".into());
        d.until = Some(until);
    }
    let erased = files.erase(&task).await.unwrap();
    assert_eq!(erased.total(), 0, "{erased:?}");
    assert_eq!(erased.retained.len(), 1, "{erased:?}");
    assert_eq!((erased.retained[0].dataset.as_str(), erased.retained[0].count), ("invoices", 1));
    assert!(file.exists(), "kept wins");
    assert_eq!(files.verify(&task).await.unwrap(), 0, "what is kept is no residue");

    // Once the retention has ended, it goes.
    for d in task.directives.iter_mut().filter(|d| d.category == "billing.invoice") {
        d.until = Some(chrono::Utc::now() - chrono::Duration::days(1));
    }
    assert_eq!(files.erase(&task).await.unwrap().total(), 1);
    assert!(!file.exists());
    assert_eq!(files.verify(&task).await.unwrap(), 0);
}

/// A dataset whose path needs an identifier type the task lacks is
/// reported as not searched, not as "nothing found".
#[tokio::test]
async fn a_dataset_the_task_gives_no_identifier_for_is_not_searched() {
    let dir = tempfile::tempdir().unwrap();
    let files = connector(dir.path()).await;
    std::fs::write(dir.path().join("avatar-ada@example.com.png"), "png").unwrap();
    let kit = Kit::new(files.clone(), vec!["exports".into(), "profile".into()]);
    let task = kit.task(vec![Identifier::parse(IdentifierKind::Email, "ada@example.com").unwrap()]);
    let erased = files.erase(&task).await.unwrap();
    assert_eq!(
        erased.datasets,
        [lethe_core::DatasetReport::unsearched("exports"), lethe_core::DatasetReport::new("avatars", 1, 0)]
    );
    // Kept, it is not searched either: what it keeps is not known.
    let mut kept = task.clone();
    for d in kept.directives.iter_mut().filter(|d| d.category == "exports") {
        d.action = lethe_core::Action::Retain;
        d.basis = Some("contract".into());
        d.until = Some(chrono::Utc::now() + chrono::Duration::days(30));
    }
    let erased = files.erase(&kept).await.unwrap();
    assert_eq!(erased.datasets[0], lethe_core::DatasetReport::unsearched("exports"), "{erased:?}");
    assert!(erased.retained.is_empty(), "{erased:?}");
}

/// The directory a dataset's path fixes (before its first placeholder)
/// must exist: misspelt, every subject's files would be "nothing found".
#[tokio::test]
async fn health_fails_when_a_datasets_fixed_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("exports")).unwrap();
    let config = |path: &str| -> toml::Table {
        toml::from_str(&format!(
            r#"
            root = "{}"
            datasets = [{{ name = "exports", category = "exports", path = "{path}" }}]"#,
            dir.path().display()
        ))
        .unwrap()
    };
    for fine in ["exports/{customer_id}.json", "{customer_id}/export.json", "export-{customer_id}.json"] {
        let files = FilesKind.build(&config(fine)).await.unwrap();
        assert_eq!(files.health().await, Ok(()), "{fine}");
    }
    let misspelt = FilesKind.build(&config("exprots/{customer_id}.json")).await.unwrap();
    let e = misspelt.health().await.unwrap_err();
    assert!(!e.retryable && e.message.contains("dataset exports") && e.message.contains("exprots"), "{e}");
    // A directory made by the first export is no reason to fail erasures
    // meanwhile: an erase needs only the root.
    let kit = Kit::new(misspelt.clone(), vec!["exports".into()]);
    let task = kit.task(vec![Identifier::parse(IdentifierKind::CustomerId, "C-1").unwrap()]);
    assert_eq!(misspelt.erase(&task).await.unwrap().total(), 0);
}

/// A legal hold placed while an erase runs withdraws the attempt: the
/// check between datasets stops it, the datasets after it are left alone
/// and unreported, and verification finds them.
#[tokio::test]
async fn a_withdrawn_attempt_stops_between_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let files = connector(dir.path()).await;
    std::fs::write(dir.path().join("exports-C-1.json"), "{}").unwrap();
    std::fs::write(dir.path().join("avatar-ada@example.com.png"), "png").unwrap();
    let kit = Kit::new(files.clone(), vec!["exports".into(), "profile".into()]);
    let mut task = kit.task(vec![
        Identifier::parse(IdentifierKind::CustomerId, "C-1").unwrap(),
        Identifier::parse(IdentifierKind::Email, "ada@example.com").unwrap(),
    ]);
    // Wanted at the first check, withdrawn at the second.
    task.wanted = lethe_connector::StillWanted::withdrawn_after(1);
    let erased = files.erase(&task).await.unwrap();
    assert!(task.wanted.withdrawn());
    assert_eq!(erased.datasets, [lethe_core::DatasetReport::new("exports", 1, 0)], "{erased:?}");
    assert!(!dir.path().join("exports-C-1.json").exists());
    assert!(dir.path().join("avatar-ada@example.com.png").exists(), "not reached");
    assert_eq!(files.verify(&task).await.unwrap(), 1);
}
