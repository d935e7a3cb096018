"""Copies a failed message, body unchanged, to the dead-letter stream with the reason in headers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.header import Header, decode_header
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.errors import ErrorClass, one_line
from uploads_consumer.messages import DeadLetterHeaders


def dead_letter_headers(
    stream: str,
    seq: int,
    subject: str,
    deliveries: int,
    error_class: ErrorClass,
    reason: str,
    consumer: str,
    published: datetime | None,
) -> dict[str, str]:
    # When the original was stored (milliseconds), so that the id names that message and no other: a stream
    # re-created starts its sequences over. A publish acknowledged as a duplicate is then always this
    # message's copy, already stored (nothing to read back from the dead-letter stream to tell).
    stored_ms = int(published.timestamp() * 1000) if published else 0
    return DeadLetterHeaders(
        # Per consumer: the same upload dead-lettered by two consumers of the stream is two dead letters.
        msg_id=f"{stream}:{seq}:{consumer}:{stored_ms}",
        consumer=consumer,
        error_class=error_class,
        error=one_line(reason),
        stream=stream,
        stream_seq=str(seq),
        subject=subject,
        deliveries=str(deliveries),
        failed_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    ).headers()


class DeadLetterPublisher:
    def __init__(self, js: JetStreamContext, subject: str, stream: str, consumer: str) -> None:
        self._js, self._subject, self._stream, self._consumer = js, subject, stream, consumer

    async def publish(self, msg: Msg, error_class: ErrorClass, reason: str) -> None:
        """Publish a delivered message's copy; raises unless the dead-letter stream stored it."""
        meta = msg.metadata
        headers = dead_letter_headers(
            meta.stream,
            meta.sequence.stream,
            msg.subject,
            meta.num_delivered,
            error_class,
            reason,
            self._consumer,
            meta.timestamp,
        )
        await self._store(msg.data, headers)

    async def publish_stored(
        self, stored: RawStreamMsg, stream: str, deliveries: int, error_class: ErrorClass, reason: str
    ) -> None:
        """Copy a message read from its stream by sequence (no delivery of ours holds it)."""
        seq = stored.seq or 0
        headers = dead_letter_headers(
            stream, seq, stored.subject or "", deliveries, error_class, reason, self._consumer, stored.time
        )
        await self._store(stored.data or b"", headers)

    async def _store(self, body: bytes, headers: dict[str, str]) -> None:
        """Returns once the dead-letter stream has the copy: stored now, or (acknowledged as a duplicate:
        the same id within the stream's duplicate window) stored before, by an attempt whose
        acknowledgement was lost or by another replica hearing the same advisory."""
        from uploads_consumer import tracing  # here: the commands that only read dead letters need none of it

        headers = tracing.inject(headers)  # whoever reads the dead letter finds its trace
        await self._js.publish(self._subject, body, headers=headers, stream=self._stream, timeout=10)


def header_text(value: object) -> str:
    """A header of a message read back from its stream, as the text that was published.

    nats-py parses a stored message's headers with the email package, which turns a value holding
    UTF-8 (an accented file name in a reason, the ellipsis of a cut one) into an `email.header.Header`
    of undecoded bytes; deliveries do not. Decoded here, for every reader of stored messages."""
    if not isinstance(value, Header):
        return str(value)
    return "".join(
        part.decode("utf-8", "replace") if isinstance(part, bytes) else part for part, _ in decode_header(value)
    )


def dead_lettered_by(headers: Mapping[str, str], settings: Settings) -> str:
    """The consumer that dead-lettered a message; one from before the header existed: NATS_CONSUMER_NAME's."""
    return headers.get("Uploads-Consumer") or settings.nats_consumer_name


def body_identity(body: bytes) -> dict[str, str | None]:
    """`event_id`, `file_uuid` and `email` of a dead letter's body, as far as it has them: an upload event
    (plain or double-encoded), or for a stage its upstream's result event; `None` for what is missing."""
    found: dict[str, str | None] = {"event_id": None, "file_uuid": None, "email": None}
    try:
        data = json.loads(body)
        if isinstance(data, str):
            data = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return found
    if isinstance(data, dict):
        for name in found:
            value = data.get(name)
            found[name] = value if isinstance(value, str) and value else None
    return found


def dead_letter_entry(msg: RawStreamMsg, settings: Settings) -> dict[str, Any]:
    """One dead letter as `dlq list --json` prints it (and the console lists it)."""
    h = msg.headers or {}
    body = msg.data or b""
    return {
        "seq": msg.seq,
        "consumer": dead_lettered_by(h, settings),
        "error_class": h.get("Uploads-Error-Class"),
        "reason": h.get("Uploads-Error"),
        "failed_at": h.get("Uploads-Failed-At"),
        "original_seq": h.get("Uploads-Stream-Seq"),
        "deliveries": h.get("Uploads-Deliveries"),
        "event_id": body_identity(body)["event_id"],
        "body": body.decode("utf-8", "replace"),
    }


async def stored_messages(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    """Every message a stream holds now, oldest first (for `dlq list`, the demo and the tests), its
    headers as published (see `header_text`)."""
    info = await js.stream_info(stream)
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq=seq)
            except NotFoundError:  # deleted (e.g. replayed) sequences leave gaps
                continue
            if msg.headers:
                msg.headers = {k: header_text(v) for k, v in msg.headers.items()}
            out.append(msg)
    return out
