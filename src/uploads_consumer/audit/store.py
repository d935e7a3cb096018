"""Where audit records are kept: SQLite (aiosqlite; WAL, every commit fsynced) or PostgreSQL (asyncpg).

One table, `audit_records`, with one row per record and its place in the chain as a unique key; a
version table, `audit_schema`, and the migrations that bring a database to this version, run at
start. Writers only ever insert. The queries behind `audit verify`, `report` and `tail` are here too,
each computed by the database (GROUP BY), not row by row in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from uploads_consumer.audit.record import COLUMNS, LISTS, Record
from uploads_consumer.config import Settings
from uploads_consumer.errors import ConfigError, UploadsError

SCHEMA_VERSION = 1
GROUPS = ("day", "user", "type", "outcome")
INSERT_CHUNK = 500  # rows per INSERT statement (SQLite allows 32766 parameters)


def _columns(integer: str, big: str, identity: str) -> str:
    """The table of version 1, in a backend's types."""
    return f"""
    CREATE TABLE audit_records (
        id {identity},
        format {integer} NOT NULL, writer TEXT NOT NULL, seq {big} NOT NULL, prev_hash TEXT NOT NULL,
        recorded_at {big} NOT NULL, consumer TEXT NOT NULL, host TEXT NOT NULL, pid {integer} NOT NULL,
        stream TEXT NOT NULL, stream_seq {big} NOT NULL, deliveries {integer} NOT NULL,
        event_id TEXT, file_uuid TEXT, email TEXT, filename TEXT, bucket TEXT,
        size {big}, content_type TEXT, sha256 TEXT,
        outcome TEXT NOT NULL, error_class TEXT, reason TEXT, duration_ms {big},
        processors TEXT NOT NULL, skipped TEXT NOT NULL, hash TEXT NOT NULL,
        UNIQUE (writer, seq)
    )"""


def _migrations(integer: str, big: str, identity: str) -> dict[int, list[str]]:
    return {
        1: [
            "CREATE TABLE audit_schema (version INTEGER NOT NULL)",
            "INSERT INTO audit_schema (version) VALUES (0)",
            _columns(integer, big, identity),
            "CREATE INDEX audit_records_recorded_at ON audit_records (recorded_at)",
        ],
    }


class SchemaTooNew(UploadsError):
    def __init__(self, version: int) -> None:
        super().__init__(
            f"the audit database is at schema version {version}, newer than this uploads-consumer knows "
            f"({SCHEMA_VERSION}): upgrade uploads-consumer"
        )


def _row(values: Sequence[Any]) -> Record:
    """A row as a record. A list column that is not JSON (edited by hand) stays the text it is, for
    verify to name the record and for tail to show it, never to stop either."""
    record = dict(zip(COLUMNS, values, strict=True))
    for name in LISTS:
        with contextlib.suppress(ValueError):
            record[name] = json.loads(record[name])
    return record


def _params(record: Record) -> list[Any]:
    return [json.dumps(record[c], ensure_ascii=False) if c in LISTS else record[c] for c in COLUMNS]


def _report_sql(group: str, param: Any) -> str:
    """Records, uploads (processed), their bytes, failures (dead-lettered), retries and duplicates per group."""
    return f"""
    SELECT {group} AS grp, COUNT(*),
        SUM(CASE WHEN outcome = 'processed' THEN 1 ELSE 0 END),
        CAST(COALESCE(SUM(CASE WHEN outcome = 'processed' THEN size END), 0) AS BIGINT),
        SUM(CASE WHEN outcome = 'dead_lettered' THEN 1 ELSE 0 END),
        SUM(CASE WHEN outcome = 'retried' THEN 1 ELSE 0 END),
        SUM(CASE WHEN outcome = 'duplicate' THEN 1 ELSE 0 END)
    FROM audit_records WHERE recorded_at >= {param(1)} AND consumer = {param(2)}
    GROUP BY grp ORDER BY grp"""


REPORT_COLUMNS = ("group", "records", "uploads", "bytes", "failures", "retries", "duplicates")


