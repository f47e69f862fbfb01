//! `lethe import <file.csv> --regulation gdpr`: erasure requests in bulk from
//! a CSV file, sent in batches through `POST /v1/requests:batch` (a token
//! with `requests:submit`).
//!
//! The header row names the columns: identifier types (`email`, `phone`,
//! `customer_id`, `device_id` or a custom lower-case type), and optionally
//! `regulation` (overrides `--regulation` for its row), `external_ref` and
//! `received_at`: when the person's request reached the company (an RFC 3339
//! time, or a date `YYYY-MM-DD` read as its first moment anywhere on earth,
//! 00:00 at UTC+14, so that no due date comes out later than the law's
//! wherever the request arrived; give the time with its offset to be exact).
//! The deadline and request-dated retentions run from it; without it they
//! run from the import.
//! Columns named `line` and `reason` are ignored, so that a corrected
//! `<file>.rejected.csv` can be imported as it is. Empty cells are skipped;
//! blank lines are not rows. A row with the wrong number of cells or without
//! any identifier is rejected here; the coordinator judges the rest
//! (identifier syntax, regulation) and refuses items one by one. A quoted
//! cell that is never closed stops the import before anything is sent: it
//! would swallow the rest of the file.
//!
//! **Resuming.** Every row is sent with the idempotency key
//! `import:<first 32 hex digits of the file's SHA-256>:<line>`. Running the
//! same file again, after an interruption or a failure, sends the same keys
//! and the coordinator answers `replayed` with the request it created the
//! first time instead of creating another; the batch size may differ between
//! runs. The coordinator keeps idempotency keys per token: resume with the
//! token that started the import, or every row is created again. A file with any byte changed gets other keys: correct rejected rows
//! in `<file>.rejected.csv` and import that file, rather than editing the
//! original and importing it again.
//!
//! **Privacy.** Nothing printed names an identifier: rows are named by line
//! number, header cells are never quoted (a file without a header row would
//! have identifiers there), and the coordinator's reasons never quote values.
//! The exception is `<file>.rejected.csv`, the rejected rows as they were
//! read, behind a `line` and a `reason` column: a copy of the operator's own
//! input, created readable by its owner only, and removed by a later run of
//! the same file that rejects nothing.
//!
//! **Duplicates.** A row repeating an earlier row's submission (the same
//! identifiers once normalised, regulation and reference) is not sent.
//!
//! **Exit status.** 0 when every row was created, had been created by an
//! earlier run (replayed) or repeated an earlier row; 3 when some rows were
//! rejected (every other row was sent); 1 when the import could not run or
//! stopped (unreadable file, header without an identifier column, coordinator
//! unreachable or refusing the token): what was sent before stays, and the
//! same command resumes; 2 for a usage error (a missing `--regulation`, say),
//! before anything ran.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use csv::ByteRecord;
use indicatif::{ProgressBar, ProgressStyle};
use lethe_core::IdentifierKind;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::client::Client;

/// Most rows in one batch (the coordinator's limit).
pub const MAX_BATCH: usize = 1000;

/// Hex digits of the file's SHA-256 in each idempotency key (128 bits).
const DIGEST_HEX_LEN: usize = 32;

#[derive(Args)]
pub struct ImportArgs {
    /// The CSV file. Header row: identifier types (email, phone,
    /// customer_id, device_id or a custom lower-case type), optionally
    /// `regulation` (per row), `external_ref` and `received_at` (when the
    /// request reached you: RFC 3339, or YYYY-MM-DD read as 00:00 at UTC+14,
    /// the day's first moment anywhere).
    pub file: PathBuf,
    /// Regulation of the rows without a `regulation` cell: gdpr, uk-gdpr,
    /// ccpa, vcdpa, lgpd or pipeda.
    #[arg(long, value_parser = crate::ops::regulation)]
    pub regulation: String,
    /// Rows per call to the coordinator (1 to 1000).
    #[arg(long, default_value_t = 500, value_parser = batch_size)]
    pub batch: usize,
    /// Pause between batches, in milliseconds (to go easy on a busy coordinator).
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// Rejected rows listed in the summary (all of them are in <file>.rejected.csv).
    #[arg(long, default_value_t = 20)]
    pub show_rejected: usize,
}

fn batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH).contains(&n) => Ok(n),
        _ => Err(format!("a batch holds 1 to {MAX_BATCH} rows")),
    }
}

