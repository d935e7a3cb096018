"""Idempotency: what was processed, and which steps of it, live in a JetStream key-value bucket.

An upload is recorded under its `event_id` *and* the keys it names (`key_for`): an event that
reuses another upload's event_id with other keys is a different upload, so it can neither pass
for the real one nor make the real one "a duplicate". Two copies of one upload in the same process
are serialised by `claim`, so the second sees the first one's record. Completed steps with an
external effect are recorded per upload (`record_step`) with their outputs, and reused on
redelivery instead of being repeated. The timeouts of each step are counted there too
(`count_timeout`), so that replicas and restarts agree how often an upload's step has run out of time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from uploads_consumer.errors import RetryableError, describe
from uploads_consumer.events import FileUploadEvent

FILE_PREFIX = "file"
"""`file.{file_uuid}`: the index of a processed upload by its file_uuid (an event_id is never `file`)."""
WRITE_ATTEMPTS = 4
WRITE_PAUSES = (0.2, 0.5, 1.0)


def key_for(event: FileUploadEvent) -> str:
    """`{event_id}.{digest of bucket, keys, email and file_uuid}`: one key per distinct upload."""
    identity = "\0".join((event.bucket_name, event.s3_data_key, event.s3_metadata_key, event.email, event.file_uuid))
    return f"{event.event_id}.{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:20]}"


def file_key(file_uuid: str) -> str:
    return f"{FILE_PREFIX}.{file_uuid}"


@dataclass(frozen=True)
class Where:
    """Where a processed upload was, as its record in the bucket says."""

    stream: str
    """The stream of the message this consumer processed: the upload stream, or for a stage the results."""
    seq: int
    result_seq: int | None = None
    """Its result event's sequence in the result stream; None when it publishes none."""
    at: int = 0
    """When it was recorded, epoch milliseconds."""
    event_id: str | None = None

    def value(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, value: bytes | None) -> Where | None:
        """The record's value; None for one written before records said where (`1`) or unreadable."""
        try:
            data = json.loads(value or b"")
            return cls(**{k: data[k] for k in ("stream", "seq", "result_seq", "at", "event_id") if k in data})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _step_key(key: str, step: str, record: str = "step") -> str:
    """`{key}.step.webhook`; an instance `webhook:ops` is `{key}.step.webhook.ops` (a name has no dots).
    `record` names what is kept of the step: `step` (its checkpoint) or `timeouts` (their count)."""
    kind, _, instance = step.partition(":")
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", kind) + (f".{re.sub(r'[^A-Za-z0-9_-]', '_', instance)}" if instance else "")
    return f"{key}.{record}.{safe}"


