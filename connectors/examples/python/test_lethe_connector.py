"""Offline tests of the runtime and the example connector (no broker, no
coordinator): envelope checks, identifier sealing, retention arithmetic, and
whole tasks run against a temporary SQLite file.

    python3 -m unittest discover -s connectors/examples/python -v

The end-to-end test against Kafka and a real coordinator is
``tests/e2e_python.rs`` (``cargo test -p lethe --test e2e_python``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import sqlite3
import tempfile
import unittest
import uuid

import example_connector as ex
import lethe_connector as lc

UTC = dt.timezone.utc


def at(y: int, m: int, d: int) -> dt.datetime:
    return dt.datetime(y, m, d, tzinfo=UTC)


class FakeKeys:
    """A coordinator that knows one task's key (or none)."""

    def __init__(self, key: bytes | None, task_id: uuid.UUID | None = None):
        self.key, self.task_id, self.calls = key, task_id, 0

    def fetch(self, task_id: uuid.UUID, attempt: int | None = None) -> bytes:
        self.calls += 1
        self.attempt = attempt
        if self.key is None or task_id != self.task_id:
            raise lc.KeyRefused()
        return self.key


def task_json(request_id: uuid.UUID, task_id: uuid.UUID, identifiers: list[dict], **extra) -> dict:
    """A task message as the coordinator writes it (docs/protocol.md)."""
    doc = {
        "version": 1,
        "task_id": str(task_id),
        "request_id": str(request_id),
        "system": "clubhouse",
        "action": "retain",
        "attempt": 1,
        "regulation": "gdpr",
        "due_at": "2026-12-29T09:09:06.123456789Z",
        "identifiers": identifiers,
        "categories": [
            {"category": "marketing.profile", "action": "erase"},
            {
                "category": "billing.invoice",
                "action": "retain",
                "basis": "HGB §257: 10 years",
                "period": "P10Y",
                "cutoff": "2016-11-29T09:09:06.456Z",
                "until": "2036-11-29T09:09:06.456Z",
            },
        ],
        "issued_at": "2026-11-29T09:09:06.456Z",
    }
    doc.update(extra)
    return doc