/// What a header column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Column {
    Identifier(String),
    Regulation,
    ExternalRef,
    ReceivedAt,
    Ignored,
}

/// One submission, as the coordinator takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub subject: BTreeMap<String, String>,
    pub regulation: String,
    pub external_ref: Option<String>,
    /// When the request reached the company, if the file says.
    pub received_at: Option<DateTime<Utc>>,
}

/// A data row of the file.
#[derive(Debug)]
pub struct Row {
    /// Line of the file where the row starts (the header is line 1).
    pub line: u64,
    /// The row, or why it is rejected without asking the coordinator.
    pub submission: Result<Submission, String>,
    /// The cells as read (identifiers: only for the rejected file).
    cells: Vec<String>,
}

/// A parsed file.
#[derive(Debug)]
pub struct Parsed {
    header: Vec<String>,
    columns: Vec<Column>,
    pub rows: Vec<Row>,
}

/// `import:<hex digest prefix>`, shared by every row of the file `bytes`.
pub fn key_prefix(bytes: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(bytes));
    format!("import:{}", &digest[..DIGEST_HEX_LEN])
}

/// The idempotency key of the row at `line`.
pub fn row_key(prefix: &str, line: u64) -> String {
    format!("{prefix}:{line}")
}

fn header_column(index: usize, raw: &[u8]) -> anyhow::Result<Column> {
    let n = index + 1;
    // Never quote a header cell: without a header row, it is an identifier.
    let name = std::str::from_utf8(raw)
        .with_context(|| format!("column {n} of the header row is not valid UTF-8"))?
        .trim()
        .to_ascii_lowercase();
    if let Some(sep) = [';', '\t'].into_iter().find(|c| name.contains(*c)) {
        bail!(
            "column {n} of the header row holds {}: lethe import reads comma-separated files; save the \
             file with commas between the cells",
            if sep == ';' { "a ';'" } else { "a tab" }
        );
    }
    Ok(match name.as_str() {
        "" => bail!("column {n} of the header row has no name"),
        "regulation" => Column::Regulation,
        "external_ref" => Column::ExternalRef,
        "received_at" => Column::ReceivedAt,
        "line" | "reason" => Column::Ignored,
        other => match other.parse::<IdentifierKind>() {
            Ok(kind) => Column::Identifier(kind.as_str().to_owned()),
            Err(_) => bail!(
                "column {n} of the header row is not an identifier type (email, phone, customer_id, \
                 device_id or a lower-case word of letters, digits and _), regulation, external_ref or \
                 received_at; \
                 the first row must name the columns"
            ),
        },
    })
}

/// Parses a CSV file's bytes; `default_regulation` applies to rows without
/// a `regulation` cell. Fails only on the header; rows are judged one by one.
pub fn parse(bytes: &[u8], default_regulation: &str) -> anyhow::Result<Parsed> {
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(body);
    let raw_header = reader.byte_headers().context("cannot read the header row")?.clone();
    if raw_header.is_empty() {
        bail!("the file is empty: expected a header row naming the columns (e.g. email,regulation)");
    }
    let columns = raw_header
        .iter()
        .enumerate()
        .map(|(i, c)| header_column(i, c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (i, c) in columns.iter().enumerate() {
        if *c != Column::Ignored {
            if let Some(first) = columns[..i].iter().position(|d| d == c) {
                bail!("column {} of the header row repeats column {}", i + 1, first + 1);
            }
        }
    }
    if !columns.iter().any(|c| matches!(c, Column::Identifier(_))) {
        bail!(
            "the header row names no identifier column: expected at least one of email, phone, \
             customer_id, device_id or a custom lower-case identifier type (besides regulation, external_ref and received_at)"
        );
    }
    let header = raw_header.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    let mut rows = Vec::new();
    let mut lines = Lines { text: body, at: 0, line: 1 };
    let mut last_start = None;
    for record in reader.byte_records() {
        let record = record.context("cannot read the file")?;
        let start = record.position().map_or(0, |p| p.byte());
        let line = lines.line_of(start);
        last_start = Some((start, line));
        let cells = record.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        rows.push(Row { line, submission: row(&columns, &record, default_regulation), cells });
    }
    // A quote never closed makes the rest of the file one cell of the last
    // row, which the reader accepts; sending what came before would leave
    // the rest unsent with no row to blame.
    if let Some((start, line)) = last_start {
        let start = usize::try_from(start).unwrap_or(body.len()).min(body.len());
        if unclosed_quote(&body[start..]) {
            bail!(
                "line {line}: a quoted cell is never closed, so the rest of the file would be read \
                 as one cell; nothing was sent (close the quote; a quote inside a quoted cell is \
                 written twice: \"\")"
            );
        }
    }
    Ok(Parsed { header, columns, rows })
}

/// Whether the record that starts `text` (and runs to the end of the file)
/// ends inside a quoted cell, read as the csv reader reads it: a quote opens
/// a quoted cell only at the start of a cell, `""` inside one is a quote,
/// and after the closing quote the rest of the cell is literal.
fn unclosed_quote(text: &[u8]) -> bool {
    let mut in_quotes = false;
    let mut cell_start = true;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if in_quotes {
            if b == b'"' {
                if text.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    in_quotes = false;
                }
            }
        } else if b == b'"' && cell_start {
            in_quotes = true;
            cell_start = false;
        } else {
            cell_start = matches!(b, b',' | b'\n' | b'\r');
        }
        i += 1;
    }
    in_quotes
}

