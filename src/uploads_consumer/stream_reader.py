"""Reading a stretch of a stream quickly, for `trace` and the console: what no key finds must be read.

An ephemeral pull consumer (acknowledgements off, in memory, gone by itself 10 s after its last use) is
asked for the messages in large batches, and the replies come to a plain subscription whose callback
sees each message's raw parts. nats-py's `fetch` cost about 80 µs a message here; this, about 16 µs
(bench/console.py): a read of 100 000 messages takes a second and a half rather than eight. Each message's stream sequence and time come from its reply subject
(`$JS.ACK.…`), so a reader that needs no body asks for headers only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

BATCH = 10_000
IDLE = 10.0  # seconds without a message after which a scan gives up (the server stopped answering)


@dataclass(frozen=True)
class Seen:
    """One message as a scan sees it."""

    seq: int
    time_ns: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


Visit = Callable[[Seen], bool]
"""Called with each message in order; True stops the scan there."""


def _position(reply: str) -> tuple[int, int, int] | None:
    """(stream sequence, time in ns, messages still pending) from a JetStream reply subject: v1
    `$JS.ACK.stream.consumer.delivered.sseq.cseq.ts.pending`, or v2 with a domain and account hash."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        base = 2
    elif len(tokens) >= 11:
        base = 4
    else:
        return None
    try:
        return int(tokens[base + 3]), int(tokens[base + 5]), int(tokens[base + 6])
    except ValueError:
        return None


async def scan(
    js: Any,
    stream: str,
    visit: Visit,
    subject: str | None = None,
    start_seq: int | None = None,
    start_time: datetime | None = None,
    headers_only: bool = False,
    stop_at_seq: int | None = None,
) -> int:
    """Read `stream` (its messages on `subject`) from `start_seq` or `start_time` (else its first message)
    to its end as it was when the scan began (or `stop_at_seq`), calling `visit` with each; returns how
    many were read. Stops early when `visit` says so."""
    nc = js._nc
    if start_seq is not None:
        policy: dict[str, Any] = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": max(1, start_seq)}
    elif start_time is not None:
        policy = {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start_time.isoformat()}
    else:
        policy = {"deliver_policy": DeliverPolicy.ALL}
    config = ConsumerConfig(  # no name: the server names it, and `$JS.API.CONSUMER.CREATE.{stream}` is all it takes
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=IDLE,
        headers_only=headers_only or None,
        filter_subject=subject,
        num_replicas=1,
        **policy,
    )
    info = await js.add_consumer(stream, config)
    if not info.num_pending:
        return 0
    inbox = nc.new_inbox()
    done, more = asyncio.Event(), asyncio.Event()
    read = 0
    asked = 0

    async def on_message(msg: Any) -> None:
        nonlocal read
        if done.is_set():
            return
        position = _position(msg.reply or "")
        if position is None:  # a status (no messages, request expired): the end, as the server saw it
            done.set()
            return
        seq, time_ns, pending = position
        if stop_at_seq is not None and seq > stop_at_seq:
            done.set()
            return
        read += 1
        if read == asked - BATCH // 2:  # half of the last batch in: ask for the next, so none waits
            more.set()
        headers = dict(msg.headers) if msg.headers else None
        if visit(Seen(seq, time_ns, msg.subject, msg.data, headers)) or pending == 0 or seq == stop_at_seq:
            done.set()

    sub = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=4 * BATCH, pending_bytes_limit=256 << 20)
    next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{info.name}"
    request = json.dumps({"batch": BATCH, "no_wait": True}).encode()
    try:
        more.set()
        while not done.is_set():
            if more.is_set():
                more.clear()
                await nc.publish(next_subject, request, reply=inbox)
                asked += BATCH
            heard = read
            waits = [asyncio.ensure_future(done.wait()), asyncio.ensure_future(more.wait())]
            _, pending_waits = await asyncio.wait(waits, timeout=IDLE, return_when=asyncio.FIRST_COMPLETED)
            for w in pending_waits:
                w.cancel()
            if not done.is_set() and not more.is_set() and read == heard:
                raise TimeoutError(f"reading {stream}: no message for {IDLE:g}s")
    finally:
        await sub.unsubscribe()
    return read
