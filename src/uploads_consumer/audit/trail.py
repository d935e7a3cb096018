"""The audit trail: one record for every settlement, durable before the server hears of the settlement.

The settle path calls one object, `record(delivered, settlement)`, just before it sends an ack, a nak
or a term (and once a copy of a message the server gave up on is stored): an `AuditTrail`, or
`NoAudit` when AUDIT_URL is unset. Each record is chained to the previous
record of its writer (one chain per process: the SHA-256 of its canonical form and that of the record
before it) and appended, fsynced, to a `Journal`: the SQLite store itself, or the local spool of a
PostgreSQL store (spool.py). Several settlements waiting at once are written in one transaction.

Record format, canonical form and guarantees: docs/contract.md, "12. Audit trail".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from uploads_consumer.audit.anchors import SEAL_TIMEOUT, AnchorPublisher
from uploads_consumer.audit.chain import Head
from uploads_consumer.audit.record import ZERO_HASH, Record, chained, committed
from uploads_consumer.errors import describe
from uploads_consumer.events import FileUploadEvent, upload_of
from uploads_consumer.observability import Metrics, get_logger

log = get_logger("uploads_consumer.audit")

RETRY_LIMIT = 30.0  # longest pause between attempts to write to a journal that failed


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

    def stored_heads(self) -> Mapping[str, Head]:
        """Per writer, the last record the store has (its own chain's, and any taken over)."""
        ...

    async def flush(self, timeout: float) -> None:
        """Move what it holds to the store, for at most `timeout` seconds."""
        ...

    async def close(self) -> None: ...


def writer_identity() -> tuple[str, int, str]:
    """(host, pid, writer): a writer names one process's chain, unique even when a pid comes back."""
    host, pid = socket.gethostname(), os.getpid()
    return host, pid, f"{host}/{pid}/{secrets.token_hex(4)}"


def storable_text(value: str | None) -> str | None:
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
        anchors: AnchorPublisher | None = None,
    ) -> None:
        self.journal = journal
        self.anchors = anchors
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
        # The end of this chain, for whoever keeps the logs (and its anchor, when it could be published).
        log.info("audit trail closed", writer=self.writer, seq=self.seq, hash=self.head)

    async def anchoring(self, js: JetStreamContext) -> None:
        """Publish the chains' heads every AUDIT_ANCHOR_INTERVAL (a task, cancelled at the stop)."""
        if self.anchors is not None:
            await self.anchors.run(js)

    async def seal(self) -> None:
        """At a clean stop, once every settlement is recorded and before NATS closes: the records to the
        store (a spool: for a moment), then their heads anchored."""
        if self.anchors is None:
            return
        if self._writing is not None:
            await asyncio.wait([self._writing])
        began = time.monotonic()  # both within SEAL_TIMEOUT: the stop's own time limit counts on it
        await self.journal.flush(SEAL_TIMEOUT / 2)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.anchors.publish(), SEAL_TIMEOUT - (time.monotonic() - began))

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
        return committed(
            {
                "recorded_at": int(time.time() * 1000),
                "consumer": self._consumer,
                "host": self.host,
                "pid": self.pid,
                "stream": delivered.stream,
                "stream_seq": delivered.stream_seq,
                "deliveries": delivered.deliveries,
                "event_id": event.event_id if event else None,
                "file_uuid": event.file_uuid if event else None,
                "email": storable_text(event.email) if event else None,
                "filename": storable_text(result.get("original_filename") or (event.stored_name if event else None)),
                "bucket": storable_text(event.bucket_name) if event else None,
                "size": result.get("size"),
                "content_type": result.get("content_type"),
                "sha256": result.get("sha256"),
                "outcome": str(settlement.outcome),
                "error_class": settlement.error_class,
                "reason": storable_text(settlement.reason),
                "duration_ms": round(1000 * (time.monotonic() - received)) if received is not None else None,
                "processors": [storable_text(name) for name in result.get("processors", ())],
                "skipped": [storable_text(name) for name in result.get("skipped", ())],
            }
        )

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

    async def anchoring(self, js: JetStreamContext) -> None:
        return None

    async def seal(self) -> None:
        return None


Audit = AuditTrail | NoAudit