/// Line numbers of where records start. The csv crate's own
/// `Position::line` miscounts after blank lines and CRLF line ends, so the
/// line is counted from the record's byte offset (which may point at the
/// line ends skipped before it). Offsets must come in increasing order.
struct Lines<'a> {
    text: &'a [u8],
    at: usize,
    line: u64,
}

impl Lines<'_> {
    fn line_of(&mut self, offset: u64) -> u64 {
        let len = self.text.len();
        let mut start = usize::try_from(offset).unwrap_or(len).min(len);
        while start < len && matches!(self.text[start], b'\r' | b'\n') {
            start += 1;
        }
        while self.at < start {
            match self.text[self.at] {
                b'\n' => self.line += 1,
                b'\r' if self.text.get(self.at + 1) != Some(&b'\n') => self.line += 1,
                _ => {}
            }
            self.at += 1;
        }
        self.line
    }
}

fn row(columns: &[Column], record: &ByteRecord, default_regulation: &str) -> Result<Submission, String> {
    if record.len() != columns.len() {
        return Err(format!("{} cells where the header has {}", record.len(), columns.len()));
    }
    let mut subject = BTreeMap::new();
    let mut regulation = None;
    let mut external_ref = None;
    let mut received_at = None;
    for (column, cell) in columns.iter().zip(record.iter()) {
        let cell = std::str::from_utf8(cell).map_err(|_| "not valid UTF-8".to_owned())?;
        if cell.trim().is_empty() {
            continue;
        }
        match column {
            Column::Identifier(kind) => {
                subject.insert(kind.clone(), cell.to_owned());
            }
            Column::Regulation => regulation = Some(cell.trim().to_owned()),
            Column::ExternalRef => external_ref = Some(cell.trim().to_owned()),
            Column::ReceivedAt => received_at = Some(received(cell.trim())?),
            Column::Ignored => {}
        }
    }
    if subject.is_empty() {
        return Err("no identifier".to_owned());
    }
    Ok(Submission {
        subject,
        regulation: regulation.unwrap_or_else(|| default_regulation.to_owned()),
        external_ref,
        received_at,
    })
}

/// A `received_at` cell: an RFC 3339 time, or a date read as its first
/// moment anywhere on earth (00:00 at UTC+14, the previous day's 10:00 UTC):
/// read as 00:00 UTC, a request that arrived on that date east of UTC would
/// count as received up to 14 hours late, and fall due as much later than
/// the law allows. The coordinator judges the range (not in the future, at
/// most a year ago). The cell is not quoted: it is the operator's input.
fn received(cell: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(cell, "%Y-%m-%d") {
        let earliest = chrono::FixedOffset::east_opt(14 * 3600).expect("a valid offset");
        return day
            .and_time(chrono::NaiveTime::MIN)
            .and_local_timezone(earliest)
            .single()
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| "received_at: not a valid date".to_owned());
    }
    crate::ops::parse_time(cell).map_err(|e| format!("received_at: {e}"))
}

