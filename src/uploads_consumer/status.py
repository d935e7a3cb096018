"""`status`: stream, consumer and dead-letter figures, as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.connection import NatsUnavailable, connect_once, redact_url


async def _oldest_pending_age(js: JetStreamContext, stream: str, ack_floor_seq: int, last_seq: int) -> float | None:
    """Age in seconds of the first message after the ack floor, if any is left."""
    if ack_floor_seq >= last_seq:
        return None
    try:
        msg = await js.get_msg(stream, seq=ack_floor_seq + 1, next=True, subject=None)
    except Exception:  # noqa: BLE001 - deleted or expired: not worth failing status for
        return None
    return max(0.0, time.time() - msg.time.timestamp()) if msg.time else None


async def collect_status(settings: Settings, consumer_name: str | None = None) -> dict[str, Any]:
    """Figures for the stream, one consumer (NATS_CONSUMER_NAME unless named) and the dead letters.
    Raises NotFoundError (stream/consumer missing) or a connection error."""
    name = consumer_name or settings.nats_consumer_name
    nc = await connect_once(settings, "uploads-consumer-status")
    try:
        js = nc.jetstream(timeout=5)
        stream = await js.stream_info(settings.nats_stream_name)
        consumer = await js.consumer_info(settings.nats_stream_name, name)
        others = sorted(c.name for c in await js.consumers_info(settings.nats_stream_name) if c.name != name)
        try:
            dlq = await js.stream_info(settings.dlq_stream_name)
            dead = {"stream": settings.dlq_stream_name, "messages": dlq.state.messages, "bytes": dlq.state.bytes}
        except NotFoundError:
            dead = {"stream": settings.dlq_stream_name, "messages": None, "bytes": None, "missing": True}
        age = await _oldest_pending_age(
            js, settings.nats_stream_name, consumer.ack_floor.stream_seq or 0, stream.state.last_seq
        )
        return {
            "server": redact_url(nc.connected_url.geturl()) if nc.connected_url else None,
            "stream": {
                "name": settings.nats_stream_name,
                "messages": stream.state.messages,
                "bytes": stream.state.bytes,
                "first_seq": stream.state.first_seq,
                "last_seq": stream.state.last_seq,
            },
            "consumer": {
                "name": name,
                "pending": consumer.num_pending or 0,
                "ack_pending": consumer.num_ack_pending or 0,
                "max_ack_pending": consumer.config.max_ack_pending,
                "redelivered": consumer.num_redelivered or 0,
                "waiting_pulls": consumer.num_waiting or 0,
                "ack_floor_seq": consumer.ack_floor.stream_seq or 0,
                "oldest_pending_age_s": None if age is None else round(age, 1),
            },
            "other_consumers": others,
            "dead_letter": dead,
        }
    finally:
        await nc.close()


async def print_status(settings: Settings, as_json: bool, consumer_name: str | None = None) -> int:
    try:
        status = await collect_status(settings, consumer_name)
    except NotFoundError:
        print(
            f"uploads-consumer: stream {settings.nats_stream_name} or consumer "
            f"{consumer_name or settings.nats_consumer_name} does not exist; run `uploads-consumer setup`"
        )
        return 1
    except NatsUnavailable as exc:
        print(f"uploads-consumer: {exc.reason}")
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    s, c, d = status["stream"], status["consumer"], status["dead_letter"]
    age = "-" if c["oldest_pending_age_s"] is None else f"{c['oldest_pending_age_s']}s"
    rows = [
        ("server", status["server"]),
        (f"stream {s['name']}", f"{s['messages']} messages, {s['bytes']} bytes"),
        (
            f"consumer {c['name']}",
            f"pending (lag) {c['pending']}, ack pending {c['ack_pending']}/{c['max_ack_pending']}, redelivered {c['redelivered']}",
        ),
        ("oldest pending", age),
        ("other consumers", ", ".join(status["other_consumers"]) or "-"),
        (
            f"dead-letter {d['stream']}",
            "missing" if d.get("missing") else f"{d['messages']} messages, all consumers (`dlq list --consumer`)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
