//! `lethe import <file.csv>` against a running `lethe serve`: an import
//! killed (SIGKILL) half-way through is run again to completion; every valid
//! row ends as exactly one request (the idempotency keys of the rows sent
//! before the kill are answered `replayed`), bad rows are rejected by line
//! number with their reasons, and no identifier is printed.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use support::{clean_env, describe, generated_people, lethe, Lab, Server, StateKind, ADMIN_TOKEN, LETHE};
use tokio::process::Command;

const PEOPLE: i64 = 240;

/// The CSV, the identifiers it holds, its valid rows (external_ref → regulation)
/// and its bad rows (line → expected part of the reason).
struct ImportFile {
    text: String,
    identifiers: Vec<String>,
    valid: BTreeMap<String, String>,
    bad: BTreeMap<u64, &'static str>,
}

fn import_file(lab: &Lab) -> ImportFile {
    let mut file = ImportFile {
        text: "email,regulation,external_ref\n".to_owned(),
        identifiers: Vec::new(),
        valid: BTreeMap::new(),
        bad: BTreeMap::new(),
    };
    let mut line = 1;
    let mut push = |file: &mut ImportFile, row: String| {
        file.text.push_str(&row);
        file.text.push('\n');
        line += 1;
        line
    };
    for (i, person) in lab.people.iter().enumerate() {
        let i = i + 1;
        let regulation = if i % 10 == 0 { "ccpa" } else { "" };
        push(&mut file, format!("{},{regulation},row-{i}", person.email));
        file.identifiers.push(person.email.clone());
        let effective = if regulation.is_empty() { "gdpr" } else { regulation };
        file.valid.insert(format!("row-{i}"), effective.to_owned());
        let bad = match i {
            30 => Some(("not-an-email,,bad-1", "email is not a valid address")),
            90 => Some((",,", "no identifier")),
            150 => Some(("stranger@example.org,martian,bad-3", "unknown regulation")),
            200 => Some(("extra@example.org,gdpr,bad-4,surplus", "4 cells where the header has 3")),
            _ => None,
        };
        if let Some((row, reason)) = bad {
            let at = push(&mut file, row.to_owned());
            file.bad.insert(at, reason);
        }
    }
    file.identifiers.extend(["not-an-email", "stranger@example.org", "extra@example.org"].map(String::from));
    file
}

