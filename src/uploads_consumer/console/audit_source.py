"""The read model's one door to the audit trail (AUDIT_URL): an upload's or a person's records, the usage
report, and the record of each replay the console makes.

A replay is an operator's act, not a settlement: the console writes its record in a chain of its own
(a writer per console process, like a daemon's), with outcome `replayed`, the consumer the letter went
back to, the original message, and who asked in `reason`. It is written before the letter goes back;
when it cannot be written, the letter is not replayed (docs/contract.md 12.1).
"""

from __future__ import annotations

import time
from typing import Any

from uploads_consumer.audit.record import ZERO_HASH, Record, chained, committed
from uploads_consumer.audit.schema import DAY_MS
from uploads_consumer.audit.store import AuditStore, store_for
from uploads_consumer.audit.trail import storable_text, writer_identity
from uploads_consumer.config import Settings
from uploads_consumer.console.letters import DeadLetter
from uploads_consumer.errors import UploadsError, describe

LOOKUP_LIMIT = 10_000


class AuditSource:
    def __init__(self, settings: Settings) -> None:
        self._store: AuditStore = store_for(settings)
        self.host, self.pid, self.writer = writer_identity()
        self._seq, self._head = 0, ZERO_HASH

    async def open(self) -> None:
        await self._store.open(create=False)

    async def close(self) -> None:
        await self._store.close()

    async def lookup(self, key: str) -> list[Record]:
        """Every record of one upload or one person (`key`: a file_uuid, an event_id or an email), across
        consumers, oldest first: the store's indexed lookup (`audit show`)."""
        return await self._store.lookup(key, LOOKUP_LIMIT)

    async def report(self, since_ms: int, by: str, consumer: str) -> list[dict[str, Any]]:
        """Per group (day, user, type or outcome) from the UTC day of `since_ms` on: records, uploads,
        bytes, failures, retries, duplicates; read from the store's daily figures (`audit report`)."""
        rows = await self._store.report(since_ms // DAY_MS, (by,), consumer)
        return [{"group": row.pop(by), **row} for row in rows]

    async def record_replay(self, letter: DeadLetter, user: str, subject: str) -> None:
        """The replay's record, durable before the letter goes back; UploadsError when it cannot be."""
        entry = {
            "recorded_at": int(time.time() * 1000),
            "consumer": letter.consumer,
            "host": self.host,
            "pid": self.pid,
            "stream": letter.stream,
            "stream_seq": letter.stream_seq or 0,
            "deliveries": letter.deliveries or 0,
            "event_id": storable_text(letter.event_id),
            "file_uuid": storable_text(letter.file_uuid),
            "email": storable_text(letter.email),
            "filename": None,
            "bucket": None,
            "size": None,
            "content_type": None,
            "sha256": None,
            "outcome": "replayed",
            "error_class": storable_text(letter.error_class or None),
            "reason": storable_text(f"replayed by {user} from the console: dead letter {letter.seq} to {subject}"),
            "duration_ms": None,
            "processors": [],
            "skipped": [],
        }
        records = chained([committed(entry)], self.writer, self._seq, self._head)
        try:
            await self._store.append(records)
        except Exception as exc:  # noqa: BLE001 - said to the operator; the letter stays where it is
            raise UploadsError(f"the audit trail cannot record the replay ({describe(exc)})") from None
        self._seq, self._head = records[-1]["seq"], records[-1]["hash"]
