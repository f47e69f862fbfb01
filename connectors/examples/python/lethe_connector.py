"""A small runtime for Lethe connector workers written in Python.

It implements the bus protocol of ``docs/protocol.md`` (version 1) so that a
connector author writes only the store-specific part: a :class:`Connector`
with ``erase(identifiers, directives)`` and ``verify(identifiers, directives)``.

What the runtime does for each message of ``<namespace>.tasks.<system>``
(consumer group ``<namespace>.connector.<system>``):

1. decodes and checks the envelope; a message it cannot decode (invalid
   JSON, unknown ``version``, missing fields) goes to
   ``<namespace>.dlq`` with the headers ``lethe-dlq-reason`` and
   ``lethe-dlq-source``;
2. fetches the request's data key from the coordinator
   (``POST /v1/connector/keys`` with a token scoped ``connector:<system>``)
   and opens the identifiers (AES-256-GCM, see :func:`open_identifier`);
3. calls the connector's ``erase`` and then ``verify``, retrying retryable
   errors a few times in process (a connector of an asynchronous store may
   answer ``Erasure.pending(job_id)`` instead: the task is ``accepted`` and
   comes back later with ``directives.job`` set);
4. publishes one result to ``<namespace>.results`` (key: the request id)
   and waits for the broker's acknowledgement;
5. only then stores the task's offset for commit (at least once: a crash
   before that means the task is delivered again, so connectors must be
   idempotent).

Messages are handled one at a time, in partition order. Identifier values
never appear in a log line, an error reason or a ``repr``; the data key and
the plaintext identifiers live only in memory for the duration of a task.

Needs Python 3.11+, ``confluent-kafka`` and ``cryptography`` (see
``requirements.txt``).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
import traceback
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

ENVELOPE_VERSION = 1
"""The envelope version this module reads and writes."""

REGULATIONS = ("gdpr", "uk-gdpr", "ccpa", "vcdpa", "lgpd", "pipeda")
"""The regulations a task may name."""

ACTIONS = ("erase", "anonymize", "retain", "hold")
"""Category actions, from the least to the most protective."""

NONCE_LEN = 12
TAG_LEN = 16

MAX_REASON_BYTES = 500
"""Longest ``reason`` or ``basis`` the coordinator keeps (it cuts longer ones)."""

MAX_NAME_BYTES = 200
"""Longest ``dataset`` or ``category`` name the coordinator keeps."""

MAX_JOB_ID_BYTES = 1024
"""Longest job id the coordinator takes; a longer one fails the task."""

DEAD_LETTER_TRIES = 20
"""Tries to write a dead letter before the message is given up (logged and
skipped): one poison message never blocks a partition."""

log = logging.getLogger("lethe.connector")


# --------------------------------------------------------------------- errors


class ConnectorError(Exception):
    """A failed attempt. ``reason`` is reported to the coordinator and must
    never contain an identifier value; ``retryable`` says whether trying
    again later may succeed (network, time-outs, locks, 5xx, 429) or not
    (authentication, configuration, missing objects, 4xx)."""

    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class RetryableError(ConnectorError):
    """A failure that may go away by itself: the task is tried again."""

    def __init__(self, reason: str):
        super().__init__(reason, retryable=True)


class PermanentError(ConnectorError):
    """A failure that needs an operator: the task fails until retried."""

    def __init__(self, reason: str):
        super().__init__(reason, retryable=False)


class KeyRefused(PermanentError):
    """The coordinator has no key for this attempt: the task is unknown or
    another system's, the request is closed, or the attempt was withdrawn
    (a legal hold, or a newer attempt)."""

    def __init__(self) -> None:
        super().__init__(
            "no key for this task: the request is closed, the task is not this system's, "
            "or this attempt is no longer asked for"
        )


class Undecodable(Exception):
    """A task message that does not follow the protocol; it is dead-lettered."""


# ---------------------------------------------------------------- identifiers


@dataclasses.dataclass(frozen=True)
class Identifier:
    """One decrypted identifier of the subject, e.g. ``email``. Its value is
    already normalised by the coordinator (e-mail trimmed and lower-cased,
    phone in E.164) and is never shown by ``repr``."""

    type: str
    value: str = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return f"Identifier(type={self.type!r}, value=<redacted>)"

    __str__ = __repr__

    def appears_in(self, text: str) -> bool:
        """Whether ``text`` mentions this identifier, as the coordinator
        screens it: in any case, percent-encoded, as the hex MD5 or SHA-256
        of the value, and for a phone as its last eight digits whatever the
        separators. Values under four characters are not looked for as text."""
        visible = "".join(c for c in text if not _invisible(c))
        lower = visible.lower()
        decoded = urllib.parse.unquote(visible).lower()
        needle = self.value.lower()
        if len(needle) >= 4 and (needle in lower or needle in decoded):
            return True
        data = self.value.encode()
        if hashlib.md5(data).hexdigest() in lower or hashlib.sha256(data).hexdigest() in lower:
            return True
        if self.type == "phone":
            digits = "".join(c for c in self.value if c.isascii() and c.isdigit())
            if len(digits) >= 8:
                squashed = "".join(c for c in decoded if c not in " -.()/\u00a0")
                return digits[-8:] in squashed
        return False


def _invisible(c: str) -> bool:
    """Unicode's format characters that text carries without showing (a
    zero-width space, a soft hyphen): ignored when screening."""
    return unicodedata.category(c) == "Cf"


WITHHELD_REASON = "[the connector's reason was withheld: it contained an identifier of the subject]"
"""What a failure reason becomes when it names one of the subject's identifiers."""