/// The rows to send, each submission once, and the lines left out as
/// repeating an earlier one (→ its line). Submissions compare as the
/// coordinator would judge them: identifiers normalised (`Ada@Example.com`
/// is `ada@example.com`), the regulation's case ignored. A row whose
/// identifiers do not parse is kept for the coordinator to refuse.
fn first_of_each(rows: Vec<(u64, &Submission)>) -> (Vec<(u64, &Submission)>, BTreeMap<u64, u64>) {
    /// Normalised identifiers (type, value), regulation, reference, receipt.
    type Same = (Vec<(String, String)>, String, Option<String>, Option<DateTime<Utc>>);
    let same = |s: &Submission| -> Option<Same> {
        let mut subject = Vec::with_capacity(s.subject.len());
        for (kind, value) in &s.subject {
            let kind: IdentifierKind = kind.parse().ok()?;
            let value = lethe_core::Identifier::parse(kind.clone(), value).ok()?;
            subject.push((kind.as_str().to_owned(), value.expose().to_owned()));
        }
        subject.sort();
        Some((subject, s.regulation.trim().to_lowercase(), s.external_ref.clone(), s.received_at))
    };
    let mut seen = std::collections::HashMap::new();
    let (mut first, mut repeated) = (Vec::new(), BTreeMap::new());
    for (line, s) in rows {
        match same(s) {
            Some(key) => match seen.get(&key) {
                Some(earlier) => {
                    repeated.insert(line, *earlier);
                }
                None => {
                    seen.insert(key, line);
                    first.push((line, s));
                }
            },
            None => first.push((line, s)),
        }
    }
    (first, repeated)
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    pub read: usize,
    pub created: usize,
    pub replayed: usize,
    /// Line → the earlier line with the same submission, sent once.
    pub duplicates: BTreeMap<u64, u64>,
    /// Line → reason, both local and the coordinator's.
    pub rejected: BTreeMap<u64, String>,
}

impl Summary {
    fn progress(&self) -> String {
        format!(
            "created {}, replayed {}, duplicates {}, rejected {}",
            self.created,
            self.replayed,
            self.duplicates.len(),
            self.rejected.len()
        )
    }

    /// The report printed at the end; names rows by line only.
    pub fn render(&self, show_rejected: usize) -> String {
        let mut out = format!(
            "rows read:         {}\nrequests created:  {}\nalready created:   {} (replayed: sent by an earlier run of this file)\n",
            self.read, self.created, self.replayed,
        );
        if !self.duplicates.is_empty() {
            out.push_str(&format!(
                "duplicates:        {} (the same submission as an earlier line, sent once)\n",
                self.duplicates.len()
            ));
        }
        out.push_str(&format!("rejected:          {}\n", self.rejected.len()));
        for (line, reason) in self.rejected.iter().take(show_rejected) {
            out.push_str(&format!("  line {line}: {reason}\n"));
        }
        if self.rejected.len() > show_rejected {
            out.push_str(&format!("  …and {} more\n", self.rejected.len() - show_rejected));
        }
        out
    }
}

/// `<file>.rejected.csv`.
pub fn rejected_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".rejected.csv");
    PathBuf::from(name)
}

