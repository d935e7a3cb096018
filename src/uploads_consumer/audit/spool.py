"""The journal of a writer whose audit store is PostgreSQL, and `open_trail`, which builds the trail
AUDIT_URL names.

A record is first appended, fsynced, to the writer's own spool — a SQLite file in AUDIT_SPOOL_DIR
(by default a folder per consumer), locked (flock) by its process for as long as it lives — so the
settlement can go out at once, store or no store. A background task moves the spool to the store in
order, and waits out a store that is down; past AUDIT_SPOOL_MAX records, settlements wait for it
(the daemon then takes no new work).

A spool file says which store it is for (the store's own `store_id`, once reached, and its address
without credentials) and which consumer and writer made it. A spool whose process died is taken
over, and emptied into the store, by the next process on the folder **that writes to that store**
(its records keep their own writer and chain); a process writing elsewhere leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from uploads_consumer.audit.anchors import AnchorPublisher
from uploads_consumer.audit.chain import Head
from uploads_consumer.audit.record import Record
from uploads_consumer.audit.store import PostgresStore, SqliteStore, sqlite_path
from uploads_consumer.audit.trail import Audit, AuditTrail, NoAudit, writer_identity
from uploads_consumer.config import Settings
from uploads_consumer.connection import redact_url
from uploads_consumer.errors import describe
from uploads_consumer.observability import Metrics, get_logger

log = get_logger("uploads_consumer.audit")

FLUSH_BATCH = 500
FLUSH_DELAY = 0.2  # after the first record, how long others may join it before the batch goes to the store
RETRY_LIMIT = 5.0  # longest pause between attempts to reach the store
RESCAN = 30.0  # how often the folder is searched for spools whose process died
CLOSE_TIMEOUT = 1.0  # at a stop, the last chance to move the spool (what is left waits for the next start)
SPOOL_FORMAT = "2"


def store_address(url: str) -> str:
    """A PostgreSQL URL's host, port and database, without user or password: `db:5432/audit`."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    if host and ":" not in host.rsplit("]", 1)[-1] and "," not in host:
        host += ":5432"
    return host + parts.path


