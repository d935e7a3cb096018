"""One upload, from "this is a new event" to "settle it": steps 2–8 of docs/contract.md.

Check the event, look it up in the idempotency bucket (while its S3 requests are already out),
fetch what the steps still to run need — nothing, the stored object and its metadata, or the
plaintext (download, unwrap, stream-decrypt to a private file, sniff the content type) — run the
processors, publish the result event, record the upload. Reusable without the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploads_consumer import tracing
from uploads_consumer.config import Settings
from uploads_consumer.content_type import HEAD_BYTES, content_type
from uploads_consumer.dedupe import Deduplicator, Where, key_for
from uploads_consumer.envelope import (
    MAX_METADATA_BYTES,
    OVERHEAD,
    EnvelopeMetadata,
    MasterKeyRing,
    ObjectDecryptor,
    parse_metadata,
)
from uploads_consumer.errors import (
    ErrorClass,
    PermanentError,
    ProcessorTimeout,
    ResourceLimit,
    RetryableError,
    UploadsError,
    describe,
)
from uploads_consumer.events import FileUploadEvent, check_event
from uploads_consumer.messages import ResultEvent, ResultHeaders
from uploads_consumer.observability import Metrics
from uploads_consumer.processors import (
    LoadedProcessor,
    Need,
    ProcessingContext,
    Publish,
    StepSkipped,
    StoredObject,
    chain_need,
    matches_any,
)
from uploads_consumer.storage import ObjectRequest, ObjectStore
from uploads_consumer.workdir import WorkFolder

WORK_DIR_NAME = ".incoming"  # beside the saved files, so `save` can hard-link instead of copying


@dataclass(frozen=True)
class Processed:
    """Every step done: the result event that was published."""

    result: dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """Which message brought an upload: `origin`, its stream and sequence (`FILE_UPLOADS:42`; a message
    `dlq replay` republishes has a new one), and how often the server has delivered it."""

    stream: str = ""
    seq: int = 0
    num_delivered: int = 1

    @property
    def origin(self) -> str:
        return f"{self.stream}:{self.seq}"


@dataclass(frozen=True)
class Duplicate:
    """This upload was processed before (its record is in the idempotency bucket)."""

    key: str


def check_length(length: int, metadata: EnvelopeMetadata) -> None:
    """The stored object is exactly what the metadata says it is (IV + ciphertext + tag); else bad_envelope."""
    if length < OVERHEAD:
        raise PermanentError(ErrorClass.BAD_ENVELOPE, f"object is {length} bytes, shorter than {OVERHEAD} (IV and tag)")
    if length != metadata.encrypted_size:
        raise PermanentError(
            ErrorClass.BAD_ENVELOPE,
            f"object is {length} bytes but metadata says encrypted_size {metadata.encrypted_size}",
        )


class PlaintextFile:
    """An ObjectSink that decrypts into a private temporary file and hashes the plaintext.

    Each `start()` begins again from nothing (a fresh decryptor and an empty file), which is what
    a restarted download needs. Nothing here is trusted until `verify()` has checked the tag and
    that every byte reached the file (a full disk or a quota cuts writes short).
    """

    def __init__(
        self, work_dir: Path, dek: bytes, metadata: EnvelopeMetadata, metrics: Metrics, name: str | None = None
    ) -> None:
        if name is None:
            fd, path = tempfile.mkstemp(dir=work_dir, prefix="plain-", suffix=".part")  # mode 0600
        else:  # a fresh name in a private folder of our own
            path = str(work_dir / name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.path = Path(path)
        self.head = b""
        """The first plaintext bytes (content_type.HEAD_BYTES), kept for sniffing the type."""
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._dek = dek
        self._metadata = metadata
        self._metrics = metrics
        self._decryptor = ObjectDecryptor(dek)
        self._digest = hashlib.sha256()
        self._written = 0

    def start(self, length: int) -> None:
        check_length(length, self._metadata)
        self._file.seek(0)
        self._file.truncate()
        self._decryptor = ObjectDecryptor(self._dek)
        self._digest = hashlib.sha256()
        self._written = 0
        self.head = b""

    def write(self, chunk: bytes) -> None:
        plain = self._decryptor.feed(chunk)
        if plain:
            if len(self.head) < HEAD_BYTES:
                self.head += bytes(plain[: HEAD_BYTES - len(self.head)])
            self._digest.update(plain)
            self._write_all(plain)

    def _write_all(self, data: memoryview) -> None:
        # An unbuffered write may store fewer bytes than asked (a full disk, RLIMIT_FSIZE, a network
        # file system): write the rest, and fail loudly when nothing more goes in.
        try:
            while data:
                n = self._file.write(data)
                if not n:
                    raise OSError(errno.ENOSPC, "no byte could be written")
                self._written += n
                data = data[n:]
        except OSError as exc:
            raise RetryableError(f"cannot write the plaintext to the work directory: {exc.strerror or exc}") from None

    def verify(self) -> tuple[int, str]:
        """Check the tag and the file's length; returns (size, sha256 hex). Durability is the business
        of whoever keeps the file (`save` fsyncs it in a worker thread, not here on the event loop)."""
        self._decryptor.finalize()
        size = self._decryptor.plaintext_size
        on_disk = os.fstat(self._file.fileno()).st_size
        if self._written != size or on_disk != size:
            raise RetryableError(f"the plaintext file holds {on_disk} of {size} bytes (disk full?)")
        self._metrics.bytes_decrypted.inc(size)
        return size, self._digest.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _remove_job(job: Path) -> None:
    """Remove a job's folder: usually empty by now (one rmdir), else with what processors left in it."""
    try:
        os.rmdir(job)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(job, ignore_errors=True)