class Envelope(unittest.TestCase):
    def setUp(self) -> None:
        self.request, self.task = uuid.uuid4(), uuid.uuid4()
        self.doc = task_json(self.request, self.task, [{"type": "email", "ciphertext": "AAAA"}])

    def decode(self, doc) -> lc.TaskMessage:
        return lc.decode_task(json.dumps(doc).encode())

    def test_a_protocol_task_decodes(self) -> None:
        task = self.decode(self.doc)
        self.assertEqual((task.task_id, task.request_id, task.attempt), (self.task, self.request, 1))
        self.assertEqual(task.issued_at, dt.datetime(2026, 11, 29, 9, 9, 6, 456000, tzinfo=UTC))
        self.assertEqual(task.due_at.microsecond, 123456, "nanoseconds are cut to microseconds")
        invoice = task.directives["billing.invoice"]
        self.assertEqual((invoice.action, invoice.period), ("retain", "P10Y"))
        self.assertEqual(invoice.issued_at, task.issued_at)
        self.assertNotIn("identity.contact", task.directives)

    def test_the_job_of_an_earlier_attempt_comes_with_the_directives(self) -> None:
        self.assertIsNone(self.decode(self.doc).directives.job)
        self.assertIsNone(self.decode({**self.doc, "job": None}).directives.job)
        job = {"id": "job-7", "accepted_at": "2026-11-29T09:00:00Z"}
        task = self.decode({**self.doc, "job": job})
        self.assertEqual(task.directives.job, lc.Job("job-7", dt.datetime(2026, 11, 29, 9, tzinfo=UTC)))
        with self.assertRaises(lc.Undecodable):
            self.decode({**self.doc, "job": {"id": "job-7"}})

    def assert_undecodable(self, raw: bytes, reason: str) -> None:
        with self.assertRaises(lc.Undecodable) as caught:
            lc.decode_task(raw)
        self.assertIn(reason, str(caught.exception))

    def test_fields_added_within_the_version_are_ignored(self) -> None:
        added = {**self.doc, "extra": 1, "categories": [{"category": "a", "action": "erase", "why": "?"}]}
        task = lc.decode_task(json.dumps(added).encode())
        self.assertEqual(task.task_id, lc.decode_task(json.dumps(self.doc).encode()).task_id)
        # A later version is refused by its number, whatever its fields.
        self.assert_undecodable(json.dumps({"version": 2, "anything": "else"}).encode(), "unsupported envelope version 2")

    def test_an_attempt_or_regulation_out_of_range_is_undecodable(self) -> None:
        self.assert_undecodable(json.dumps({**self.doc, "attempt": 0}).encode(), "task.attempt")
        self.assert_undecodable(json.dumps({**self.doc, "attempt": 2**32}).encode(), "task.attempt")
        self.assert_undecodable(json.dumps({**self.doc, "regulation": "hipaa"}).encode(), "task.regulation")

    def test_what_is_not_a_version_1_task_is_undecodable(self) -> None:
        self.assert_undecodable(b"{not json", "invalid envelope")
        self.assert_undecodable(b"", "invalid envelope")
        self.assert_undecodable(b"\xff\xfe", "invalid envelope")
        self.assert_undecodable(b"[1]", "not a JSON object")
        version_2 = json.dumps({**self.doc, "version": 2}).encode()
        self.assert_undecodable(version_2, "unsupported envelope version 2")
        self.assert_undecodable(json.dumps({**self.doc, "version": "1"}).encode(), "version")
        doc = dict(self.doc)
        del doc["issued_at"]
        self.assert_undecodable(json.dumps(doc).encode(), "lacks issued_at")
        self.assert_undecodable(json.dumps({**self.doc, "task_id": "x"}).encode(), "task_id is not a UUID")
        self.assert_undecodable(json.dumps({**self.doc, "action": "shred"}).encode(), "task.action")
        bad = {**self.doc, "identifiers": [{"type": "email"}]}
        self.assert_undecodable(json.dumps(bad).encode(), "task.identifiers[0] lacks ciphertext")
        bad = {**self.doc, "issued_at": "yesterday"}
        self.assert_undecodable(json.dumps(bad).encode(), "issued_at is not an RFC 3339 timestamp")


class Sealing(unittest.TestCase):
    def test_open_reverses_seal_and_binds_request_and_type(self) -> None:
        key, request = secrets.token_bytes(32), uuid.uuid4()
        sealed = lc.seal_identifier(key, request, "email", "ada@example.com")
        self.assertEqual(lc.open_identifier(key, request, "email", sealed).value, "ada@example.com")
        for args in [
            (secrets.token_bytes(32), request, "email", sealed),
            (key, uuid.uuid4(), "email", sealed),
            (key, request, "phone", sealed),
            (key, request, "email", "not base64!"),
            (key, request, "email", "AAAA"),
        ]:
            with self.assertRaises(lc.PermanentError):
                lc.open_identifier(*args)

    def test_identifiers_never_show_their_values(self) -> None:
        ids = lc.Identifiers([lc.Identifier("email", "ada@example.com")])
        for text in (repr(ids), str(ids), repr(ids[0]), str(ids[0]), repr(list(ids))):
            self.assertNotIn("ada@", text)
        self.assertEqual(ids.values("email"), ["ada@example.com"])


