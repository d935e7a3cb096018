"""Operator tools behind the CLI: publish, dead-letter list/replay, decrypt one upload."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings, replay_subject
from uploads_consumer.connection import command_connection, connect_once, redacted_servers, require_jetstream
from uploads_consumer.deadletter import header_text, stored_messages
from uploads_consumer.envelope import MAX_METADATA_BYTES, MasterKeyRing, parse_metadata
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, UploadsError
from uploads_consumer.events import FileUploadEvent, parse_event, utc_text
from uploads_consumer.observability import Metrics
from uploads_consumer.pipeline import PlaintextFile
from uploads_consumer.producer import publish_event, upload_file
from uploads_consumer.provision import consumer_filters, subject_matches
from uploads_consumer.storage import ObjectStore


def _keyring(settings: Settings) -> MasterKeyRing:
    current, previous = settings.master_keys()
    return MasterKeyRing(current, previous)


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self._tty = sys.stderr.isatty() and total > 1

    def advance(self) -> None:
        self.done += 1
        if self._tty:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def publish_files(settings: Settings, files: list[str], email: str, bucket: str | None, repeat: int) -> int:
    bucket = bucket or settings.s3_bucket_name
    if not bucket:
        raise ConfigError("S3_BUCKET_NAME", "required for publish (or pass --bucket)")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise UploadsError(f"{p}: no such file")
    keyring = _keyring(settings)
    jobs = [p for p in paths for _ in range(max(1, repeat))]
    progress = Progress(len(jobs), "publishing")
    nc = await connect_once(settings, "uploads-consumer-publish")
    limit = asyncio.Semaphore(16)
    try:
        js = nc.jetstream(timeout=10)
        await require_stream_for(js, settings)  # before any upload: no orphan object left in S3
        async with ObjectStore(settings) as store:
            await store.ensure_bucket(bucket)

            async def one(path: Path) -> None:
                async with limit:
                    event = await upload_file(store, keyring, path, email, bucket)
                    await publish_event(js, settings.nats_subject, event)
                    progress.advance()

            await asyncio.gather(*(one(p) for p in jobs))
    finally:
        await nc.close()
    print(f"published {len(jobs)} upload{'s' if len(jobs) != 1 else ''} to {settings.nats_subject} (bucket {bucket})")
    return 0


async def require_stream_for(js: Any, settings: Settings) -> None:
    """JetStream is there, and a stream stores NATS_SUBJECT; else what to do, in one line."""
    await require_jetstream(js, settings)
    try:
        await js.find_stream_name_by_subject(settings.nats_subject)
    except NotFoundError:
        raise UploadsError(
            f"no stream stores {settings.nats_subject} on the server at {redacted_servers(settings)}: "
            "run `uploads-consumer setup` first (nothing was uploaded)"
        ) from None


async def read_dead_letters(settings: Settings, consumer: str | None = None) -> list[dict[str, Any]]:
    """Every dead letter (or those `consumer` dead-lettered), oldest first."""
    async with command_connection(settings, "dlq list", "operator") as nc:
        messages = await stored_messages(nc.jetstream(timeout=10), settings.dlq_stream_name)
    out = []
    for msg in messages:
        h = msg.headers or {}
        owner = dead_lettered_by(h, settings)
        if consumer is not None and owner != consumer:
            continue
        out.append(
            {
                "seq": msg.seq,
                "consumer": owner,
                "error_class": h.get("Uploads-Error-Class"),
                "reason": h.get("Uploads-Error"),
                "failed_at": h.get("Uploads-Failed-At"),
                "original_seq": h.get("Uploads-Stream-Seq"),
                "deliveries": h.get("Uploads-Deliveries"),
                "event_id": _event_id(msg.data or b""),
                "body": (msg.data or b"").decode("utf-8", "replace"),
            }
        )
    return out


def dead_lettered_by(headers: dict[str, str], settings: Settings) -> str:
    """The consumer that dead-lettered a message; one from before the header existed: NATS_CONSUMER_NAME's."""
    return headers.get("Uploads-Consumer") or settings.nats_consumer_name


