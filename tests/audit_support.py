"""What the audit trail's tests share: records made up, stores filled, the `audit` command run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from uploads_consumer.audit.record import FIELDS_V1, committed
from uploads_consumer.audit.schema import DAY_MS
from uploads_consumer.audit.store import store_at, store_for
from uploads_consumer.embedded import clean_environment

# The grants of docs/contract.md (12.7) that make the table append-only for the daemons.
WRITER_GRANTS = [
    "CREATE ROLE uploads_writer LOGIN PASSWORD 'writer-secret-6d1f'",
    "GRANT SELECT ON audit_schema TO uploads_writer",
    "GRANT SELECT, INSERT ON audit_records TO uploads_writer",
]
AUDITOR_GRANTS = [
    "CREATE ROLE uploads_auditor LOGIN PASSWORD 'auditor-secret-2b7c'",
    "GRANT SELECT ON audit_schema, audit_records, audit_erasures, audit_retention, audit_daily, audit_users_1d, "
    "audit_users_4d, audit_users_32d, audit_users_256d TO uploads_auditor",
]


async def pg_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def stored(settings) -> list[dict]:
    """Every record in the store AUDIT_URL names, in chain order."""
    store = store_for(settings)
    await store.open(create=False)
    try:
        return [record async for record in store.chains()]
    finally:
        await store.close()


async def fill(url: str, *chains: list[dict]) -> None:
    """Append each chain's records to the store at `url` (created as the daemon would)."""
    store = store_at(url)
    await store.open()
    try:
        for records in chains:
            await store.append(records)
    finally:
        await store.close()


def audit_command(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "audit", *args],
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sample(n: int, **fields) -> list[dict]:
    """Format 1 entries (as an older uploads-consumer wrote them), at fixed times of 2026-01-26."""
    entry = {name: None for name in FIELDS_V1 if name not in ("writer", "seq", "prev_hash")}
    entry.update(format=1, consumer="file_processor", host="h", pid=7, stream="FILE_UPLOADS", deliveries=1)
    entry.update(outcome="processed", processors=["save"], skipped=[])
    entry.update(fields)
    return [{**entry, "stream_seq": i + 1, "recorded_at": 1769421017042 + i, "size": 100 * (i + 1)} for i in range(n)]


def recent(n: int, days_ago: float = 0, **fields) -> list[dict]:
    """Format 2 entries, as the trail writes them now, recorded `days_ago` days back."""
    at = int(time.time() * 1000 - days_ago * DAY_MS)
    return [committed({**e, "recorded_at": at + i}) for i, e in enumerate(sample(n, **fields))]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"