def _group(by: str, day: str) -> str:
    if by not in GROUPS:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)}")
    return {
        "day": day,
        "user": "COALESCE(email, '(none)')",
        "type": "COALESCE(content_type, '(unknown)')",
        "outcome": "outcome",
    }[by]


class SqliteStore:
    """A SQLite database file: the store of `sqlite:///…`, and each writer's spool for PostgreSQL."""

    DAY = "strftime('%Y-%m-%d', recorded_at / 1000, 'unixepoch')"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: Any = None

    async def open(self, create: bool = True) -> None:
        """Open (and create, unless `create` is False) the database, with its schema brought up to date."""
        if not create and not self.path.exists():
            raise ConfigError("AUDIT_URL", f"no SQLite database at {self.path}")
        try:
            import aiosqlite
        except ImportError:
            raise ConfigError(
                "AUDIT_URL", "the audit trail needs the audit extra: pip install 'uploads-consumer[audit]'"
            ) from None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)  # transactions are ours
            for pragma in ("busy_timeout=10000", "journal_mode=WAL", "synchronous=FULL"):
                await self._db.execute(f"PRAGMA {pragma}")
            await self._migrate()
        except (OSError, aiosqlite.Error) as exc:
            await self.close()
            raise ConfigError("AUDIT_URL", f"cannot open the SQLite database {self.path}: {exc}") from None

    async def _version(self) -> int:
        rows = await self._db.execute_fetchall("SELECT name FROM sqlite_master WHERE name = 'audit_schema'")
        if not rows:
            return 0
        [(version,)] = await self._db.execute_fetchall("SELECT version FROM audit_schema")
        return int(version)

    async def _migrate(self) -> None:
        if await self._version() == SCHEMA_VERSION:
            return
        await self._db.execute("BEGIN IMMEDIATE")  # one migrator at a time, whatever the processes
        try:
            version = await self._version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version)
            for number, statements in _migrations("INTEGER", "INTEGER", "INTEGER PRIMARY KEY").items():
                if number > version:
                    for statement in statements:
                        await self._db.execute(statement)
                    await self._db.execute("UPDATE audit_schema SET version = ?", (number,))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    async def append(self, records: list[Record]) -> None:
        """One transaction, fsynced at its commit (WAL, synchronous=FULL); a record already there is kept."""
        names = ", ".join(COLUMNS)
        row = "(" + ", ".join("?" * len(COLUMNS)) + ")"
        for start in range(0, len(records), INSERT_CHUNK):
            chunk = records[start : start + INSERT_CHUNK]
            values = [value for record in chunk for value in _params(record)]
            sql = f"INSERT INTO audit_records ({names}) VALUES {', '.join([row] * len(chunk))} ON CONFLICT DO NOTHING"
            await self._db.execute(sql, values)

    def full(self) -> bool:
        """As the daemon's journal (`sqlite://`: the store is its own spool), never: it is the trail."""
        return False

    async def wait_for_room(self, stopping: asyncio.Event) -> None:
        return None

    async def count(self) -> int:
        [(n,)] = await self._db.execute_fetchall("SELECT COUNT(*) FROM audit_records")
        return int(n)

    async def oldest(self, limit: int) -> tuple[int, list[Record]]:
        """The first `limit` records (a spool's, in the order they were written) and the last one's id."""
        rows = await self._db.execute_fetchall(
            f"SELECT id, {', '.join(COLUMNS)} FROM audit_records ORDER BY id LIMIT ?", (limit,)
        )
        return (rows[-1][0] if rows else 0), [_row(r[1:]) for r in rows]

    async def remove_through(self, last_id: int) -> None:
        await self._db.execute("DELETE FROM audit_records WHERE id <= ?", (last_id,))

    async def chains(self) -> AsyncIterator[Record]:
        async with self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit_records ORDER BY writer, seq") as rows:
            async for values in rows:
                yield _row(values)

    async def report(self, since_ms: int, by: str, consumer: str) -> list[dict[str, Any]]:
        rows = await self._db.execute_fetchall(_report_sql(_group(by, self.DAY), lambda _: "?"), (since_ms, consumer))
        return [dict(zip(REPORT_COLUMNS, row, strict=True)) for row in rows]

    async def after(self, last_id: int, limit: int) -> list[tuple[int, Record]]:
        rows = await self._db.execute_fetchall(
            f"SELECT id, {', '.join(COLUMNS)} FROM audit_records WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
        )
        return [(r[0], _row(r[1:])) for r in rows]

    async def last_id(self, back: int) -> int:
        [(top,)] = await self._db.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM audit_records")
        return max(0, int(top) - back)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()


