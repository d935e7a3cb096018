"""Copies a failed message, body unchanged, to the dead-letter stream with the reason in headers."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from uploads_consumer.errors import ErrorClass, one_line


def dead_letter_headers(msg: Msg, error_class: ErrorClass, reason: str) -> dict[str, str]:
    meta = msg.metadata
    return {
        "Nats-Msg-Id": f"{meta.stream}:{meta.sequence.stream}",
        "Uploads-Error-Class": str(error_class),
        "Uploads-Error": one_line(reason),
        "Uploads-Stream": meta.stream,
        "Uploads-Stream-Seq": str(meta.sequence.stream),
        "Uploads-Subject": msg.subject,
        "Uploads-Deliveries": str(meta.num_delivered),
        "Uploads-Failed-At": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


class DeadLetterPublisher:
    def __init__(self, js: JetStreamContext, subject: str, stream: str) -> None:
        self._js, self._subject, self._stream = js, subject, stream

    async def publish(self, msg: Msg, error_class: ErrorClass, reason: str) -> None:
        """Publish and wait for the stream's acknowledgement; raises if the copy is not stored."""
        await self._js.publish(
            self._subject,
            msg.data,
            headers=dead_letter_headers(msg, error_class, reason),
            stream=self._stream,
            timeout=10,
        )


async def stored_messages(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    """Every message a stream holds now, oldest first (for `dlq list`, the demo and the tests)."""
    info = await js.stream_info(stream)
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                out.append(await js.get_msg(stream, seq=seq))
            except NotFoundError:  # deleted (e.g. replayed) sequences leave gaps
                continue
    return out
