"""`uploads-consumer audit ...`: verify the chains against their anchors, report usage, show one upload or
person, export, forget a person, apply retention, make a signing key, follow the trail, migrate the schema."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import getpass
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.js.errors import NotFoundError

from uploads_consumer.audit import anchors, retention
from uploads_consumer.audit.record import Record
from uploads_consumer.audit.schema import DAY_MS, SCHEMA_VERSION
from uploads_consumer.audit.store import MEASURES, READ_COLUMNS, day_text, store_for, utc
from uploads_consumer.audit.verify import Verification, verify
from uploads_consumer.config import Settings
from uploads_consumer.connection import connect_once
from uploads_consumer.errors import ConfigError, UploadsError, describe


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'s' if n != 1 else ''}"


def _actor() -> str:
    """Who runs an erasure: the system user and host (and, recorded by the caller, the database role)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no name for this uid (a container's)
        user = "?"
    return f"{user}@{socket.gethostname()}"


async def audit_migrate(settings: Settings) -> int:
    store = store_for(settings)
    await store.open()  # creates or upgrades the schema
    await store.close()
    print(f"audit schema at version {SCHEMA_VERSION}")
    return 0


# -- verify


async def _read_anchors(settings: Settings) -> list[tuple[int, bytes]]:
    nc = await connect_once(settings, "uploads-consumer-audit-verify")
    try:
        return [
            message async for message in anchors.read_anchors(nc.jetstream(timeout=10), settings.audit_anchor_stream)
        ]
    finally:
        await nc.close()


def _verify_keys(settings: Settings, given: Sequence[str]) -> list[Ed25519PublicKey] | None:
    if given:
        return anchors.verify_keys(list(given), "--public-key")
    if settings.audit_verify_key:
        return anchors.verify_keys([settings.audit_verify_key], "AUDIT_VERIFY_KEY")
    return None


def _print_verification(result: Verification, keys: int | None, stream: str) -> None:
    check = result.check
    for found in result.breaks:
        where = f"writer {found.writer} seq {found.seq}: " if found.writer != "-" else ""
        print(f"{found.kind}: {where}{found.problem}")
    chains = _plural(check.chains, "chain")
    if result.breaks:
        broken = len({b.writer for b in result.breaks if b.writer != "-"})
        print(f"{broken} of {chains} broken ({_plural(check.records, 'record')} read)")
    else:
        print(f"{_plural(check.records, 'record')} in {chains} verified")
    if result.anchors_read is not None:
        signed = f"signatures checked with {_plural(keys, 'key')}" if keys else "signatures not checked: no key given"
        print(
            f"anchors: {_plural(result.anchors_read, 'anchor')} read from {stream} ({signed}); "
            f"{result.anchored_chains} of {_plural(result.known_chains, 'chain')} anchored; "
            f"{_plural(result.unanchored_records, 'record')} "
            "stored after their chain's last anchor, which no anchor covers yet"
        )
    if check.forgotten_v1:
        print(
            f"forgotten: {_plural(check.forgotten_v1, 'format 1 record')} had personal fields forgotten: "
            "their place in their chain is checked, their content no longer can be"
        )


async def audit_verify(
    settings: Settings, use_anchors: bool = True, public_keys: Sequence[str] = (), incremental: bool = False
) -> int:
    """Walk every writer's chain, then hold it against its anchors; exit 1 naming each break.
    `incremental`: each chain from its last anchor on."""
    if incremental and not (use_anchors and settings.audit_anchor_stream):
        raise UploadsError("--incremental starts each chain at its last anchor: it needs the anchors")
    keys = _verify_keys(settings, public_keys)
    stream = settings.audit_anchor_stream
    raw: list[tuple[int, bytes]] | None = None
    unread = None
    if not use_anchors:
        unread = "not read (--no-anchors)"
    elif not stream:
        unread = "none kept (AUDIT_ANCHOR_STREAM is empty)"
    else:
        try:
            raw = await _read_anchors(settings)
        except NotFoundError:
            unread = f"cannot be read: stream {stream} does not exist"
        except UploadsError as exc:
            unread = f"cannot be read: {exc.reason}"
        except Exception as exc:  # noqa: BLE001 - said, then the chains are checked all the same
            unread = f"cannot be read: {describe(exc)}"
    store = store_for(settings)
    await store.open(create=False)
    try:
        result = await verify(store, raw, keys, incremental and raw is not None)
    finally:
        await store.close()
    _print_verification(result, len(keys) if keys is not None else None, stream)
    if incremental and raw is not None:
        print(
            f"incremental: {_plural(result.not_reread, 'record')} before their chain's last anchor not read again "
            "(a verify without --incremental checks their content)"
        )
    if unread is not None:
        print(
            f"anchors: {unread}: the removal of a chain's last records, or a rewrite of every hash from a "
            "record on, cannot be seen"
        )
        if use_anchors and stream:
            print("run `audit verify --no-anchors` to check the chains alone", file=sys.stderr)
            return 1
    return 0 if result.ok else 1


def audit_keygen() -> int:
    private, public = anchors.keygen()
    print(f"AUDIT_SIGNING_KEY={private}")
    print(f"AUDIT_VERIFY_KEY={public}")
    print(
        "# AUDIT_SIGNING_KEY: the daemons' secret (they sign the anchors with it); AUDIT_VERIFY_KEY, or "
        "--public-key, for `audit verify`. Keep the first where only the daemons read it.",
        file=sys.stderr,
    )
    return 0


# -- report


def _since_day(since: float) -> int:
    return int((time.time() - since) * 1000) // DAY_MS


async def audit_report(settings: Settings, since: float, by: Sequence[str], consumer: str | None, as_json: bool) -> int:
    """Per group of one or two keys, from the start of the UTC day `since` ago: read from the rollups."""
    consumer = consumer or settings.nats_consumer_name
    since_day = _since_day(since)
    store = store_for(settings)
    await store.open(create=False)
    try:
        groups = await store.report(since_day, by, consumer)
        others = [] if groups else await store.consumers_since(since_day)
    finally:
        await store.close()
    since_text = day_text(since_day)
    if not groups:
        who = ", ".join(f"{name} ({n:,})" for name, n in others)
        raise UploadsError(
            f"consumer {consumer} has no records since {since_text}; "
            + (f"consumers with records since then: {who}" if who else "no consumer has records since then")
        )
    total = {m: sum(g[m] for g in groups) for m in MEASURES}
    for g in groups:
        g["group"] = g[by[0]] if len(by) == 1 else [g[k] for k in by]
    if as_json:
        shown = [{"group": g["group"], **{k: g[k] for k in by}, **{m: g[m] for m in MEASURES}} for g in groups]
        print(
            json.dumps({"consumer": consumer, "since": since_text, "by": ",".join(by), "groups": shown, "total": total})
        )
        return 0
    print(f"consumer {consumer}, since {since_text} (UTC), by {', '.join(by)}")
    widths = [max(len(k), 5, *(len(str(g[k])) for g in groups)) for k in by]
    heads = "  ".join(f"{k.upper():<{w}}" for k, w in zip(by, widths, strict=True))
    print(f"{heads}  RECORDS  UPLOADS           BYTES  FAILURES  RETRIES  DUPLICATES")
    blank = dict.fromkeys(by[1:], "")
    for row in [*groups, {by[0]: "total", **blank, **total}]:
        keys = "  ".join(f"{row[k]!s:<{w}}" for k, w in zip(by, widths, strict=True))
        print(
            f"{keys}  {row['records']:>7}  {row['uploads']:>7}  {row['bytes']:>14,}  "
            f"{row['failures']:>8}  {row['retries']:>7}  {row['duplicates']:>10}"
        )
    return 0


# -- show, export, tail


def _tail_line(record: Record) -> str:
    shown = (
        "stream_seq",
        "deliveries",
        "event_id",
        "file_uuid",
        "email",
        "filename",
        "size",
        "content_type",
        "error_class",
    )
    facts = " ".join(f"{k}={record[k]}" for k in shown if record[k] is not None)
    took = f" {record['duration_ms']}ms" if record["duration_ms"] is not None else ""
    why = f" reason={json.dumps(record['reason'], ensure_ascii=False)}" if record["reason"] else ""
    forgotten = " (personal fields forgotten)" if record.get("erasure_id") is not None else ""
    return f"{utc(record['recorded_at'])} {record['consumer']} {record['outcome']} {facts}{took}{why}{forgotten}"


def _json_line(record: Record) -> str:
    return json.dumps(record, ensure_ascii=False)


async def audit_show(settings: Settings, key: str, as_json: bool) -> int:
    """Every record of one upload (file_uuid or event_id) or one person (email), across consumers."""
    store = store_for(settings)
    await store.open(create=False)
    try:
        records = await store.lookup(key)
    finally:
        await store.close()
    if not records:
        raise UploadsError(f"no record has {key!r} as its file_uuid, event_id or email")
    for record in records:
        print(_json_line(record) if as_json else _tail_line(record))
    if not as_json:
        consumers = sorted({r["consumer"] for r in records})
        uploads = len({r["file_uuid"] for r in records if r["file_uuid"]})
        print(f"{_plural(len(records), 'record')} of {_plural(uploads, 'upload')}, by {', '.join(consumers)}")
    return 0


async def audit_export(settings: Settings, since: float, fmt: str) -> int:
    """Every record since then, oldest first, streamed to stdout as JSON lines or CSV (constant memory)."""
    store = store_for(settings)
    await store.open(create=False)
    out = sys.stdout
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(READ_COLUMNS)
    try:
        async for record in store.export(int((time.time() - since) * 1000)):
            if writer is None:
                out.write(_json_line(record) + "\n")
            else:
                writer.writerow(
                    ["" if v is None else json.dumps(v) if isinstance(v, list) else v for v in record.values()]
                )
    except BrokenPipeError:  # `| head`: the reader has what it wanted; nothing more to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs advise
        return 0
    finally:
        await store.close()
    out.flush()
    return 0


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
                print(_json_line(record) if as_json else _tail_line(record), flush=True)
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


# -- forget, prune, erasures


async def audit_forget(settings: Settings, email: str | None, file_uuid: str | None, note: str | None) -> int:
    """Remove the personal fields of one person's (or one upload's) records; the erasure is recorded."""
    column, value = ("email", email) if email is not None else ("file_uuid", file_uuid)
    assert value is not None
    store = store_for(settings)
    await store.open(create=False)
    try:
        erasure = await store.forget(column, value, await store.actor(_actor()), note)
    finally:
        await store.close()
    if erasure is None:
        raise UploadsError(f"no record in the store has this {column} (or its records were forgotten before)")
    print(
        f"forgot the email, file name and reason of {_plural(erasure.records, 'record')} (erasure {erasure.id}); "
        "every chain still verifies. Records still in a writer's spool reach the store later: run it again "
        "once uploads_consumer_audit_spool_depth is 0"
    )
    return 0


async def audit_prune(settings: Settings, dry_run: bool) -> int:
    """Remove what AUDIT_RETENTION no longer keeps, in whole chain prefixes."""
    if settings.audit_retention is None:
        raise ConfigError("AUDIT_RETENTION", "not set: every record is kept, and there is nothing to prune")
    now = int(time.time() * 1000)
    cutoff = now - int(settings.audit_retention * 1000)
    store = store_for(settings)
    await store.open(create=False)
    try:
        result = await retention.prune(store, cutoff, await store.actor(_actor()), now, dry_run)
    finally:
        await store.close()
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {_plural(result.records, 'record')} older than {utc(cutoff)} from {_plural(result.chains, 'chain')}")
    for kept in result.kept:
        print(f"kept: writer {kept.writer} from seq {kept.seq}: {kept.problem}; `audit verify` says more")
    return 1 if result.kept else 0


async def audit_erasures(settings: Settings, as_json: bool) -> int:
    """Every erasure recorded: forgets and retention runs, who ran them, when, and how many records."""
    store = store_for(settings)
    await store.open(create=False)
    try:
        rows = await store.erasures()
    finally:
        await store.close()
    for row in rows:
        if as_json:
            print(json.dumps({**row, "erased_at": utc(row["erased_at"])}, ensure_ascii=False))
        else:
            note = f"  note={json.dumps(row['note'], ensure_ascii=False)}" if row["note"] else ""
            print(
                f"{row['id']:>5}  {utc(row['erased_at'])}  {row['erased_by']}  {row['what']}: "
                f"{_plural(row['records'], 'record')}{note}"
            )
    if not rows and not as_json:
        print("no erasure recorded")
    return 0