class Deduplicator:
    def __init__(self, kv: KeyValue | None) -> None:
        self._kv = kv  # None: the bucket is disabled (DEDUPE_BUCKET empty); only in-process claims remain
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @property
    def enabled(self) -> bool:
        return self._kv is not None

    @contextlib.asynccontextmanager
    async def claim(self, key: str) -> AsyncIterator[None]:
        """Hold an upload's key for the whole of its processing; twins wait their turn."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def seen(self, key: str) -> bool:
        if self._kv is None:
            return False
        try:
            await self._kv.get(key)
            return True
        except KeyNotFoundError:  # also KeyDeletedError
            return False
        except Exception as exc:
            raise RetryableError(f"idempotency lookup failed: {describe(exc)}") from exc

    async def mark(self, key: str, where: Where | None = None, file_uuid: str | None = None) -> None:
        """Record the upload as processed, and where it was. Retried in place: failing here would repeat
        every step. The index by file_uuid is written alongside, once: without it `trace` reads the stream."""
        value = where.value() if where is not None else b"1"
        if file_uuid is None:
            await self._put(key, value, "recording the upload as processed")
            return
        await asyncio.gather(self._put(key, value, "recording the upload as processed"), self._index(file_uuid, value))

    async def _index(self, file_uuid: str, value: bytes) -> None:
        if self._kv is None:
            return
        with contextlib.suppress(Exception):  # a lookup aid: never in the way of the work
            await self._kv.put(file_key(file_uuid), value)

    async def step(self, key: str, step: str) -> dict[str, Any] | None:
        """The outputs a completed step reported, or None if it has not completed."""
        if self._kv is None:
            return None
        try:
            entry = await self._kv.get(_step_key(key, step))
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise RetryableError(f"step record lookup failed: {describe(exc)}") from exc
        try:
            outputs = json.loads(entry.value or b"{}")
        except ValueError:
            return {}
        return outputs if isinstance(outputs, dict) else {}

    async def steps(self, key: str, steps: list[str]) -> dict[str, dict[str, Any]]:
        """The completed ones among `steps`, with their outputs (looked up together)."""
        if self._kv is None or not steps:
            return {}
        found = await asyncio.gather(*(self.step(key, step) for step in steps))
        return {step: outputs for step, outputs in zip(steps, found, strict=True) if outputs is not None}

    async def record_step(self, key: str, step: str, outputs: dict[str, Any]) -> None:
        body = json.dumps(outputs, ensure_ascii=False, default=str).encode("utf-8")
        await self._put(_step_key(key, step), body, f"recording step {step} as done")

    async def count_timeout(self, key: str, step: str, origin: str) -> int | None:
        """Count one more timeout of `step` on this upload, and return how many there have been: in the
        bucket at `{key}.timeouts.{step}`, as `{"origin": …, "count": n}`. `origin` is the message's
        stream and sequence: a message `dlq replay` republished is a new one, so its count starts
        again from 1. Compare-and-set, so replicas counting at once each add theirs.
        None without a bucket."""
        if self._kv is None:
            return None
        record = _step_key(key, step, "timeouts")
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                try:
                    entry = await self._kv.get(record)
                except KeyNotFoundError:  # also KeyDeletedError
                    entry = None
                count = 1
                if entry is not None:
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        before = json.loads(entry.value or b"{}")
                        if before.get("origin") == origin:
                            count = int(before.get("count", 0)) + 1
                body = json.dumps({"origin": origin, "count": count}).encode()
                if entry is None:
                    await self._kv.create(record, body)
                else:
                    await self._kv.update(record, body, last=entry.revision)
                return count
            except KeyWrongLastSequenceError:
                continue  # another replica counted meanwhile: read its count and add ours
            except Exception as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise RetryableError(f"counting a timeout of step {step} failed: {describe(exc)}") from exc
                await asyncio.sleep(WRITE_PAUSES[min(attempt, len(WRITE_PAUSES)) - 1])
        raise RetryableError(f"counting a timeout of step {step} failed: the record kept changing")

    async def _put(self, key: str, value: bytes, what: str) -> None:
        if self._kv is None:
            return
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                await self._kv.put(key, value)
                return
            except Exception as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise RetryableError(f"{what} failed: {describe(exc)}") from exc
                await asyncio.sleep(WRITE_PAUSES[min(attempt, len(WRITE_PAUSES)) - 1])


async def find_records(js: Any, bucket: str, event_id: str | None = None, file_uuid: str | None = None) -> list[Where]:
    """What one consumer's bucket says of an upload, by event_id (its records, one per distinct upload with
    that id) or by file_uuid (the index): the server matches the keys, nothing is read but what matches.
    [] when it holds none, or the bucket does not exist."""
    stream = f"KV_{bucket}"

    async def read(subject: str, event: str | None) -> Where | None:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return None
        where = Where.parse(msg.data)
        if where is None:  # written before records said where: when, at least
            return Where("", 0, at=int(msg.time.timestamp() * 1000) if msg.time else 0, event_id=event)
        return (
            where if where.event_id is not None else Where(where.stream, where.seq, where.result_seq, where.at, event)
        )

    async def by_event_id() -> list[Where | None]:
        if event_id is None:
            return []
        try:
            info = await js.stream_info(stream, subjects_filter=f"$KV.{bucket}.{event_id}.*")
        except NotFoundError:
            return []
        subjects = sorted((info.state.subjects or {}) if info.state else {})
        return list(await asyncio.gather(*(read(subject, event_id) for subject in subjects)))

    async def by_file_uuid() -> list[Where | None]:
        return [await read(f"$KV.{bucket}.{file_key(file_uuid)}", None)] if file_uuid is not None else []

    indexed, recorded = await asyncio.gather(by_file_uuid(), by_event_id())
    return [where for where in (*indexed, *recorded) if where is not None]
