"""The audit trail: one record for every settlement, durable before the server hears of the settlement.

The settle path calls one object, `record(delivered, settlement)`, just before it sends an ack, a nak
or a term (and once a copy of a message the server gave up on is stored): an `AuditTrail`, or
`NoAudit` when AUDIT_URL is unset. Each record is chained to the previous
record of its writer (one chain per process: the SHA-256 of its canonical form and that of the record
before it) and appended, fsynced, to a `Journal`: the SQLite store itself, or the local spool of a
PostgreSQL store (audit_spool.py). Several settlements waiting at once are written in one transaction.

Record format, canonical form and guarantees: docs/contract.md, "12. Audit trail".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from nats.aio.msg import Msg

from uploads_consumer.errors import describe
from uploads_consumer.events import FileUploadEvent, upload_of
from uploads_consumer.observability import Metrics, get_logger

log = get_logger("uploads_consumer.audit")

FORMAT = 1
ZERO_HASH = "0" * 64
FIELDS = (
    "format",
    "writer",
    "seq",
    "prev_hash",
    "recorded_at",
    "consumer",
    "host",
    "pid",
    "stream",
    "stream_seq",
    "deliveries",
    "event_id",
    "file_uuid",
    "email",
    "filename",
    "bucket",
    "size",
    "content_type",
    "sha256",
    "outcome",
    "error_class",
    "reason",
    "duration_ms",
    "processors",
    "skipped",
)
"""The fields a record's hash covers: every field but `hash` itself."""
COLUMNS = (*FIELDS, "hash")
RETRY_LIMIT = 30.0  # longest pause between attempts to write to a journal that failed

Record = dict[str, Any]


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is taken over: the FIELDS as one JSON object, keys sorted, no
    whitespace, non-ASCII as UTF-8 (for strings, integers, null and lists of strings: RFC 8785)."""
    return json.dumps(
        {k: record[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def chained(entries: Iterable[Mapping[str, Any]], writer: str, seq: int, prev_hash: str) -> list[Record]:
    """Entries as the records that follow (seq, prev_hash) in `writer`'s chain."""
    records = []
    for entry in entries:
        seq += 1
        record = {**entry, "writer": writer, "seq": seq, "prev_hash": prev_hash}
        record["hash"] = prev_hash = record_hash(record)
        records.append(record)
    return records


@dataclass(frozen=True)
class Break:
    """The first record of a chain that does not verify."""

    writer: str
    seq: int
    problem: str


@dataclass
class ChainCheck:
    """Walks records in (writer, seq) order, as `audit verify` reads them, and notes each chain's
    first break: an edited record (its hash), records missing before it (its seq), or one that does
    not follow the record before it (its prev_hash: reordered, or a neighbour removed or rewritten)."""

    records: int = 0
    chains: int = 0
    breaks: list[Break] = field(default_factory=list)
    _writer: str | None = None
    _seq: int = 0
    _hash: str = ZERO_HASH
    _broken: bool = False

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        if record["writer"] != self._writer:
            self.chains += 1
            self._writer, self._seq, self._hash, self._broken = record["writer"], 0, ZERO_HASH, False
        if self._broken:
            return
        problem = None
        expected = self._seq + 1
        if record.get("format") != FORMAT:
            problem = f"unknown record format {record.get('format')!r}"
        elif record_hash(record) != record["hash"]:
            problem = "its content does not match its hash (edited)"
        elif record["seq"] != expected:
            missing = (
                f"record {expected}" if record["seq"] == expected + 1 else f"records {expected}-{record['seq'] - 1}"
            )
            problem = (
                f"{missing} of this chain missing before it (deleted)" if record["seq"] > expected else "out of order"
            )
        elif record["prev_hash"] != self._hash:
            problem = "its prev_hash is not the hash of the record before it (reordered or rewritten)"
        if problem is not None:
            self.breaks.append(Break(record["writer"], record["seq"], problem))
            self._broken = True
        self._seq, self._hash = record["seq"], record["hash"]