class PostgresStore:
    """A PostgreSQL database several writers share. One connection, made (and the schema checked)
    on first use and again after any failure."""

    DAY = "to_char(to_timestamp(recorded_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    LOCK = 0x75636164  # pg_advisory_xact_lock key of the migration: one migrator at a time

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Any = None

    async def open(self, create: bool = True) -> None:
        await self._connection()

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        try:
            import asyncpg
        except ImportError:
            raise ConfigError(
                "AUDIT_URL", "the audit trail needs the audit extra: pip install 'uploads-consumer[audit]'"
            ) from None
        conn = await asyncpg.connect(self._url, timeout=5, command_timeout=30)
        try:
            await self._migrate(conn)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    @staticmethod
    async def _version(conn: Any) -> int:
        if await conn.fetchval("SELECT to_regclass('audit_schema')") is None:
            return 0
        return int(await conn.fetchval("SELECT version FROM audit_schema"))

    async def _migrate(self, conn: Any) -> None:
        # Nothing is written when the schema is current: a role that may only insert and select works.
        if await self._version(conn) == SCHEMA_VERSION:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self.LOCK)
            version = await self._version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version)
            identity = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
            for number, statements in _migrations("INTEGER", "BIGINT", identity).items():
                if number > version:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute("UPDATE audit_schema SET version = $1", number)

    async def append(self, records: list[Record]) -> None:
        """One transaction; a record already stored (a batch sent again after a lost answer) is kept as it is."""
        conn = await self._connection()
        names = ", ".join(COLUMNS)
        marks = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
        try:
            async with conn.transaction():
                await conn.executemany(
                    f"INSERT INTO audit_records ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING",
                    [_params(record) for record in records],
                )
        except BaseException:
            await self.close()  # a fresh connection next time
            raise

    async def chains(self) -> AsyncIterator[Record]:
        conn = await self._connection()
        async with conn.transaction():
            query = f"SELECT {', '.join(COLUMNS)} FROM audit_records ORDER BY writer, seq"
            async for values in conn.cursor(query, prefetch=1000):
                yield _row(values)

    async def report(self, since_ms: int, by: str, consumer: str) -> list[dict[str, Any]]:
        conn = await self._connection()
        rows = await conn.fetch(_report_sql(_group(by, self.DAY), lambda n: f"${n}"), since_ms, consumer)
        return [dict(zip(REPORT_COLUMNS, row, strict=True)) for row in rows]

    async def after(self, last_id: int, limit: int) -> list[tuple[int, Record]]:
        conn = await self._connection()
        rows = await conn.fetch(
            f"SELECT id, {', '.join(COLUMNS)} FROM audit_records WHERE id > $1 ORDER BY id LIMIT $2", last_id, limit
        )
        return [(r[0], _row(list(r)[1:])) for r in rows]

    async def last_id(self, back: int) -> int:
        conn = await self._connection()
        return max(0, int(await conn.fetchval("SELECT COALESCE(MAX(id), 0) FROM audit_records")) - back)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=2)


AuditStore = SqliteStore | PostgresStore


def sqlite_path(url: str) -> Path:
    """`sqlite:///audit.db` → audit.db (relative); `sqlite:////var/lib/a.db` → /var/lib/a.db."""
    return Path(url.removeprefix("sqlite:///"))


def store_for(settings: Settings) -> AuditStore:
    """The store AUDIT_URL names (not opened); ConfigError when it is unset."""
    if settings.audit_url is None:
        raise ConfigError("AUDIT_URL", "not set: the audit commands read the trail it names")
    url = settings.audit_url.get_secret_value()
    return SqliteStore(sqlite_path(url)) if url.startswith("sqlite:") else PostgresStore(url)
