"""`uploads-consumer audit ...`: verify the chains, report usage, follow the trail, migrate the schema."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from datetime import UTC, datetime

from uploads_consumer.audit.chain import ChainCheck
from uploads_consumer.audit.record import Record
from uploads_consumer.audit.store import REPORT_COLUMNS, SCHEMA_VERSION, store_for
from uploads_consumer.config import Settings


def _utc(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def audit_migrate(settings: Settings) -> int:
    store = store_for(settings)
    await store.open()  # creates or upgrades the schema
    await store.close()
    print(f"audit schema at version {SCHEMA_VERSION}")
    return 0


async def audit_verify(settings: Settings) -> int:
    """Walk every writer's chain; exit 1 naming the first broken record of each broken chain."""
    store = store_for(settings)
    await store.open(create=False)
    check = ChainCheck()
    try:
        async for record in store.chains():
            check.add(record)
    finally:
        await store.close()
    for broken in check.breaks:
        print(f"broken: writer {broken.writer} seq {broken.seq}: {broken.problem}")
    chains = f"{check.chains} chain{'s' if check.chains != 1 else ''}"
    if check.breaks:
        print(f"{len(check.breaks)} of {chains} broken ({check.records} records read)")
        return 1
    print(f"{check.records} record{'s' if check.records != 1 else ''} in {chains} verified")
    return 0


async def audit_report(settings: Settings, since: float, by: str, consumer: str | None, as_json: bool) -> int:
    consumer = consumer or settings.nats_consumer_name
    since_ms = int((time.time() - since) * 1000)
    store = store_for(settings)
    await store.open(create=False)
    try:
        groups = await store.report(since_ms, by, consumer)
    finally:
        await store.close()
    total = {c: sum(g[c] for g in groups) for c in REPORT_COLUMNS[1:]}
    if as_json:
        print(json.dumps({"consumer": consumer, "since": _utc(since_ms), "by": by, "groups": groups, "total": total}))
        return 0
    print(f"consumer {consumer}, since {_utc(since_ms)}, by {by}")
    width = max([len(by), 5, *(len(str(g["group"])) for g in groups)])
    print(f"{by.upper():<{width}}  RECORDS  UPLOADS           BYTES  FAILURES  RETRIES  DUPLICATES")
    for row in [*groups, {"group": "total", **total}]:
        print(
            f"{row['group']:<{width}}  {row['records']:>7}  {row['uploads']:>7}  {row['bytes']:>14,}  "
            f"{row['failures']:>8}  {row['retries']:>7}  {row['duplicates']:>10}"
        )
    return 0


def _tail_line(record: Record) -> str:
    shown = ("stream_seq", "deliveries", "event_id", "email", "filename", "size", "content_type", "error_class")
    facts = " ".join(f"{k}={record[k]}" for k in shown if record[k] is not None)
    took = f" {record['duration_ms']}ms" if record["duration_ms"] is not None else ""
    why = f" reason={json.dumps(record['reason'], ensure_ascii=False)}" if record["reason"] else ""
    return f"{_utc(record['recorded_at'])} {record['consumer']} {record['outcome']} {facts}{took}{why}"


TAIL_LOOKBACK = 2000  # ids a PostgreSQL transaction that commits late may have taken below the newest shown


async def audit_tail(settings: Settings, lines: int, as_json: bool, interval: float = 1.0) -> int:
    """The last `lines` records, then each new one as it arrives, until SIGINT or SIGTERM (exit 0).

    The handlers are the loop's own: a shell starts a background job with SIGINT ignored, which
    Python would keep, and `kill -INT` (or a supervisor's SIGTERM) could then never end the tail."""
    store = store_for(settings)
    await store.open(create=False)
    floor = top = await store.last_id(lines)
    shown: set[int] = set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        while not stop.is_set():
            # More than the look-back per poll: each one gets past what it has already shown.
            for record_id, record in await store.after(max(floor, top - TAIL_LOOKBACK), TAIL_LOOKBACK + 1000):
                if record_id in shown:
                    continue
                print(json.dumps(record, ensure_ascii=False) if as_json else _tail_line(record), flush=True)
                shown.add(record_id)
                top = max(top, record_id)
            shown = {i for i in shown if i > top - TAIL_LOOKBACK}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await store.close()
    return 0
