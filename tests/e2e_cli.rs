//! The `lethe` command line against a running `lethe serve`: submit, status,
//! requests list, `migrate`, and `config check` on a good and on broken files.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::{ada_and_neighbours, describe, lethe, lethe_with_env, Lab, Server, StateKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip_against_a_running_server() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;
    let cwd = lab.root();
    let base = server.base.as_str();

    // lethe submit
    let out =
        lethe(&["submit", "--email", "  Ada@Example.COM ", "--regulation", "gdpr", "--server", base], cwd)
            .await;
    assert!(out.status.success(), "{}", describe(&out));
    let answer: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    let id = answer["id"].as_str().expect("id").to_owned();
    uuid::Uuid::parse_str(&id).expect("a UUID");
    assert!(answer["due_at"].is_string(), "{answer}");
    assert!(answer["status"].is_string(), "{answer}");

    // lethe status (after the request is final, so the table is stable)
    server.wait_final(&id).await;
    let out = lethe(&["status", &id, "--server", base], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    for expected in [
        format!("request   {id}"),
        "status    completed".to_owned(),
        "regulation gdpr".to_owned(),
        "SYSTEM".to_owned(),
        "STATE".to_owned(),
    ] {
        assert!(table.contains(&expected), "{expected:?} missing from:\n{table}");
    }
    let shop = table.lines().find(|l| l.starts_with("shop ")).unwrap_or_else(|| panic!("{table}"));
    assert!(shop.contains("erase") && shop.contains("succeeded"), "{shop}");
    assert!(shop.contains("deleted 3, anonymized 3"), "{shop}");
    let news = table.lines().find(|l| l.starts_with("newsletter ")).unwrap_or_else(|| panic!("{table}"));
    assert!(news.contains("succeeded") && news.contains("deleted 5, anonymized 0"), "{news}");
    assert!(!table.to_ascii_lowercase().contains("ada@example.com"), "{table}");

    // lethe status --watch on a final request returns at once
    let out = lethe(&["status", &id, "--watch", "--server", base], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));

    // lethe status on an unknown request fails and says so
    let out = lethe(&["status", "00000000-0000-0000-0000-000000000000", "--server", base], cwd).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"), "{}", describe(&out));

    // Ids and system names are checked before they become part of a URL:
    // a path that would lead elsewhere is refused by the command line.
    for args in [
        vec!["status", "../../v1/keys/certificate"],
        vec!["retry", "not-a-request", "shop"],
        vec!["retry", &id, "../../holds"],
        vec!["extend", "x?y", "--reason", "complex"],
        vec!["hold", "release", "../requests"],
        vec!["certificate", "get", "../../metrics"],
    ] {
        let out = at(base, cwd, &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid value"), "{args:?}: {err}");
    }

    // lethe submit with an invalid address fails without echoing it
    let out =
        lethe(&["submit", "--email", "secret-value-no-at", "--regulation", "gdpr", "--server", base], cwd)
            .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("422"), "{}", describe(&out));
    assert!(!describe(&out).contains("secret-value-no-at"), "{}", describe(&out));

    // Usage errors the argument parser cannot see exit 2 as its own do,
    // before anything is sent.
    for args in [
        vec!["submit", "--regulation", "gdpr"],
        vec!["submit", "--id", "loyalty-card", "--regulation", "gdpr"],
        vec!["submit", "--id", "x=1", "--id", "x=2", "--regulation", "gdpr"],
        vec!["policy", "explain", "--regulation", "gdpr"],
        vec!["submit", "--email", "a@example.com", "--regulation", "hipaa"],
        vec!["policy", "explain", "--local", "--regulation", "hipaa"],
        vec!["requests", "list", "--status", "bogus"],
        vec!["requests", "list", "--due-before", "soon"],
        vec!["requests", "list", "--limit", "0"],
    ] {
        let out = at(base, cwd, &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
    // A mistyped regulation stops an import before it reads or sends a row
    // (and before it writes rejected rows, identifiers and all, to a file).
    let people = cwd.join("people.csv");
    std::fs::write(&people, "email\nzed@example.com\n").unwrap();
    let out = at(base, cwd, &["import", people.to_str().unwrap(), "--regulation", "hipaa"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(!cwd.join("people.csv.rejected.csv").exists());
    let out =
        at(base, cwd, &["requests", "list", "--due-before", "2099-01-01", "--status", "completed"]).await;
    assert!(out.status.success(), "a date is a time: {}", describe(&out));

    // lethe requests list (table and JSON)
    let out = lethe(&["requests", "list", "--server", base], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(list.starts_with("ID"), "{list}");
    let row = list.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{id} not in:\n{list}"));
    assert!(row.contains("completed") && row.contains("gdpr"), "{row}");
    assert_eq!(list.lines().count(), 2, "header and one request:\n{list}");
    let out = lethe(&["requests", "list", "--json", "--server", base], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let page: Value = serde_json::from_slice(&out.stdout).expect("JSON page");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["items"][0]["id"], id.as_str());
    // Filters by system and by failed task.
    let out = at(base, cwd, &["requests", "list", "--system", "nowhere"]).await;
    assert!(!out.status.success(), "a likely typo is refused: {}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("the configured systems: shop, newsletter"), "{said}");
    for (args, rows) in [(vec!["--system", "shop"], 2), (vec!["--failed-task"], 1)] {
        let mut all = vec!["requests", "list"];
        all.extend(args.iter().copied());
        let out = at(base, cwd, &all).await;
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            rows,
            "{args:?}: {}",
            describe(&out)
        );
    }

    // lethe token create / rotate: a portal's rotated token still reads
    // the requests it submitted; the old secret stops at once.
    let config = lab.config.to_str().expect("UTF-8 path");
    let token_cmd = |args: &[&str]| {
        let mut all = vec!["token"];
        all.extend(args);
        all.extend(["--config", config]);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lethe(&args, cwd).await
    };
    let out = run(token_cmd(&[
        "create",
        "--name",
        "portal",
        "--scope",
        "requests:submit",
        "--scope",
        "requests:read:own",
    ]))
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let old = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let as_token = |token: &str| vec![("LETHE_TOKEN".to_owned(), token.to_owned())];
    let out = lethe_with_env(
        &["submit", "--email", "zoe@example.com", "--regulation", "gdpr", "--server", base],
        cwd,
        &as_token(&old),
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs = theirs["id"].as_str().unwrap().to_owned();
    let out = run(token_cmd(&["list"])).await;
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    let token_id = list.lines().find(|l| l.contains(" portal ")).and_then(|l| l.split_whitespace().next());
    let token_id = token_id.unwrap_or_else(|| panic!("{list}")).to_owned();
    let out = run(token_cmd(&["rotate", &token_id, "--overlap-hours", "169"])).await;
    assert_eq!(out.status.code(), Some(2), "at most a week: {}", describe(&out));
    let out = run(token_cmd(&["rotate", "no-such-token"])).await;
    assert_eq!(out.status.code(), Some(2), "not a token id: {}", describe(&out));
    let out = run(token_cmd(&["rotate", &uuid::Uuid::now_v7().to_string()])).await;
    assert_eq!(out.status.code(), Some(1), "no such token: {}", describe(&out));
    // A second token in force under the same name is refused (webhooks
    // tell portals apart by name).
    let out = run(token_cmd(&["create", "--name", "portal", "--scope", "requests:submit"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already named"), "{}", describe(&out));
    let out = run(token_cmd(&["rotate", &token_id])).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer works"), "{}", describe(&out));
    let new = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(new.starts_with("lethe_") && new != old, "{}", describe(&out));
    let out = lethe_with_env(&["status", &theirs, "--server", base], cwd, &as_token(&old)).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", describe(&out));
    let out = lethe_with_env(&["status", &theirs, "--server", base], cwd, &as_token(&new)).await;
    assert!(out.status.success(), "the rotated token reads its request: {}", describe(&out));
    server.wait_final(&theirs).await;

    // The subject is erased as configured.
    let ada = BTreeSet::from([1]);
    lab.assert_rows_after(&ada, &ada).await;

    // lethe config check: the lab's file is fine.
    let config = lab.config.to_str().expect("UTF-8 path");
    let out = lethe(&["config", "check", "--config", config], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(stdout.contains("2 systems: shop, newsletter"), "{stdout}");

    // lethe webhooks replay names an endpoint the configuration has.
    let out = lethe(
        &["webhooks", "replay", "--endpoint", "nope", "--since", "2026-01-01T00:00:00Z", "--config", config],
        cwd,
    )
    .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no webhook endpoint is named \"nope\""),
        "{}",
        describe(&out)
    );
    let out =
        lethe(&["webhooks", "replay", "--endpoint", "nope", "--since", "yesterday", "--config", config], cwd)
            .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    // An unknown field at the top level of a section.
    let text = std::fs::read_to_string(&lab.config).expect("read config");
    let broken = lab.root().join("broken.toml");
    std::fs::write(&broken, text.replace("[server]\n", "[server]\nlisten_backlog = 128\n")).unwrap();
    let out = lethe(&["config", "check", "--config", broken.to_str().unwrap()], cwd).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `listen_backlog`"), "{}", describe(&out));

    // An unknown field inside a connector's settings.
    let bad_table = lab.root().join("bad-table.toml");
    std::fs::write(
        &bad_table,
        text.replacen("action = \"delete\"\n", "action = \"delete\"\nsoft_delete = true\n", 1),
    )
    .unwrap();
    let out = lethe(&["config", "check", "--config", bad_table.to_str().unwrap()], cwd).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("soft_delete"), "{}", describe(&out));
    assert!(stderr.contains("shop"), "the message names the system: {}", describe(&out));

    // A file that does not exist.
    let missing = lab.root().join("missing.toml");
    let out = lethe(&["config", "check", "--config", missing.to_str().unwrap()], cwd).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"), "{}", describe(&out));
}

/// `lethe hold place|list|release`, `lethe policy explain` (server and
/// local) and `lethe extend`, against `lethe serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_policy_and_extensions_from_the_command_line() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;
    let cwd = lab.root();
    let base = server.base.as_str();
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let place = [
        "hold",
        "place",
        "--email",
        "ada@example.com",
        "--system",
        "newsletter",
        "--reason",
        "pending litigation",
        "--case-ref",
        "LIT-9",
    ];
    let placed: Value = serde_json::from_str(&ok(at(base, cwd, &place).await)).unwrap();
    let hold_id = placed["id"].as_str().unwrap().to_owned();
    let list = ok(at(base, cwd, &["hold", "list"]).await);
    assert!(list.contains(&hold_id) && list.contains("LIT-9") && list.contains("newsletter"), "{list}");

    let explain =
        ok(at(base, cwd, &["policy", "explain", "--email", "ada@example.com", "--regulation", "gdpr"]).await);
    assert!(explain.contains("newsletter -> hold"), "{explain}");
    assert!(explain.contains("legal hold LIT-9"), "{explain}");
    assert!(explain.contains("shop -> erase") && explain.contains("erase-everything-else"), "{explain}");
    let config = lab.config.display().to_string();
    let local =
        ok(lethe(&["policy", "explain", "--local", "--config", &config, "--regulation", "ccpa"], cwd).await);
    assert!(local.contains("newsletter -> erase"), "no holds locally: {local}");
    // Given a subject, it says where its identifiers cannot be searched:
    // the newsletter finds subjects by e-mail only, the shop by customer id too.
    let args =
        ["policy", "explain", "--local", "--config", &config, "--customer-id", "7", "--regulation", "gdpr"];
    let by_id = ok(lethe(&args, cwd).await);
    let news = &by_id[by_id.find("newsletter ->").unwrap_or_else(|| panic!("{by_id}"))..];
    assert!(news.contains("not searched"), "{by_id}");
    let shop = &by_id[by_id.find("shop ->").unwrap_or_else(|| panic!("{by_id}"))..];
    assert!(!shop[..shop.find("\n\n").unwrap_or(shop.len())].contains("not searched"), "{by_id}");

    let out = ok(at(base, cwd, &["submit", "--email", "ada@example.com", "--regulation", "gdpr"]).await);
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"].as_str().unwrap().to_owned();
    let view = server.wait_final(&id).await;
    assert_eq!(view["status"], "completed_with_exemptions", "{view:#}");
    let status = ok(at(base, cwd, &["status", &id]).await);
    let news = status.lines().find(|l| l.starts_with("newsletter ")).unwrap_or_else(|| panic!("{status}"));
    assert!(news.contains("hold") && news.contains("held"), "{status}");

    // Answered requests cannot be extended; the CLI says why.
    let out = at(base, cwd, &["extend", &id, "--reason", "complex"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"), "{}", describe(&out));

    let released: Value =
        serde_json::from_str(&ok(at(base, cwd, &["hold", "release", &hold_id]).await)).unwrap();
    assert_eq!(released["resumed_tasks"], 1, "{released}");
    let started = std::time::Instant::now();
    loop {
        let view = server.request(&id).await;
        if view["status"] == "completed" {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "{view:#}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let all = ok(at(base, cwd, &["hold", "list", "--all"]).await);
    assert!(all.contains("released"), "{all}");
}

/// Runs `lethe <args> --server <base>`.
async fn at(base: &str, cwd: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend(["--server", base]);
    lethe(&all, cwd).await
}

/// The quick start's first command: `lethe demo` on the embedded default,
/// in an empty directory, with no external service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_erases_and_keeps_what_the_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let out = lethe(&["demo", "--subjects", "40", "--requests", "8"], dir.path()).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in ["All 9 requests final", "completed_with_exemptions", "HGB §257", "shop        invoices"]
    {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    let printed: Vec<&str> = text.lines().filter(|l| !l.starts_with("Try:")).collect();
    assert!(!printed.join("\n").contains("@example.com"), "the demo prints no identifier:\n{text}");
}

/// `lethe connector check`: the conformance checks against the lab's live
/// newsletter database, with a made-up subject and with a test subject
/// (which it erases), and against a system whose database is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_check_runs_the_conformance_kit_against_a_live_system() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let cwd = lab.root();
    let config = lab.config.to_str().expect("UTF-8 path");

    let out = lethe(&["connector", "check", "--config", config, "--system", "newsletter"], cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for check in ["pass  health", "pass  erase_is_idempotent", "pass  no_identifier_leaks"] {
        assert!(stdout.contains(check), "{check}: {stdout}");
    }
    assert!(stdout.contains("skip  other_subjects_untouched"), "{stdout}");
    lab.assert_rows_after(&BTreeSet::new(), &BTreeSet::new()).await;

    // A test subject that exists: its data is seen, erased and verified gone.
    let args =
        ["connector", "check", "--config", config, "--system", "newsletter", "--email", "bob@example.com"];
    let out = lethe(&args, cwd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pass  verify_sees_data") && stdout.contains("pass  erase_reports"), "{stdout}");
    assert!(!stdout.contains("bob@example.com"), "the subject is not echoed: {stdout}");
    lab.assert_rows_after(&BTreeSet::new(), &BTreeSet::from([2])).await;

    // The database file is gone: the checks fail and say which.
    let text = std::fs::read_to_string(&lab.config).expect("read config");
    let broken = lab.root().join("broken.toml");
    let news = lab.newsletter.display().to_string();
    std::fs::write(&broken, text.replace(&news, &format!("{news}.missing"))).unwrap();
    let broken = broken.to_str().unwrap();
    let out = lethe(&["connector", "check", "--config", broken, "--system", "newsletter"], cwd).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL  health"), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed the conformance checks"),
        "{}",
        describe(&out)
    );

    let out = lethe(&["connector", "check", "--config", config, "--system", "nope"], cwd).await;
    assert!(!out.status.success(), "{}", describe(&out));
}

/// `lethe migrate` names the migrations it applies to a new store, and a
/// second run applies none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_says_what_it_applied() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let config = lab.config.to_str().expect("UTF-8 path");
    let env = lab.child_env();

    let out = lethe_with_env(&["migrate", "--config", config], lab.root(), &env).await;
    assert!(out.status.success(), "{}", describe(&out));
    let first = String::from_utf8_lossy(&out.stdout).into_owned();
    let applied = first.lines().filter(|l| l.starts_with("applied ")).count();
    assert!(applied > 0, "a new store has migrations to apply:\n{first}");
    assert!(first.lines().any(|l| l.starts_with("applied 1 ")), "the first migration is named:\n{first}");
    assert!(first.ends_with("state store (sqlite) is up to date\n"), "{first}");

    let out = lethe_with_env(&["migrate", "--config", config], lab.root(), &env).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "state store (sqlite) is up to date\n");
}

/// The commands that work on the store directly (tokens, audit, webhooks)
/// never migrate it under the coordinators running on it: a schema of
/// another version is refused, naming what to do, and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_commands_refuse_a_schema_of_another_version_and_leave_it() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let config = lab.config.to_str().expect("UTF-8 path");
    let env = lab.child_env();
    let token_list = ["token", "list", "--config", config];
    let tokens = || lethe_with_env(&token_list, lab.root(), &env);
    let out = lethe_with_env(&["migrate", "--config", config], lab.root(), &env).await;
    assert!(out.status.success(), "{}", describe(&out));
    let out = tokens().await;
    assert!(out.status.success(), "{}", describe(&out));

    let url = format!("sqlite://{}", lab.state_file.display());
    let db = sqlx::SqlitePool::connect(&url).await.expect("open the state store");
    let migrations = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(&db).await.unwrap();
        n
    };
    // As if a newer binary's migration were still to run.
    let last: (i64, String, Vec<u8>) = sqlx::query_as(
        "SELECT version, description, checksum FROM _sqlx_migrations ORDER BY version DESC LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?").bind(last.0).execute(&db).await.unwrap();
    let before = migrations().await;
    let out = tokens().await;
    assert!(!out.status.success(), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("older than this version") && said.contains("lethe migrate"), "{said}");
    assert_eq!(migrations().await, before, "nothing was migrated");
    let out = lethe_with_env(&["audit", "verify", "--config", config], lab.root(), &env).await;
    assert!(!out.status.success() && describe(&out).contains("lethe migrate"), "{}", describe(&out));

    // Up to date again, then migrated by a newer version than this one.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (?, ?, 1, ?, 0)",
    )
    .bind(last.0)
    .bind(&last.1)
    .bind(&last.2)
    .execute(&db)
    .await
    .unwrap();
    let out = tokens().await;
    assert!(out.status.success(), "{}", describe(&out));

    // The same migration with other contents (another build's), then one
    // that failed part-way.
    let set_last = |sql: &'static str| {
        let db = db.clone();
        async move { sqlx::query(sql).bind(last.0).execute(&db).await.unwrap() }
    };
    set_last("UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = ?").await;
    let out = tokens().await;
    assert!(!out.status.success(), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("migration {} ", last.0)) && said.contains("checksum"), "{said}");
    sqlx::query("UPDATE _sqlx_migrations SET checksum = ? WHERE version = ?")
        .bind(&last.2)
        .bind(last.0)
        .execute(&db)
        .await
        .unwrap();
    set_last("UPDATE _sqlx_migrations SET success = 0 WHERE version = ?").await;
    let out = tokens().await;
    assert!(!out.status.success(), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("failed part-way"), "{said}");
    set_last("UPDATE _sqlx_migrations SET success = 1 WHERE version = ?").await;
    let out = tokens().await;
    assert!(out.status.success(), "{}", describe(&out));

    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999999, 'from the future', 1, x'00', 0)",
    )
    .execute(&db)
    .await
    .unwrap();
    let out = tokens().await;
    assert!(!out.status.success(), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("newer version of Lethe") && said.contains("99999999"), "{said}");

    // A PostgreSQL database no coordinator has set up yet.
    let fresh = Lab::new(StateKind::Postgres, ada_and_neighbours()).await;
    let config = fresh.config.to_str().expect("UTF-8 path");
    let out = lethe_with_env(&["token", "list", "--config", config], fresh.root(), &fresh.child_env()).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no Lethe schema yet") && said.contains("lethe migrate"), "{said}");
}