class Pipeline:
    """Everything between "this is a new event" and "settle it", reusable by the daemon and the CLI."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        keyring: MasterKeyRing,
        processors: list[LoadedProcessor],
        ledger: Deduplicator,
        publish: Publish | None,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyring = keyring
        self._processors = processors
        self._ledger = ledger
        self._publish = publish
        self._metrics = metrics
        self._allowed = settings.allowed_buckets
        self._allowed_types = settings.allowed_content_types
        self.need = chain_need(processors, settings.allowed_content_types)
        """What a first delivery fetches: the most that any step of the chain needs."""
        self._need_typed = chain_need(processors, settings.allowed_content_types, type_known=True)
        """The same where a stage before this consumer already found the content type."""
        self._external = [p.name for p in processors if p.external_effect]
        self.download_path = Path(settings.decrypt_download_path).resolve()
        # private when we create it (mkdir's parents=True would not apply the mode to parents)
        self.download_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        # This process's files there carry its prefix, under a lock it holds; a dead one's are removed now.
        self.work = WorkFolder(self.download_path / WORK_DIR_NAME)
        self.work_dir = self.work.path
        self._jobs = itertools.count(1)

    def close(self) -> None:
        """At a clean stop, once nothing is in flight: nothing of this process stays in the work folder."""
        self.work.close()

    async def run(
        self,
        event: FileUploadEvent,
        log: Any,
        upstream: Mapping[str, Mapping[str, Any]] | None = None,
        delivery: Delivery | None = None,
    ) -> Processed | Duplicate:
        """Process one event; `upstream`: what the stages before this consumer reported of it (AFTER);
        `delivery`: which message brought it, for counting a step's timeouts and for its record (`trace`).
        Raises the project's errors only (anything else is a bug: transient)."""
        check_event(event, self._allowed)  # before any lookup: a hostile event touches nothing
        key = key_for(event)
        upstream = upstream or {}
        type_known = any(before.get("content_type") for before in upstream.values())
        first = self._need_typed if type_known else self.need
        async with self._ledger.claim(key):
            # The S3 requests the chain needs go out together, while the upload and its completed
            # steps are looked up in the idempotency bucket: one round trip of latency, not three.
            # The object's body is not read until the metadata has been checked.
            ahead = self._store.request_ahead(event.bucket_name, event.s3_data_key) if first is Need.PLAINTEXT else None
            meta = (
                asyncio.ensure_future(
                    self._store.read_small(event.bucket_name, event.s3_metadata_key, MAX_METADATA_BYTES)
                )
                if first >= Need.OBJECT
                else None
            )
            try:
                with tracing.span("idempotency lookup"):
                    if self._external:  # both lookups at once: one round trip
                        seen, done = await asyncio.gather(
                            self._ledger.seen(key), self._ledger.steps(key, self._external)
                        )
                    else:
                        seen, done = await self._ledger.seen(key), {}
                if seen:
                    return Duplicate(key)
                need = self._need_now(done, type_known)
                return await self._process(event, key, need, done, meta, ahead, log, upstream, delivery or Delivery())
            finally:
                if ahead is not None:
                    ahead.discard()
                if meta is not None:
                    if not meta.done():
                        meta.cancel()
                        await asyncio.wait([meta])  # a cancellation of our own still propagates from here
                    if not meta.cancelled():
                        meta.exception()  # retrieved: an unread metadata error is not "never retrieved"

    def _need_now(self, done: dict[str, dict[str, Any]], type_known: bool) -> Need:
        """What this delivery fetches: what the steps still to run need (a checkpointed step is not
        run again, so a redelivery after it fetches no more than the rest need, perhaps nothing)."""
        remaining = [p for p in self._processors if p.name not in done]
        return chain_need(remaining, self._allowed_types, type_known) if remaining else Need.EVENT

    async def _process(
        self,
        event: FileUploadEvent,
        key: str,
        need: Need,
        done: dict[str, dict[str, Any]],
        meta: asyncio.Future[bytes] | None,
        ahead: ObjectRequest | None,
        log: Any,
        upstream: Mapping[str, Mapping[str, Any]],
        delivery: Delivery,
    ) -> Processed:
        metadata = parse_metadata(await meta) if need >= Need.OBJECT and meta is not None else None
        limit = self._settings.max_file_size
        if metadata is not None and metadata.encrypted_size > limit:
            raise PermanentError(
                ErrorClass.TOO_LARGE,
                f"metadata says the object is {metadata.encrypted_size} bytes, over MAX_FILE_SIZE ({limit})",
            )
        job = self._job_dir()
        ctx: ProcessingContext | None = None
        plaintext: PlaintextFile | None = None
        try:
            stored: StoredObject | None = None
            size: int | None = None
            sha256: str | None = None
            kind: str | None = None
            if metadata is not None:
                if need is Need.OBJECT:  # its size and ETag, not its bytes
                    info = await self._store.head(event.bucket_name, event.s3_data_key)
                    check_length(info.size, metadata)
                else:
                    with tracing.span("decrypt"):
                        plaintext = self._plaintext_file(self._keyring.unwrap(metadata.kek), metadata, job)
                        info = await self._store.download(event.bucket_name, event.s3_data_key, plaintext, limit, ahead)
                        size, sha256 = plaintext.verify()
                    kind = content_type(plaintext.head, metadata.clean_filename)
                stored = StoredObject(event.bucket_name, event.s3_data_key, info.size, info.etag, event.s3_metadata_key)
            ctx = ProcessingContext(
                event=event,
                metadata=metadata,
                stored=stored,
                plaintext_path=plaintext.path if plaintext is not None else None,
                size=size,
                sha256=sha256,
                content_type=kind,
                download_path=self.download_path,
                work_dir=job,
                log=log,
                upstream=upstream,
            )
            ran: list[str] = []
            skipped: list[str] = []
            try:
                await self._run_chain(ctx, key, done, ran, skipped, log, delivery)
            except UploadsError as exc:  # the audit trail records how far it got
                exc.known = {**ctx.facts(), "processors": ran, "skipped": skipped}
                raise
        finally:
            if plaintext is not None:
                plaintext.discard()
            if ctx is not None and ctx.work_dir_made:
                _remove_job(job)
        result = ResultEvent(
            event_id=event.event_id,
            file_uuid=event.file_uuid,
            email=event.email,
            consumer=self._settings.nats_consumer_name,
            **ctx.facts(),
            processors=ran,
            skipped=skipped,
            outputs=ctx.outputs,
            processed_at=int(time.time() * 1000),
            # For the stages after this consumer (AFTER): the upload itself, and what came before.
            after=self._settings.after,
            upload=event,
            upstream=dict(upstream),
        ).published()
        result_seq = await self._publish_result(result)
        # Where it was, for `trace` and the console: the message it came in, and its result event.
        where = Where(delivery.stream, delivery.seq, result_seq, int(time.time() * 1000), event.event_id)
        with tracing.span("idempotency record"):
            await self._ledger.mark(key, where if delivery.stream else None, event.file_uuid)
        return Processed(result)

    def _job_dir(self) -> Path:
        """The path of this message's work folder, made only if a processor asks for it
        (`ctx.work_dir`): most chains never do. Names come from a per-process random prefix and a
        counter: unique among replicas sharing the folder, and cheaper than asking `tempfile` for
        fresh randomness for every upload."""
        return self.work_dir / f"job-{self.work.prefix}-{next(self._jobs)}"

    def _plaintext_file(self, dek: bytes, metadata: EnvelopeMetadata, job: Path) -> PlaintextFile:
        """The (empty) plaintext file for this message, named after its work folder."""
        try:
            return PlaintextFile(self.work_dir, dek, metadata, self._metrics, name=f"plain-{job.name[4:]}.part")
        except OSError as exc:  # the work folder itself: full disk, permissions
            raise RetryableError(f"work directory {self.work_dir}: {exc.strerror or exc}") from None

    async def _run_chain(
        self,
        ctx: ProcessingContext,
        key: str,
        done: dict[str, dict[str, Any]],
        ran: list[str],
        skipped: list[str],
        log: Any,
        delivery: Delivery,
    ) -> None:
        """Each step in turn; `ran` and `skipped` grow as they go (so they say how far a failure got)."""
        kind = ctx.facts()["content_type"]  # sniffed here, or by a stage before this one
        if self._allowed_types and kind is not None and not matches_any(kind, self._allowed_types):
            raise PermanentError(
                ErrorClass.TYPE_NOT_ALLOWED,
                f"content type {kind} is not allowed (ALLOWED_CONTENT_TYPES={','.join(self._allowed_types)})",
            )
        outcomes = self._metrics.processor_outcomes
        for processor in self._processors:
            if processor.name in done:  # completed on an earlier delivery: its effect is not repeated
                ctx.outputs[processor.name] = done[processor.name]
                ran.append(processor.name)
                ctx.log.info("step already done; not repeated", processor=processor.name)
                continue
            if not processor.applies_to(kind):
                skipped.append(processor.name)
                ctx.skipped[processor.name] = f"not for content type {kind}"
                outcomes.labels(processor.name, "skipped").inc()
                continue
            try:
                with tracing.span("processor", processor.name):
                    await self._run_processor(processor, ctx, log)
            except StepSkipped:  # the processor found the upload is not for it: as if its types did not match
                skipped.append(processor.name)
                continue
            except ProcessorTimeout as timeout:  # counted, so that settler.decide can end it
                await self._count_timeout(timeout, key, processor.name, delivery)
                raise
            if processor.external_effect:
                with tracing.span("checkpoint", processor.name):
                    await self._ledger.record_step(key, processor.name, ctx.outputs.get(processor.name, {}))
            try:
                await processor.recorded(ctx)
            except Exception as exc:  # noqa: BLE001 - the step is done and recorded; it is not undone
                ctx.log.error("a processor's action after its step failed", error=describe(exc))
            ran.append(processor.name)

    async def _count_timeout(self, timeout: ProcessorTimeout, key: str, step: str, delivery: Delivery) -> None:
        """How often `step` has timed out on this upload, this time included: counted in the idempotency
        bucket for this message (a replayed message starts afresh); without a bucket, the message's
        delivery count stands in for it (the server's, so replicas and restarts agree as well)."""
        timeout.step = step
        timeout.retries = self._settings.processor_timeout_retries
        counted = await self._ledger.count_timeout(key, step, delivery.origin)
        timeout.timeouts = counted if counted is not None else delivery.num_delivered

    async def _run_processor(self, processor: LoadedProcessor, ctx: ProcessingContext, log: Any) -> None:
        ctx.current = processor.name
        ctx.log = log.bind(processor=processor.name)
        began = time.monotonic()
        outcome = "ok"
        try:
            await processor.run(ctx)
        except StepSkipped as skip:
            outcome = "skipped"
            ctx.outputs.pop(processor.name, None)
            ctx.skipped[processor.name] = skip.reason
            ctx.log.info("step skipped", reason=skip.reason)
            raise
        except ResourceLimit:  # the upload over a limit on its work
            outcome = "limit"
            raise
        except PermanentError:
            outcome = "failed"
            raise
        except ProcessorTimeout:  # out of time: retried a few times, told apart from endpoints that are down
            outcome = "timeout"
            raise
        except UploadsError:
            outcome = "retry"
            raise
        except Exception as exc:
            outcome = "retry"
            raise RetryableError(f"processor {processor.name} raised {describe(exc)}") from exc
        finally:
            self._metrics.processor_duration.labels(processor.name).observe(time.monotonic() - began)
            self._metrics.processor_outcomes.labels(processor.name, outcome).inc()

    async def _publish_result(self, result: dict[str, Any]) -> int | None:
        """Its sequence in the result stream; None when results are off."""
        subject = self._settings.result_subject
        if not subject or self._publish is None:
            return None
        body = json.dumps(result, ensure_ascii=False).encode("utf-8")
        # One result per upload per consumer: the consumer's name keeps another's from passing for a duplicate.
        headers = ResultHeaders(msg_id=f"{result['event_id']}:{result['consumer']}:processed")
        return await self._publish(subject, body, headers.headers())
