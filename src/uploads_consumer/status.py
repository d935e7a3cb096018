"""`status`: stream, consumer, pipeline and dead-letter figures, as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings, default_dedupe_bucket
from uploads_consumer.connection import NatsUnavailable, command_connection, redact_url
from uploads_consumer.presence import read_reports
from uploads_consumer.stages import Topology, oldest_pending_age, read_pipeline


def _pipeline_rows(topology: Topology) -> list[dict[str, Any]]:
    return [
        {
            "name": node.name,
            "after": node.after,
            "stream": node.stream,
            "pending": node.pending,
            "ack_pending": node.info.num_ack_pending or 0,
        }
        for node in topology.order()
    ]


async def collect_status(settings: Settings, consumer_name: str | None = None) -> dict[str, Any]:
    """Figures for one consumer (NATS_CONSUMER_NAME unless named) and its stream, every consumer and stage
    of the pipeline, and the dead letters. Raises NotFoundError (stream/consumer missing) or a connection
    error."""
    name = consumer_name or settings.nats_consumer_name
    async with command_connection(settings, "status", "operator") as nc:
        js = nc.jetstream(timeout=5)
        topology = await read_pipeline(js, settings)
        node = topology.nodes.get(name)
        # A named consumer is found where it is; this daemon's own where it reads (a stage: the results).
        stream_name = (
            node.stream
            if node is not None
            else settings.source.stream
            if name == settings.nats_consumer_name
            else settings.nats_stream_name
        )
        stream = await js.stream_info(stream_name)
        consumer = await js.consumer_info(stream_name, name)
        others = sorted(c.name for c in await js.consumers_info(stream_name) if c.name != name)
        try:
            dlq = await js.stream_info(settings.dlq_stream_name)
            dead = {"stream": settings.dlq_stream_name, "messages": dlq.state.messages, "bytes": dlq.state.bytes}
        except NotFoundError:
            dead = {"stream": settings.dlq_stream_name, "messages": None, "bytes": None, "missing": True}
        age = await oldest_pending_age(js, stream_name, consumer)
        bucket = settings.dedupe_bucket if name == settings.nats_consumer_name else default_dedupe_bucket(name)
        replicas = await read_reports(js, bucket) if bucket else "DEDUPE_BUCKET is empty: replicas say nothing"
        return {
            "server": redact_url(nc.connected_url.geturl()) if nc.connected_url else None,
            "stream": {
                "name": stream_name,
                "messages": stream.state.messages,
                "bytes": stream.state.bytes,
                "first_seq": stream.state.first_seq,
                "last_seq": stream.state.last_seq,
            },
            "consumer": {
                "name": name,
                "after": node.after if node is not None else None,
                "pending": consumer.num_pending or 0,
                "ack_pending": consumer.num_ack_pending or 0,
                "max_ack_pending": consumer.config.max_ack_pending,
                "redelivered": consumer.num_redelivered or 0,
                "waiting_pulls": consumer.num_waiting or 0,
                "ack_floor_seq": consumer.ack_floor.stream_seq or 0,
                "oldest_pending_age_s": None if age is None else round(age, 1),
            },
            "replicas": replicas if isinstance(replicas, str) else [asdict(r) for r in replicas],
            "other_consumers": others,
            "pipeline": _pipeline_rows(topology),
            "dead_letter": dead,
        }


def _replica_rows(replicas: list[dict[str, Any]] | str) -> list[tuple[str, str]]:
    """What each replica said of itself lately (presence): ready, or why not."""
    if isinstance(replicas, str):
        return [("replicas", replicas)]
    rows = [("replicas", f"{len(replicas)} reporting" if replicas else "none reporting (no daemon running?)")]
    for r in replicas:
        state = "ready" if r["ready"] else f"NOT READY: {r['why']}"
        rows.append((f"  {r['host']}/{r['pid']}", f"{state}; {r['in_flight']} in flight"))
    return rows


def _pipeline_text(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for row in rows:
        where = f"after {row['after']}" if row["after"] else f"reads {row['stream']}"
        behind = row["after"] or row["stream"]
        out.append(
            (f"  {row['name']}", f"{where}: pending {row['pending']} behind {behind}, ack pending {row['ack_pending']}")
        )
    return out


async def print_status(settings: Settings, as_json: bool, consumer_name: str | None = None) -> int:
    try:
        status = await collect_status(settings, consumer_name)
    except NotFoundError:
        name = consumer_name or settings.nats_consumer_name
        stream = settings.source.stream if name == settings.nats_consumer_name else settings.nats_stream_name
        print(f"uploads-consumer: stream {stream} or consumer {name} does not exist; run `uploads-consumer setup`")
        return 1
    except NatsUnavailable as exc:
        print(f"uploads-consumer: {exc.reason}")
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    s, c, d = status["stream"], status["consumer"], status["dead_letter"]
    age = "-" if c["oldest_pending_age_s"] is None else f"{c['oldest_pending_age_s']}s"
    lag = f"pending (lag behind {c['after']})" if c["after"] else "pending (lag)"
    rows = [
        ("server", status["server"]),
        (f"stream {s['name']}", f"{s['messages']} messages, {s['bytes']} bytes"),
        (
            f"consumer {c['name']}" + (f" (after {c['after']})" if c["after"] else ""),
            f"{lag} {c['pending']}, ack pending {c['ack_pending']}/{c['max_ack_pending']}, redelivered {c['redelivered']}",
        ),
        ("oldest pending", age),
        *_replica_rows(status["replicas"]),
        ("other consumers", ", ".join(status["other_consumers"]) or "-"),
        ("pipeline", f"{len(status['pipeline'])} consumers and stages"),
        *_pipeline_text(status["pipeline"]),
        (
            f"dead-letter {d['stream']}",
            "missing" if d.get("missing") else f"{d['messages']} messages, all consumers (`dlq list --consumer`)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