class Outcome(StrEnum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"
    RETRIED = "retried"


@dataclass(frozen=True)
class Settlement:
    """What the settle path knows when it carries out a decision: the audit trail's input."""

    outcome: Outcome
    received: float | None = None
    """time.monotonic() when the message arrived (for the record's duration)."""
    result: Mapping[str, Any] | None = None
    """The result event of a processed upload; of a retried or dead-lettered one, what was known of it
    when it stopped (`UploadsError.known`), if its chain had begun."""
    error_class: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Delivered:
    """The message a record is about: its place in its stream, its delivery count and its body."""

    stream: str
    stream_seq: int
    deliveries: int
    data: bytes

    @classmethod
    def of(cls, msg: Msg) -> Delivered:
        meta = msg.metadata
        return cls(meta.stream, meta.sequence.stream, meta.num_delivered, msg.data)


class Journal(Protocol):
    """Where records become durable: `append` returns once they are on disk (or in the store)."""

    async def open(self) -> None: ...

    async def append(self, records: list[Record]) -> None: ...

    def full(self) -> bool:
        """Past its bound: settlements wait until the records are moved on."""
        ...

    async def wait_for_room(self, stopping: asyncio.Event) -> None: ...

    async def close(self) -> None: ...


def writer_identity() -> tuple[str, int, str]:
    """(host, pid, writer): a writer names one process's chain, unique even when a pid comes back."""
    host, pid = socket.gethostname(), os.getpid()
    return host, pid, f"{host}/{pid}/{secrets.token_hex(4)}"


def _text(value: str | None) -> str | None:
    """Text any store keeps as given: no NUL (PostgreSQL refuses it), no lone surrogate (not UTF-8)."""
    if value is None:
        return None
    return value.replace("\0", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _event(body: bytes) -> FileUploadEvent | None:
    return upload_of(body)  # an upload event, or (a stage's message) the upload its upstream's result carries


class AuditTrail:
    """Writes the record of each settlement to its journal, chained, before the settlement is sent."""

    def __init__(
        self,
        journal: Journal,
        consumer: str,
        metrics: Metrics,
        stopping: asyncio.Event,
        identity: tuple[str, int, str] | None = None,
    ) -> None:
        self.journal = journal
        self._consumer = consumer
        self._metrics = metrics
        self._stopping = stopping
        self.host, self.pid, self.writer = identity or writer_identity()
        self.seq, self.head = 0, ZERO_HASH
        self._queue: list[tuple[Record, asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AuditTrail:
        await self.journal.open()
        log.info("audit trail open", writer=self.writer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writing is not None:
            await asyncio.wait([self._writing])
        await self.journal.close()
        # The end of this chain, for whoever keeps the logs: a deleted last record leaves no gap in it.
        log.info("audit trail closed", writer=self.writer, seq=self.seq, hash=self.head)

    async def record(self, delivered: Delivered, settlement: Settlement) -> None:
        """Make the settlement's record durable. Past the journal's bound, the settlement then waits
        (the message stays ours) until there is room again, or the daemon stops."""
        entry = self.entry(delivered, settlement)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, done))
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write(), name="audit-write")
        await done
        self._metrics.audit_records.inc()
        if self.journal.full():
            await self.journal.wait_for_room(self._stopping)

    def entry(self, delivered: Delivered, settlement: Settlement) -> Record:
        """The record, less its place in the chain."""
        event = _event(delivered.data)
        result = settlement.result or {}
        received = settlement.received
        return {
            "format": FORMAT,
            "recorded_at": int(time.time() * 1000),
            "consumer": self._consumer,
            "host": self.host,
            "pid": self.pid,
            "stream": delivered.stream,
            "stream_seq": delivered.stream_seq,
            "deliveries": delivered.deliveries,
            "event_id": event.event_id if event else None,
            "file_uuid": event.file_uuid if event else None,
            "email": _text(event.email) if event else None,
            "filename": _text(result.get("original_filename") or (event.stored_name if event else None)),
            "bucket": _text(event.bucket_name) if event else None,
            "size": result.get("size"),
            "content_type": result.get("content_type"),
            "sha256": result.get("sha256"),
            "outcome": str(settlement.outcome),
            "error_class": settlement.error_class,
            "reason": _text(settlement.reason),
            "duration_ms": round(1000 * (time.monotonic() - received)) if received is not None else None,
            "processors": [_text(name) for name in result.get("processors", ())],
            "skipped": [_text(name) for name in result.get("skipped", ())],
        }

    async def _write(self) -> None:
        """Group commit: whatever waits is chained and appended in one go. A failed append does not
        advance the chain; it is tried again (the messages wait with it) until it works or we stop."""
        delay = 0.5
        said = None
        while self._queue:
            batch, self._queue = self._queue, []
            records = chained((entry for entry, _ in batch), self.writer, self.seq, self.head)
            while True:
                try:
                    await self.journal.append(records)
                    break
                except Exception as exc:  # noqa: BLE001 - the settlements wait; none is sent unrecorded
                    self._metrics.audit_flush_errors.inc()
                    if describe(exc) != said:
                        said = describe(exc)
                        log.error("audit records cannot be written; the settlements wait", error=said)
                    if self._stopping.is_set():
                        for _, done in batch:
                            if not done.done():
                                done.set_exception(exc)
                        records = []
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    delay = min(delay * 2, RETRY_LIMIT)
            if records:
                self.seq, self.head = records[-1]["seq"], records[-1]["hash"]
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)


class NoAudit:
    """AUDIT_URL unset: the settle path calls this, and nothing is written."""

    async def __aenter__(self) -> NoAudit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def record(self, delivered: Delivered, settlement: Settlement) -> None:
        return None


Audit = AuditTrail | NoAudit
