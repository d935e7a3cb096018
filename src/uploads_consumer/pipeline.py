"""Steps 3–7 of docs/contract.md for one event: check, download, unwrap, stream-decrypt, process, publish the result."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from uploads_consumer.config import Settings
from uploads_consumer.envelope import (
    MAX_METADATA_BYTES,
    OVERHEAD,
    EnvelopeMetadata,
    MasterKeyRing,
    ObjectDecryptor,
    parse_metadata,
)
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, UploadsError, describe
from uploads_consumer.events import FileUploadEvent, check_event
from uploads_consumer.observability import Metrics
from uploads_consumer.processors import NamedProcessor, ProcessingContext
from uploads_consumer.storage import ObjectStore

WORK_DIR_NAME = ".incoming"  # beside the saved files, so `save` can hard-link instead of copying
STALE_AFTER = 6 * 3600.0


class PlaintextFile:
    """An ObjectSink that decrypts into a private temporary file and hashes the plaintext.

    Each `start()` begins again from nothing (a fresh decryptor and an empty file), which is what
    a restarted download needs. Nothing here is trusted until `verify()` has checked the tag.
    """

    def __init__(self, work_dir: Path, dek: bytes, metadata: EnvelopeMetadata, metrics: Metrics) -> None:
        fd, name = tempfile.mkstemp(dir=work_dir, prefix="plain-", suffix=".part")  # mode 0600
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._dek = dek
        self._metadata = metadata
        self._metrics = metrics
        self._decryptor = ObjectDecryptor(dek)
        self._digest = hashlib.sha256()

    def start(self, length: int) -> None:
        if length < OVERHEAD:
            raise PermanentError(
                ErrorClass.BAD_ENVELOPE, f"object is {length} bytes, shorter than {OVERHEAD} (IV and tag)"
            )
        if length != self._metadata.encrypted_size:
            raise PermanentError(
                ErrorClass.BAD_ENVELOPE,
                f"object is {length} bytes but metadata says encrypted_size {self._metadata.encrypted_size}",
            )
        self._file.seek(0)
        self._file.truncate()
        self._decryptor = ObjectDecryptor(self._dek)
        self._digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        plain = self._decryptor.feed(chunk)
        if plain:
            self._digest.update(plain)
            self._file.write(plain)

    def verify(self) -> tuple[int, str]:
        """Check the GCM tag; returns (size, sha256 hex). Durability is the business of whoever
        keeps the file (`save` fsyncs it in a worker thread, not here on the event loop)."""
        self._decryptor.finalize()
        size = self._decryptor.plaintext_size
        self._metrics.bytes_decrypted.inc(size)
        return size, self._digest.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Pipeline:
    """Everything between "this is a new event" and "settle it", reusable by the daemon and the CLI."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        keyring: MasterKeyRing,
        processors: list[NamedProcessor],
        js: JetStreamContext | None,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyring = keyring
        self._processors = processors
        self._js = js
        self._metrics = metrics
        self._allowed = settings.allowed_buckets
        root = Path(settings.decrypt_download_path)
        root.mkdir(
            parents=True, exist_ok=True, mode=0o700
        )  # private when we create it (mkdir's parents=True would not)
        self.work_dir = root / WORK_DIR_NAME
        self.work_dir.mkdir(exist_ok=True, mode=0o700)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Plaintext left by a process that was killed. A live download rewrites its file every
        second or so; one untouched for STALE_AFTER is nobody's (replicas may share the folder)."""
        cutoff = time.time() - STALE_AFTER
        for path in self.work_dir.glob("plain-*.part"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    async def run(self, event: FileUploadEvent, log: Any) -> dict[str, Any]:
        """Process one event; returns the result event. Raises the project's errors only."""
        check_event(event, self._allowed)
        # The object's GET goes out with the metadata's: one round trip to S3 instead of two in a
        # row. Its body is not read until the metadata has been checked and the key unwrapped.
        ahead = self._store.request_ahead(event.bucket_name, event.s3_data_key)
        plaintext: PlaintextFile | None = None
        try:
            metadata = parse_metadata(
                await self._store.read_small(event.bucket_name, event.s3_metadata_key, MAX_METADATA_BYTES)
            )
            if metadata.original_size > self._settings.max_file_size:
                raise PermanentError(
                    ErrorClass.TOO_LARGE,
                    f"metadata says {metadata.original_size} bytes, over MAX_FILE_SIZE ({self._settings.max_file_size})",
                )
            dek = self._keyring.unwrap(metadata.kek)
            plaintext = PlaintextFile(self.work_dir, dek, metadata, self._metrics)
            await self._store.download(
                event.bucket_name, event.s3_data_key, plaintext, self._settings.max_file_size, ahead
            )
            size, sha256 = plaintext.verify()
            ctx = ProcessingContext(
                event=event,
                metadata=metadata,
                plaintext_path=plaintext.path,
                size=size,
                sha256=sha256,
                settings=self._settings,
                log=log,
            )
            for processor in self._processors:
                await self._run_processor(processor, ctx)
        finally:
            ahead.discard()
            if plaintext is not None:
                plaintext.discard()
        result = {
            "event_id": event.event_id,
            "file_uuid": event.file_uuid,
            "email": event.email,
            "status": "processed",
            "original_filename": metadata.clean_filename,
            "size": size,
            "sha256": sha256,
            "processors": [p.name for p in self._processors],
            "outputs": ctx.outputs,
            "processed_at": int(time.time() * 1000),
        }
        await self._publish_result(result)
        return result

    async def _run_processor(self, processor: NamedProcessor, ctx: ProcessingContext) -> None:
        try:
            await processor.run(ctx)
        except UploadsError:
            raise
        except Exception as exc:
            raise RetryableError(f"processor {processor.name} raised {describe(exc)}") from exc

    async def _publish_result(self, result: dict[str, Any]) -> None:
        subject = self._settings.nats_result_subject
        if not subject or self._js is None:
            return
        try:
            await self._js.publish(
                subject,
                json.dumps(result, ensure_ascii=False).encode("utf-8"),
                headers={"Nats-Msg-Id": f"{result['event_id']}:processed"},
                timeout=10,
            )
        except Exception as exc:
            raise RetryableError(f"publishing the result event failed: {describe(exc)}") from exc
