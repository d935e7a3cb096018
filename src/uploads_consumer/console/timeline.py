"""One upload's timeline across every consumer and stage: the read model `trace` and the console share.

How an upload is found, cheapest first (`found_by` says which, and what it cost):

1. by its stream sequence (`--seq N`): one read;
2. by event_id or file_uuid, in the consumers' own records: each consumer's idempotency bucket keeps,
   for every upload it processed, where it was (dedupe.py); the server matches the key, so this is two
   requests per consumer whatever the streams hold — and the audit trail's indexed lookup when
   AUDIT_URL is set;
3. among the dead letters (read whole: the dead-letter stream is small);
4. a scan of the stream after the consumers' ack floors: an upload no consumer has settled is there
   (pending or in flight), so this costs the lag, not the stream;
5. a scan of the rest of the stream: only an upload processed before its consumers' records said where,
   or whose records expired (DEDUPE_TTL), or of a consumer without a bucket (about 16 µs a message).

Each consumer's state then comes from what it recorded (its bucket's record and result event, its dead
letters, its audit records) and, for what it has not settled, from where its durable stands: past its
delivered sequence the upload is `pending`, between its ack floor and that sequence `in_flight` (or
`retrying` when the audit trail shows a failed delivery), before its start `not_reached`. A stage's
message is its upstream's result event: until the upstream completes the upload, the stage waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js.api import DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings, result_subject
from uploads_consumer.console.letters import DeadLetter, DeadLetterIndex, body_digest
from uploads_consumer.deadletter import header_text
from uploads_consumer.dedupe import Where, find_records
from uploads_consumer.errors import UploadsError
from uploads_consumer.events import FileUploadEvent, upload_of
from uploads_consumer.provision import consumer_filters, subject_matches
from uploads_consumer.replay import ReplayRoutes
from uploads_consumer.stages import Node, Topology
from uploads_consumer.stream_reader import Seen, scan

STATES = ("processed", "duplicate", "dead_lettered", "retrying", "in_flight", "pending", "not_reached")
SHOWN_HEADERS = ("Nats-Msg-Id", "traceparent", "tracestate")
LONG_TEXT = 200  # an output string longer than this is shown by its length, unless it is a path or a key
CONTENT_OUTPUTS = frozenset({"text", "segments", "transcript", "transcription"})
"""Outputs that are the file's content (transcribe's and extract's text): shown by their length only."""
RESULT_WINDOW_S = 10  # how far before its record a consumer's result event is looked for, when no record says


@dataclass
class Delivery:
    """One settlement of the upload by one consumer (or a replay an operator made)."""

    at: str | None
    outcome: str
    deliveries: int | None = None
    duration_ms: int | None = None
    error_class: str | None = None
    reason: str | None = None
    seq: int | None = None


@dataclass
class ConsumerView:
    name: str
    after: str | None
    stream: str
    state: str
    note: str | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    processors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    error_class: str | None = None
    reason: str | None = None
    replayable: bool = False
    replay_refused: str | None = None
    dead_letter_seq: int | None = None
    message_seq: int | None = None
    """The sequence of the message this consumer reads for the upload, in `stream`."""
    result_seq: int | None = None
    trace_id: str | None = None


@dataclass
class UploadView:
    event_id: str | None
    file_uuid: str | None
    email: str | None
    bucket: str | None
    timestamp: int | None
    stream: str
    seq: int | None
    subject: str | None = None
    published_at: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    trace_id: str | None = None
    filename: str | None = None
    size: int | None = None
    content_type: str | None = None
    sha256: str | None = None
    other_seqs: list[int] = field(default_factory=list)
    """Other messages of the same upload on the stream (the event published again, a replay)."""


@dataclass
class Timeline:
    upload: UploadView
    consumers: list[ConsumerView]
    source: str
    """`streams` (the consumers' records, dead letters and positions) or `audit trail and streams`."""
    found_by: str

    def as_json(self) -> dict[str, Any]:
        return {
            "upload": asdict(self.upload),
            "consumers": [asdict(c) for c in self.consumers],
            "source": self.source,
            "found_by": self.found_by,
        }


