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
from uploads_consumer.connection import connect_once
from uploads_consumer.deadletter import stored_messages
from uploads_consumer.envelope import MAX_METADATA_BYTES, MasterKeyRing, parse_metadata
from uploads_consumer.errors import ConfigError, UploadsError
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


async def read_dead_letters(settings: Settings, consumer: str | None = None) -> list[dict[str, Any]]:
    """Every dead letter (or those `consumer` dead-lettered), oldest first."""
    nc = await connect_once(settings, "uploads-consumer-dlq")
    try:
        messages = await stored_messages(nc.jetstream(timeout=10), settings.dlq_stream_name)
    finally:
        await nc.close()
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
    print(f"{'SEQ':>6}  {'CONSUMER':<{width}} {'CLASS':<16} {'FAILED AT':<24} {'EVENT ID':<36}  REASON")
    for e in entries:
        print(
            f"{e['seq']:>6}  {e['consumer']:<{width}} {e['error_class'] or '-':<16} {e['failed_at'] or '-':<24} "
            f"{e['event_id'] or '-':<36}  {e['reason'] or ''}"
        )
    print(f"{len(entries)} dead-lettered message{'s' if len(entries) != 1 else ''}")
    return 0


class ReplayRoutes:
    """Where a dead letter goes back to, per consumer: its own replay subject when its filter has it
    (no other consumer of the stream sees it), else the upload subject when no other consumer reads
    that; otherwise nowhere, with the reason."""

    def __init__(self, settings: Settings, stream_subjects: list[str], consumers: list[ConsumerInfo]) -> None:
        self._settings = settings
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
        s = self._settings
        if consumer not in self._filters:
            raise UploadsError(f"consumer {consumer} does not exist on {s.nats_stream_name} (any more)")
        own = replay_subject(s.nats_subject, consumer)
        if own in self._filters[consumer] and any(subject_matches(p, own) for p in self._captured):
            also = self._others_reading(consumer, own)  # no filter at all, or a wildcard: they would see it
            if not also:
                return own
            raise UploadsError(
                f"{own} would reach {', '.join(also)} too (their filters take it in); narrow their filters, then replay"
            )
        others = self._others_reading(consumer, s.nats_subject)
        if not others:
            return s.nats_subject
        raise UploadsError(
            f"consumer {consumer} does not read {own}, and {s.nats_subject} would reach {', '.join(others)} too "
            f"(they would process the upload again); run `uploads-consumer setup --enable-replay` with "
            f"NATS_CONSUMER_NAME={consumer}, then replay"
        )


async def dlq_replay(settings: Settings, replay_all: bool, seqs: list[int], consumer: str | None = None) -> int:
    """Put dead letters back, each to the consumer that dead-lettered it only (see ReplayRoutes);
    the dead letter is deleted once the upload stream has acknowledged its copy. Exit 1 if any was refused."""
    nc = await connect_once(settings, "uploads-consumer-dlq-replay")
    replayed: dict[str, int] = {}
    refused = 0
    try:
        js = nc.jetstream(timeout=10)
        stream = await js.stream_info(settings.nats_stream_name)
        routes = ReplayRoutes(
            settings, stream.config.subjects or [], await js.consumers_info(settings.nats_stream_name)
        )
        if replay_all:
            info = await js.stream_info(settings.dlq_stream_name)
            seqs = list(range(info.state.first_seq, info.state.last_seq + 1)) if info.state.messages else []
        for seq in seqs:
            try:
                msg = await js.get_msg(settings.dlq_stream_name, seq=seq)
            except NotFoundError:
                if not replay_all:
                    print(f"seq {seq}: not in {settings.dlq_stream_name}", file=sys.stderr)
                continue
            owner = dead_lettered_by(msg.headers or {}, settings)
            if consumer is not None and owner != consumer:
                if not replay_all:
                    print(f"seq {seq}: dead-lettered by {owner}, not {consumer}; left as it is", file=sys.stderr)
                continue
            try:
                subject = routes.subject_for(owner)
            except UploadsError as exc:
                print(f"seq {seq}: not replayed: {exc.reason}", file=sys.stderr)
                refused += 1
                continue
            # Republish first; only once the stream has acknowledged it, remove the dead letter.
            await js.publish(subject, msg.data or b"", timeout=10)
            await js.delete_msg(settings.dlq_stream_name, seq)
            replayed[subject] = replayed.get(subject, 0) + 1
    finally:
        await nc.close()
    total = sum(replayed.values())
    where = ", ".join(f"{n} to {subject}" for subject, n in replayed.items())
    print(f"replayed {total} message{'s' if total != 1 else ''}" + (f" ({where})" if where else ""))
    return 1 if refused else 0


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