def _event_id(body: bytes) -> str | None:
    try:
        data = json.loads(body)
        if isinstance(data, str):
            data = json.loads(data)
        return str(data.get("event_id")) if isinstance(data, dict) and data.get("event_id") else None
    except Exception:  # noqa: BLE001
        return None


async def dlq_list(settings: Settings, as_json: bool, consumer: str | None = None) -> int:
    entries = await read_dead_letters(settings, consumer)
    if as_json:
        for e in entries:
            print(json.dumps(e, ensure_ascii=False))
        return 0
    if not entries:
        print(f"{settings.dlq_stream_name} is empty" + (f" for consumer {consumer}" if consumer else ""))
        return 0
    width = max(8, *(len(e["consumer"]) for e in entries))
    classes = max(5, *(len(e["error_class"] or "-") for e in entries))  # the longest class present
    print(f"{'SEQ':>6}  {'CONSUMER':<{width}} {'CLASS':<{classes}} {'FAILED AT':<24} {'EVENT ID':<36}  REASON")
    for e in entries:
        print(
            f"{e['seq']:>6}  {e['consumer']:<{width}} {e['error_class'] or '-':<{classes}} "
            f"{e['failed_at'] or '-':<24} {e['event_id'] or '-':<36}  {e['reason'] or ''}"
        )
    print(f"{len(entries)} dead-lettered message{'s' if len(entries) != 1 else ''}")
    return 0


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
        self._filters = {c.name: consumer_filters(c.config) for c in consumers}

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


async def _routes(js: Any, settings: Settings, stream: str) -> ReplayRoutes:
    info = await js.stream_info(stream)
    return ReplayRoutes(settings, stream, info.config.subjects or [], await js.consumers_info(stream))


async def dlq_replay(settings: Settings, replay_all: bool, seqs: list[int], consumer: str | None = None) -> int:
    """Put dead letters back, each to the consumer that dead-lettered it only (see ReplayRoutes), on the
    stream it came from (the upload stream, or for a stage the result stream); the dead letter is deleted
    once that stream has acknowledged its copy. Exit 1 if any was refused."""
    replayed: dict[str, int] = {}
    refused = 0
    async with command_connection(settings, "dlq replay", "operator") as nc:
        js = nc.jetstream(timeout=10)
        routes: dict[str, ReplayRoutes] = {}
        if replay_all:
            info = await js.stream_info(settings.dlq_stream_name)
            seqs = list(range(info.state.first_seq, info.state.last_seq + 1)) if info.state.messages else []
        for seq in seqs:
            try:
                msg = await js.get_msg(settings.dlq_stream_name, seq=seq)
            except NotFoundError:
                if not replay_all:  # asked for by its number: a mistake to say, not to pass over
                    print(f"seq {seq}: not in {settings.dlq_stream_name}", file=sys.stderr)
                    refused += 1
                continue
            owner = dead_lettered_by(msg.headers or {}, settings)
            if consumer is not None and owner != consumer:
                if not replay_all:
                    print(f"seq {seq}: dead-lettered by {owner}, not {consumer}; left as it is", file=sys.stderr)
                continue
            stream = header_text((msg.headers or {}).get("Uploads-Stream") or settings.nats_stream_name)
            try:
                if stream not in routes:
                    routes[stream] = await _routes(js, settings, stream)
                subject = routes[stream].subject_for(owner)
            except NotFoundError:
                print(f"seq {seq}: not replayed: stream {stream} does not exist (any more)", file=sys.stderr)
                refused += 1
                continue
            except UploadsError as exc:
                print(f"seq {seq}: not replayed: {exc.reason}", file=sys.stderr)
                refused += 1
                continue
            # Republish first; only once the stream has acknowledged it, remove the dead letter.
            await js.publish(subject, msg.data or b"", timeout=10)
            await js.delete_msg(settings.dlq_stream_name, seq)
            replayed[subject] = replayed.get(subject, 0) + 1
    total = sum(replayed.values())
    where = ", ".join(f"{n} to {subject}" for subject, n in replayed.items())
    print(f"replayed {total} message{'s' if total != 1 else ''}" + (f" ({where})" if where else ""))
    return 1 if refused else 0


