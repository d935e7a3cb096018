"""Publishes uploads exactly as the upload backend does: encrypted object, metadata.json, event."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from nats.js import JetStreamContext

from uploads_consumer import tracing
from uploads_consumer.envelope import ENCRYPTED_SUFFIX, MasterKeyRing, encrypt_stream, metadata_json
from uploads_consumer.events import FileUploadEvent
from uploads_consumer.storage import ObjectStore


def event_json(event: FileUploadEvent) -> bytes:
    """The backend's compact JSON, in its field order."""
    return json.dumps(event.model_dump(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _encrypt_file(path: Path, encrypted: IO[bytes], dek: bytes) -> int:
    with open(path, "rb") as src:
        size, _ = encrypt_stream(src, encrypted, dek)
    encrypted.flush()
    return size


async def upload_file(
    store: ObjectStore, keyring: MasterKeyRing, path: Path, email: str, bucket: str, name: str | None = None
) -> FileUploadEvent:
    """Encrypt `path` with a fresh data key and upload object and metadata; returns the event to publish."""
    name = name or path.name
    file_uuid = str(uuid.uuid4())
    prefix = f"uploads/{email}/{file_uuid}/"
    dek = os.urandom(32)
    now_ms = int(time.time() * 1000)
    with tempfile.NamedTemporaryFile(prefix="upload-", suffix=".enc") as encrypted:
        size = await asyncio.to_thread(_encrypt_file, path, encrypted, dek)
        await store.put_file(bucket, prefix + name + ".enc", Path(encrypted.name))
    meta = metadata_json(keyring.wrap(dek), name + ENCRYPTED_SUFFIX, size, now_ms)
    await store.put_bytes(bucket, prefix + "metadata.json", meta)
    return FileUploadEvent(
        event_id=str(uuid.uuid4()),
        email=email,
        file_uuid=file_uuid,
        s3_data_key=prefix + name + ".enc",
        s3_metadata_key=prefix + "metadata.json",
        bucket_name=bucket,
        timestamp=now_ms,
    )


async def publish_event(js: JetStreamContext, subject: str, event: FileUploadEvent) -> None:
    body = event_json(event)
    with tracing.producer(subject, len(body), event.event_id):  # the consumer's spans continue this trace
        await js.publish(subject, body, headers=tracing.inject({"Nats-Msg-Id": event.event_id}), timeout=10)