/// A value for every `${VAR}` a configuration text names: 64 hex
/// characters do for a master key, a token and a password alike.
fn placeholders(text: &str) -> Vec<(String, String)> {
    let names: BTreeSet<&str> = text.split("${").skip(1).filter_map(|s| s.split('}').next()).collect();
    // Each its own value (64 hex digits), as no two systems share a token.
    let value = |n: &str| format!("{:0>64}", n.bytes().map(|b| format!("{b:02x}")).collect::<String>());
    names.into_iter().map(|n| (n.to_owned(), value(n)[..64].to_owned())).collect()
}

/// The shipped production example passes `config check --strict` with the
/// bundled policy, as the README says to run it; the README's own
/// configuration example passes `config check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_configuration_examples_pass_config_check() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let example = root.join("config/examples/production.toml");
    let text = std::fs::read_to_string(&example).expect("read the production example");
    let path = example.to_str().expect("UTF-8 path");
    let out =
        lethe_with_env(&["config", "check", "--config", path, "--strict"], root, &placeholders(&text)).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("note: environment variable"),
        "{}",
        describe(&out)
    );
    // Without its secrets (a check in CI, say): it passes, naming each one
    // `lethe serve` will need.
    let out = lethe_with_env(&["config", "check", "--config", path, "--strict"], root, &[]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["LETHE_MASTER_KEY", "LETHE_SHOP_TOKEN", "LETHE_DB_PASSWORD"] {
        assert!(stdout.contains(&format!("note: environment variable {name} is not set here")), "{stdout}");
    }
    // With them, what `lethe serve` would refuse is refused here too.
    let mut short = placeholders(&text);
    short.iter_mut().filter(|(n, _)| n == "LETHE_SHOP_TOKEN").for_each(|(_, v)| *v = "short".into());
    let out = lethe_with_env(&["config", "check", "--config", path], root, &short).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32 characters") && !stderr.contains("short\""), "{stderr}");
    let mut bad_key = placeholders(&text);
    bad_key.iter_mut().filter(|(n, _)| n == "LETHE_MASTER_KEY").for_each(|(_, v)| *v = "not-hex".into());
    let out = lethe_with_env(&["config", "check", "--config", path], root, &bad_key).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("keys.master_key"), "{}", describe(&out));

    let readme = std::fs::read_to_string(root.join("README.md")).expect("read the README");
    let block = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("[[systems]]"))
        .expect("the README's configuration example");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("readme.toml");
    std::fs::write(&file, block).unwrap();
    let path = file.to_str().expect("UTF-8 path");
    let out = lethe_with_env(&["config", "check", "--config", path], dir.path(), &placeholders(block)).await;
    assert!(out.status.success(), "{}", describe(&out));
}