class SpoolFile:
    """One writer's spool: a SQLite file holding records (as JSON, oldest first) and who it is for.
    A spool left by a version before spool format 2 holds `audit_records` rows and says nothing of
    its store: it is never taken over (its owner is None)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: Any = None
        self._legacy = False

    async def open(self, owner: Mapping[str, str] | None = None) -> None:
        """Open it; with `owner`, create it (a new spool) and record whose it is."""
        import aiosqlite

        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in ("busy_timeout=10000", "journal_mode=WAL", "synchronous=FULL"):
            await self._db.execute(f"PRAGMA {pragma}")
        tables = {row[0] for row in await self._db.execute_fetchall("SELECT name FROM sqlite_master")}
        self._legacy = "audit_records" in tables and "spooled" not in tables
        if owner is not None:
            await self._db.executescript(
                "CREATE TABLE IF NOT EXISTS spooled (id INTEGER PRIMARY KEY, record TEXT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS spool_owner (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            )
            for key, value in owner.items():
                await self.set(key, value)

    async def set(self, key: str, value: str) -> None:
        await self._db.execute("INSERT OR REPLACE INTO spool_owner (key, value) VALUES (?, ?)", (key, value))

    async def owner(self) -> dict[str, str] | None:
        """Whose spool it is (`store`, `store_id`, `consumer`, `writer`), or None when it does not say."""
        if self._legacy:
            return None
        try:
            rows = await self._db.execute_fetchall("SELECT key, value FROM spool_owner")
        except Exception:  # noqa: BLE001 - no such table: nothing says whose it is
            return None
        owner = {str(k): str(v) for k, v in rows}
        return owner if "store" in owner else None

    async def append(self, records: list[Record]) -> None:
        """One transaction, fsynced at its commit."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.executemany(
                "INSERT INTO spooled (record) VALUES (?)", [(json.dumps(r, ensure_ascii=False),) for r in records]
            )
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("COMMIT")

    async def count(self) -> int:
        table = "audit_records" if self._legacy else "spooled"
        [(n,)] = await self._db.execute_fetchall(f"SELECT COUNT(*) FROM {table}")
        return int(n)

    async def oldest(self, limit: int) -> tuple[int, list[Record]]:
        """The first `limit` records, in the order they were written, and the last one's id."""
        rows = await self._db.execute_fetchall("SELECT id, record FROM spooled ORDER BY id LIMIT ?", (limit,))
        return (rows[-1][0] if rows else 0), [json.loads(r[1]) for r in rows]

    async def remove_through(self, last_id: int) -> None:
        await self._db.execute("DELETE FROM spooled WHERE id <= ?", (last_id,))

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()


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
    def __init__(
        self,
        directory: Path,
        writer: str,
        consumer: str,
        store: PostgresStore,
        address: str,
        limit: int,
        metrics: Metrics,
        legacy_dir: Path | None = None,
    ) -> None:
        self._dir = directory
        self._store = store
        self._address = address
        self._owner = {"format": SPOOL_FORMAT, "store": address, "consumer": consumer, "writer": writer}
        self._limit = limit
        self._metrics = metrics
        self._legacy_dir = legacy_dir
        self.local = SpoolFile(directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", writer) + ".db"))
        self._lock: int | None = None
        self._store_id: str | None = None
        self._orphans: list[tuple[SpoolFile, int]] = []
        self._left_alone: set[Path] = set()
        self.depth = 0
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # a stop: every record to the store now, no batch waits to fill
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushed_in_vain = False

    async def open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = _lock(self.local.path.with_suffix(".lock"))
        assert self._lock is not None, "a writer's name is its own"
        await self.local.open(self._owner)
        if self._legacy_dir is not None and (old := sorted(self._legacy_dir.glob("*.db"))):
            log.error(
                "audit spools of an older version, which do not say which store they belong to, are left alone "
                "(see the contract, 12.4)",
                spools=[str(p) for p in old],
            )
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

    def stored_heads(self) -> Mapping[str, Head]:
        return self._store.stored

    async def flush(self, timeout: float) -> None:
        if self._task is not None and self.depth and not self._flushed_in_vain:
            self._hurry.set()
            self._wake.set()
            try:
                await asyncio.wait_for(self._emptied(), timeout)
            except TimeoutError:
                self._flushed_in_vain = True  # the store is away: the stop waits for it once, not twice

    async def close(self) -> None:
        if self._task is not None:
            await self.flush(CLOSE_TIMEOUT)
            self._task.cancel()
            await asyncio.wait([self._task])
        left = await self.local.count() if self._task is not None else 0
        await self.local.close()
        for orphan, fd in self._orphans:
            await orphan.close()
            os.close(fd)
        if self._lock is not None:
            if left:  # kept, locked no more: the next process on this folder writing to its store moves it
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
                if self._store_id is None:  # the store reached: its name goes into our spool
                    self._store_id = await self._store.store_id()
                    await self.local.set("store_id", self._store_id)
                if time.monotonic() - scanned >= RESCAN:
                    await self._adopt_orphans(self._store_id)
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
            # A settlement's record is on disk already (the spool); what waits here is only its move to the
            # store. Letting the next ones join it makes one transaction of many instead of one per upload:
            # at 100 uploads/s, per record, a tenth of the round trips and of the spool's own writes.
            if self.depth < FLUSH_BATCH and not self._hurry.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), FLUSH_DELAY)

    async def _move(self, spool: SpoolFile) -> None:
        """Spool → store, oldest first; a batch is deleted from the spool only once the store has it."""
        while True:
            last, records = await spool.oldest(FLUSH_BATCH)
            if not records:
                return
            await self._store.append(records)
            await spool.remove_through(last)
            self._count(-len(records))
            self._moved.set()

    def _ours(self, owner: Mapping[str, str] | None, store_id: str) -> bool:
        """A spool for the store we write to: the same store_id, or, when it never reached its store
        to learn it, the same address."""
        if owner is None:
            return False
        if owner.get("store_id"):
            return owner["store_id"] == store_id
        return owner.get("store") == self._address

    async def _adopt_orphans(self, store_id: str) -> None:
        mine = {self.local.path, *(orphan.path for orphan, _ in self._orphans), *self._left_alone}
        for path in sorted(self._dir.glob("*.db")):
            if path in mine or (fd := _lock(path.with_suffix(".lock"))) is None:
                continue  # ours, or its process lives
            orphan = SpoolFile(path)
            try:
                await orphan.open()
                owner = await orphan.owner()
                count = await orphan.count()
            except Exception as exc:  # noqa: BLE001 - left for a person to look at; our own spool goes on
                await orphan.close()
                os.close(fd)
                self._left_alone.add(path)
                log.error("cannot read the audit spool of a process that stopped", spool=str(path), error=describe(exc))
                continue
            if not self._ours(owner, store_id):
                await orphan.close()
                os.close(fd)
                self._left_alone.add(path)
                if owner is None:
                    log.error(
                        "the audit spool of an older version, which does not say which store it belongs to, is "
                        "left alone (see the contract, 12.4)",
                        spool=str(path),
                        records=count,
                    )
                else:
                    log.warning(
                        "the audit spool of a process that wrote to another store is left alone",
                        spool=str(path),
                        store=owner.get("store"),
                        consumer=owner.get("consumer"),
                        records=count,
                    )
                continue
            self._orphans.append((orphan, fd))
            self._count(count)
            log.warning(
                "taking over the audit spool of a process that stopped",
                spool=str(path),
                consumer=owner.get("consumer") if owner else None,
                records=count,
            )


def open_trail(settings: Settings, metrics: Metrics, stopping: asyncio.Event) -> Audit:
    """The audit trail AUDIT_URL names, not yet open (`async with` opens it); NoAudit when it is unset.
    A bad AUDIT_SIGNING_KEY is a ConfigError here, before anything connects."""
    if settings.audit_url is None:
        return NoAudit()
    url = settings.audit_url.get_secret_value()
    identity = writer_identity()
    journal: SqliteStore | Spool
    if url.startswith("sqlite:"):
        journal = SqliteStore(sqlite_path(url))
    else:
        store = PostgresStore(url)
        legacy = settings.decrypt_download_path / ".audit-spool" if settings.audit_spool_dir is None else None
        journal = Spool(
            settings.audit_spool_path,
            identity[2],
            settings.nats_consumer_name,
            store,
            store_address(url),
            settings.audit_spool_max,
            metrics,
            legacy,
        )
        log.info("audit store", url=redact_url(url), spool=str(settings.audit_spool_path))
    anchors = (
        AnchorPublisher(settings, journal.stored_heads, metrics, time.time) if settings.audit_anchor_stream else None
    )
    return AuditTrail(journal, settings.nats_consumer_name, metrics, stopping, identity, anchors)
