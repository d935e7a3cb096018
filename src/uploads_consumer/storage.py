"""S3 access: one long-lived aioboto3 client, streaming reads, and errors mapped to outcomes."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Protocol

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    ResponseStreamingError,
)

from uploads_consumer.config import Settings
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, describe

CHUNK_SIZE = 1 << 20
BODY_ATTEMPTS = 3  # botocore does not retry a body that breaks mid-stream; we start over this often
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}

# A body that breaks half-way surfaces as one of these.
_BROKEN_BODY = (
    ResponseStreamingError,
    IncompleteReadError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
)


class ObjectRequest:
    """A GET sent ahead of need. `discard()` releases it whether it finished, failed or is pending."""

    def __init__(self, task: asyncio.Future[Any]) -> None:
        self._task = task

    async def response(self) -> Any:
        return await self._task

    def discard(self) -> None:
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled() and self._task.exception() is None:
            self._task.result()["Body"].close()  # unread: close rather than leave it half-read


class ObjectSink(Protocol):
    """Receives one object's bytes; `start` is called again whenever the download starts over."""

    def start(self, length: int) -> None: ...

    def write(self, chunk: bytes) -> None: ...


def map_s3_error(exc: BaseException, what: str) -> Exception:
    """Any S3 failure → PermanentError(not_found) or RetryableError, with a one-line reason."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_FOUND:
            return PermanentError(ErrorClass.NOT_FOUND, f"{what}: {code}")
        return RetryableError(f"{what}: S3 error {code} {err.get('Message', '')}".strip())
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)):
        return RetryableError(f"{what}: {describe(exc)}")
    return RetryableError(f"{what}: unexpected {describe(exc)}")


class ObjectStore:
    """The S3 client the daemon and the tools share. Use as `async with ObjectStore(settings) as s3`."""

    def __init__(self, settings: Settings, pool_size: int | None = None) -> None:
        self._settings = settings
        self._pool = max(pool_size or 0, 2 * settings.max_in_flight, 10)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> ObjectStore:
        s = self._settings
        session = aioboto3.Session(
            aws_access_key_id=s.aws_access_key_id,
            aws_secret_access_key=s.aws_secret_access_key.get_secret_value() if s.aws_secret_access_key else None,
            region_name=s.aws_region,
        )
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=self._pool,
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path" if s.s3_path_style_access else "auto"},
            # Our requests are built by code, not users; and the GCM tag authenticates every byte
            # end to end, so S3's optional checksums add CPU without adding safety.
            parameter_validation=False,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = await self._stack.enter_async_context(
            session.client("s3", endpoint_url=s.s3_endpoint_url, config=config)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def read_small(self, bucket: str, key: str, limit: int, what: str = "metadata") -> bytes:
        """Read a small object whole; an object over `limit` is bad_envelope and is not read."""
        try:
            response = await self._client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                if response["ContentLength"] > limit:
                    raise PermanentError(
                        ErrorClass.BAD_ENVELOPE,
                        f"{what} is {response['ContentLength']} bytes, over the {limit} byte limit",
                    )
                data: bytes = await body.read()
                return data
            finally:
                body.close()
        except PermanentError:
            raise
        except Exception as exc:
            raise map_s3_error(exc, f"get {what} s3://{bucket}/{key}") from exc

    async def _get_object(self, bucket: str, key: str) -> Any:
        try:
            return await self._client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise map_s3_error(exc, f"get object s3://{bucket}/{key}") from exc

    def request_ahead(self, bucket: str, key: str) -> ObjectRequest:
        """Send the GET now (e.g. while the metadata is read); read or discard its body later."""
        return ObjectRequest(asyncio.ensure_future(self._get_object(bucket, key)))

    async def download(
        self, bucket: str, key: str, sink: ObjectSink, max_size: int, ahead: ObjectRequest | None = None
    ) -> int:
        """Stream an object into `sink`, starting over (sink.start again) when the body breaks.

        Checks the size before reading a byte: over `max_size` is too_large. Returns the length.
        `ahead`, if given, is this object's GET already sent; it serves the first attempt.
        """
        where = f"s3://{bucket}/{key}"
        for attempt in range(1, BODY_ATTEMPTS + 1):
            response = (
                await ahead.response() if ahead is not None and attempt == 1 else await self._get_object(bucket, key)
            )
            length = int(response["ContentLength"])
            body = response["Body"]
            try:
                if length > max_size:
                    raise PermanentError(
                        ErrorClass.TOO_LARGE, f"object is {length} bytes, over MAX_FILE_SIZE ({max_size})"
                    )
                sink.start(length)
                try:
                    while chunk := await body.read(CHUNK_SIZE):
                        sink.write(chunk)
                    return length
                except _BROKEN_BODY as exc:
                    if attempt == BODY_ATTEMPTS:
                        raise RetryableError(
                            f"object body {where} broke {attempt} times, last: {type(exc).__name__}"
                        ) from exc
            finally:
                body.close()
        raise AssertionError("unreachable")

    async def put_file(self, bucket: str, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        await self._client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": content_type})

    async def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/json") -> None:
        await self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    async def ensure_bucket(self, bucket: str) -> None:
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError:
            await self._client.create_bucket(Bucket=bucket)