/// external_ref of every request the server lists.
async fn listed_refs(server: &Server) -> Vec<(String, String)> {
    server
        .list()
        .await
        .iter()
        .map(|r| {
            (
                r["external_ref"].as_str().unwrap_or_default().to_owned(),
                r["regulation"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn import(csv: &str, batch: &str, base: &str, cwd: &Path) -> Output {
    lethe(&["import", csv, "--regulation", "gdpr", "--batch", batch, "--server", base], cwd).await
}

fn number(stdout: &str, label: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"))
}

fn assert_no_identifier(what: &str, text: &str, identifiers: &[String]) {
    let lower = text.to_ascii_lowercase();
    for id in identifiers {
        assert!(!lower.contains(&id.to_ascii_lowercase()), "{what} names an identifier:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_killed_half_way_resumes_without_duplicates() {
    let lab = Lab::new(StateKind::Sqlite, generated_people(PEOPLE)).await;
    let server = Server::start(&lab).await;
    let cwd = lab.root();
    let file = import_file(&lab);
    let csv = cwd.join("people.csv");
    std::fs::write(&csv, &file.text).expect("write the CSV");
    let csv_arg = csv.to_str().expect("UTF-8 path");
    let valid = file.valid.len();

    // First run: small batches with a pause, killed once some requests exist.
    let (out1, err1) = (cwd.join("import-1.out"), cwd.join("import-1.err"));
    let mut cmd = Command::new(LETHE);
    cmd.args(["import", csv_arg, "--regulation", "gdpr", "--batch", "10", "--pause-ms", "150"])
        .args(["--server", &server.base])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out1).expect("stdout file"))
        .stderr(std::fs::File::create(&err1).expect("stderr file"))
        .kill_on_drop(true);
    clean_env(&mut cmd);
    cmd.env("LETHE_LOG", "warn").env("NO_COLOR", "1").env("LETHE_TOKEN", ADMIN_TOKEN);
    let mut child = cmd.spawn().expect("spawn lethe import");
    let started = Instant::now();
    loop {
        let n = server.list().await.len();
        if n > 0 {
            break;
        }
        if let Some(status) = child.try_wait().expect("poll lethe import") {
            panic!(
                "lethe import ended ({status}) before any request was listed:\n{}\n{}",
                std::fs::read_to_string(&out1).unwrap_or_default(),
                std::fs::read_to_string(&err1).unwrap_or_default()
            );
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no request listed within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().expect("SIGKILL lethe import");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("lethe import did not die within 10 s")
        .expect("wait for lethe import");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "lethe import should die of SIGKILL: {status}");
    }
    // A batch in flight at the kill may still commit: wait until the count is stable.
    let mut before = server.list().await.len();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = server.list().await.len();
        if now == before {
            break;
        }
        before = now;
    }
    assert!(before > 0 && before < valid, "the kill should land half-way: {before} of {valid} created");
    let first_output = format!(
        "{}{}",
        std::fs::read_to_string(&out1).unwrap_or_default(),
        std::fs::read_to_string(&err1).unwrap_or_default()
    );
    assert_no_identifier("the killed import's output", &first_output, &file.identifiers);
    assert!(!lab.root().join("people.csv.rejected.csv").exists(), "written only at the end");

    // Second run, other batch size: resumes, creating only what is missing.
    let out = import(csv_arg, "100", &server.base, cwd).await;
    assert_eq!(out.status.code(), Some(3), "rejected rows exit with 3: {}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_no_identifier("the second import's stdout", &stdout, &file.identifiers);
    assert_no_identifier(
        "the second import's stderr",
        &String::from_utf8_lossy(&out.stderr),
        &file.identifiers,
    );
    assert_eq!(number(&stdout, "rows read:"), valid + file.bad.len(), "{stdout}");
    assert_eq!(number(&stdout, "already created:"), before, "{stdout}");
    assert_eq!(number(&stdout, "requests created:"), valid - before, "{stdout}");
    assert_eq!(number(&stdout, "rejected:"), file.bad.len(), "{stdout}");
    for (line, reason) in &file.bad {
        let listed = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("line {line}: ")))
            .unwrap_or_else(|| panic!("line {line} not listed as rejected:\n{stdout}"));
        assert!(listed.contains(reason), "line {line}: expected {reason:?} in {listed:?}");
    }

    // Exactly one request per valid row, with its row's regulation.
    let refs = listed_refs(&server).await;
    assert_eq!(refs.len(), valid, "one request per valid row");
    let by_ref: BTreeMap<String, String> = refs.into_iter().collect();
    assert_eq!(by_ref, file.valid, "each valid row exactly once, with its regulation");
    let stored: i64 = lab.state_request_statuses().await.values().sum();
    assert_eq!(stored, valid as i64, "requests in the state store");

    // The rejected rows, for the operator to correct.
    let rejected = std::fs::read_to_string(cwd.join("people.csv.rejected.csv")).expect("rejected file");
    let mut rows = rejected.lines();
    assert_eq!(rows.next(), Some("line,reason,email,regulation,external_ref"));
    let lines: Vec<u64> =
        rows.map(|r| r.split(',').next().unwrap_or_default().parse().expect("line")).collect();
    assert_eq!(lines, file.bad.keys().copied().collect::<Vec<_>>(), "{rejected}");

    // A third run changes nothing: every valid row is replayed.
    let out = import(csv_arg, "500", &server.base, cwd).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(number(&stdout, "already created:"), valid, "{stdout}");
    assert_eq!(number(&stdout, "requests created:"), 0, "{stdout}");
    assert_eq!(server.list().await.len(), valid);

    // A header without an identifier column is refused as a whole.
    let no_ids = cwd.join("no-ids.csv");
    std::fs::write(&no_ids, "regulation,external_ref\ngdpr,x\n").expect("write");
    let out = lethe(
        &["import", no_ids.to_str().expect("path"), "--regulation", "gdpr", "--server", &server.base],
        cwd,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identifier column"), "{}", describe(&out));

    // A file without a header row: its first customer number would be read
    // as a column name and that person never submitted. Refused, and
    // nothing is sent.
    let headless = cwd.join("headless.csv");
    std::fs::write(
        &headless,
        "c1042
c1043
c1044
",
    )
    .expect("write");
    let out = lethe(
        &["import", headless.to_str().expect("path"), "--regulation", "gdpr", "--server", &server.base],
        cwd,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no configured system uses"), "{}", describe(&out));
    assert!(!stderr.contains("c1042"), "the first row is never quoted: {stderr}");
    assert_eq!(server.list().await.len(), valid);

    // A `received_at` column: the due date runs from when the request
    // reached the company, not from the import.
    let ten_days_ago = (chrono::Utc::now() - chrono::Duration::days(10)).date_naive();
    let late = cwd.join("late.csv");
    std::fs::write(
        &late,
        format!("email,external_ref,received_at\nlate.letter@example.org,late-1,{ten_days_ago}\n"),
    )
    .expect("write");
    let out = lethe(
        &["import", late.to_str().expect("path"), "--regulation", "gdpr", "--server", &server.base],
        cwd,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let listed = server.list().await;
    let time = |r: &serde_json::Value, field: &str| {
        chrono::DateTime::parse_from_rfc3339(r[field].as_str().expect(field)).expect(field).to_utc()
    };
    let imported = listed.iter().find(|r| r["external_ref"] == "late-1").expect("the late request");
    // A date alone is its first moment anywhere on earth: 00:00 at UTC+14.
    let received = ten_days_ago.and_time(chrono::NaiveTime::MIN).and_utc() - chrono::Duration::hours(14);
    assert_eq!(time(imported, "received_at"), received);
    assert_eq!(
        time(imported, "due_at"),
        received.checked_add_months(chrono::Months::new(1)).expect("a date"),
        "GDPR's month, counted from the receipt"
    );
}