@dataclass
class Sources:
    """What a timeline is read from: NATS, the dead letters as read, and the audit trail (or None)."""

    js: Any
    settings: Settings
    topology: Topology
    letters: DeadLetterIndex
    audit: Any = None
    """An AuditSource (console/audit_source.py), when AUDIT_URL is set."""


def utc_ms(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc(moment: datetime | None) -> str | None:
    return utc_ms(int(moment.timestamp() * 1000)) if moment is not None else None


def trace_id_of(headers: dict[str, str]) -> str | None:
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def summarize(outputs: Any, key: str = "") -> Any:
    """Outputs as the console and `trace` show them: metadata, never the file's content. What came out of
    the file (a transcript, extracted text and its segments) is shown by its length, and so is any text
    longer than LONG_TEXT that is not a path."""
    if key in CONTENT_OUTPUTS:
        size = len(outputs) if isinstance(outputs, (str, list)) else None
        unit = "characters" if isinstance(outputs, str) else "items"
        return f"({size} {unit})" if size is not None else "(content)"
    if isinstance(outputs, dict):
        return {str(k): summarize(v, str(k)) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [summarize(v) for v in outputs[:50]]
    if isinstance(outputs, str) and len(outputs) > LONG_TEXT and not key.endswith(("path", "key")):
        return f"({len(outputs)} characters)"
    return outputs


def _headers(msg: RawStreamMsg) -> dict[str, str]:
    return {k: header_text(v) for k, v in (msg.headers or {}).items()}


async def _get(js: Any, stream: str, seq: int) -> RawStreamMsg | None:
    try:
        msg: RawStreamMsg = await js.get_msg(stream, seq=seq)
    except NotFoundError:
        return None
    return msg


def _matches(event: FileUploadEvent | None, key: str | None) -> bool:
    return event is not None and key in (event.event_id, event.file_uuid)


class _Finder:
    """Finds the upload's message on the upload stream, cheapest way first (the module's docstring)."""

    def __init__(self, src: Sources, marks: dict[str, list[Where]], records: list[dict[str, Any]]) -> None:
        self.src = src
        self.marks = marks
        self.records = records

    async def by_key(self, key: str) -> tuple[int | None, FileUploadEvent | None, str]:
        s = self.src.settings
        uploads = s.nats_stream_name
        seqs = sorted(w.seq for found in self.marks.values() for w in found if w.stream == uploads and w.seq)
        if seqs:
            return seqs[0], None, f"the consumers' records ({len(self.marks)} buckets asked)"
        seqs = sorted(r["stream_seq"] for r in self.records if r["stream"] == uploads and r["stream_seq"])
        if seqs:
            return seqs[0], None, "the audit trail"
        index = await self.src.letters.ready(self.src.js)
        letters = [x for x in index.about(key) if x.stream == uploads and x.stream_seq]
        if letters:
            return letters[0].stream_seq, None, "the dead letters"
        staged = await self._through_a_stage(key)
        if staged is not None:
            return None, staged, "a stage's records"
        floor = min(
            (
                (n.info.ack_floor.stream_seq or 0) if n.info.ack_floor else 0
                for n in self.src.topology.nodes.values()
                if n.stream == uploads
            ),
            default=0,
        )
        found, read = await self._scan(key, floor + 1, None)
        if found is not None:
            return found[0], found[1], f"a read of the stream past the consumers' ack floors ({read} messages)"
        if floor > 0:
            found, more = await self._scan(key, 1, floor)
            if found is not None:
                return found[0], found[1], f"a read of the stream from its start ({read + more} messages)"
            read += more
        return None, None, f"not found: {read} messages read"

    async def _through_a_stage(self, key: str) -> FileUploadEvent | None:
        """The upload as a stage's message (its upstream's result) carries it, when only a stage recorded it."""
        s = self.src.settings
        for found in self.marks.values():
            for where in found:
                if where.stream == s.nats_result_stream_name and where.seq:
                    msg = await _get(self.src.js, where.stream, where.seq)
                    event = upload_of(msg.data or b"") if msg is not None else None
                    if _matches(event, key):
                        return event
        return None

    async def _scan(self, key: str, start: int, stop: int | None) -> tuple[tuple[int, FileUploadEvent] | None, int]:
        needle = key.encode()
        hit: list[tuple[int, FileUploadEvent]] = []

        def visit(seen: Seen) -> bool:
            if needle in seen.data:
                event = upload_of(seen.data)
                if _matches(event, key) and event is not None:
                    hit.append((seen.seq, event))
                    return True
            return False

        try:
            read = await scan(
                self.src.js,
                self.src.settings.nats_stream_name,
                visit,
                start_seq=start,
                stop_at_seq=stop,
            )
        except NotFoundError:
            return None, 0
        return (hit[0] if hit else None), read


def _is_stage(node: Node) -> bool:
    return node.after is not None


def _processed_marks(node: Node, marks: dict[str, list[Where]]) -> list[Where]:
    """The consumer's records of the upload as processed: where they say it was (on the stream it reads), or
    nothing (a record from before records said where)."""
    return [w for w in marks.get(node.name, []) if w.stream in (node.stream, "")]


def _position(node: Node, seq: int, subject: str | None, published: datetime | None) -> tuple[str, str | None] | None:
    """Where the consumer's durable stands for a message it has not settled as far as anything recorded
    shows: (state, note), or None when it is settled (before its ack floor)."""
    info = node.info
    config = info.config
    filters = consumer_filters(config)
    if subject and filters and not any(subject_matches(f, subject) for f in filters):
        return "not_reached", f"its filter does not take in {subject}"
    if config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE and (config.opt_start_seq or 0) > seq:
        return "not_reached", f"it starts at sequence {config.opt_start_seq}"
    created = info.created
    if config.deliver_policy in (DeliverPolicy.NEW, DeliverPolicy.LAST, DeliverPolicy.LAST_PER_SUBJECT) and (
        published is not None and created is not None and created > published
    ):
        return "not_reached", f"created after it ({_utc(created)}), from new messages on"
    delivered = info.delivered.stream_seq if info.delivered else 0
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    if seq > (delivered or 0):
        return "pending", f"not delivered yet ({info.num_pending or 0} pending)"
    if seq > (floor or 0):
        return "in_flight", "delivered, not yet settled"
    return None


class TimelineBuilder:
    def __init__(self, src: Sources) -> None:
        self.src = src
        self._routes: dict[str, ReplayRoutes | str] = {}
        self._event_id: str | None = None
        self._results: list[dict[str, Any]] = []
        """The result events read, in pipeline order: where the file's name, size and type come from."""
        self._read: dict[tuple[str, int], RawStreamMsg | None] = {}
        self._replays: dict[str, RawStreamMsg | None] = {}
        """Per consumer of the upload stream that settled nothing of it: its replay of the upload, if any."""

    async def build(self, key: str | None = None, seq: int | None = None) -> Timeline | None:
        """The timeline of the upload `key` (event_id or file_uuid) or of the upload message `seq`; None
        when no such upload is found."""
        s, js = self.src.settings, self.src.js
        uploads = s.nats_stream_name
        message: RawStreamMsg | None = None
        event: FileUploadEvent | None = None
        if seq is not None:
            message = await _get(js, uploads, seq)
            if message is None:
                return None
            event = upload_of(message.data or b"")
            key = event.event_id if event is not None else None
            found_by = "its sequence"
        records: list[dict[str, Any]] = []
        if key is not None and self.src.audit is not None:
            records = [r for r in await self.src.audit.lookup(key) if key in (r["event_id"], r["file_uuid"])]
            if records and seq is None:
                key = records[0]["event_id"] or key
        marks = await self._marks(key) if key is not None else {}
        if seq is None:
            assert key is not None
            seq, event, found_by = await _Finder(self.src, marks, records).by_key(key)
            if seq is None and event is None:
                return None
            if seq is not None:
                message = await _get(js, uploads, seq)
                found = upload_of(message.data or b"") if message is not None else None
                event = found or event
        if event is None and key is not None:
            event = await self._event_from_letters(key)
        if event is not None and key != event.event_id:  # a file_uuid: the rest is keyed by event_id
            key = event.event_id
            marks = await self._marks(key, known=marks)
            if self.src.audit is not None and not records:
                records = [r for r in await self.src.audit.lookup(key) if r["event_id"] == key]
        self._event_id = event.event_id if event is not None else None
        await self._prefetch_results(marks)
        upload = self._upload_view(event, message, seq, marks, records)
        await self._prefetch_replays(upload, message, marks, records)
        views: dict[str, ConsumerView] = {}
        for node in self.src.topology.order():
            views[node.name] = await self._consumer(node, upload, message, marks, records, views)
        self._fill_facts(upload, list(views.values()), records)
        source = "audit trail and streams" if self.src.audit is not None else "streams"
        return Timeline(upload, list(views.values()), source, found_by)

    # -- what the consumers recorded

    async def _marks(self, key: str, known: dict[str, list[Where]] | None = None) -> dict[str, list[Where]]:
        """Each consumer's records of the upload `key` (an event_id or a file_uuid), all at once; with
        `known`, only for the consumers that had none there, by event_id."""
        known = known or {}
        nodes = [n for n in self.src.topology.nodes.values() if n.bucket and not known.get(n.name)]

        async def one(node: Node) -> list[Where]:
            assert node.bucket is not None
            try:
                return await find_records(self.src.js, node.bucket, event_id=key, file_uuid=None if known else key)
            except (TimeoutError, UploadsError):
                return []

        found = await asyncio.gather(*(one(n) for n in nodes))
        return {**known, **{n.name: _unique(f) for n, f in zip(nodes, found, strict=True)}}

    async def _prefetch_results(self, marks: dict[str, list[Where]]) -> None:
        """The result events the records name, read together (each stage's message is one of them)."""
        seqs = sorted({w.result_seq for found in marks.values() for w in found if w.result_seq})
        stream = self.src.settings.nats_result_stream_name
        read = await asyncio.gather(*(_get(self.src.js, stream, seq) for seq in seqs))
        self._read.update({(stream, seq): msg for seq, msg in zip(seqs, read, strict=True)})

    async def _prefetch_replays(
        self,
        upload: UploadView,
        message: RawStreamMsg | None,
        marks: dict[str, list[Where]],
        records: list[dict[str, Any]],
    ) -> None:
        """The replay lookups of the consumers of the upload stream that recorded nothing of the upload, together
        rather than one after another (one read each; one of a consumer that dead-lettered it goes unused)."""
        nodes = [
            node
            for node in self.src.topology.order()
            if not _is_stage(node)
            and not _processed_marks(node, marks)
            and not any(r["consumer"] == node.name and r["outcome"] in ("processed", "duplicate") for r in records)
        ]
        found = await asyncio.gather(*(self._replay_message(node, upload, message) for node in nodes))
        self._replays.update(zip((node.name for node in nodes), found, strict=True))

    async def _message(self, stream: str, seq: int) -> RawStreamMsg | None:
        if (stream, seq) not in self._read:
            self._read[(stream, seq)] = await _get(self.src.js, stream, seq)
        return self._read[(stream, seq)]

    async def _event_from_letters(self, key: str) -> FileUploadEvent | None:
        """The upload as a dead letter's body holds it, when its message has left the stream."""
        for letter in (await self.src.letters.ready(self.src.js)).about(key):
            msg = await _get(self.src.js, self.src.settings.dlq_stream_name, letter.seq)
            event = upload_of(msg.data or b"") if msg is not None else None
            if _matches(event, key):
                return event
        return None

    def _upload_view(
        self,
        event: FileUploadEvent | None,
        message: RawStreamMsg | None,
        seq: int | None,
        marks: dict[str, list[Where]],
        records: list[dict[str, Any]],
    ) -> UploadView:
        s = self.src.settings
        headers = _headers(message) if message is not None else {}
        shown = {k: v for k, v in headers.items() if k in SHOWN_HEADERS}
        others = {w.seq for found in marks.values() for w in found if w.stream == s.nats_stream_name and w.seq}
        others |= {r["stream_seq"] for r in records if r["stream"] == s.nats_stream_name and r["stream_seq"]}
        if event is not None and self.src.letters.loaded:
            others |= {
                x.stream_seq
                for x in self.src.letters.about(event.event_id)
                if x.stream == s.nats_stream_name and x.stream_seq
            }
        if seq is not None:
            others.discard(seq)
        return UploadView(
            event_id=event.event_id if event else None,
            file_uuid=event.file_uuid if event else None,
            email=event.email if event else None,
            bucket=event.bucket_name if event else None,
            timestamp=event.timestamp if event else None,
            stream=s.nats_stream_name,
            seq=seq,
            subject=message.subject if message is not None else None,
            published_at=_utc(message.time) if message is not None else None,
            headers=shown,
            trace_id=trace_id_of(headers),
            other_seqs=sorted(others),
        )

    def _fill_facts(self, upload: UploadView, views: list[ConsumerView], records: list[dict[str, Any]]) -> None:
        """The file's name, size, type and digest, from the first result event or record that knows them."""
        names = {"filename": "original_filename", "size": "size", "content_type": "content_type", "sha256": "sha256"}
        for body in self._results:
            for name, published in names.items():
                if getattr(upload, name) is None and body.get(published) is not None:
                    setattr(upload, name, body[published])
        for record in records:
            for name in ("filename", "size", "content_type", "sha256"):
                if getattr(upload, name) is None and record.get(name) is not None:
                    setattr(upload, name, record[name])

    # -- one consumer

    async def _consumer(
        self,
        node: Node,
        upload: UploadView,
        message: RawStreamMsg | None,
        marks: dict[str, list[Where]],
        records: list[dict[str, Any]],
        views: dict[str, ConsumerView],
    ) -> ConsumerView:
        s = self.src.settings
        view = ConsumerView(node.name, node.after, node.stream, "pending")
        mine = [r for r in records if r["consumer"] == node.name]
        my_marks = marks.get(node.name, [])
        processed = _processed_marks(node, marks)
        done = bool(processed) or any(r["outcome"] == "processed" for r in mine)
        letters = [] if done else await self._letters_of(node, upload, message)
        # The message this consumer reads for the upload, and where it stands for it.
        seq: int | None
        subject: str | None
        published: datetime | None
        if _is_stage(node):
            upstream = views.get(node.after or "")
            seq = upstream.result_seq if upstream is not None else None
            if seq is None:
                seq = next((w.seq for w in my_marks if w.stream == node.stream and w.seq), None)
            if seq is None:
                seq = next((x.stream_seq for x in letters if x.stream_seq), None)
            subject = result_subject(s.nats_result_subject, node.after or "")
            published = None
            if seq is None and not (my_marks or letters or mine):
                view.state, view.note = self._waiting(node, upstream)
                return view
            if seq is not None and (msg := await self._message(node.stream, seq)) is not None:
                published, subject = msg.time, msg.subject
        else:
            seq = upload.seq
            subject = upload.subject
            published = message.time if message is not None else None
        view.message_seq = seq
        self._deliveries(view, mine, my_marks, letters)
        if processed or any(r["outcome"] == "processed" for r in mine):
            await self._processed(view, node, processed, mine, seq)
            if seq is not None and _is_duplicate(seq, processed, mine, node):
                view.state = "duplicate"
                view.note = "acknowledged as a duplicate of an upload it processed before"
            return view
        if any(r["outcome"] == "duplicate" for r in mine):
            view.state = "duplicate"
            return view
        if letters:
            letter = letters[-1]
            view.state = "dead_lettered"
            view.error_class, view.reason = letter.error_class, letter.reason
            view.dead_letter_seq = letter.seq
            view.replayable, view.replay_refused = await self._replayable(letter)
            self._steps_before(view, mine)
            return view
        if node.name in self._replays:
            replay = self._replays[node.name]
        else:
            replay = await self._replay_message(node, upload, message if not _is_stage(node) else None)
        if replay is not None:
            seq, subject, published = replay.seq, replay.subject, replay.time
            view.message_seq = seq
            view.note = "replayed"
        if seq is None:
            view.state, view.note = "not_reached", "its message is no longer in the stream"
            return view
        standing = _position(node, seq, subject, published)
        if standing is None:
            view.state = "processed"
            view.note = (
                "acknowledged, but no record of it remains (expired after DEDUPE_TTL, or DEDUPE_BUCKET is off): "
                "processed or a duplicate; the audit trail (AUDIT_URL) tells"
            )
            return view
        view.state, view.note = standing
        last = mine[-1] if mine else None
        if view.state == "in_flight" and last is not None and last["outcome"] == "retried":
            view.state = "retrying"
            view.error_class, view.reason = last["error_class"], last["reason"]
            view.note = "its last delivery failed; it will be delivered again"
        return view

    def _waiting(self, node: Node, upstream: ConsumerView | None) -> tuple[str, str]:
        if upstream is None:
            return "not_reached", f"it follows {node.after}, which does not exist"
        if upstream.state in ("pending", "in_flight", "retrying"):
            return "pending", f"waits for {node.after} ({upstream.state})"
        return "not_reached", f"{node.after} did not complete it ({upstream.state})"

    async def _letters_of(self, node: Node, upload: UploadView, message: RawStreamMsg | None) -> list[DeadLetter]:
        index = await self.src.letters.ready(self.src.js)
        found: list[DeadLetter] = []
        if upload.event_id is not None:
            found = [x for x in index.about(upload.event_id) if x.consumer == node.name]
        if not found and upload.seq is not None and not _is_stage(node):
            found = [x for x in index.at(upload.stream, upload.seq) if x.consumer == node.name]
        if not found and message is not None and not _is_stage(node):  # not an upload: the same body, replayed
            found = [x for x in index.copying(body_digest(message.data or b"")) if x.consumer == node.name]
        return found

    def _deliveries(
        self, view: ConsumerView, records: list[dict[str, Any]], marks: list[Where], letters: list[DeadLetter]
    ) -> None:
        if records:
            view.deliveries = [
                Delivery(
                    utc_ms(r["recorded_at"]),
                    r["outcome"],
                    r["deliveries"],
                    r["duration_ms"],
                    r["error_class"],
                    r["reason"],
                    r["stream_seq"],
                )
                for r in records
            ]
            return
        view.deliveries = [Delivery(utc_ms(w.at) if w.at else None, "processed", seq=w.seq or None) for w in marks]
        view.deliveries += [
            Delivery(x.failed_at or None, "dead_lettered", x.deliveries, None, x.error_class, x.reason, x.stream_seq)
            for x in letters
        ]
        view.deliveries.sort(key=lambda d: d.at or "")

    async def _processed(
        self, view: ConsumerView, node: Node, marks: list[Where], records: list[dict[str, Any]], seq: int | None
    ) -> None:
        view.state = "processed"
        result_seq = next((w.result_seq for w in marks if w.result_seq), None)
        done = [r for r in records if r["outcome"] == "processed"]
        # A record that says where (stream set) and names no result: the consumer published none. Only a
        # record from before records said where, or the audit trail's alone, leaves its result to look for.
        if result_seq is None and node.results and not any(w.stream for w in marks):
            at = next((w.at for w in marks if w.at), None) or (done[-1]["recorded_at"] if done else None)
            if at is not None:
                result_seq = await self._find_result(node, at)
        view.result_seq = result_seq
        if result_seq is not None:
            msg = await self._message(self.src.settings.nats_result_stream_name, result_seq)
            if msg is not None:
                try:
                    body = json.loads(msg.data or b"{}")
                except ValueError:
                    body = {}
                view.processors = [str(p) for p in body.get("processors", [])]
                view.skipped = [str(p) for p in body.get("skipped", [])]
                view.outputs = summarize(body.get("outputs", {}))
                view.trace_id = trace_id_of(_headers(msg))
                self._results.append(body)
                return
        if done:
            view.processors, view.skipped = list(done[-1]["processors"]), list(done[-1]["skipped"])

    async def _find_result(self, node: Node, at_ms: int) -> int | None:
        """A result event no record names (a record written before records said where): looked for among
        the consumer's results published shortly before its record."""
        event_id = self._event_id
        if event_id is None or not node.results:
            return None
        wanted = f"{event_id}:{node.name}:processed"
        hit: list[int] = []
        end_ns = (at_ms + 2000) * 1_000_000

        def visit(seen: Seen) -> bool:
            if (seen.headers or {}).get("Nats-Msg-Id") == wanted:
                hit.append(seen.seq)
                return True
            return seen.time_ns > end_ns

        start = datetime.fromtimestamp(at_ms / 1000, UTC) - timedelta(seconds=RESULT_WINDOW_S)
        try:
            await scan(
                self.src.js,
                self.src.settings.nats_result_stream_name,
                visit,
                subject=node.results,
                start_time=start,
                headers_only=True,
            )
        except NotFoundError:
            return None
        return hit[0] if hit else None

    def _steps_before(self, view: ConsumerView, records: list[dict[str, Any]]) -> None:
        failed = [r for r in records if r["outcome"] == "dead_lettered"]
        if failed:
            view.processors, view.skipped = list(failed[-1]["processors"]), list(failed[-1]["skipped"])

    async def _replayable(self, letter: DeadLetter) -> tuple[bool, str | None]:
        routes = self._routes.get(letter.stream)
        if routes is None:
            try:
                info = await self.src.js.stream_info(letter.stream)
                routes = ReplayRoutes(
                    self.src.settings,
                    letter.stream,
                    info.config.subjects or [],
                    await self.src.js.consumers_info(letter.stream),
                )
            except NotFoundError:
                routes = f"stream {letter.stream} does not exist (any more)"
            self._routes[letter.stream] = routes
        if isinstance(routes, str):
            return False, routes
        try:
            routes.subject_for(letter.consumer)
        except UploadsError as exc:
            return False, exc.reason
        return True, None

    async def _replay_message(
        self, node: Node, upload: UploadView, message: RawStreamMsg | None
    ) -> RawStreamMsg | None:
        """A replay of the upload given back to this consumer and not yet settled by it: on its replay
        subject, past its ack floor (replays are few: each is one read)."""
        s = self.src.settings
        body = message.data if message is not None else None
        if upload.event_id is None and body is None:
            return None
        base = s.nats_result_subject if _is_stage(node) else s.nats_subject
        subject = f"{base}.replay.{node.name}"
        seq = (node.info.ack_floor.stream_seq or 0) + 1 if node.info.ack_floor else 1
        for _ in range(1000):
            try:
                msg = await self.src.js.get_msg(node.stream, seq=seq, next=True, subject=subject)
            except NotFoundError:
                return None
            event = upload_of(msg.data or b"")
            if (event is not None and event.event_id == upload.event_id) or (
                upload.event_id is None and msg.data == body
            ):
                return msg  # type: ignore[no-any-return]
            seq = (msg.seq or seq) + 1
        return None


def _unique(found: Sequence[Where]) -> list[Where]:
    seen: list[Where] = []
    for where in found:
        if where not in seen:
            seen.append(where)
    return seen


def _is_duplicate(seq: int, marks: list[Where], records: list[dict[str, Any]], node: Node) -> bool:
    """The message `seq` was acknowledged as a duplicate: the upload's record names another message of it,
    or the audit trail says so of this one."""
    outcomes = {r["outcome"] for r in records if r["stream_seq"] == seq and r["stream"] == node.stream}
    if outcomes & {"processed", "duplicate"}:
        return "processed" not in outcomes
    seqs = {w.seq for w in marks if w.seq}
    floor = node.info.ack_floor.stream_seq if node.info.ack_floor else 0
    return bool(seqs) and seq not in seqs and seq <= (floor or 0)