async def keys_check(settings: Settings, last: int) -> int:
    """Which key of the ring opens each of the newest `last` uploads on the stream: the current key, a
    previous one, or none (exit 1). A typo in ENCRYPTION_PREVIOUS_MASTER_KEYS that is still base64 starts
    cleanly; this says so before the uploads it concerns are dead-lettered."""
    keyring = _keyring(settings)
    names = ["current", *(f"previous {i}" for i in range(1, len(keyring.fingerprints)))]
    print(f"the ring: {', '.join(f'{n} {fp}' for n, fp in zip(names, keyring.fingerprints, strict=True))}")
    async with command_connection(settings, "keys check", "operator") as nc:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(settings.nats_stream_name)
        events: list[FileUploadEvent] = []
        seq = info.state.last_seq
        while seq >= max(info.state.first_seq, 1) and len(events) < last and seq > info.state.last_seq - 20 * last:
            try:
                events.append(parse_event((await js.get_msg(settings.nats_stream_name, seq=seq)).data or b""))
            except (NotFoundError, PermanentError):  # deleted, or not an upload (a startup probe)
                pass
            seq -= 1
    counts: dict[str, int] = {}
    async with ObjectStore(settings) as store:
        for event in events:
            outcome, said = await _which_key(store, keyring, names, event)
            counts[outcome] = counts.get(outcome, 0) + 1
            print(f"{event.file_uuid}  {utc_text(event.timestamp)}  {said}")
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "none found"
    print(f"checked {len(events)} upload{'s' if len(events) != 1 else ''}: {summary}")
    if counts.get("none"):
        print(
            "uploads-consumer: some uploads open under no key of the ring: the backend wraps with a key this "
            "daemon lacks (check ENCRYPTION_MASTER_KEY and ENCRYPTION_PREVIOUS_MASTER_KEYS against the backend's)",
            file=sys.stderr,
        )
        return 1
    return 0


async def _which_key(
    store: ObjectStore, keyring: MasterKeyRing, names: list[str], event: FileUploadEvent
) -> tuple[str, str]:
    """(the key that opens this upload's data key, or `none`, or `unreadable`; what to print)."""
    try:
        metadata = parse_metadata(await store.read_small(event.bucket_name, event.s3_metadata_key, MAX_METADATA_BYTES))
        index, _ = keyring.unwrap_with(metadata.kek)
    except PermanentError as exc:
        if exc.error_class is ErrorClass.DECRYPT_FAILED:
            return "none", "NONE of the ring's keys"
        return "unreadable", f"not checked: {exc.reason}"
    except UploadsError as exc:  # S3 away: retryable
        return "unreadable", f"not checked: {exc.reason}"
    return names[index], f"{names[index]} ({keyring.fingerprints[index]})"


async def decrypt_one(settings: Settings, bucket: str, data_key: str, metadata_key: str, out: str) -> int:
    keyring = _keyring(settings)
    dest = Path(out)
    async with ObjectStore(settings) as store:
        metadata = parse_metadata(await store.read_small(bucket, metadata_key, MAX_METADATA_BYTES))
        dek = keyring.unwrap(metadata.kek)
        work_dir = dest.resolve().parent  # noqa: ASYNC240 - one stat, before any work starts
        plaintext = PlaintextFile(work_dir, dek, metadata, Metrics())
        try:
            await store.download(bucket, data_key, plaintext, settings.max_file_size)
            size, sha256 = plaintext.verify()
            plaintext.path.replace(dest)
        finally:
            plaintext.discard()
    print(f"{dest}: {size} bytes, sha256 {sha256} (tag verified; original name {metadata.clean_filename!r})")
    return 0
