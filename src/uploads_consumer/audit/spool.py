"""The journal of a writer whose audit store is PostgreSQL, and `open_trail`, which builds the trail
AUDIT_URL names.

A record is first appended, fsynced, to the writer's own spool — a SQLite file in AUDIT_SPOOL_DIR,
locked (flock) by its process for as long as it lives — so the settlement can go out at once, store
or no store. A background task moves the spool to the store in order, and waits out a store that is
down; past AUDIT_SPOOL_MAX records, settlements wait for it (the daemon then takes no new work). A
spool whose process died is taken over, and emptied into the store, by the next process that starts
on the same folder (its records keep their own writer and chain).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import time
from pathlib import Path

from uploads_consumer.audit.record import Record
from uploads_consumer.audit.store import PostgresStore, SqliteStore, sqlite_path
from uploads_consumer.audit.trail import Audit, AuditTrail, NoAudit, writer_identity
from uploads_consumer.config import Settings
from uploads_consumer.connection import redact_url
from uploads_consumer.errors import describe
from uploads_consumer.observability import Metrics, get_logger

log = get_logger("uploads_consumer.audit")

FLUSH_BATCH = 500
RETRY_LIMIT = 5.0  # longest pause between attempts to reach the store
RESCAN = 30.0  # how often the folder is searched for spools whose process died
CLOSE_TIMEOUT = 1.0  # at a stop, the last chance to move the spool (what is left waits for the next start)


def _lock(path: Path) -> int | None:
    """An exclusive flock on `path` (created), or None while another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove(db: Path, fd: int) -> None:
    """Delete an emptied spool's files, then let go of its lock."""
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), db.with_suffix(".lock")):
        path.unlink(missing_ok=True)
    os.close(fd)


class Spool:
    def __init__(self, directory: Path, writer: str, store: PostgresStore, limit: int, metrics: Metrics) -> None:
        self._dir = directory
        self._store = store
        self._limit = limit
        self._metrics = metrics
        self.local = SqliteStore(directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", writer) + ".db"))
        self._lock: int | None = None
        self._orphans: list[tuple[SqliteStore, int]] = []
        self._unreadable: set[Path] = set()
        self.depth = 0
        self._wake = asyncio.Event()
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = _lock(self.local.path.with_suffix(".lock"))
        assert self._lock is not None, "a writer's name is its own"
        await self.local.open()
        self._task = asyncio.create_task(self._flush_loop(), name="audit-flush")

    async def append(self, records: list[Record]) -> None:
        await self.local.append(records)
        self._count(len(records))
        self._wake.set()

    def full(self) -> bool:
        return self.depth >= self._limit

    async def wait_for_room(self, stopping: asyncio.Event) -> None:
        while self.full() and not stopping.is_set():
            self._moved.clear()
            waits = [asyncio.ensure_future(self._moved.wait()), asyncio.ensure_future(stopping.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    async def close(self) -> None:
        if self._task is not None:
            if self.depth:
                self._wake.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._emptied(), CLOSE_TIMEOUT)
            self._task.cancel()
            await asyncio.wait([self._task])
        left = await self.local.count() if self._task is not None else 0
        await self.local.close()
        for orphan, fd in self._orphans:
            await orphan.close()
            os.close(fd)
        if self._lock is not None:
            if left:  # kept, locked no more: the next process on this folder moves it to the store
                log.warning(
                    "audit records left in the spool for the next start", spool=str(self.local.path), records=left
                )
                os.close(self._lock)
            else:
                _remove(self.local.path, self._lock)
        await self._store.close()

    def _count(self, change: int) -> None:
        self.depth += change
        self._metrics.audit_spool_depth.set(self.depth)

    async def _emptied(self) -> None:
        while self.depth:
            self._moved.clear()
            await self._moved.wait()

    async def _flush_loop(self) -> None:
        delay, said, scanned = 0.5, "", -RESCAN
        while True:
            self._wake.clear()
            try:
                if time.monotonic() - scanned >= RESCAN:
                    await self._adopt_orphans()
                    scanned = time.monotonic()
                for orphan, fd in list(self._orphans):
                    await self._move(orphan)
                    await orphan.close()
                    _remove(orphan.path, fd)
                    self._orphans.remove((orphan, fd))
                await self._move(self.local)
            except Exception as exc:  # noqa: BLE001 - the store is down or refuses: the records wait in the spool
                self._metrics.audit_flush_errors.inc()
                if describe(exc) != said:
                    said = describe(exc)
                    log.error("audit store unavailable; records wait in the spool", error=said, spooled=self.depth)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_LIMIT)
                continue
            if said:
                log.info("audit store available again; spool emptied")
                said, delay = "", 0.5
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESCAN)

    async def _move(self, spool: SqliteStore) -> None:
        """Spool → store, oldest first; a batch is deleted from the spool only once the store has it."""
        while True:
            last, records = await spool.oldest(FLUSH_BATCH)
            if not records:
                return
            await self._store.append(records)
            await spool.remove_through(last)
            self._count(-len(records))
            self._moved.set()

    async def _adopt_orphans(self) -> None:
        mine = {self.local.path, *(orphan.path for orphan, _ in self._orphans), *self._unreadable}
        for path in sorted(self._dir.glob("*.db")):
            if path in mine or (fd := _lock(path.with_suffix(".lock"))) is None:
                continue  # ours, or its process lives
            orphan = SqliteStore(path)
            try:
                await orphan.open()
                count = await orphan.count()
            except Exception as exc:  # noqa: BLE001 - left for a person to look at; our own spool goes on
                await orphan.close()
                os.close(fd)
                self._unreadable.add(path)
                log.error("cannot read the audit spool of a process that stopped", spool=str(path), error=describe(exc))
                continue
            self._orphans.append((orphan, fd))
            self._count(count)
            log.warning("taking over the audit spool of a process that stopped", spool=str(path), records=count)


def open_trail(settings: Settings, metrics: Metrics, stopping: asyncio.Event) -> Audit:
    """The audit trail AUDIT_URL names, not yet open (`async with` opens it); NoAudit when it is unset."""
    if settings.audit_url is None:
        return NoAudit()
    url = settings.audit_url.get_secret_value()
    identity = writer_identity()
    journal: SqliteStore | Spool
    if url.startswith("sqlite:"):
        journal = SqliteStore(sqlite_path(url))
    else:
        store = PostgresStore(url)
        journal = Spool(settings.audit_spool_path, identity[2], store, settings.audit_spool_max, metrics)
        log.info("audit store", url=redact_url(url), spool=str(settings.audit_spool_path))
    return AuditTrail(journal, settings.nats_consumer_name, metrics, stopping, identity)
