"""`trace ID`: one upload's timeline across every consumer and stage, as text or JSON (console/timeline.py)."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from uploads_consumer.config import Settings
from uploads_consumer.connection import command_connection
from uploads_consumer.console.letters import DeadLetterIndex
from uploads_consumer.console.timeline import Sources, Timeline, TimelineBuilder
from uploads_consumer.stages import read_pipeline


def canonical_id(text: str) -> str | None:
    """A file_uuid or event_id in the form the daemon records (lower-case, hyphenated); None if not a UUID."""
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        return None


async def read_timeline(settings: Settings, key: str | None, seq: int | None) -> Timeline | None:
    """The upload's timeline, read as an operator (the operator role's permissions)."""
    audit = None
    if settings.audit_url is not None:
        from uploads_consumer.console.audit_source import AuditSource

        audit = AuditSource(settings)
        await audit.open()
    try:
        async with command_connection(settings, "trace", "operator") as nc:
            js = nc.jetstream(timeout=10)
            topology = await read_pipeline(js, settings)
            letters = DeadLetterIndex(settings)  # read when first needed
            return await TimelineBuilder(Sources(js, settings, topology, letters, audit)).build(key, seq)
    finally:
        if audit is not None:
            await audit.close()


async def print_trace(settings: Settings, ident: str | None, seq: int | None, as_json: bool) -> int:
    key = None
    if ident is not None:
        key = canonical_id(ident)
        if key is None:
            print(
                f"uploads-consumer: {ident!r} is not a file_uuid or an event_id (a UUID); or give --seq N",
                file=sys.stderr,
            )
            return 1
    timeline = await read_timeline(settings, key, seq)
    if timeline is None:
        what = f"sequence {seq} in {settings.nats_stream_name}" if seq is not None else f"{key}"
        print(
            f"uploads-consumer: no upload {what}: not in {settings.nats_stream_name}, the dead letters or "
            "the consumers' records" + (" and audit trail" if settings.audit_url else ""),
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(json.dumps(timeline.as_json(), indent=2, ensure_ascii=False))
        return 0
    for line in timeline_text(timeline):
        print(line)
    return 0


def _facts(upload: dict[str, Any]) -> str:
    known = [f"{upload['size']} bytes" if upload["size"] is not None else None, upload["content_type"]]
    shown = ", ".join(k for k in known if k)
    return f"{upload['filename'] or '(name not known)'}" + (f" ({shown})" if shown else "")


def timeline_text(timeline: Timeline) -> list[str]:
    data = timeline.as_json()
    u = data["upload"]
    lines = [
        f"upload    event_id {u['event_id'] or '-'}  file_uuid {u['file_uuid'] or '-'}",
        f"          {u['email'] or '-'}  {_facts(u)}",
    ]
    if u["seq"] is not None:
        where = f"{u['stream']} seq {u['seq']}"
        if u["subject"]:
            where += f", {u['subject']}, published {u['published_at']}"
        else:
            where += " (no longer in the stream)"
        lines.append(f"message   {where}")
    for name, value in u["headers"].items():
        lines.append(f"          {name}: {value}")
    if u["other_seqs"]:
        lines.append(f"          also at seq {', '.join(map(str, u['other_seqs']))}")
    lines.append(f"found by  {data['found_by']}; read from the {data['source']}")
    lines.append("")
    width = max([8, *(len(c["name"]) for c in data["consumers"])])
    lines.append(f"{'CONSUMER':<{width}}  {'AFTER':<{width}}  {'STATE':<13}  DETAIL")
    for c in data["consumers"]:
        lines.append(f"{c['name']:<{width}}  {c['after'] or '-':<{width}}  {c['state']:<13}  {_detail(c)}")
        for d in c["deliveries"]:
            took = f", {d['duration_ms']} ms" if d["duration_ms"] is not None else ""
            count = f", delivery {d['deliveries']}" if d["deliveries"] else ""
            why = f": {d['error_class'] or ''} {d['reason']}".rstrip() if d["reason"] else ""
            lines.append(f"{'':<{width}}    {d['at'] or '-'}  {d['outcome']}{count}{took}{why}")
    return lines


def _detail(c: dict[str, Any]) -> str:
    parts = []
    if c["processors"]:
        parts.append("ran " + ", ".join(c["processors"]))
    if c["skipped"]:
        parts.append("skipped " + ", ".join(c["skipped"]))
    for step, outputs in c["outputs"].items():
        if outputs:
            parts.append(f"{step}: " + ", ".join(f"{k}={v}" for k, v in outputs.items()))
    if c["state"] == "dead_lettered":
        parts.append(f"{c['error_class']}: {c['reason']}")
        if c["replayable"]:
            parts.append(f"replay: uploads-consumer dlq replay --seq {c['dead_letter_seq']}")
        else:
            parts.append(f"not replayable: {c['replay_refused']}")
    if c["note"]:
        parts.append(c["note"])
    return "; ".join(parts) or "-"