class Retention(unittest.TestCase):
    def test_periods_clamp_to_the_end_of_a_shorter_month(self) -> None:
        self.assertEqual(lc.add_period(at(2024, 2, 29), "P1Y"), at(2025, 2, 28))
        self.assertEqual(lc.add_period(at(2024, 1, 31), "P1M"), at(2024, 2, 29))
        self.assertEqual(lc.add_period(at(2024, 11, 30), "P3M"), at(2025, 2, 28))
        self.assertEqual(lc.add_period(at(2024, 5, 10), "P10Y"), at(2034, 5, 10))
        self.assertEqual(lc.add_period(at(2024, 12, 31), "P30D"), at(2025, 1, 30))
        with self.assertRaises(ValueError):
            lc.add_period(at(2024, 1, 1), "10 years")

    def test_directives_decide_what_is_kept(self) -> None:
        issued = at(2026, 11, 29)
        ends = {"cutoff": at(2016, 11, 29), "until": at(2036, 11, 29)}
        retain = lc.Directive("billing.invoice", "retain", issued, "HGB", "P10Y", **ends)
        self.assertFalse(retain.keeps(at(2016, 11, 29)), "at the cutoff the period is over")
        self.assertTrue(retain.keeps(at(2016, 11, 30)))
        self.assertEqual(retain.kept_until(at(2024, 5, 10)), at(2034, 5, 10))
        self.assertTrue(retain.keeps(None), "undated: kept until `until`")
        self.assertEqual(retain.kept_until(None), at(2036, 11, 29))
        ended = lc.Directive("x", "retain", at(2036, 11, 29), "HGB", "P10Y", until=at(2036, 11, 29))
        self.assertFalse(ended.keeps(None), "issued at `until`: the retention has ended")
        hold = lc.Directive("x", "hold", issued, "legal hold LIT-1: litigation")
        self.assertTrue(hold.keeps(at(1990, 1, 1)) and hold.keeps(None))
        self.assertIsNone(hold.kept_until(None))
        for action in ("erase", "anonymize"):
            self.assertFalse(lc.Directive("x", action, issued).keeps(at(2026, 1, 1)))


class Results(unittest.TestCase):
    """What a result may carry, as the coordinator takes it."""

    def test_texts_naming_the_subject_are_withheld(self) -> None:
        ada = lc.Identifier("email", "ada@example.com")
        phone = lc.Identifier("phone", "+442079460958")
        for text, named in [
            ("no row for ADA@Example.com", True),
            ("GET /users?email=ada%40example.com failed", True),
            ("hash " + hashlib.md5(b"ada@example.com").hexdigest(), True),
            ("ada\u200b@example.com is locked", True),
            ("call 020 7946 0958 failed", True),
            ("the table is locked", False),
        ]:
            self.assertEqual(ada.appears_in(text) or phone.appears_in(text), named, text)
        outcome = lc.screened(
            {"status": "retained_in_part", "datasets": [{"dataset": "rows of ada@example.com", "deleted": 1,
                                                          "anonymized": 0}],
             "retained": [{"dataset": "invoices", "category": "billing", "count": 1,
                           "basis": "kept for ada@example.com"}], "residual": 0},
            [ada],
        )
        self.assertEqual(outcome["datasets"][0]["dataset"], lc.WITHHELD_TEXT)
        self.assertEqual(outcome["retained"][0]["basis"], lc.WITHHELD_TEXT)
        self.assertEqual(outcome["retained"][0]["dataset"], "invoices")
        failed = lc.screened(lc.failed(lc.PermanentError("ada@example.com is locked")), [ada])
        self.assertEqual(failed["reason"], lc.WITHHELD_REASON)

    def test_texts_are_cut_as_the_coordinator_cuts_them(self) -> None:
        self.assertEqual(lc.cut("short", 10), "short")
        long = "é" * 300  # 600 bytes
        reason = lc.failed(lc.RetryableError(long))["reason"]
        self.assertTrue(reason.endswith("…"))
        self.assertLessEqual(len(reason[:-1].encode()), lc.MAX_REASON_BYTES)
        kept = lc.RetainedReport("d" * 300, "c" * 300, 1, "b" * 600).to_json()
        self.assertEqual(len(kept["dataset"].encode()), lc.MAX_NAME_BYTES + len("…".encode()))
        self.assertEqual(len(kept["category"].encode()), lc.MAX_NAME_BYTES + len("…".encode()))
        self.assertEqual(len(kept["basis"].encode()), lc.MAX_REASON_BYTES + len("…".encode()))

    def test_what_the_coordinator_would_refuse_is_a_named_permanent_failure(self) -> None:
        for erasure, residual, named in [
            (lc.Erasure([lc.DatasetReport("t", deleted=1.0)]), 0, "count"),
            (lc.Erasure([lc.DatasetReport("t", deleted=True)]), 0, "count"),
            (lc.Erasure([lc.DatasetReport("t", deleted=-1)]), 0, "count"),
            (lc.Erasure([lc.DatasetReport("t", deleted=1)]), None, "count"),
            (lc.Erasure.pending(""), 0, "job id"),
            (lc.Erasure.pending("x" * 1025), 0, "job id"),
            (lc.Erasure.pending("job\n7"), 0, "control characters"),
            (lc.Erasure.pending("job-7", 1.5), 0, "poll_after_seconds"),
        ]:
            outcome = lc.outcome_of(erasure, residual)
            self.assertEqual((outcome["status"], outcome["retryable"]), ("failed", False), outcome)
            self.assertIn(named, outcome["reason"])
        self.assertEqual(lc.outcome_of(lc.Erasure.pending("job-7", 30), 0)["status"], "accepted")

    def test_a_dataset_not_searched_is_reported_not_hidden_in_not_found(self) -> None:
        nothing = lc.outcome_of(lc.Erasure([lc.DatasetReport("t")]), 0)
        self.assertEqual(nothing, {"status": "not_found", "residual": 0})
        unsearched = lc.outcome_of(lc.Erasure([lc.DatasetReport("t", not_searched=True)]), 0)
        self.assertEqual(unsearched["status"], "erased")
        self.assertEqual(unsearched["datasets"], [{"dataset": "t", "deleted": 0, "anonymized": 0, "not_searched": True}])