WITHHELD_TEXT = "[withheld: it contained an identifier of the subject]"
"""What another text of a result (a basis, a dataset name) becomes then."""


def screened(outcome: dict[str, Any], identifiers: Iterable[Identifier]) -> dict[str, Any]:
    """``outcome`` with every text that names one of ``identifiers`` withheld,
    as Lethe's own workers send it: a reason, a kept record's basis, a
    dataset or category name written from a value would otherwise reach the
    coordinator's unchangeable audit trail."""
    ids = list(identifiers)

    def clean(text: Any, withheld: str) -> Any:
        if isinstance(text, str) and any(i.appears_in(text) for i in ids):
            return withheld
        return text

    if "reason" in outcome:
        outcome["reason"] = clean(outcome["reason"], WITHHELD_REASON)
    for d in outcome.get("datasets", []):
        d["dataset"] = clean(d["dataset"], WITHHELD_TEXT)
    for r in outcome.get("retained", []):
        for field in ("dataset", "category", "basis"):
            if field in r:
                r[field] = clean(r[field], WITHHELD_TEXT)
    return outcome


class Identifiers(tuple):
    """The subject's identifiers (a tuple of :class:`Identifier`)."""

    def values(self, kind: str) -> list[str]:
        """The values of every identifier of type ``kind``."""
        return [i.value for i in self if i.type == kind]

    def __repr__(self) -> str:
        return f"Identifiers({', '.join(i.type for i in self)})"

    __str__ = __repr__


def _aad(request_id: uuid.UUID, kind: str) -> bytes:
    return request_id.bytes + kind.encode("utf-8")


def open_identifier(key: bytes, request_id: uuid.UUID, kind: str, ciphertext: str) -> Identifier:
    """Opens one sealed identifier.

    ``ciphertext`` is standard, padded base64 of ``nonce (12 bytes) ||
    AES-256-GCM ciphertext || tag (16 bytes)``; the associated data is the
    request id's 16 bytes (RFC 4122 byte order, ``uuid.UUID.bytes``)
    followed by the UTF-8 type. Raises :class:`PermanentError` if the value
    was sealed under another key, request or type.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    failed = PermanentError("identifiers could not be decrypted with the request's key")
    try:
        sealed = base64.b64decode(ciphertext, validate=True)
    except (binascii.Error, ValueError):
        raise failed from None
    if len(sealed) < NONCE_LEN + TAG_LEN:
        raise failed
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], _aad(request_id, kind))
        return Identifier(kind, plain.decode("utf-8"))
    except (InvalidTag, UnicodeDecodeError, ValueError):
        raise failed from None


def seal_identifier(key: bytes, request_id: uuid.UUID, kind: str, value: str) -> str:
    """Seals ``value`` the way the coordinator does (the inverse of
    :func:`open_identifier`); useful in tests and tools."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(NONCE_LEN)
    sealed = nonce + AESGCM(key).encrypt(nonce, value.encode("utf-8"), _aad(request_id, kind))
    return base64.b64encode(sealed).decode("ascii")


# ----------------------------------------------------------------- time, periods


def parse_time(value: str) -> dt.datetime:
    """An RFC 3339 timestamp as an aware UTC datetime (nanoseconds are cut
    to microseconds)."""
    # Python 3.11 accepts "Z" but at most 6 fractional digits; cut the rest.
    text = re.sub(r"(\.\d{6})\d+", r"\1", value)
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return parsed.astimezone(dt.timezone.utc)


def format_time(value: dt.datetime) -> str:
    """``value`` in RFC 3339 UTC with milliseconds, e.g. ``2026-11-29T09:09:06.456Z``."""
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_PERIOD = re.compile(r"^P(\d+)([YMWD])$", re.IGNORECASE)


def add_period(start: dt.datetime, period: str) -> dt.datetime:
    """``start`` plus an ISO 8601 period (``P10Y``, ``P6M``, ``P30D``).

    Month arithmetic keeps the time of day and clamps the day to the end of
    a shorter month (29 February + 1 year = 28 February), like the
    coordinator.
    """
    m = _PERIOD.match(period.strip())
    if not m:
        raise ValueError(f"unsupported period {period!r}")
    n, unit = int(m.group(1)), m.group(2).upper()
    if unit in "WD":
        return start + dt.timedelta(days=n * (7 if unit == "W" else 1))
    months = n * 12 if unit == "Y" else n
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    if year > dt.MAXYEAR:
        return dt.datetime.max.replace(tzinfo=start.tzinfo)
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


# ----------------------------------------------------------------- directives


