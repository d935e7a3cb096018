"""Idempotency: event_ids already processed live in a JetStream key-value bucket.

Two copies of one event_id in the same process are serialised by `claim`, so the second sees
the first one's record and is acknowledged as a duplicate instead of being processed again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from uploads_consumer.errors import RetryableError, describe


class Deduplicator:
    def __init__(self, kv: KeyValue | None) -> None:
        self._kv = kv  # None: the bucket is disabled (DEDUPE_BUCKET empty); only in-process claims remain
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def claim(self, event_id: str | None) -> AsyncIterator[None]:
        """Hold the event_id for the whole of processing and settling; twins wait their turn."""
        if event_id is None:
            yield
            return
        lock, users = self._locks.get(event_id, (asyncio.Lock(), 0))
        self._locks[event_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[event_id]
            if users == 1:
                del self._locks[event_id]
            else:
                self._locks[event_id] = (lock, users - 1)

    async def seen(self, event_id: str) -> bool:
        if self._kv is None:
            return False
        try:
            await self._kv.get(event_id)
            return True
        except KeyNotFoundError:  # also KeyDeletedError
            return False
        except Exception as exc:
            raise RetryableError(f"idempotency lookup failed: {describe(exc)}") from exc

    async def mark(self, event_id: str) -> None:
        if self._kv is None:
            return
        try:
            await self._kv.put(event_id, b"1")
        except Exception as exc:
            raise RetryableError(f"recording the event as processed failed: {describe(exc)}") from exc
