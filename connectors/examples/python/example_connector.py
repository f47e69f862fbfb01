"""An example Lethe connector in Python: a members' club database in SQLite.

The database (see ``SCHEMA``) has two datasets, each of one data category:

- ``newsletter`` (``marketing.profile``): one row per subscription, keyed by
  e-mail, without a date that retention could count from;
- ``invoices`` (``billing.invoice``): membership invoices, keyed by the
  member's e-mail and dated by ``issued_on``.

For each dataset the connector follows its category's directive: ``erase``
deletes the subject's rows; ``anonymize`` keeps each row but replaces what
names the subject (the e-mail becomes ``anonymised-<row id>@invalid``, the
first name goes), so an invoice keeps its amount; ``retain`` deletes the
rows past their period and keeps the rest; ``hold`` keeps everything. Kept
rows are reported with their basis, so the task ends ``retained_in_part``.
A dataset whose category has no directive is left alone.

Stored addresses are compared as the coordinator normalises the requested
ones: surrounding white space removed, Unicode normal form C, lower-cased
(all of Unicode, not only ASCII: SQLite's own ``lower`` and ``trim`` would
miss ``JÖRG@example.de`` or a leading tab, and report "not found").

Run it (see README.md)::

    CLUBHOUSE_DB=/path/to/clubhouse.db LETHE_BROKERS=127.0.0.1:9092 \\
    LETHE_COORDINATOR_URL=http://127.0.0.1:8700 LETHE_CONNECTOR_TOKEN=... \\
    python3 example_connector.py
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sqlite3
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager

from lethe_connector import (
    Connector,
    ConnectorError,
    DatasetReport,
    Directives,
    Erasure,
    Identifiers,
    PermanentError,
    RetainedReport,
    RetryableError,
    Settings,
    Worker,
    configure_logging,
)

SYSTEM = "clubhouse"
"""The system's name in the coordinator's configuration (``LETHE_SYSTEM`` overrides it)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS newsletter (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL,
    first_name TEXT,
    subscribed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invoices (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL,
    issued_on TEXT NOT NULL,  -- YYYY-MM-DD
    amount_cents INTEGER NOT NULL
);
"""
"""The tables this connector expects (``--create-schema`` creates them)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A table holding one category of personal data, matched by e-mail."""

    table: str
    category: str
    #: Column with the record's own date (retention counts from it), if any.
    date_column: str | None = None


DATASETS = (
    Dataset("newsletter", "marketing.profile"),
    Dataset("invoices", "billing.invoice", date_column="issued_on"),
)


def record_date(value: str | None) -> dt.datetime | None:
    """A stored ``YYYY-MM-DD`` (or ISO timestamp) as UTC."""
    if value is None:
        return None
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def normalised_email(value: str | None) -> str | None:
    """A stored address as the coordinator normalises a requested one."""
    if value is None:
        return None
    return unicodedata.normalize("NFC", value.strip()).lower()


def classify(error: sqlite3.Error, doing: str) -> ConnectorError:
    """Busy or locked databases are retryable; anything else (missing file,
    table or column, corruption, permissions) needs an operator. SQLite's
    messages never contain bound parameters, so they carry no identifier."""
    text = str(error)
    if isinstance(error, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return RetryableError(f"{doing}: the database is busy ({text})")
    return PermanentError(f"{doing}: {error.__class__.__name__}: {text}")


class ClubhouseConnector(Connector):
    """Erases a subject from the club's SQLite file."""

    def __init__(self, path: str):
        self.path = path

    @contextmanager
    def _connect(self, doing: str) -> Iterator[sqlite3.Connection]:
        try:
            # mode=rw: a missing file is an error, not a new empty database.
            conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=5, isolation_level=None)
            conn.create_function("lethe_email", 1, normalised_email, deterministic=True)
        except sqlite3.Error as e:
            raise classify(e, doing) from None
        try:
            yield conn
        except sqlite3.Error as e:
            raise classify(e, doing) from None
        finally:
            conn.close()

    def health(self) -> None:
        with self._connect("health") as conn:
            for d in DATASETS:
                conn.execute(f'SELECT 1 FROM "{d.table}" LIMIT 1').fetchall()

    def _rows(
        self, conn: sqlite3.Connection, d: Dataset, emails: list[str]
    ) -> list[tuple[int, dt.datetime | None]]:
        """``(id, date)`` of the subject's rows in ``d``."""
        marks = ", ".join("?" for _ in emails)
        date = d.date_column or "NULL"
        sql = f'SELECT id, {date} FROM "{d.table}" WHERE lethe_email(email) IN ({marks}) ORDER BY id'
        return [(row[0], record_date(row[1])) for row in conn.execute(sql, emails)]

    def erase(self, identifiers: Identifiers, directives: Directives) -> Erasure:
        emails = identifiers.values("email")
        erasure = Erasure()
        work = [(d, directives[d.category]) for d in DATASETS if d.category in directives]
        if not emails:
            # Every dataset is found by e-mail: none could be searched.
            erasure.datasets = [DatasetReport(d.table, not_searched=True) for d, _ in work]
            return erasure
        with self._connect("erase") as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for d, directive in work:
                    rows = self._rows(conn, d, emails)
                    kept = [(i, day) for i, day in rows if directive.keeps(day)]
                    gone = [i for i, day in rows if not directive.keeps(day)]
                    if gone and directive.action == "anonymize":
                        marks = ", ".join("?" for _ in gone)
                        blank = ", first_name = NULL" if d.table == "newsletter" else ""
                        conn.execute(
                            f"UPDATE \"{d.table}\" SET email = 'anonymised-' || id || '@invalid'{blank} "
                            f"WHERE id IN ({marks})",
                            gone,
                        )
                        erasure.datasets.append(DatasetReport(d.table, anonymized=len(gone)))
                        continue
                    if gone:
                        marks = ", ".join("?" for _ in gone)
                        conn.execute(f'DELETE FROM "{d.table}" WHERE id IN ({marks})', gone)
                    erasure.datasets.append(DatasetReport(d.table, deleted=len(gone)))
                    if kept:
                        ends = [directive.kept_until(day) for _, day in kept]
                        until = None if any(e is None for e in ends) else max(ends)
                        # Followed up when the first ends, not the last.
                        first = min(ends) if until is not None and min(ends) < until else None
                        basis = directive.basis or f"{directive.action} ({d.category})"
                        erasure.retained.append(
                            RetainedReport(d.table, d.category, len(kept), basis, until, first)
                        )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return erasure

    def verify(self, identifiers: Identifiers, directives: Directives) -> int:
        emails = identifiers.values("email")
        if not emails:
            return 0
        residual = 0
        with self._connect("verify") as conn:
            for d in DATASETS:
                directive = directives.get(d.category)
                if directive is None:
                    continue
                residual += sum(1 for _, day in self._rows(conn, d, emails) if not directive.keeps(day))
        return residual


def main(argv: list[str]) -> int:
    configure_logging()
    path = os.environ.get("CLUBHOUSE_DB", "").strip()
    if not path:
        print("set CLUBHOUSE_DB to the SQLite file (see the README)", file=sys.stderr)
        return 2
    if "--create-schema" in argv:
        with sqlite3.connect(path) as conn:
            conn.executescript(SCHEMA)
        print(f"tables created in {path}")
        return 0
    connector = ClubhouseConnector(path)
    try:
        connector.health()
    except ConnectorError as e:
        # Tasks report the failure until it is fixed; the worker still runs.
        logging.getLogger("clubhouse").warning("health check failed: %s", e.reason)
    Worker(Settings.from_env(system=SYSTEM), connector).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