@dataclasses.dataclass(frozen=True)
class Directive:
    """The instruction for one data category (see "Category directives" in
    docs/protocol.md), with the task's ``issued_at``: retention is decided as
    of that instant, never by the worker's own clock."""

    category: str
    action: str
    issued_at: dt.datetime
    basis: str | None = None
    period: str | None = None
    cutoff: dt.datetime | None = None
    until: dt.datetime | None = None

    def keeps(self, record_date: dt.datetime | None = None) -> bool:
        """Whether a record of this category, dated ``record_date`` (``None``
        for a record without a date of its own), must be kept now.

        ``erase`` and ``anonymize`` keep nothing; ``hold`` keeps everything;
        ``retain`` keeps a dated record after ``cutoff`` and an undated one
        while ``issued_at`` is before ``until``.
        """
        if self.action in ("erase", "anonymize"):
            return False
        if self.action == "hold":
            return True
        if record_date is not None and self.cutoff is not None:
            return record_date > self.cutoff
        if self.until is not None:
            return self.issued_at < self.until
        return True  # a retention without an end: keep rather than guess

    def kept_until(self, record_date: dt.datetime | None = None) -> dt.datetime | None:
        """Until when a kept record stays: its date plus the period (dated,
        retention counted from the record), ``until`` (undated, or counted
        from the request), ``None`` under a legal hold."""
        if self.action != "retain":
            return None
        if record_date is not None and self.cutoff is not None and self.period:
            return add_period(record_date, self.period)
        return self.until


@dataclasses.dataclass(frozen=True)
class Job:
    """An asynchronous job the connector reported (``Erasure.pending``) on an
    earlier attempt of the task."""

    id: str
    #: When the coordinator first recorded the job; a maximum wait counts from here.
    accepted_at: dt.datetime


class Directives(Mapping[str, Directive]):
    """The directives of one task, by category, with the attempt's context:
    ``issued_at`` (retention is decided as of it) and ``job`` (the external
    job of an earlier attempt to check instead of starting another, or
    ``None``). A dataset whose category has no directive must be left
    untouched and not reported.

    A connector whose erase takes many steps (a large table in batches, a
    long scan) calls :meth:`still_wanted` between them and stops when it
    says no: a legal hold placed while the attempt runs withdraws it, and
    every step after that would erase what the law now keeps."""

    def __init__(self, directives: Iterable[Directive], issued_at: dt.datetime, job: Job | None = None):
        self._by_category = {d.category: d for d in directives}
        self.issued_at = issued_at
        self.job = job
        self._ask: Callable[[], bool] | None = None
        self._every = 0.0
        self._next_ask = 0.0
        self._withdrawn = False

    def asking(self, ask: Callable[[], bool], every: float) -> None:
        """Has :meth:`still_wanted` call ``ask`` at most once per ``every``
        seconds, the first time ``every`` after now (the runtime sets this;
        a connector does not)."""
        self._ask, self._every = ask, every
        self._next_ask = time.monotonic() + every

    def still_wanted(self) -> bool:
        """``False`` once the coordinator no longer asks for this attempt (a
        legal hold, or a newer attempt): stop, and return what was changed
        so far. The runtime verifies it as usual, and the coordinator
        records the change as a late change of the withdrawn attempt.
        Cheap to call often: the coordinator is asked at most every few
        seconds, and an answer that cannot be had counts as wanted."""
        if self._withdrawn:
            return False
        if self._ask is None or time.monotonic() < self._next_ask:
            return True
        self._next_ask = time.monotonic() + self._every
        self._withdrawn = not self._ask()
        return not self._withdrawn

    @property
    def withdrawn(self) -> bool:
        """Whether :meth:`still_wanted` found the attempt withdrawn."""
        return self._withdrawn

    def __getitem__(self, category: str) -> Directive:
        return self._by_category[category]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_category)

    def __len__(self) -> int:
        return len(self._by_category)

    def __repr__(self) -> str:
        inner = ", ".join(f"{c}={d.action}" for c, d in self._by_category.items())
        return f"Directives({inner})"


# -------------------------------------------------------------------- reports


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (at a character
    boundary) and marked with an ellipsis, as the coordinator cuts it: a
    vendor's error page must not make a result the broker refuses."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode(errors="ignore") + "…"


def _count(value: Any) -> bool:
    """Whether ``value`` is a count the coordinator takes: a whole number,
    not negative (``True`` and ``1.0`` are not)."""
    return type(value) is int and value >= 0


@dataclasses.dataclass
class DatasetReport:
    """Records deleted or anonymised in one dataset (table, list, key space).
    ``not_searched``: the task gave no identifier of a type the dataset
    finds subjects by, so nothing was looked for in it."""

    dataset: str
    deleted: int = 0
    anonymized: int = 0
    not_searched: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": cut(self.dataset, MAX_NAME_BYTES),
            "deleted": self.deleted,
            "anonymized": self.anonymized,
        }
        if self.not_searched:
            out["not_searched"] = True
        return out


@dataclasses.dataclass
class RetainedReport:
    """Records of one dataset kept on a legal basis; ``until`` is ``None``
    under a legal hold. ``first_until``, when some records end before the
    last, is the earliest end: the coordinator runs the task again then."""

    dataset: str
    category: str | None
    count: int
    basis: str
    until: dt.datetime | None = None
    first_until: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": cut(self.dataset, MAX_NAME_BYTES),
            "count": self.count,
            "basis": cut(self.basis, MAX_REASON_BYTES),
        }
        if self.category is not None:
            out["category"] = cut(self.category, MAX_NAME_BYTES)
        if self.until is not None:
            out["until"] = format_time(self.until)
        if self.first_until is not None:
            out["first_until"] = format_time(self.first_until)
        return out


