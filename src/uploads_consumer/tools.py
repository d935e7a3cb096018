"""Operator tools behind the CLI: publish, dead-letter list/replay, decrypt one upload."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.connection import command_connection, connect_once, redacted_servers, require_jetstream
from uploads_consumer.deadletter import dead_letter_entry, stored_messages
from uploads_consumer.envelope import MAX_METADATA_BYTES, MasterKeyRing, parse_metadata
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, UploadsError
from uploads_consumer.events import FileUploadEvent, parse_event, utc_text
from uploads_consumer.observability import Metrics
from uploads_consumer.pipeline import PlaintextFile
from uploads_consumer.producer import publish_event, upload_file
from uploads_consumer.replay import replay_dead_letters
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
    entries = [dead_letter_entry(msg, settings) for msg in messages]
    return [e for e in entries if consumer is None or e["consumer"] == consumer]


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


async def dlq_replay(settings: Settings, replay_all: bool, seqs: list[int], consumer: str | None = None) -> int:
    """Put dead letters back, each to the consumer that dead-lettered it only (replay.py); exit 1 if any was
    refused."""
    async with command_connection(settings, "dlq replay", "operator") as nc:
        report = await replay_dead_letters(nc.jetstream(timeout=10), settings, seqs, consumer, every=replay_all)
    for not_replayed in report.not_replayed:
        print(f"seq {not_replayed.seq}: {not_replayed.reason}", file=sys.stderr)
    replayed: dict[str, int] = {}
    for r in report.replayed:
        replayed[r.subject] = replayed.get(r.subject, 0) + 1
    total = len(report.replayed)
    where = ", ".join(f"{n} to {subject}" for subject, n in replayed.items())
    print(f"replayed {total} message{'s' if total != 1 else ''}" + (f" ({where})" if where else ""))
    return 1 if report.refused else 0


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
