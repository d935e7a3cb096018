"""Where audit records are kept: SQLite (aiosqlite; WAL, every commit fsynced) or PostgreSQL (asyncpg).

Writers only ever insert. The queries behind `audit verify`, `report`, `show`, `export`, `tail`,
`forget` and `prune` are here too, written once for both backends (`$1`-style parameters), each
computed by the database; the tables are in schema.py.

`lookup` (one upload's or one person's records, across consumers) is the query a console or a
`trace` command reuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploads_consumer.audit.chain import Head
from uploads_consumer.audit.record import COLUMNS, LISTS, PERSONAL, Record
from uploads_consumer.audit.schema import (
    DAY_MS,
    FIGURES,
    FORGOTTEN_EMAIL,
    NO_EMAIL,
    NO_TYPE,
    POSTGRES,
    ROLLUPS,
    SCHEMA_VERSION,
    SQLITE,
    USER_PERIODS,
    Dialect,
    figures,
    migrations,
    rollup_rows,
    rollup_upsert,
    users_table,
)
from uploads_consumer.config import Settings
from uploads_consumer.errors import ConfigError, UploadsError
from uploads_consumer.events import utc_text

INSERT_CHUNK = 500  # rows per INSERT statement on SQLite (it allows 32766 parameters)
READ_COLUMNS = (*COLUMNS, "erasure_id")
_SELECT = ", ".join(READ_COLUMNS)
INTEGERS = frozenset({"format", "seq", "recorded_at", "pid", "stream_seq", "deliveries", "size", "duration_ms"})
GROUPS = ("day", "user", "type", "outcome")
MEASURES = FIGURES
_MEASURES_SQL = ", ".join(f"CAST(SUM({f}) AS BIGINT)" for f in FIGURES)  # PostgreSQL sums a BIGINT into a NUMERIC
_GROUP_COLUMNS = {"day": "day", "user": "email", "type": "content_type", "outcome": "outcome"}
_FORGOTTEN = "CASE WHEN email IS NULL AND erasure_id IS NOT NULL THEN ' ' ELSE COALESCE(email, '') END"


class SchemaTooNew(UploadsError):
    def __init__(self, version: int) -> None:
        super().__init__(
            f"the audit database is at schema version {version}, newer than this uploads-consumer knows "
            f"({SCHEMA_VERSION}): upgrade uploads-consumer"
        )


def _row(values: Sequence[Any], columns: Sequence[str] = READ_COLUMNS) -> Record:
    """A row as a record. A list column that is not JSON (edited by hand) stays the text it is, for
    verify to name the record and for tail to show it, never to stop either."""
    record = dict(zip(columns, values, strict=True))
    for name in LISTS:
        try:
            record[name] = json.loads(record[name])
        except ValueError:
            pass
    return record


def _params(record: Record) -> list[Any]:
    return [json.dumps(record[c], ensure_ascii=False) if c in LISTS else record.get(c) for c in COLUMNS]


utc = utc_text  # the records' times, as every command prints them


def day_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY_MS // 1000))


_NAMELESS = {NO_EMAIL: "(none)", FORGOTTEN_EMAIL: "(forgotten)"}
_SHOWN: dict[str, Callable[[Any], Any]] = {  # a rollup key as a report shows it
    "day": lambda value: day_text(int(value)),
    "user": lambda value: _NAMELESS.get(value, value),
    "type": lambda value: value or "(unknown)",
    "outcome": str,
}


def user_periods(since_day: int) -> list[tuple[int, int, int | None]]:
    """[since_day, for ever) as (days, first, end) ranges of the users' pyramid of periods: single days
    up to the first 4-day boundary, 4-day periods up to the first 32-day one, and so on; the last
    level open-ended. A year is then one 256-day period and a few of each smaller size."""
    ranges: list[tuple[int, int, int | None]] = []
    day = since_day
    for days, above in zip(USER_PERIODS, (*USER_PERIODS[1:], None), strict=True):
        if above is None:
            ranges.append((days, day // days, None))
            break
        boundary = -(-day // above) * above
        if boundary > day:
            ranges.append((days, day // days, boundary // days))
        day = boundary
    return ranges


def report_source(by: Sequence[str], since_day: int) -> tuple[str, str]:
    """Where a report by `by` reads (a description, and its rows, consumer `$1`): keys named as GROUPS
    map them, then FIGURES. Not by user: the daily rollup; by user and day: the users' daily one; by
    user: the users' pyramid (`user_periods`); by user and type, which no rollup keeps: the records.
    By outcome, each row is split into one per outcome."""
    day = "day" if "day" in by else ""
    if "user" in by and "type" in by:
        figures_sql = ", ".join(f"{f} AS {name}" for f, name in zip(figures(), FIGURES, strict=True))
        rows = (
            f"SELECT recorded_at / {DAY_MS} AS day, {_FORGOTTEN} AS email, COALESCE(content_type, '{NO_TYPE}') "
            f"AS content_type, {figures_sql} FROM audit_records "
            f"WHERE consumer = $1 AND recorded_at >= {since_day * DAY_MS}"
        )
        where = "records"
    elif "user" not in by:
        rows = f"SELECT * FROM audit_daily WHERE consumer = $1 AND day >= {since_day}"
        where = "audit_daily"
    elif day:
        rows = (
            f"SELECT period AS day, email, {', '.join(FIGURES)} FROM {users_table(1)} "
            f"WHERE consumer = $1 AND period >= {since_day}"
        )
        where = users_table(1)
    else:
        rows = " UNION ALL ".join(
            f"SELECT email, {', '.join(FIGURES)} FROM {users_table(days)} WHERE consumer = $1 AND period >= {first}"
            + (f" AND period < {end}" if end is not None else "")
            for days, first, end in user_periods(since_day)
        )
        where = "audit_users_*"
    if "outcome" in by:  # one row per outcome a row has, with that outcome's figures alone
        keys = "".join(f"{_GROUP_COLUMNS[g]}, " for g in by if g != "outcome")
        parts = []
        for outcome, column in _OUTCOMES:
            values = dict.fromkeys(FIGURES, "0") | {"records": column, column: column}
            if column == "uploads":
                values["bytes"] = "bytes"
            shown = ", ".join(f"{v} AS {f}" for f, v in values.items())
            parts.append(f"SELECT {keys}'{outcome}' AS outcome, {shown} FROM ({rows}) AS s WHERE {column} > 0")
        rows = " UNION ALL ".join(parts)
    return where, rows


_OUTCOMES = (
    ("processed", "uploads"),
    ("dead_lettered", "failures"),
    ("retried", "retries"),
    ("duplicate", "duplicates"),
)


@dataclass(frozen=True)
class Erasure:
    id: int
    records: int


class Store:
    """What both backends do, over four primitives each implements: fetch, execute, stream, transaction."""

    dialect: Dialect

    def __init__(self) -> None:
        self.stored: dict[str, Head] = {}
        """Per writer, the last record this process has stored (what its anchors say)."""

    def _note_stored(self, records: list[Record]) -> None:
        for record in records:
            self.stored[record["writer"]] = Head(record["seq"], record["hash"])

    def stored_heads(self) -> dict[str, Head]:
        return self.stored

    # -- primitives

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def _execute(self, sql: str, *args: Any) -> None:
        raise NotImplementedError

    def _stream(self, sql: str, *args: Any) -> AsyncIterator[Sequence[Any]]:
        raise NotImplementedError

    def _transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def open(self, create: bool = True) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _value(self, sql: str, *args: Any) -> Any:
        rows = await self._fetch(sql, *args)
        return rows[0][0] if rows else None

    # -- the trail

    async def actor(self, who: str) -> str:
        """`who`, and the database role it acts as (PostgreSQL), for an erasure record."""
        return who

    async def store_id(self) -> str:
        """The store's own random name (audit_schema.store_id): a spool file says which store it is for."""
        return str(await self._value("SELECT store_id FROM audit_schema"))

    # -- verify

    async def chains(self) -> AsyncIterator[Record]:
        """Every record, in (writer, seq) order, read as it goes (constant memory)."""
        async for values in self._stream(f"SELECT {_SELECT} FROM audit_records ORDER BY writer, seq"):
            yield _row(values)

    async def writers(self) -> list[str]:
        """Every writer with records, one index probe each (not a scan of the records)."""
        rows = await self._fetch(
            "WITH RECURSIVE w (writer) AS (SELECT MIN(writer) FROM audit_records UNION ALL "
            "SELECT (SELECT MIN(writer) FROM audit_records WHERE writer > w.writer) FROM w WHERE w.writer IS NOT NULL) "
            "SELECT writer FROM w WHERE writer IS NOT NULL"
        )
        return [str(row[0]) for row in rows]

    async def chain_from(self, writer: str, seq: int) -> AsyncIterator[Record]:
        """A writer's records from `seq` on, in order, read as it goes."""
        query = f"SELECT {_SELECT} FROM audit_records WHERE writer = $1 AND seq >= $2 ORDER BY seq"
        async for values in self._stream(query, writer, seq):
            yield _row(values)

    async def last_seq(self, writer: str) -> int:
        return int(await self._value("SELECT COALESCE(MAX(seq), 0) FROM audit_records WHERE writer = $1", writer))

    async def markers(self) -> dict[str, Head]:
        """Per chain that retention shortened, the last record it removed."""
        rows = await self._fetch("SELECT writer, seq, hash FROM audit_retention")
        return {writer: Head(int(seq), hash) for writer, seq, hash in rows}

    async def erasure_ids(self) -> set[int]:
        return {int(row[0]) for row in await self._fetch("SELECT id FROM audit_erasures")}

    # -- report

    async def report(self, since_day: int, by: Sequence[str], consumer: str) -> list[dict[str, Any]]:
        """Per group of `by` (one or two of GROUPS), from UTC day `since_day` on: MEASURES."""
        if not by or len(by) > 2 or len(set(by)) != len(by) or any(g not in GROUPS for g in by):
            raise ValueError(f"group by one or two of {', '.join(GROUPS)}")
        _, rows = report_source(by, since_day)
        keys = ", ".join(_GROUP_COLUMNS[g] for g in by)
        sql = f"SELECT {keys}, {_MEASURES_SQL} FROM ({rows}) AS r GROUP BY {keys} ORDER BY {keys}"
        names, shown, keyed = (*by, *MEASURES), [_SHOWN[g] for g in by], len(by)
        return [
            dict(
                zip(names, (*(show(v) for show, v in zip(shown, row[:keyed], strict=True)), *row[keyed:]), strict=True)
            )
            for row in await self._report_rows(sql, consumer)
        ]

    async def _report_rows(self, sql: str, consumer: str) -> Sequence[Sequence[Any]]:
        return await self._fetch(sql, consumer)

    async def consumers_since(self, since_day: int) -> list[tuple[str, int]]:
        """The consumers with records from UTC day `since_day` on, and how many each has."""
        rows = await self._fetch(
            "SELECT consumer, SUM(records) FROM audit_daily WHERE day >= $1 GROUP BY consumer ORDER BY consumer",
            since_day,
        )
        return [(str(consumer), int(n)) for consumer, n in rows]

    # -- show, export, tail

    async def lookup(self, key: str, limit: int = 10_000) -> list[Record]:
        """Every record of one upload or one person: `key` is a file_uuid, an event_id or an email
        (each indexed), across consumers, oldest first."""
        rows = await self._fetch(
            f"SELECT {_SELECT} FROM audit_records WHERE file_uuid = $1 OR event_id = $1 OR email = $1 "
            "ORDER BY recorded_at, writer, seq LIMIT $2",
            key,
            limit,
        )
        return [_row(r) for r in rows]

    async def export(self, since_ms: int) -> AsyncIterator[Record]:
        """Every record since then, oldest first, read as it goes (constant memory)."""
        query = f"SELECT {_SELECT} FROM audit_records WHERE recorded_at >= $1 ORDER BY recorded_at, id"
        async for values in self._stream(query, since_ms):
            yield _row(values)

    async def after(self, last_id: int, limit: int) -> list[tuple[int, Record]]:
        rows = await self._fetch(
            f"SELECT id, {_SELECT} FROM audit_records WHERE id > $1 ORDER BY id LIMIT $2", last_id, limit
        )
        return [(int(r[0]), _row(list(r)[1:])) for r in rows]

    async def last_id(self, back: int) -> int:
        return max(0, int(await self._value("SELECT COALESCE(MAX(id), 0) FROM audit_records")) - back)

    # -- forget

    async def _begin_erasure(self, what: str, by: str, note: str | None, at_ms: int) -> int:
        rows = await self._fetch(
            "INSERT INTO audit_erasures (erased_at, erased_by, what, records, note) VALUES ($1, $2, $3, 0, $4) "
            "RETURNING id",
            at_ms,
            by,
            what,
            note,
        )
        return int(rows[0][0])

    async def forget(self, column: str, value: str, by: str, note: str | None = None) -> Erasure | None:
        """Remove the personal fields (and the salt) of every record whose `column` (email or file_uuid)
        is `value`, in one transaction that also records the erasure and moves their counts in the
        per-user rollups to `(forgotten)`. None when no record matched (nothing is recorded)."""
        if column not in ("email", "file_uuid"):
            raise ValueError(column)
        match = f"{column} = $1 AND erasure_id IS NULL"
        what = "email" if column == "email" else f"file_uuid {value}"  # never the address itself
        try:
            async with self._transaction():
                erasure = await self._begin_erasure(what, by, note, int(time.time() * 1000))
                await self._move_to_forgotten(match, value)
                emptied = ", ".join(f"{name} = NULL" for name in (*PERSONAL, "salt"))
                await self._execute(
                    f"UPDATE audit_records SET {emptied}, erasure_id = $2 WHERE {match}", value, erasure
                )
                count = int(await self._value("SELECT COUNT(*) FROM audit_records WHERE erasure_id = $1", erasure))
                if not count:
                    raise _NothingToForget()
                await self._execute("UPDATE audit_erasures SET records = $1 WHERE id = $2", count, erasure)
        except _NothingToForget:
            return None
        return Erasure(erasure, count)

    async def _move_to_forgotten(self, match: str, value: str) -> None:
        """In the per-user rollups, the matching records' figures move from their email to `(forgotten)`."""
        marks = ", ".join(f"${i}" for i in range(1, len(FIGURES) + 4))
        for table, rows in rollup_rows(f"(SELECT * FROM audit_records WHERE {match}) AS m").items():
            if ROLLUPS[table][2] != "email":
                continue
            upsert = rollup_upsert(table).format(rows=f"VALUES ({marks})")
            for consumer, period, email, *counts in await self._fetch(rows, value):
                if email != NO_EMAIL:
                    await self._execute(upsert, consumer, period, email, *(-n for n in counts))
                    await self._execute(upsert, consumer, period, FORGOTTEN_EMAIL, *counts)
            await self._execute(f"DELETE FROM {table} WHERE records <= 0")

    async def erasures(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT id, erased_at, erased_by, what, records, note FROM audit_erasures ORDER BY id")
        return [dict(zip(("id", "erased_at", "erased_by", "what", "records", "note"), r, strict=True)) for r in rows]

    # -- retention

    async def prunable(self, cutoff_ms: int) -> list[tuple[str, int]]:
        """Per chain with records older than the cutoff, the last seq of its prefix that is: up to the
        first record that is not (or to its end)."""
        rows = await self._fetch(
            "SELECT o.writer, (SELECT MIN(seq) FROM audit_records y WHERE y.writer = o.writer AND y.recorded_at >= $1), "
            "MAX(o.seq) FROM audit_records o WHERE o.recorded_at < $1 GROUP BY o.writer ORDER BY o.writer",
            cutoff_ms,
        )
        return [(str(w), int(young) - 1 if young is not None else int(last)) for w, young, last in rows]

    async def chain_slice(self, writer: str, after_seq: int, through_seq: int, limit: int) -> list[Record]:
        rows = await self._fetch(
            f"SELECT {_SELECT} FROM audit_records WHERE writer = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
            writer,
            after_seq,
            through_seq,
            limit,
        )
        return [_row(r) for r in rows]

    async def begin_prune(self, what: str, by: str, at_ms: int) -> int:
        async with self._transaction():
            return await self._begin_erasure(what, by, None, at_ms)

    async def remove_prefix(self, last: Record, pruned_at: int, erasure: int) -> int:
        """Delete `last`'s chain up to it and move the chain's marker there, in one transaction."""
        async with self._transaction():
            n = int(
                await self._value(
                    "SELECT COUNT(*) FROM audit_records WHERE writer = $1 AND seq <= $2", last["writer"], last["seq"]
                )
            )
            await self._execute(
                "DELETE FROM audit_records WHERE writer = $1 AND seq <= $2", last["writer"], last["seq"]
            )
            await self._execute("DELETE FROM audit_retention WHERE writer = $1", last["writer"])
            await self._execute(
                "INSERT INTO audit_retention (writer, seq, hash, recorded_at, pruned_at) VALUES ($1, $2, $3, $4, $5)",
                last["writer"],
                last["seq"],
                last["hash"],
                last["recorded_at"],
                pruned_at,
            )
            await self._execute("UPDATE audit_erasures SET records = records + $1 WHERE id = $2", n, erasure)
        return n

    async def drop_rollups_before(self, day: int) -> None:
        """The figures of the days before `day` (of the longer periods, those wholly before it)."""
        async with self._transaction():
            for table, (period, days, _) in ROLLUPS.items():
                await self._execute(f"DELETE FROM {table} WHERE {period} < $1", day // days)


class _NothingToForget(Exception):
    """Rolls the erasure back: no record matched."""


class SqliteStore(Store):
    """A SQLite database file: the store of `sqlite:///…` (and the daemon's journal for it)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        super().__init__()
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
            # Transactions are ours; rows cross from aiosqlite's thread a thousand at a time (verify, export).
            self._db = await aiosqlite.connect(self.path, isolation_level=None, iter_chunk_size=1000)
            for pragma in ("busy_timeout=10000", "journal_mode=WAL", "synchronous=FULL"):
                await self._db.execute(f"PRAGMA {pragma}")
            await self._migrate()
        except (OSError, aiosqlite.Error) as exc:
            await self.close()
            raise ConfigError("AUDIT_URL", f"cannot open the SQLite database {self.path}: {exc}") from None

    @staticmethod
    def _sql(sql: str) -> str:
        return re.sub(r"\$(\d+)", r"?\1", sql)

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._db.execute_fetchall(self._sql(sql), args))

    async def _execute(self, sql: str, *args: Any) -> None:
        await self._db.execute(self._sql(sql), args)

    async def _stream(self, sql: str, *args: Any) -> AsyncIterator[Sequence[Any]]:
        async with self._db.execute(self._sql(sql), args) as rows:
            async for values in rows:
                yield values

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        await self._db.execute("BEGIN IMMEDIATE")  # the write lock now: no upgrade that could fail later
        try:
            yield
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("COMMIT")

    async def _version(self) -> int:
        rows = await self._db.execute_fetchall("SELECT name FROM sqlite_master WHERE name = 'audit_schema'")
        if not rows:
            return 0
        [(version,)] = await self._db.execute_fetchall("SELECT version FROM audit_schema")
        return int(version)

    async def _migrate(self) -> None:
        if await self._version() == SCHEMA_VERSION:
            return
        async with self._transaction():  # one migrator at a time, whatever the processes
            version = await self._version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version)
            for number, statements in migrations(SQLITE).items():
                if number > version:
                    for statement in statements:
                        await self._db.execute(statement)
                    await self._db.execute("UPDATE audit_schema SET version = ?", (number,))

    async def append(self, records: list[Record]) -> None:
        """One transaction, fsynced at its commit (WAL, synchronous=FULL); a record already there is kept."""
        names = ", ".join(COLUMNS)
        row = "(" + ", ".join("?" * len(COLUMNS)) + ")"
        async with self._transaction():
            for start in range(0, len(records), INSERT_CHUNK):
                chunk = records[start : start + INSERT_CHUNK]
                values = [value for record in chunk for value in _params(record)]
                sql = (
                    f"INSERT INTO audit_records ({names}) VALUES {', '.join([row] * len(chunk))} ON CONFLICT DO NOTHING"
                )
                await self._db.execute(sql, values)
        self._note_stored(records)

    def full(self) -> bool:
        """As the daemon's journal (`sqlite://`: the store is its own spool), never: it is the trail."""
        return False

    async def wait_for_room(self, stopping: asyncio.Event) -> None:
        return None

    async def flush(self, timeout: float) -> None:
        return None  # what it took is stored

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()


class PostgresStore(Store):
    """A PostgreSQL database several writers share. One connection, made (and the schema checked)
    on first use and again after any failure."""

    dialect = POSTGRES
    LOCK = 0x75636164  # pg_advisory_xact_lock key of the migration: one migrator at a time

    def __init__(self, url: str) -> None:
        super().__init__()
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
        conn = await asyncpg.connect(self._url, timeout=5, command_timeout=300)
        try:
            await self._migrate(conn)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        conn = await self._connection()
        return [tuple(r) for r in await conn.fetch(sql, *args)]

    async def _execute(self, sql: str, *args: Any) -> None:
        conn = await self._connection()
        await conn.execute(sql, *args)

    async def _report_rows(self, sql: str, consumer: str) -> Sequence[Sequence[Any]]:
        # A report groups tens of thousands of users: its hash table in memory, not spilled to disk
        # in batches as PostgreSQL's default 4 MB of work_mem would have it.
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute("SET LOCAL work_mem = '64MB'")
            rows: Sequence[Sequence[Any]] = await conn.fetch(sql, consumer)
            return rows

    async def _stream(self, sql: str, *args: Any) -> AsyncIterator[Sequence[Any]]:
        conn = await self._connection()
        async with conn.transaction():
            async for values in conn.cursor(sql, *args, prefetch=1000):
                yield tuple(values)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        conn = await self._connection()
        async with conn.transaction():
            yield

    async def actor(self, who: str) -> str:
        return f"{who} as {await self._value('SELECT current_user')}"

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
            for number, statements in migrations(POSTGRES).items():
                if number > version:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute("UPDATE audit_schema SET version = $1", number)

    async def append(self, records: list[Record]) -> None:
        """One statement in one transaction (the rollups' trigger then runs once); a record already
        stored (a batch sent again after a lost answer) is kept as it is."""
        conn = await self._connection()
        arrays = ", ".join(f"${i}::{'bigint' if c in INTEGERS else 'text'}[]" for i, c in enumerate(COLUMNS, 1))
        columns = list(zip(*(_params(record) for record in records), strict=True))
        try:
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO audit_records ({', '.join(COLUMNS)}) SELECT * FROM unnest({arrays}) "
                    "ON CONFLICT DO NOTHING",
                    *columns,
                )
        except BaseException:
            await self.close()  # a fresh connection next time
            raise
        self._note_stored(records)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=2)


AuditStore = SqliteStore | PostgresStore


def sqlite_path(url: str) -> Path:
    """`sqlite:///audit.db` → audit.db (relative); `sqlite:////var/lib/a.db` → /var/lib/a.db."""
    return Path(url.removeprefix("sqlite:///"))


def store_at(url: str) -> AuditStore:
    """The store an AUDIT_URL value names (not opened)."""
    return SqliteStore(sqlite_path(url)) if url.startswith("sqlite:") else PostgresStore(url)


def store_for(settings: Settings) -> AuditStore:
    """The store AUDIT_URL names (not opened); ConfigError when it is unset."""
    if settings.audit_url is None:
        raise ConfigError("AUDIT_URL", "not set: the audit commands read the trail it names")
    return store_at(settings.audit_url.get_secret_value())