@dataclasses.dataclass
class Erasure:
    """What ``erase`` did: per dataset, and what it kept. For a store that
    erases asynchronously, :meth:`Erasure.pending` instead."""

    datasets: list[DatasetReport] = dataclasses.field(default_factory=list)
    retained: list[RetainedReport] = dataclasses.field(default_factory=list)
    #: ``(job id, seconds before the coordinator asks again)`` of a job still running.
    pending_job: tuple[str, int | None] | None = None

    @classmethod
    def pending(cls, job_id: str, poll_after_seconds: int | None = None) -> "Erasure":
        """An external job was started (or, when ``directives.job`` is set,
        is still running): the task is ``accepted`` and sent again later
        with ``directives.job`` set. ``verify`` is not called."""
        return cls(pending_job=(job_id, poll_after_seconds))

    def total(self) -> int:
        return sum(d.deleted + d.anonymized for d in self.datasets)


class Connector:
    """The store-specific part of a worker. Both calls must be idempotent
    (a task may be delivered more than once) and raise :class:`ConnectorError`
    with a reason free of identifiers when they fail."""

    def erase(self, identifiers: Identifiers, directives: Directives) -> Erasure:
        """Erases the subject's data as ``directives`` say."""
        raise NotImplementedError

    def verify(self, identifiers: Identifiers, directives: Directives) -> int:
        """Counts what is still there that ``directives`` say must be gone
        (0 after a complete erase; kept records are not counted)."""
        raise NotImplementedError

    def health(self) -> None:
        """Raises :class:`ConnectorError` if the store cannot be reached."""


def outcome_of(erasure: Erasure, residual: int) -> dict[str, Any]:
    """The result's ``outcome`` for a finished erase and its verification.
    What the coordinator would refuse is a permanent failure here, named:
    sent as it is, the result would be dead-lettered (a count that is not
    a whole number) or fail the task less clearly (a job id it cannot
    keep), while the erase it reports has happened."""
    problem = _malformed(erasure, residual)
    if problem is not None:
        return failed(PermanentError(f"the connector reported {problem}"))
    if erasure.pending_job is not None:
        job_id, poll_after = erasure.pending_job
        accepted: dict[str, Any] = {"status": "accepted", "job_id": job_id}
        if poll_after is not None:
            accepted["poll_after_seconds"] = poll_after
        return accepted
    datasets = [d.to_json() for d in erasure.datasets]
    if erasure.retained:
        retained = [r.to_json() for r in erasure.retained]
        return {
            "status": "retained_in_part",
            "datasets": datasets,
            "retained": retained,
            "residual": residual,
        }
    # A dataset not searched must reach the request: "nothing found" would
    # say it was searched.
    if erasure.total() == 0 and not any(d.not_searched for d in erasure.datasets):
        return {"status": "not_found", "residual": residual}
    return {"status": "erased", "datasets": datasets, "residual": residual}


def _malformed(erasure: Erasure, residual: int) -> str | None:
    """What in ``erasure`` the coordinator would refuse, if anything."""
    if erasure.pending_job is not None:
        job_id, poll_after = erasure.pending_job
        if not isinstance(job_id, str) or not 0 < len(job_id.encode()) <= MAX_JOB_ID_BYTES:
            return f"a job id that is not 1 to {MAX_JOB_ID_BYTES} bytes of text"
        if any(ord(c) < 32 or ord(c) == 127 for c in job_id):
            return "a job id with control characters"
        if poll_after is not None and not _count(poll_after):
            return "a poll_after_seconds that is not a whole number of seconds"
        return None
    counts = [c for d in erasure.datasets for c in (d.deleted, d.anonymized)]
    counts += [r.count for r in erasure.retained]
    if not all(_count(c) for c in counts) or not _count(residual):
        return "a count that is not a whole number of 0 or more"
    return None


def failed(error: ConnectorError) -> dict[str, Any]:
    return {"status": "failed", "retryable": error.retryable, "reason": cut(error.reason, MAX_REASON_BYTES)}


# ---------------------------------------------------------------- task envelope


@dataclasses.dataclass(frozen=True)
class SealedIdentifier:
    type: str
    ciphertext: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """A decoded task message (``docs/schemas/task.v1.json``)."""

    task_id: uuid.UUID
    request_id: uuid.UUID
    system: str
    action: str
    attempt: int
    regulation: str
    due_at: dt.datetime
    issued_at: dt.datetime
    identifiers: tuple[SealedIdentifier, ...]
    directives: Directives


_TASK_FIELDS = {
    "version", "task_id", "request_id", "system", "action", "categories", "attempt",
    "regulation", "due_at", "identifiers", "issued_at",
}
_DIRECTIVE_REQUIRED = {"category", "action"}


def _fields(obj: Any, what: str, required: set[str]) -> dict[str, Any]:
    """``obj`` as an object with every field in ``required``; fields it does
    not know are ignored (the protocol adds fields within a version only
    where ignoring them is safe)."""
    if not isinstance(obj, dict):
        raise Undecodable(f"{what} is not a JSON object")
    missing = sorted(required - obj.keys())
    if missing:
        raise Undecodable(f"{what} lacks {', '.join(missing)}")
    return obj


