"""The dead letters as the read model keeps them: one small entry per letter, read once and kept current.

`trace` reads them all when it starts (the dead-letter stream is small next to the upload stream); the
console keeps the index and, each time it refreshes, reads only the letters stored since and drops the
ones deleted (replayed). An entry holds what a list and a timeline show, never the body: a letter's
page reads it by its sequence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import StreamInfo
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.deadletter import body_identity, dead_lettered_by, header_text
from uploads_consumer.stream_reader import Seen, scan


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    consumer: str
    error_class: str
    reason: str
    failed_at: str
    deliveries: int | None
    stream: str
    """The stream the original was in: the upload stream, or for a stage the result stream."""
    stream_seq: int | None
    subject: str
    event_id: str | None
    file_uuid: str | None
    email: str | None
    digest: str = ""
    """Of the body: a letter holds the original body unchanged, so a message with the same digest is the one
    it copies (or a replay of it), even when the body is not an upload event."""

    def about(self, key: str) -> bool:
        return key in (self.event_id, self.file_uuid)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


def letter_of(seq: int, headers: dict[str, Any], body: bytes, settings: Settings) -> DeadLetter:
    h = {k: header_text(v) for k, v in headers.items()}
    identity = body_identity(body)
    return DeadLetter(
        seq=seq,
        consumer=dead_lettered_by(h, settings),
        error_class=h.get("Uploads-Error-Class") or "",
        reason=h.get("Uploads-Error") or "",
        failed_at=h.get("Uploads-Failed-At") or "",
        deliveries=_int(h.get("Uploads-Deliveries")),
        stream=h.get("Uploads-Stream") or settings.nats_stream_name,
        stream_seq=_int(h.get("Uploads-Stream-Seq")),
        subject=h.get("Uploads-Subject") or "",
        event_id=identity["event_id"],
        file_uuid=identity["file_uuid"],
        email=identity["email"],
        digest=body_digest(body),
    )


@dataclass
class DeadLetterIndex:
    """Every letter of the dead-letter stream, by sequence."""

    settings: Settings
    letters: dict[int, DeadLetter] = field(default_factory=dict)
    read_to: int = 0
    """The last sequence read."""
    missing: bool = False
    """The dead-letter stream does not exist (yet)."""
    loaded: bool = False

    async def ready(self, js: Any) -> DeadLetterIndex:
        """Read once, when first needed (`trace` of an upload every consumer processed needs none)."""
        if not self.loaded:
            await self.refresh(js)
        return self

    async def refresh(self, js: Any) -> None:
        """Read the letters stored since the last refresh and forget those deleted since."""
        name = self.settings.dlq_stream_name
        self.loaded = True
        try:
            # The sequences deleted in the range too (replayed letters): nats-py's stream_info cannot ask.
            response = await js._api_request(
                f"{js._prefix}.STREAM.INFO.{name}", json.dumps({"deleted_details": True}).encode(), timeout=js._timeout
            )
            info = StreamInfo.from_response(response)
        except NotFoundError:
            self.letters.clear()
            self.missing = True
            return
        self.missing = False
        state = info.state
        if state.last_seq < self.read_to:  # the stream was re-created: its sequences started over
            self.letters.clear()
            self.read_to = 0
        gone = set(state.deleted or ())
        for seq in [s for s in self.letters if s < state.first_seq or s in gone]:
            del self.letters[seq]
        if state.messages and state.last_seq > self.read_to:

            def keep(seen: Seen) -> bool:
                self.letters[seen.seq] = letter_of(seen.seq, seen.headers or {}, seen.data, self.settings)
                return False

            await scan(js, name, keep, start_seq=max(self.read_to + 1, state.first_seq))
        self.read_to = max(self.read_to, state.last_seq)

    def of(self, consumer: str | None = None, error_class: str | None = None) -> list[DeadLetter]:
        """Newest first."""
        return [
            letter
            for _, letter in sorted(self.letters.items(), reverse=True)
            if (consumer is None or letter.consumer == consumer)
            and (error_class is None or letter.error_class == error_class)
        ]

    def about(self, key: str) -> list[DeadLetter]:
        return [letter for _, letter in sorted(self.letters.items()) if letter.about(key)]

    def at(self, stream: str, stream_seq: int) -> list[DeadLetter]:
        """The letters of one original message (several consumers may each have dead-lettered it)."""
        return [
            letter
            for _, letter in sorted(self.letters.items())
            if letter.stream == stream and letter.stream_seq == stream_seq
        ]

    def copying(self, digest: str) -> list[DeadLetter]:
        """The letters whose body is this one."""
        return [letter for _, letter in sorted(self.letters.items()) if letter.digest == digest]

    def by_class(self) -> dict[str, dict[str, int]]:
        """Per consumer, per error class: how many letters."""
        counts: dict[str, dict[str, int]] = {}
        for letter in self.letters.values():
            per = counts.setdefault(letter.consumer, {})
            per[letter.error_class] = per.get(letter.error_class, 0) + 1
        return counts