/// Writes the rejected rows as read, behind `line` and `reason` columns
/// (in front, so that a row with too many cells keeps them aligned).
fn write_rejected(path: &Path, parsed: &Parsed, rejected: &BTreeMap<u64, String>) -> anyhow::Result<()> {
    let kept = |cells: &[String]| -> Vec<String> {
        cells
            .iter()
            .enumerate()
            .filter(|(i, _)| parsed.columns.get(*i) != Some(&Column::Ignored))
            .map(|(_, c)| c.clone())
            .collect()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    let mut out = csv::WriterBuilder::new().flexible(true).from_writer(file);
    let mut header = vec!["line".to_owned(), "reason".to_owned()];
    header.extend(kept(&parsed.header));
    out.write_record(&header)?;
    for row in &parsed.rows {
        if let Some(reason) = rejected.get(&row.line) {
            let mut record = vec![row.line.to_string(), reason.clone()];
            record.extend(kept(&row.cells));
            out.write_record(&record)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Refuses a custom identifier type no configured system uses before
/// anything is sent: in a file without a header row the first person's
/// value is read as a column name (`c1042`), and that person would never
/// be submitted. Checks nothing if a system cannot tell its types.
async fn check_columns(client: &Client, parsed: &Parsed) -> anyhow::Result<()> {
    let mut used: Vec<String> = Vec::new();
    for s in &client.systems().await? {
        let Some(types) = s["identifier_types"].as_array() else { return Ok(()) };
        used.extend(types.iter().filter_map(|t| t.as_str().map(str::to_owned)));
    }
    for (i, c) in parsed.columns.iter().enumerate() {
        let Column::Identifier(kind) = c else { continue };
        let custom = matches!(kind.parse::<IdentifierKind>(), Ok(IdentifierKind::Custom(_)));
        if custom && !used.contains(kind) {
            used.sort();
            used.dedup();
            bail!(
                "column {} of the header row is a custom identifier type that no configured system uses \
                 (they use: {}); the first row must name the columns",
                i + 1,
                used.join(", ")
            );
        }
    }
    Ok(())
}

/// Runs an import; prints progress on stderr and the summary on stdout.
pub async fn run(client: &Client, args: &ImportArgs) -> anyhow::Result<Summary> {
    let shown = args.file.display();
    let bytes = std::fs::read(&args.file).with_context(|| format!("cannot read {shown}"))?;
    let parsed = parse(&bytes, &args.regulation).with_context(|| format!("{shown}"))?;
    check_columns(client, &parsed).await.with_context(|| format!("{shown}"))?;
    let prefix = key_prefix(&bytes);
    let mut summary = Summary { read: parsed.rows.len(), ..Summary::default() };
    let mut pending = Vec::new();
    for row in &parsed.rows {
        match &row.submission {
            Ok(s) => pending.push((row.line, s)),
            Err(reason) => {
                summary.rejected.insert(row.line, reason.clone());
            }
        }
    }
    let (pending, duplicates) = first_of_each(pending);
    summary.duplicates = duplicates;
    let terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let bar = if terminal { ProgressBar::new(summary.read as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} rows  {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position((summary.rejected.len() + summary.duplicates.len()) as u64);
    bar.set_message(summary.progress());
    let mut sent = 0;
    for (n, chunk) in pending.chunks(args.batch).enumerate() {
        if n > 0 && args.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        }
        let (first, last) = (chunk[0].0, chunk[chunk.len() - 1].0);
        let items: Vec<Value> = chunk
            .iter()
            .map(|(line, s)| {
                let mut request =
                    json!({"subject": s.subject, "regulation": s.regulation, "external_ref": s.external_ref});
                if let Some(at) = s.received_at {
                    request["received_at"] = json!(at.to_rfc3339_opts(SecondsFormat::Millis, true));
                }
                json!({ "request": request, "idempotency_key": row_key(&prefix, *line) })
            })
            .collect();
        let answer = client.post("/v1/requests:batch", &json!({ "requests": items })).await;
        let results = answer.and_then(|a| batch_results(&a, chunk.len())).map_err(|e| {
            // A body over the coordinator's limit, or a token refused,
            // fails the same way again.
            let text = e.to_string();
            let again = if text.contains("answered 413") {
                "run the same command again with a smaller --batch to resume"
            } else if text.contains("answered 401") {
                "give a valid token (--token or LETHE_TOKEN), the same one as before, and run the same \
                 command again to resume"
            } else if text.contains("answered 403") {
                "the token lacks the requests:submit scope; run the same command again with the token \
                 that started this import to resume"
            } else {
                "run the same command again, with the same token, to resume"
            };
            e.context(format!(
                "the batch of lines {first} to {last} was not accepted ({sent} rows were sent before it); \
                 {again}: rows already sent are answered as already created"
            ))
        });
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        for ((line, _), result) in chunk.iter().zip(results) {
            match result {
                Outcome::Created => summary.created += 1,
                Outcome::Replayed => summary.replayed += 1,
                Outcome::Refused(reason) => {
                    summary.rejected.insert(*line, reason);
                }
            }
        }
        sent += chunk.len();
        bar.inc(chunk.len() as u64);
        bar.set_message(summary.progress());
        if !terminal {
            // Rows refused or repeated before sending count as handled
            // from the start, so the count reaches the rows read.
            eprintln!(
                "lines {first} to {last} sent ({} rows); {} of {} rows handled: {}",
                chunk.len(),
                bar.position(),
                summary.read,
                summary.progress()
            );
        }
    }
    bar.finish_and_clear();
    print!("{}", summary.render(args.show_rejected));
    let rejected_file = rejected_path(&args.file);
    if summary.rejected.is_empty() {
        if rejected_file.exists() {
            std::fs::remove_file(&rejected_file)
                .with_context(|| format!("cannot remove {}", rejected_file.display()))?;
            println!("removed {} of an earlier run", rejected_file.display());
        }
    } else {
        write_rejected(&rejected_file, &parsed, &summary.rejected)
            .with_context(|| format!("cannot write {}", rejected_file.display()))?;
        println!(
            "rejected rows written to {} with their reasons; it holds their identifiers: delete it once dealt with",
            rejected_file.display()
        );
    }
    std::io::stdout().flush()?;
    Ok(summary)
}

/// One item's answer.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Created,
    Replayed,
    Refused(String),
}

fn batch_results(answer: &Value, expected: usize) -> anyhow::Result<Vec<Outcome>> {
    let results = answer.get("results").and_then(Value::as_array).context("the answer has no results")?;
    if results.len() != expected {
        bail!("the answer has {} results for {expected} requests", results.len());
    }
    results
        .iter()
        .map(|r| {
            if let Some(error) = r.get("error").and_then(Value::as_str) {
                Ok(Outcome::Refused(error.to_owned()))
            } else if r.get("id").is_none_or(Value::is_null) {
                bail!("an item of the answer has neither an id nor an error")
            } else if r.get("replayed").and_then(Value::as_bool) == Some(true) {
                Ok(Outcome::Replayed)
            } else {
                Ok(Outcome::Created)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(p: &Parsed) -> Vec<(u64, Submission)> {
        p.rows.iter().filter_map(|r| r.submission.clone().ok().map(|s| (r.line, s))).collect()
    }

    fn refused(p: &Parsed) -> Vec<(u64, String)> {
        p.rows.iter().filter_map(|r| r.submission.clone().err().map(|e| (r.line, e))).collect()
    }

    #[test]
    fn import_sends_a_repeated_submission_once() {
        let csv = "email,regulation,external_ref\n\
                   imp1@example.com,,R1\n\
                   IMP1@Example.com ,GDPR,R1\n\
                   imp1@example.com,,R2\n\
                   imp1@example.com,ccpa,R1\n\
                   not-an-email,,\n\
                   not-an-email,,\n";
        let p = parse(csv.as_bytes(), "gdpr").expect("parse");
        let rows = sent(&p);
        let (first, repeated) = first_of_each(rows.iter().map(|(l, s)| (*l, s)).collect());
        let lines: Vec<u64> = first.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [2, 4, 5, 6, 7], "another ref or regulation is another submission");
        assert_eq!(repeated, BTreeMap::from([(3, 2)]));
        let summary = Summary { read: 7, created: 5, duplicates: repeated, ..Summary::default() };
        assert!(summary.render(10).contains("duplicates:        1"), "{}", summary.render(10));
    }

    #[test]
    fn import_rows_with_overrides_skipped_cells_and_line_numbers() {
        let csv = "Email,phone,regulation,external_ref,loyalty_number\n\
                   a@example.com,,,T-1,\n\
                   ,+44 20 7946 0958,ccpa,,\n\
                   \n\
                   b@example.com,,,\"two\nlines\",L-9\n\
                   c@example.com,,gdpr\n\
                   ,,gdpr,T-5,\n\
                   d@example.com,,,,,extra\n";
        let p = parse(csv.as_bytes(), "uk-gdpr").expect("parse");
        assert_eq!(p.rows.len(), 6, "the blank line is not a row");
        let ok = sent(&p);
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].0, 2);
        assert_eq!(ok[0].1.subject, BTreeMap::from([("email".to_owned(), "a@example.com".to_owned())]));
        assert_eq!(ok[0].1.regulation, "uk-gdpr");
        assert_eq!(ok[0].1.external_ref.as_deref(), Some("T-1"));
        assert_eq!(ok[1].0, 3);
        assert_eq!(ok[1].1.subject.keys().collect::<Vec<_>>(), ["phone"]);
        assert_eq!(ok[1].1.regulation, "ccpa");
        assert_eq!(ok[1].1.external_ref, None);
        assert_eq!(ok[2].0, 5, "a row starts where its first cell does");
        assert_eq!(ok[2].1.subject.keys().collect::<Vec<_>>(), ["email", "loyalty_number"]);
        assert_eq!(ok[2].1.external_ref.as_deref(), Some("two\nlines"));
        let bad = refused(&p);
        assert_eq!(bad[0], (7, "3 cells where the header has 5".to_owned()));
        assert_eq!(bad[1], (8, "no identifier".to_owned()));
        assert_eq!(bad[2], (9, "6 cells where the header has 5".to_owned()));
    }

    #[test]
    fn import_reads_when_each_request_was_received() {
        let csv = "email,received_at\n\
                   a@example.com,2026-03-31\n\
                   b@example.com, 2026-03-31T14:05:00+02:00 \n\
                   c@example.com,31/03/2026\n\
                   d@example.com,\n\
                   a@example.com,2026-03-30\n\
                   e@example.com,yesterday\n";
        let p = parse(csv.as_bytes(), "gdpr").expect("parse");
        let ok = sent(&p);
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("time");
        assert_eq!(
            ok[0].1.received_at,
            Some(at("2026-03-30T10:00:00Z")),
            "a date: its first moment anywhere (00:00 at UTC+14)"
        );
        assert_eq!(ok[1].1.received_at, Some(at("2026-03-31T12:05:00Z")), "an offset is honoured");
        assert_eq!((ok[2].0, ok[2].1.received_at), (5, None), "an empty cell: received now");
        assert_eq!(ok[3].0, 6);
        let bad = refused(&p);
        assert_eq!(bad.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [4, 7]);
        assert!(bad[0].1.starts_with("received_at: expected an RFC 3339 time"), "{}", bad[0].1);
        assert!(!bad[0].1.contains("31/03"), "the cell is not quoted: {}", bad[0].1);
        let (first, repeated) = first_of_each(ok.iter().map(|(l, s)| (*l, s)).collect());
        assert_eq!(first.len(), 4, "another receipt is another submission");
        assert!(repeated.is_empty());
    }

    #[test]
    fn import_line_numbers_survive_blank_lines_and_crlf() {
        let lines = |csv: &str| -> Vec<u64> {
            parse(csv.as_bytes(), "gdpr").expect("parse").rows.iter().map(|r| r.line).collect()
        };
        assert_eq!(lines("email\r\na@x.org\r\n\r\nb@x.org\r\n"), [2, 4]);
        assert_eq!(lines("email\n\n\na@x.org\n\"q\n@x.org\"\n\n\nc@x.org"), [4, 5, 9]);
        assert_eq!(lines("email\ra@x.org\r\rb@x.org\r"), [2, 4]);
    }

    #[test]
    fn import_refuses_a_quote_never_closed() {
        let csv = "email,regulation\na@x.org,gdpr\n\nb@x.org,\"gdpr\nc@x.org,gdpr\nd@x.org,gdpr\n";
        let err = parse(csv.as_bytes(), "gdpr").unwrap_err().to_string();
        assert!(err.contains("line 4: a quoted cell is never closed"), "{err}");
        assert!(!err.contains("x.org"), "{err}");
        let err = parse(b"email\n\"a@x.org", "gdpr").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        // Closed quotes, doubled quotes inside them, literal quotes after a
        // closing one or inside an unquoted cell, and a last row without a
        // line end are all well formed.
        for csv in [
            "email,external_ref\na@x.org,\"say \"\"hi\"\"\"\n",
            "email,external_ref\na@x.org,\"two\nlines\"",
            "email,external_ref\na@x.org,\"ab\"c\"d\nb@x.org,x\"y\n",
            "email,external_ref\n\"a@x.org\",\"\"\r\n",
        ] {
            let p = parse(csv.as_bytes(), "gdpr").unwrap_or_else(|e| panic!("{csv:?}: {e}"));
            assert_eq!(sent(&p).len(), p.rows.len(), "{csv:?}");
        }
    }

    #[test]
    fn import_header_without_identifier_column_is_refused() {
        let err = parse(b"regulation,external_ref\ngdpr,T-1\n", "gdpr").unwrap_err().to_string();
        assert!(err.contains("no identifier column"), "{err}");
        let err = parse(b"", "gdpr").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = parse(b"email,email\na@example.com,b@example.com\n", "gdpr").unwrap_err().to_string();
        assert!(err.contains("column 2 of the header row repeats column 1"), "{err}");
    }

    #[test]
    fn import_names_a_semicolon_or_tab_separated_file() {
        let err = format!("{:#}", parse(b"email;external_ref\na@x.org;T-1\n", "gdpr").unwrap_err());
        assert!(err.contains("comma-separated") && err.contains("';'"), "{err}");
        let err = format!("{:#}", parse(b"email\texternal_ref\n", "gdpr").unwrap_err());
        assert!(err.contains("a tab"), "{err}");
    }

    #[test]
    fn import_header_errors_never_quote_the_header() {
        // A file without a header row: its first row is taken as the header.
        let err = parse(b"Ada.Lovelace@Example.com,gdpr\nb@example.com,gdpr\n", "gdpr").unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("column 1 of the header row"), "{err}");
        assert!(!err.to_ascii_lowercase().contains("lovelace"), "{err}");
    }

    #[test]
    fn import_ignores_a_bom_and_the_rejected_files_columns() {
        let p = parse("\u{feff}line,reason,email\n7,no identifier,a@example.com\n".as_bytes(), "gdpr")
            .expect("parse");
        let ok = sent(&p);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1.subject, BTreeMap::from([("email".to_owned(), "a@example.com".to_owned())]));
    }

    #[test]
    fn import_keys_derive_from_the_content_and_the_line() {
        let a = b"email\na@example.com\n";
        let b = b"email\nb@example.com\n";
        assert_eq!(key_prefix(a), key_prefix(a));
        assert_ne!(key_prefix(a), key_prefix(b));
        let key = row_key(&key_prefix(a), 2);
        let digest = hex::encode(Sha256::digest(a));
        assert_eq!(key, format!("import:{}:2", &digest[..32]));
        assert_ne!(key, row_key(&key_prefix(a), 3));
        assert!(key.len() <= 255 && key.bytes().all(|c| c.is_ascii_graphic()), "{key}");
    }

    #[test]
    fn import_batch_size_is_bounded() {
        assert_eq!(batch_size("500"), Ok(500));
        assert_eq!(batch_size("1000"), Ok(1000));
        assert!(batch_size("0").is_err());
        assert!(batch_size("1001").is_err());
    }

    #[test]
    fn import_batch_answers_are_read_in_order() {
        let answer = json!({"results": [
            {"id": "x", "status": "received", "due_at": "2026-01-01T00:00:00Z", "replayed": false, "error": null},
            {"id": "y", "status": "received", "due_at": "2026-01-01T00:00:00Z", "replayed": true, "error": null},
            {"id": null, "status": null, "due_at": null, "replayed": false, "error": "subject: email is not valid"},
        ]});
        let results = batch_results(&answer, 3).expect("results");
        assert_eq!(
            results,
            [Outcome::Created, Outcome::Replayed, Outcome::Refused("subject: email is not valid".into())]
        );
        assert!(batch_results(&answer, 2).is_err());
    }

    #[test]
    fn import_summary_lists_lines_and_writes_the_rejected_file() {
        let csv = "email,reason,regulation\n,x,gdpr\nb@example.com,,gdpr,extra\nc@example.com,,gdpr\n";
        let p = parse(csv.as_bytes(), "gdpr").expect("parse");
        let mut summary = Summary { read: 3, ..Summary::default() };
        for r in &p.rows {
            if let Err(e) = &r.submission {
                summary.rejected.insert(r.line, e.clone());
            }
        }
        summary.rejected.insert(4, "regulation: unknown".to_owned());
        let text = summary.render(2);
        assert!(text.contains("rejected:          3"), "{text}");
        assert!(text.contains("  line 2: no identifier\n"), "{text}");
        assert!(text.contains("  line 3: 4 cells where the header has 3\n"), "{text}");
        assert!(text.contains("…and 1 more"), "{text}");
        assert!(!text.contains("example.com"), "{text}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = rejected_path(&dir.path().join("people.csv"));
        assert!(path.ends_with("people.csv.rejected.csv"));
        write_rejected(&path, &p, &summary.rejected).expect("write");
        let written = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            written,
            "line,reason,email,regulation\n2,no identifier,,gdpr\n\
             3,4 cells where the header has 3,b@example.com,gdpr,extra\n\
             4,regulation: unknown,c@example.com,gdpr\n"
        );
        let again = parse(written.as_bytes(), "gdpr").expect("the rejected file parses");
        assert_eq!(again.rows.len(), 3);
    }
}