def _string(obj: dict[str, Any], name: str, what: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise Undecodable(f"{what}.{name} is not a string")
    return value


def _optional(obj: dict[str, Any], name: str, what: str) -> str | None:
    if obj.get(name) is None:
        return None
    return _string(obj, name, what)


def _uuid(obj: dict[str, Any], name: str) -> uuid.UUID:
    try:
        return uuid.UUID(_string(obj, name, "task"))
    except ValueError:
        raise Undecodable(f"task.{name} is not a UUID") from None


def _time(value: str | None, what: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise Undecodable(f"{what} is not an RFC 3339 timestamp") from None


def _action(value: str, what: str) -> str:
    if value not in ACTIONS:
        raise Undecodable(f"{what} is not one of {', '.join(ACTIONS)}")
    return value


def decode_task(raw: bytes | None) -> TaskMessage:
    """Decodes and checks a task message; raises :class:`Undecodable` (whose
    message names fields, never values) for anything that is not a version 1
    task."""
    try:
        doc = json.loads(raw or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = getattr(e, "pos", "?")
        raise Undecodable(f"invalid envelope: not JSON ({e.__class__.__name__} at byte {where})") from None
    if not isinstance(doc, dict):
        raise Undecodable("invalid envelope: not a JSON object")
    version = doc.get("version")
    if type(version) is not int:
        raise Undecodable("invalid envelope: version is missing or not an integer")
    if version != ENVELOPE_VERSION:
        raise Undecodable(f"unsupported envelope version {version}")
    _fields(doc, "task", _TASK_FIELDS)
    attempt = doc["attempt"]
    if type(attempt) is not int or not 1 <= attempt <= 4294967295:
        raise Undecodable("task.attempt is not an integer from 1 to 4294967295")
    if doc["regulation"] not in REGULATIONS:
        raise Undecodable("task.regulation is not a known regulation")
    issued_at = _time(_string(doc, "issued_at", "task"), "task.issued_at")
    assert issued_at is not None
    due_at = _time(_string(doc, "due_at", "task"), "task.due_at")
    assert due_at is not None
    if not isinstance(doc["identifiers"], list):
        raise Undecodable("task.identifiers is not an array")
    sealed = []
    for i, item in enumerate(doc["identifiers"]):
        what = f"task.identifiers[{i}]"
        _fields(item, what, {"type", "ciphertext"})
        sealed.append(SealedIdentifier(_string(item, "type", what), _string(item, "ciphertext", what)))
    if not isinstance(doc["categories"], list):
        raise Undecodable("task.categories is not an array")
    directives = []
    for i, item in enumerate(doc["categories"]):
        what = f"task.categories[{i}]"
        _fields(item, what, _DIRECTIVE_REQUIRED)
        period = _optional(item, "period", what)
        if period is not None and not _PERIOD.match(period):
            raise Undecodable(f"{what}.period is not an ISO 8601 period")
        directives.append(
            Directive(
                category=_string(item, "category", what),
                action=_action(_string(item, "action", what), f"{what}.action"),
                issued_at=issued_at,
                basis=_optional(item, "basis", what),
                period=period,
                cutoff=_time(_optional(item, "cutoff", what), f"{what}.cutoff"),
                until=_time(_optional(item, "until", what), f"{what}.until"),
            )
        )
    job = None
    if doc.get("job") is not None:
        _fields(doc["job"], "task.job", {"id", "accepted_at"})
        accepted_at = _time(_string(doc["job"], "accepted_at", "task.job"), "task.job.accepted_at")
        assert accepted_at is not None
        job = Job(_string(doc["job"], "id", "task.job"), accepted_at)
    return TaskMessage(
        task_id=_uuid(doc, "task_id"),
        request_id=_uuid(doc, "request_id"),
        system=_string(doc, "system", "task"),
        action=_action(_string(doc, "action", "task"), "task.action"),
        attempt=attempt,
        regulation=_string(doc, "regulation", "task"),
        due_at=due_at,
        issued_at=issued_at,
        identifiers=tuple(sealed),
        directives=Directives(directives, issued_at, job),
    )


# ------------------------------------------------------------------- settings


@dataclasses.dataclass
class Settings:
    """Where the worker connects and how it retries."""

    brokers: str
    system: str
    coordinator: str
    token: str = dataclasses.field(repr=False)
    namespace: str = "lethe"
    worker: str = ""
    #: More librdkafka properties for the consumer and the producer.
    client: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Calls (key, erase, verify) per task before a retryable error is reported.
    attempts: int = 4
    first_backoff: float = 0.5
    max_backoff: float = 5.0
    http_timeout: float = 10.0
    #: How often, at most, ``Directives.still_wanted`` asks the coordinator.
    wanted_every: float = 2.0

    def __post_init__(self) -> None:
        if not self.worker:
            self.worker = f"{self.system}-py-{os.getpid()}"

    @classmethod
    def from_env(cls, system: str | None = None, env: Mapping[str, str] = os.environ) -> "Settings":
        """Reads ``LETHE_BROKERS``, ``LETHE_COORDINATOR_URL``,
        ``LETHE_CONNECTOR_TOKEN``, ``LETHE_SYSTEM`` (or ``system``) and the
        optional ``LETHE_NAMESPACE`` (default ``lethe``), ``LETHE_WORKER_NAME``
        and ``LETHE_KAFKA_<PROPERTY>`` (``LETHE_KAFKA_SECURITY_PROTOCOL`` →
        ``security.protocol``)."""

        def need(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise SystemExit(f"set {name} (see the README)")
            return value

        client = {
            k[len("LETHE_KAFKA_"):].lower().replace("_", "."): v
            for k, v in env.items()
            if k.startswith("LETHE_KAFKA_") and k != "LETHE_KAFKA_ADDR"
        }
        return cls(
            brokers=need("LETHE_BROKERS"),
            system=env.get("LETHE_SYSTEM", "").strip() or system or need("LETHE_SYSTEM"),
            coordinator=need("LETHE_COORDINATOR_URL"),
            token=need("LETHE_CONNECTOR_TOKEN"),
            namespace=env.get("LETHE_NAMESPACE", "").strip() or "lethe",
            worker=env.get("LETHE_WORKER_NAME", "").strip(),
            client=client,
        )

    @property
    def tasks_topic(self) -> str:
        return f"{self.namespace}.tasks.{self.system}"

    @property
    def results_topic(self) -> str:
        return f"{self.namespace}.results"

    @property
    def dlq_topic(self) -> str:
        return f"{self.namespace}.dlq"

    @property
    def group(self) -> str:
        return f"{self.namespace}.connector.{self.system}"


# ------------------------------------------------------------------------ keys


class KeyClient:
    """Fetches a task's data key from the coordinator. Keys are returned to
    the caller and never stored."""

    def __init__(self, coordinator: str, token: str, timeout: float = 10.0, system: str | None = None):
        self._url = coordinator.rstrip("/") + "/v1/connector/keys"
        self._token = token
        self._timeout = timeout
        #: Named in each call, so that a token of another system is refused
        #: (403, retried) instead of answered 404 (which fails the task).
        self._system = system

    def __repr__(self) -> str:
        return f"KeyClient({self._url!r})"

    def token_accepted(self) -> bool | None:
        """Whether the coordinator accepts this worker's token (for its
        system), asked with a ``keys:batch`` call naming no task: ``False``
        on 401 or 403, ``None`` when it cannot be asked now."""
        asked: dict[str, Any] = {"task_ids": [], "attempts": {}}
        if self._system is not None:
            asked["system"] = self._system
        request = urllib.request.Request(
            self._url + ":batch",
            data=json.dumps(asked).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout):
                return True
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return False
            return None if e.code >= 500 else True
        except (urllib.error.URLError, OSError):
            return None

    def fetch(self, task_id: uuid.UUID, attempt: int) -> bytes:
        """The request's 32-byte key for ``attempt`` of the task. Raises
        :class:`KeyRefused` on 404 (the task is unknown, another system's,
        no longer asks for this attempt, or its request is closed and the
        key destroyed), :class:`PermanentError` for a malformed key, and
        :class:`RetryableError` for any other answer: 401/403 (the worker's
        token, not the task's fault), other statuses, and when the
        coordinator cannot answer."""
        asked: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
        if self._system is not None:
            asked["system"] = self._system
        body = json.dumps(asked).encode()
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise KeyRefused() from None
            if e.code in (401, 403):
                # The worker's token, not the task: retried, never failed for it.
                raise RetryableError("the coordinator rejected this worker's connector token") from None
            # Only a 404 says something about the task; anything else (a
            # coordinator of another version refusing a field, a proxy) is
            # retried, never failed for good.
            raise RetryableError(f"the coordinator answered {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RetryableError(f"coordinator unreachable: {reason.__class__.__name__}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetryableError("malformed key response from the coordinator") from None
        try:
            key = bytes.fromhex(answer["key"])
        except (KeyError, TypeError, ValueError):
            raise PermanentError("the coordinator sent a malformed key") from None
        if len(key) != 32:
            raise PermanentError("the coordinator sent a malformed key")
        return key


# ---------------------------------------------------------------------- worker


def traceparent(request_id: uuid.UUID) -> str:
    """A W3C ``traceparent`` whose trace id is the request id, as the
    coordinator's, so that one trace covers the whole request."""
    return f"00-{request_id.hex}-{secrets.token_hex(8)}-01"


class Runner:
    """Runs tasks to result messages: key, identifiers, ``erase``, ``verify``.
    Knows nothing of Kafka (the :class:`Worker` feeds it), so it can be
    exercised on its own."""

    def __init__(self, settings: Settings, connector: Connector, keys: KeyClient | None = None):
        self.settings = settings
        self.connector = connector
        self.keys = keys or KeyClient(settings.coordinator, settings.token, settings.http_timeout, settings.system)
        self.finished = 0
        #: Set to stop backing off (the worker is shutting down).
        self.stopping = threading.Event()

    def process(self, task: TaskMessage) -> dict[str, Any]:
        """Runs one task to its result message. Never raises: every failure
        becomes a ``failed`` outcome with a reason free of identifiers."""
        started = time.monotonic()
        try:
            outcome = self._outcome(task)
        except Exception as e:  # a bug outside the connector's calls (a malformed Erasure, say)
            frames = "".join(traceback.format_tb(e.__traceback__))
            log.error("the task raised %s (message withheld):\n%s", e.__class__.__name__, frames)
            outcome = failed(PermanentError(f"unexpected {e.__class__.__name__}; see the worker's log"))
        self.finished += 1
        log.info(
            "task finished: task %s, request %s, attempt %d, outcome %s%s in %.0f ms",
            task.task_id,
            task.request_id,
            task.attempt,
            outcome["status"],
            _summary(outcome),
            (time.monotonic() - started) * 1000,
        )
        return {
            "version": ENVELOPE_VERSION,
            "task_id": str(task.task_id),
            "request_id": str(task.request_id),
            "system": task.system,
            "attempt": task.attempt,
            "outcome": outcome,
            "reported_at": format_time(dt.datetime.now(dt.timezone.utc)),
            "worker": self.settings.worker,
            "task_issued_at": format_time(task.issued_at),
        }

    def _outcome(self, task: TaskMessage) -> dict[str, Any]:
        # Known once the key is there; what fails before names none of them.
        identifiers = Identifiers()
        try:
            key = self._call("key", lambda: self.keys.fetch(task.task_id, task.attempt))
            identifiers = Identifiers(
                open_identifier(key, task.request_id, s.type, s.ciphertext) for s in task.identifiers
            )
            task.directives.asking(lambda: self._wanted(task), self.settings.wanted_every)
            retrying = False

            def erase() -> Erasure:
                # A retry first asks whether the attempt is still wanted: a
                # legal hold placed while the worker backs off withdraws the
                # attempt (its key is refused from then on), and nothing more
                # may go.
                nonlocal retrying
                if retrying:
                    self._still_wanted(task)
                retrying = True
                return self.connector.erase(identifiers, task.directives)

            erasure = self._call("erase", erase)
        except ConnectorError as e:
            return screened(failed(e), identifiers)
        if erasure.pending_job is not None:
            return screened(outcome_of(erasure, 0), identifiers)
        if task.directives.withdrawn:
            # Stopped part-way (a legal hold, or a newer attempt: the
            # coordinator gave up waiting). Verified all the same, so that
            # it never passes for a whole erasure: what is left makes it a
            # failure, which the coordinator records, with what it changed,
            # as a late change of the withdrawn attempt.
            log.warning("the attempt was withdrawn while it ran; it stopped part-way (%d changed)", erasure.total())
        try:
            residual = self._call("verify", lambda: self.connector.verify(identifiers, task.directives))
        except ConnectorError as e:
            if task.directives.withdrawn:
                # Unverified, the report still says what the attempt changed:
                # the coordinator applies no unverified report of a withdrawn
                # or superseded attempt, and records it as a late change.
                log.warning("could not verify the withdrawn attempt; reported unverified")
                outcome = outcome_of(erasure, 0)
                outcome.pop("residual", None)
                return screened(outcome, identifiers)
            return screened(failed(ConnectorError(f"verification failed: {e.reason}", e.retryable)), identifiers)
        return screened(outcome_of(erasure, residual), identifiers)

    def _wanted(self, task: TaskMessage) -> bool:
        """Whether the coordinator still asks for this attempt: it refuses
        the attempt's key once withdrawn. Any other answer, or none, counts
        as wanted."""
        try:
            self.keys.fetch(task.task_id, task.attempt)
        except KeyRefused:
            return False
        except Exception as e:
            log.debug("could not ask whether the attempt is still wanted (%s); going on", e.__class__.__name__)
        return True

    def _still_wanted(self, task: TaskMessage) -> None:
        """Raises :class:`PermanentError` if the coordinator no longer asks
        for this attempt (it refuses the attempt's key once withdrawn)."""
        try:
            self.keys.fetch(task.task_id, task.attempt)
        except KeyRefused:
            raise PermanentError(
                "this attempt was withdrawn while it was retried (a legal hold, or a newer attempt): "
                "nothing more was done"
            ) from None

    def _call(self, name: str, call: Callable[[], Any]) -> Any:
        """``call()``, retried with exponential backoff while it raises a
        retryable error; any other exception becomes a permanent error whose
        reason names only its class (its message might hold a value)."""
        s = self.settings
        delay = s.first_backoff
        for attempt in range(1, s.attempts + 1):
            try:
                return call()
            except ConnectorError as e:
                if not e.retryable or attempt == s.attempts or self.stopping.is_set():
                    raise
                log.warning("%s: retryable error (%s); retrying in %.1f s", name, e.reason, delay)
            except Exception as e:  # a bug in the connector: report it, without its message
                frames = "".join(traceback.format_tb(e.__traceback__))
                log.error("%s raised %s (message withheld):\n%s", name, e.__class__.__name__, frames)
                reason = f"unexpected {e.__class__.__name__} in {name}; see the worker's log"
                raise PermanentError(reason) from None
            time.sleep(delay)
            delay = min(delay * 2, s.max_backoff)
        raise AssertionError("unreachable")


class Worker:
    """Consumes one system's tasks and runs a :class:`Connector` on them."""

    def __init__(self, settings: Settings, connector: Connector, keys: KeyClient | None = None):
        from confluent_kafka import Consumer, Producer

        self.settings = settings
        self.runner = Runner(settings, connector, keys)
        self._stop = self.runner.stopping
        # Defaults as in Lethe's own clients, then the operator's properties,
        # then what at-least-once delivery depends on. fetch.wait.max.ms: some
        # Kafka-compatible brokers (Tansu 0.6) hold every fetch that long.
        # max.poll.interval.ms: a task runs between two polls, and one that
        # outlasts librdkafka's 5 minutes would put this worker out of its
        # group and have its task run again by another.
        base = {"bootstrap.servers": settings.brokers}
        self._consumer = Consumer(
            {
                **base,
                "fetch.wait.max.ms": 100,
                "max.poll.interval.ms": 1800000,
                **settings.client,
                "group.id": settings.group,
                "client.id": settings.worker,
                "auto.offset.reset": "earliest",
                # Offsets are stored by hand once the result is delivered, and
                # committed in the background from the stored ones.
                "enable.auto.offset.store": False,
                "enable.auto.commit": True,
                "auto.commit.interval.ms": 1000,
                "enable.partition.eof": False,
            }
        )
        self._producer_config = {
            **base,
            "linger.ms": 5,
            **settings.client,
            "client.id": settings.worker,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": 30000,
        }
        self._new_producer = lambda: Producer(self._producer_config)
        self._producer = self._new_producer()

    def stop(self) -> None:
        """Asks :meth:`run` to return after the message in hand."""
        self._stop.set()

    def run(self) -> None:
        """Consumes until :meth:`stop` (or SIGTERM/SIGINT when run from the
        main thread); then commits the stored offsets and leaves the group."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        s = self.settings
        # A token the coordinator refuses leaves every task without its key:
        # they would all fail once their attempts ran out. Refuse to start.
        accepted = self.runner.keys.token_accepted() if hasattr(self.runner.keys, "token_accepted") else True
        if accepted is False:
            raise SystemExit(
                f"the coordinator rejects the connector token of system {s.system}; fix LETHE_CONNECTOR_TOKEN"
            )
        if accepted is None:
            log.warning("cannot check the connector token now; starting, and tasks wait for their keys")

        def assigned(_consumer: Any, partitions: list[Any]) -> None:
            log.info("partitions assigned: %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions))

        def revoked(_consumer: Any, partitions: list[Any]) -> None:
            log.info("partitions revoked: %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions))

        self._consumer.subscribe([s.tasks_topic], on_assign=assigned, on_revoke=revoked)
        log.info("worker started: system %s, topic %s, group %s", s.system, s.tasks_topic, s.group)
        try:
            while not self._stop.is_set():
                message = self._consumer.poll(0.5)
                if message is None:
                    continue
                if message.error():
                    self._consumer_error(message.error())
                    continue
                self.handle(message)
        finally:
            log.info("worker stopping: %d tasks finished", self.runner.finished)
            self._producer.flush(10)
            self._consumer.close()

    def _consumer_error(self, error: Any) -> None:
        if error.fatal():
            raise RuntimeError(f"fatal Kafka consumer error: {error}")
        log.warning("Kafka consumer error (librdkafka retries): %s", error)

    def handle(self, message: Any) -> None:
        """One message: a result (or a dead letter) delivered, then its offset stored."""
        try:
            task = decode_task(message.value())
        except Undecodable as e:
            reason = str(e)
            log.warning(
                "dead-lettering message %s/%d@%d: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                reason,
            )
            self._deliver(
                self.settings.dlq_topic,
                None,
                message.value() or b"",
                [("lethe-dlq-reason", reason.encode()), ("lethe-dlq-source", message.topic().encode())],
                tries=DEAD_LETTER_TRIES,
            )
        else:
            result = self.runner.process(task)
            headers = [
                ("traceparent", traceparent(task.request_id).encode()),
                ("content-type", b"application/json"),
            ]
            payload = json.dumps(result, separators=(",", ":")).encode()
            self._deliver(self.settings.results_topic, str(task.request_id).encode(), payload, headers)
        # Only now, with the broker's acknowledgement in hand.
        from confluent_kafka import KafkaException

        try:
            self._consumer.store_offsets(message=message)
        except KafkaException as e:
            # The partition went to another worker meanwhile: it gets the
            # message again (at least once), and answers it again.
            where = f"{message.topic()}/{message.partition()}@{message.offset()}"
            log.warning("cannot store the offset of %s: %s", where, e)

    def _deliver(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        tries: int | None = None,
    ) -> None:
        """Produces one message and waits for the broker's acknowledgement,
        trying again (with backoff) until it is delivered: the offset of the
        message being answered must not be stored before. With ``tries``
        (dead letters), gives up after that many and logs it: a message the
        broker always refuses must not stop the partition."""
        from confluent_kafka import KafkaException

        delay = self.settings.first_backoff
        tried = 0
        while True:
            report: dict[str, Any] = {}

            def delivered(error: Any, _message: Any) -> None:
                report["error"] = error

            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
            except BufferError:
                self._producer.poll(1)
                continue
            except KafkaException as e:
                # Refused before sending (a message over the size limit, say).
                report["error"] = e.args[0] if e.args else e
            while "error" not in report:
                self._producer.poll(0.5)
            error = report["error"]
            if error is None:
                return
            tried += 1
            if tries is not None and tried >= tries:
                log.error("publishing to %s failed %d times (%s); giving the message up", topic, tried, error)
                return
            log.warning("publishing to %s failed (%s); retrying in %.1f s", topic, error, delay)
            if getattr(error, "fatal", lambda: False)():
                # An idempotent producer in a fatal state fails every later
                # send (e.g. after a long broker outage): start a new one.
                log.warning("the Kafka producer can no longer publish; replacing it")
                self._producer = self._new_producer()
            time.sleep(delay)
            delay = min(delay * 2, self.settings.max_backoff)


def _summary(outcome: dict[str, Any]) -> str:
    parts = []
    for d in outcome.get("datasets", []):
        anonymized = f" anonymized {d['anonymized']}" if d["anonymized"] else ""
        parts.append(f"{d['dataset']} deleted {d['deleted']}{anonymized}")
    parts += [f"{r['dataset']} kept {r['count']}" for r in outcome.get("retained", [])]
    if outcome["status"] == "accepted":
        parts.append(f"job {outcome['job_id']}")
    if outcome["status"] == "failed":
        parts.append(("retryable: " if outcome["retryable"] else "permanent: ") + outcome["reason"])
    if "residual" in outcome:
        parts.append(f"residual {outcome['residual']}")
    return f" ({'; '.join(parts)})" if parts else ""


def configure_logging(level: str | None = None) -> None:
    """Logs to standard error, one line per event (``LETHE_LOG`` sets the level)."""
    logging.basicConfig(
        level=(level or os.environ.get("LETHE_LOG") or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