class Tasks(unittest.TestCase):
    """Whole tasks through :class:`lethe_connector.Runner` and the example connector."""

    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.dir.name, "clubhouse.db")
        with sqlite3.connect(self.db) as conn:
            conn.executescript(ex.SCHEMA)
            conn.executemany(
                "INSERT INTO newsletter (id, email, first_name, subscribed_at) VALUES (?, ?, ?, ?)",
                [(1, "  Ada@Example.COM ", "Ada", "2020-01-01"), (2, "bob@example.com", "Bob", "2021-01-01")],
            )
            conn.executemany(
                "INSERT INTO invoices (id, email, issued_on, amount_cents) VALUES (?, ?, ?, ?)",
                [(10, "ada@example.com", "2012-03-01", 100), (11, "ADA@example.com", "2024-05-10", 200),
                 (20, "bob@example.com", "2010-01-01", 300)],
            )
        self.key, self.request, self.task_id = secrets.token_bytes(32), uuid.uuid4(), uuid.uuid4()
        settings = lc.Settings("127.0.0.1:9", "clubhouse", "http://127.0.0.1:9", "token", first_backoff=0.01)
        self.runner = lc.Runner(settings, ex.ClubhouseConnector(self.db), FakeKeys(self.key, self.task_id))

    def tearDown(self) -> None:
        self.dir.cleanup()

    def task(self, email: str, **extra) -> lc.TaskMessage:
        sealed = lc.seal_identifier(self.key, self.request, "email", email)
        doc = task_json(self.request, self.task_id, [{"type": "email", "ciphertext": sealed}], **extra)
        return lc.decode_task(json.dumps(doc).encode())

    def rows(self, table: str) -> list[int]:
        with sqlite3.connect(self.db) as conn:
            return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]

    def test_erase_retain_then_nothing_left_to_do(self) -> None:
        with self.assertLogs("lethe.connector", "INFO") as logs:
            result = self.runner.process(self.task("ada@example.com"))
        self.assertEqual(result["task_id"], str(self.task_id))
        self.assertEqual(result["task_issued_at"], "2026-11-29T09:09:06.456Z")
        self.assertEqual(self.runner.keys.attempt, 1, "the key is asked for the attempt held")
        outcome = result["outcome"]
        self.assertEqual(outcome["status"], "retained_in_part", outcome)
        self.assertEqual(outcome["residual"], 0)
        self.assertEqual(
            outcome["datasets"],
            [{"dataset": "newsletter", "deleted": 1, "anonymized": 0},
             {"dataset": "invoices", "deleted": 1, "anonymized": 0}],
        )
        self.assertEqual(
            outcome["retained"],
            [{"dataset": "invoices", "category": "billing.invoice", "count": 1, "basis": "HGB §257: 10 years",
              "until": "2034-05-10T00:00:00.000Z"}],
        )
        self.assertEqual(self.rows("newsletter"), [2])
        self.assertEqual(self.rows("invoices"), [11, 20])
        self.assertFalse(any("ada@" in line.lower() for line in logs.output), logs.output)

        again = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual(again["status"], "retained_in_part", "the kept invoice is still reported")
        self.assertEqual([d["deleted"] for d in again["datasets"]], [0, 0])

    def test_stored_addresses_are_normalised_as_the_coordinator_does(self) -> None:
        # SQLite's lower() and trim() know only ASCII and spaces: these rows
        # would be "not found", verified, while they are still there.
        with sqlite3.connect(self.db) as conn:
            conn.executemany(
                "INSERT INTO newsletter (id, email, first_name, subscribed_at) VALUES (?, ?, ?, ?)",
                [(3, "\tJÖRG@Example.DE", "Jörg", "2020-01-01"),
                 (4, "jo\u0308rg@example.de", "Jörg", "2020-01-01"),
                 (5, "jorg@example.de", "Jorg", "2020-01-01")],
            )
        outcome = self.runner.process(self.task("jörg@example.de"))["outcome"]
        self.assertEqual(outcome["datasets"][0], {"dataset": "newsletter", "deleted": 2, "anonymized": 0})
        self.assertEqual(self.rows("newsletter"), [1, 2, 5], "another address stays")

    def test_anonymize_keeps_the_rows_without_the_subject(self) -> None:
        categories = [{"category": c, "action": "anonymize"} for c in ("marketing.profile", "billing.invoice")]
        outcome = self.runner.process(self.task("ada@example.com", action="anonymize", categories=categories))
        outcome = outcome["outcome"]
        self.assertEqual(outcome["status"], "erased", outcome)
        self.assertEqual(outcome["residual"], 0)
        self.assertEqual(
            outcome["datasets"],
            [{"dataset": "newsletter", "deleted": 0, "anonymized": 1},
             {"dataset": "invoices", "deleted": 0, "anonymized": 2}],
        )
        with sqlite3.connect(self.db) as conn:
            invoices = conn.execute("SELECT id, email, amount_cents FROM invoices ORDER BY id").fetchall()
            subscriber = conn.execute("SELECT email, first_name FROM newsletter WHERE id = 1").fetchone()
        self.assertEqual(invoices, [(10, "anonymised-10@invalid", 100), (11, "anonymised-11@invalid", 200),
                                    (20, "bob@example.com", 300)])
        self.assertEqual(subscriber, ("anonymised-1@invalid", None))
        again = self.runner.process(self.task("ada@example.com", action="anonymize", categories=categories))
        self.assertEqual(again["outcome"], {"status": "not_found", "residual": 0}, "idempotent")

    def test_a_worker_refuses_to_start_with_a_rejected_token(self) -> None:
        class Refused(FakeKeys):
            def token_accepted(self):
                return False

        settings = lc.Settings("127.0.0.1:9", "clubhouse", "http://127.0.0.1:9", "token", client={"log_level": "0"})
        worker = lc.Worker(settings, ex.ClubhouseConnector(self.db), Refused(self.key))
        with self.assertRaises(SystemExit) as caught:
            worker.run()
        self.assertIn("rejects the connector token", str(caught.exception))

    def test_hold_keeps_everything_without_an_end(self) -> None:
        categories = [{"category": c, "action": "hold", "basis": "legal hold LIT-1: litigation"}
                      for c in ("marketing.profile", "billing.invoice")]
        task = self.task("bob@example.com", action="hold", categories=categories)
        outcome = self.runner.process(task)["outcome"]
        self.assertEqual(outcome["status"], "retained_in_part")
        self.assertEqual([(r["dataset"], r["count"], "until" in r) for r in outcome["retained"]],
                         [("newsletter", 1, False), ("invoices", 1, False)])
        self.assertEqual((self.rows("newsletter"), self.rows("invoices")), ([1, 2], [10, 11, 20]))

    def test_an_unknown_subject_is_not_found(self) -> None:
        outcome = self.runner.process(self.task("nobody@example.com"))["outcome"]
        self.assertEqual(outcome, {"status": "not_found", "residual": 0})

    def test_failures_are_classified_and_carry_no_identifier(self) -> None:
        self.runner.keys = FakeKeys(None)
        outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual((outcome["status"], outcome["retryable"]), ("failed", False))
        self.assertIn("no key", outcome["reason"])

        self.runner.keys = FakeKeys(secrets.token_bytes(32), self.task_id)
        outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual((outcome["retryable"], outcome["reason"]),
                         (False, "identifiers could not be decrypted with the request's key"))

        self.runner.keys = FakeKeys(self.key, self.task_id)
        self.runner.connector = ex.ClubhouseConnector(os.path.join(self.dir.name, "missing.db"))
        outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual((outcome["status"], outcome["retryable"]), ("failed", False), outcome)

        class Broken(lc.Connector):
            def erase(self, identifiers, directives):
                raise ValueError(f"cannot handle {identifiers.values('email')[0]}")

        class Chatty(lc.Connector):
            def erase(self, identifiers, directives):
                raise lc.PermanentError(f"no consent record for {identifiers.values('email')[0]}")

        self.runner.connector = Chatty()
        outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual(outcome["reason"], lc.WITHHELD_REASON, "a reason naming the subject is withheld")

        self.runner.connector = Broken()
        with self.assertLogs("lethe.connector", "ERROR") as logs:
            outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual(outcome["reason"], "unexpected ValueError in erase; see the worker's log")
        self.assertFalse(any("ada@" in line for line in logs.output), logs.output)

        # A connector that returns no Erasure fails its task; the worker
        # does not stop on it (the message would come back for ever).
        class Careless(lc.Connector):
            def erase(self, identifiers, directives):
                return None

            def verify(self, identifiers, directives):
                return 0

        self.runner.connector = Careless()
        with self.assertLogs("lethe.connector", "ERROR"):
            outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual((outcome["status"], outcome["retryable"]), ("failed", False), outcome)
        self.assertIn("unexpected AttributeError", outcome["reason"])

    def test_an_asynchronous_job_is_accepted_then_checked(self) -> None:
        class Async(lc.Connector):
            verified = 0

            def erase(self, identifiers, directives):
                if directives.job is None:
                    return lc.Erasure.pending("job-1", 60)
                return lc.Erasure([lc.DatasetReport("contacts", deleted=1)])

            def verify(self, identifiers, directives):
                self.verified += 1
                return 0

        connector = self.runner.connector = Async()
        outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual(outcome, {"status": "accepted", "job_id": "job-1", "poll_after_seconds": 60})
        self.assertEqual(connector.verified, 0, "nothing to verify while the job runs")
        job = {"id": "job-1", "accepted_at": "2026-11-29T09:00:00Z"}
        outcome = self.runner.process(self.task("ada@example.com", job=job))["outcome"]
        self.assertEqual(outcome["status"], "erased")
        self.assertEqual(connector.verified, 1)

    def test_a_retry_first_asks_whether_the_attempt_is_still_wanted(self) -> None:
        class Flaky(lc.Connector):
            calls = 0

            def erase(self, identifiers, directives):
                self.calls += 1
                raise lc.RetryableError("store busy")

        keys = self.runner.keys = FakeKeys(self.key, self.task_id)
        connector = self.runner.connector = Flaky()
        real_fetch = keys.fetch

        def withdrawn_after_the_first(task_id, attempt=None):
            # A legal hold lands while the worker backs off: the
            # coordinator refuses the attempt's key from then on.
            if keys.calls >= 1:
                keys.calls += 1
                raise lc.KeyRefused()
            return real_fetch(task_id, attempt)

        keys.fetch = withdrawn_after_the_first
        with self.assertLogs("lethe.connector", "WARNING"):
            outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual((outcome["status"], outcome["retryable"]), ("failed", False), outcome)
        self.assertIn("withdrawn while it was retried", outcome["reason"])
        self.assertEqual(connector.calls, 1, "nothing more is tried once the attempt is withdrawn")
        self.assertEqual(keys.calls, 2, "the key, then the check before the retry")

    def test_an_attempt_withdrawn_while_it_runs_stops_and_reports_what_it_did(self) -> None:
        class Batched(lc.Connector):
            """Deletes 500 events in five batches, asking between batches."""

            batches = 0

            def erase(self, identifiers, directives):
                report = lc.DatasetReport("events")
                for _ in range(5):
                    if not directives.still_wanted():
                        break
                    self.batches += 1
                    report.deleted += 100
                return lc.Erasure([report])

            def verify(self, identifiers, directives):
                return 500 - 100 * self.batches

        keys = self.runner.keys = FakeKeys(self.key, self.task_id)
        real_fetch = keys.fetch

        def withdrawn_after_three_checks(task_id, attempt=None):
            # The key, then "still wanted" twice; a legal hold lands before
            # the third check.
            if keys.calls >= 3:
                keys.calls += 1
                raise lc.KeyRefused()
            return real_fetch(task_id, attempt)

        keys.fetch = withdrawn_after_three_checks
        connector = self.runner.connector = Batched()
        self.runner.settings.wanted_every = 0.0
        with self.assertLogs("lethe.connector", "WARNING") as logs:
            outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        # What it did and what it left: never a whole erasure, since the
        # same refusal comes when the coordinator gave up waiting and queued
        # a newer attempt, which must not be skipped.
        datasets = [{"dataset": "events", "deleted": 200, "anonymized": 0}]
        self.assertEqual(outcome, {"status": "erased", "datasets": datasets, "residual": 300})
        self.assertEqual(connector.batches, 2, "nothing more after the attempt was withdrawn")

        # When the verification fails too, the report still says what the
        # attempt changed, unverified: never applied as such to a withdrawn
        # or superseded attempt, it is recorded as a late change.
        def verify_fails(identifiers, directives):
            raise lc.PermanentError("the count query was cancelled")

        keys.calls = 0
        connector.batches = 0
        connector.verify = verify_fails
        with self.assertLogs("lethe.connector", "WARNING") as logs:
            outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual(outcome, {"status": "erased", "datasets": datasets})
        self.assertIn("could not verify the withdrawn attempt", "\n".join(logs.output))
        self.assertIn("withdrawn while it ran", "\n".join(logs.output))

    def test_a_short_erase_never_asks_whether_it_is_still_wanted(self) -> None:
        keys = self.runner.keys = FakeKeys(self.key, self.task_id)

        class Asking(ex.ClubhouseConnector):
            def erase(self, identifiers, directives):
                assert directives.still_wanted()
                return super().erase(identifiers, directives)

        self.runner.connector = Asking(self.db)
        outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        self.assertEqual(outcome["status"], "retained_in_part", outcome)
        self.assertEqual(keys.calls, 1, "only the key: the first check comes after wanted_every")

    def test_a_locked_database_is_retried_then_reported_retryable(self) -> None:
        self.runner.connector = ex.ClubhouseConnector(self.db)
        blocker = sqlite3.connect(self.db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            original = sqlite3.connect

            def impatient(*args, **kwargs):
                kwargs["timeout"] = 0.01
                return original(*args, **kwargs)

            ex.sqlite3.connect = impatient
            with self.assertLogs("lethe.connector", "WARNING"):
                outcome = self.runner.process(self.task("ada@example.com"))["outcome"]
        finally:
            ex.sqlite3.connect = original
            blocker.execute("ROLLBACK")
            blocker.close()
        self.assertEqual((outcome["status"], outcome["retryable"]), ("failed", True), outcome)
        self.assertIn("busy", outcome["reason"])
        self.assertEqual(self.rows("newsletter"), [1, 2], "nothing changed")


if __name__ == "__main__":
    unittest.main()
