"""Giving dead letters back: where each one goes, and the replay itself, for `dlq replay` and the console.

A dead letter goes back to the consumer that dead-lettered it, and to no other (docs/contract.md 7.3):
on its own replay subject when its filter has it, else on the subject it processes when no other
consumer reads that; otherwise it is refused, left in place, with the reason. The dead-letter copy is
deleted only once the stream it goes back to has acknowledged the republished message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import AckPolicy, ConsumerInfo, RawStreamMsg
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings, replay_subject
from uploads_consumer.deadletter import dead_lettered_by, header_text
from uploads_consumer.errors import UploadsError
from uploads_consumer.provision import consumer_filters, subject_matches


class ReplayRoutes:
    """Where a dead letter goes back to, per consumer of one stream: its own replay subject when its filter
    has it (no other consumer of the stream sees it), else the subject it processes (the uploads, or a
    stage's upstream's results) when no other consumer reads that; otherwise nowhere, with the reason."""

    def __init__(
        self, settings: Settings, stream: str, stream_subjects: list[str], consumers: list[ConsumerInfo]
    ) -> None:
        self._settings = settings
        self._stream = stream
        self._uploads = stream == settings.nats_stream_name
        # Replay subjects: `{NATS_SUBJECT}.replay.X` on the upload stream, `{NATS_RESULT_SUBJECT}.replay.X`
        # for a stage on the result stream.
        self._base = settings.nats_subject if self._uploads else settings.nats_result_subject
        self._captured = stream_subjects
        # An ephemeral consumer that acknowledges nothing (trace's reader, `nats sub`) processes nothing again.
        self._filters = {
            c.name: consumer_filters(c.config)
            for c in consumers
            if c.config.durable_name or c.config.ack_policy != AckPolicy.NONE
        }

    def _others_reading(self, consumer: str, subject: str) -> list[str]:
        """The other consumers of the stream a message on `subject` would reach."""
        return sorted(
            n
            for n, f in self._filters.items()
            if n != consumer and (not f or any(subject_matches(p, subject) for p in f))
        )

    def subject_for(self, consumer: str) -> str:
        """The subject to republish on; raises UploadsError saying why there is none."""
        if consumer not in self._filters:
            raise UploadsError(f"consumer {consumer} does not exist on {self._stream} (any more)")
        own = replay_subject(self._base, consumer)
        if own in self._filters[consumer] and any(subject_matches(p, own) for p in self._captured):
            also = self._others_reading(consumer, own)  # no filter at all, or a wildcard: they would see it
            if not also:
                return own
            raise UploadsError(
                f"{own} would reach {', '.join(also)} too (their filters take it in); narrow their filters, then replay"
            )
        # What it processes: the uploads, or what a stage follows (its filter other than its replay subject).
        main = [f for f in self._filters[consumer] if f != own]
        processes = self._settings.nats_subject if self._uploads or len(main) != 1 else main[0]
        others = self._others_reading(consumer, processes)
        if not others:
            return processes
        raise UploadsError(
            f"consumer {consumer} does not read {own}, and {processes} would reach {', '.join(others)} too "
            f"(they would process the upload again); run `uploads-consumer setup --enable-replay` with "
            f"NATS_CONSUMER_NAME={consumer}, then replay"
        )


@dataclass(frozen=True)
class Replayed:
    seq: int
    """The dead letter's sequence in the dead-letter stream (deleted now)."""
    consumer: str
    subject: str


@dataclass(frozen=True)
class NotReplayed:
    seq: int
    reason: str
    refused: bool = True
    """False: passed over on purpose (another consumer's letter when one consumer's were asked for)."""


@dataclass
class ReplayReport:
    replayed: list[Replayed] = field(default_factory=list)
    not_replayed: list[NotReplayed] = field(default_factory=list)

    @property
    def refused(self) -> list[NotReplayed]:
        return [n for n in self.not_replayed if n.refused]


BeforeReplay = Callable[[RawStreamMsg, str, str], Awaitable[None]]
"""Called with the dead letter, its consumer and the subject it goes back to, just before it is republished;
an UploadsError it raises refuses that letter with its reason (the console records each replay first)."""


async def replay_dead_letters(
    js: Any,
    settings: Settings,
    seqs: Sequence[int],
    consumer: str | None = None,
    every: bool = False,
    before: BeforeReplay | None = None,
) -> ReplayReport:
    """Put the dead letters `seqs` (every one, with `every`) back, each to the consumer that dead-lettered it
    only, on the stream it came from; `consumer` keeps that consumer's. A letter asked for by its number that
    is not there, or is another consumer's, is said; with `every`, passed over in silence."""
    report = ReplayReport()
    routes: dict[str, ReplayRoutes] = {}
    if every:
        info = await js.stream_info(settings.dlq_stream_name)
        seqs = list(range(info.state.first_seq, info.state.last_seq + 1)) if info.state.messages else []
    for seq in seqs:
        try:
            msg = await js.get_msg(settings.dlq_stream_name, seq=seq)
        except NotFoundError:
            if not every:  # asked for by its number: a mistake to say, not to pass over
                report.not_replayed.append(NotReplayed(seq, f"not in {settings.dlq_stream_name}"))
            continue
        headers = {k: header_text(v) for k, v in (msg.headers or {}).items()}
        owner = dead_lettered_by(headers, settings)
        if consumer is not None and owner != consumer:
            if not every:
                report.not_replayed.append(
                    NotReplayed(seq, f"dead-lettered by {owner}, not {consumer}; left as it is", refused=False)
                )
            continue
        stream = headers.get("Uploads-Stream") or settings.nats_stream_name
        try:
            if stream not in routes:
                info = await js.stream_info(stream)
                routes[stream] = ReplayRoutes(
                    settings, stream, info.config.subjects or [], await js.consumers_info(stream)
                )
            subject = routes[stream].subject_for(owner)
            if before is not None:
                await before(msg, owner, subject)
        except NotFoundError:
            report.not_replayed.append(NotReplayed(seq, f"not replayed: stream {stream} does not exist (any more)"))
            continue
        except UploadsError as exc:
            report.not_replayed.append(NotReplayed(seq, f"not replayed: {exc.reason}"))
            continue
        # Republish first; only once the stream has acknowledged it, remove the dead letter.
        await js.publish(subject, msg.data or b"", timeout=10)
        await js.delete_msg(settings.dlq_stream_name, seq)
        report.replayed.append(Replayed(seq, owner, subject))
    return report
