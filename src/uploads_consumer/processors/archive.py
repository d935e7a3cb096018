"""The built-in `archive` processor: a verified copy of the stored upload in another bucket.

It copies the encrypted object and its `metadata.json`, byte for byte, to ARCHIVE_BUCKET under
ARCHIVE_PREFIX. It needs the stored object only (`Need.OBJECT`): nothing is decrypted.

- Within one S3 service the copy is made by the service (CopyObject; UploadPartCopy in parts at
  or above ARCHIVE_MULTIPART_THRESHOLD, 5 GiB by default, CopyObject's limit): no byte passes
  through the daemon. With ARCHIVE_ENDPOINT_URL (another S3 service) the bytes are streamed
  through it, one part in memory at a time.
- Every copy is verified before the step counts as done: its size, and its ETag against the one
  the copy must have (the source's MD5; for a copy in parts, the MD5 of the parts' MD5s).
- Idempotent: a copy of this upload already at the key (same size, and marked with the source's
  ETag in `x-amz-meta-uploads-consumer-source-etag`) is success without copying again; any other
  object there is processor_failed, unless ARCHIVE_OVERWRITE.
- ARCHIVE_DELETE_SOURCE deletes the source object and metadata once both copies are verified and
  the step is recorded (`recorded()`): a redelivery never finds a half-deleted source.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, SecretStr, field_validator

from uploads_consumer.config import PositiveSize, endpoint_url_problem
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError, describe
from uploads_consumer.observability import get_logger
from uploads_consumer.permissions import AwsGrant
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    variable_for,
)

log = get_logger("uploads_consumer.processors.archive")

MARKER = "uploads-consumer-source-etag"
"""User metadata on every copy: the ETag of the object it copies (how a redelivery knows its own copy)."""
MIN_PART = 5 << 20  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
STREAM_PART = 8 << 20  # parts of a copy streamed between services: what is held in memory at once
DELETE_ATTEMPTS = 3
START_CHECK_TIMEOUT = 10.0  # for the HeadBucket of ARCHIVE_BUCKET at start
STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "REDUCED_REDUNDANCY",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER",
        "DEEP_ARCHIVE",
        "OUTPOSTS",
        "GLACIER_IR",
        "SNOW",
        "EXPRESS_ONEZONE",
    }
)
# Headers of the source that travel with a copy (besides the user metadata).
_CARRIED = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")


class ArchiveSettings(ProcessorSettings):
    bucket: str = Field(description="the bucket the copies go to")
    prefix: str = Field(default="", description="put before each key; empty keeps the upload's own keys")
    storage_class: str | None = Field(
        default=None, description="e.g. STANDARD_IA, GLACIER_IR, DEEP_ARCHIVE; unset: the bucket's default"
    )
    tags: str = Field(default="", description="tags of every copy, key=value,key=value")
    overwrite: bool = Field(default=False, description="replace another object found at a copy's key")
    delete_source: bool = Field(
        default=False, description="delete the upload's object and metadata once both copies are verified"
    )
    multipart_threshold: PositiveSize = Field(
        default=5 << 30, description="copies this large or larger are made in parts (UploadPartCopy)"
    )
    part_size: PositiveSize = Field(default=512 << 20, description="size of each part of such a copy (5MiB-5GiB)")
    endpoint_url: str | None = Field(
        default=None, description="another S3 service for the copies; the bytes are then streamed through"
    )
    region: str | None = Field(default=None, description="its region")
    access_key_id: str | None = Field(default=None, description="its credentials; unset: the AWS chain")
    secret_access_key: SecretStr | None = Field(default=None, description="its credentials")
    path_style_access: bool = Field(default=False, description="path-style addressing there (MinIO)")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value and (problem := endpoint_url_problem(value)):
            raise ValueError(problem.replace("S3_BUCKET_NAME", "ARCHIVE_BUCKET"))
        return value

    @field_validator("storage_class")
    @classmethod
    def _storage_class(cls, value: str | None) -> str | None:
        if value is not None and value.upper() not in STORAGE_CLASSES:
            raise ValueError(f"must be one of {', '.join(sorted(STORAGE_CLASSES))}")
        return value.upper() if value else None

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: str) -> str:
        tag_set(value)
        return value

    @field_validator("part_size")
    @classmethod
    def _part_size(cls, value: int) -> int:
        if not MIN_PART <= value <= 5 << 30:
            raise ValueError("must be between 5MiB and 5GiB (S3's limits for a part)")
        return value

    @field_validator("multipart_threshold")
    @classmethod
    def _threshold(cls, value: int) -> int:
        if value > 5 << 30:
            raise ValueError("must be at most 5GiB (CopyObject copies no more at once)")
        return value


def tag_set(text: str) -> dict[str, str]:
    """`key=value,key=value` → the tags; S3 allows at most 10 per object."""
    tags: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs separated by commas, not {item!r}")
        tags[key.strip()] = value.strip()
    if len(tags) > 10:
        raise ValueError("S3 keeps at most 10 tags per object")
    return tags


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives an object completed from these parts: MD5 of their MD5s, then `-` and their count."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def part_ranges(size: int, part: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges of `size` bytes in parts of `part` (more if 10,000 parts would not hold it)."""
    part = max(part, math.ceil(size / MAX_PARTS))
    return [(start, min(start + part, size) - 1) for start in range(0, size, part)]


@dataclass(frozen=True)
class Source:
    bucket: str
    key: str
    size: int
    etag: str
    carried: dict[str, Any]
    """ContentType and friends, and the user metadata, for the copy."""


class Archive(Processor):
    """Copy the stored upload (encrypted object and metadata.json, unchanged) to ARCHIVE_BUCKET, verified.

    Server-side within one S3 service, streamed between two; a copy already there is not made again;
    ARCHIVE_DELETE_SOURCE removes the source only after both copies are verified.
    """

    settings_class = ArchiveSettings
    needs = Need.OBJECT
    external_effect = True
    settings: ArchiveSettings

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        self._tagging = "&".join(
            f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in tag_set(self.settings.tags).items()
        )
        self._stack: Any = None
        self._remote: Any = None  # the other service's client, with ARCHIVE_ENDPOINT_URL

    async def start(self) -> None:
        if self.env.s3 is None:
            raise ConfigError("PROCESSORS", f"{self.name} needs the daemon's S3 client, which this process lacks")
        s = self.settings
        if s.endpoint_url:
            session = aioboto3.Session(
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
                region_name=s.region or "us-east-1",
            )
            config = Config(
                retries={"mode": "standard", "max_attempts": 3},
                s3={"addressing_style": "path" if s.path_style_access else "auto"},
            )
            self._stack = contextlib.AsyncExitStack()
            self._remote = await self._stack.enter_async_context(
                session.client("s3", endpoint_url=s.endpoint_url, config=config)
            )
        await self._check_bucket()

    async def _check_bucket(self) -> None:
        """ARCHIVE_BUCKET must exist before the first upload: a bucket that does not is exit 2 at start,
        not every upload retried for ever on NoSuchBucket. The check is a HeadBucket; a store that does
        not answer it (down, or no permission to ask) is only warned about: the uploads will say."""
        variable = variable_for(self.name, "bucket")
        where = variable_for(self.name, "endpoint_url") if self.settings.endpoint_url else "S3_ENDPOINT_URL"
        try:
            await asyncio.wait_for(self._target_client().head_bucket(Bucket=self.settings.bucket), START_CHECK_TIMEOUT)
        except ClientError as exc:
            if s3_error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(
                    variable,
                    f"bucket {self.settings.bucket} does not exist at the S3 service of {where}: create it, "
                    f"or set {variable} to one that exists",
                ) from None
            log.warning("archive: could not check the bucket at start", variable=variable, error=describe(exc))
        except Exception as exc:  # noqa: BLE001 - S3 unreachable now: the uploads are retried until it answers
            log.warning("archive: could not check the bucket at start", variable=variable, error=describe(exc))

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = self._remote = None

    def _source_client(self) -> Any:
        assert self.env.s3 is not None
        return self.env.s3()

    def _target_client(self) -> Any:
        return self._remote if self._remote is not None else self._source_client()

    def _target_key(self, key: str) -> str:
        return self.settings.prefix + key

    async def run(self, ctx: ProcessingContext) -> None:
        stored = ctx.stored
        s = self.settings
        if self._remote is None and s.bucket == stored.bucket and not s.prefix:
            raise PermanentError(
                ErrorClass.PROCESSOR_FAILED,
                f"archive: {variable_for(self.name, 'bucket')} is the upload's own bucket and "
                f"{variable_for(self.name, 'prefix')} is empty: the copy would be the upload itself",
            )
        data = await self._source(stored.bucket, stored.key, stored.etag)
        if data.size != stored.size:
            raise RetryableError(f"archive: s3://{stored.bucket}/{stored.key} changed while being archived")
        meta = await self._source(stored.bucket, stored.metadata_key)
        copies = [await self._archive(data), await self._archive(meta)]
        ctx.report("bucket", s.bucket)
        ctx.report("key", self._target_key(data.key))
        ctx.report("metadata_key", self._target_key(meta.key))
        ctx.report("size", data.size)
        ctx.report("etag", copies[0]["etag"])
        ctx.report("storage_class", copies[0]["storage_class"])
        ctx.report("copied", [c["how"] for c in copies])

    @property
    def removes_upload(self) -> bool:
        return self.settings.delete_source

    def grants(self, uploads: tuple[str, ...]) -> list[AwsGrant]:
        s = self.settings
        elsewhere = f" (on {s.endpoint_url}, with ARCHIVE_ACCESS_KEY_ID's credentials)" if s.endpoint_url else ""
        target = (
            "s3:PutObject",
            "s3:GetObject",
            "s3:AbortMultipartUpload",
            *(("s3:PutObjectTagging",) if s.tags else ()),
        )
        out = [
            AwsGrant(
                target, (f"arn:aws:s3:::{s.bucket}/*",), f"archive: the copies, and whether one is there{elsewhere}"
            ),
            AwsGrant(("s3:ListBucket",), (f"arn:aws:s3:::{s.bucket}",), f"archive: a copy not there is 404{elsewhere}"),
        ]
        if s.delete_source:
            out.append(AwsGrant(("s3:DeleteObject",), uploads, "archive: ARCHIVE_DELETE_SOURCE"))
        return out

    async def recorded(self, ctx: ProcessingContext) -> None:
        if not self.settings.delete_source:
            return
        stored = ctx.stored
        keys = [stored.key, stored.metadata_key]
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            try:
                response = await self._source_client().delete_objects(
                    Bucket=stored.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                )
                errors = response.get("Errors") or []
                if not errors:
                    ctx.report("source_deleted", True)
                    ctx.log.info("archive: source deleted", bucket=stored.bucket, keys=keys)
                    return
                problem = "; ".join(f"{e.get('Key')}: {e.get('Code')}" for e in errors)
            except (ClientError, BotoCoreError, OSError) as exc:
                problem = describe(exc)
            if attempt < DELETE_ATTEMPTS:
                await asyncio.sleep(0.5 * attempt)
        # The copies are verified and recorded: the upload is safe; only the source stays behind.
        ctx.report("source_deleted", False)
        ctx.log.warning("archive: the source could not be deleted; it stays", bucket=stored.bucket, error=problem)

    # -- one object

    async def _source(self, bucket: str, key: str, etag: str | None = None) -> Source:
        try:
            head = await self._source_client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise _mapped(exc, f"archive: head s3://{bucket}/{key}", source=True) from None
        except (BotoCoreError, OSError) as exc:
            raise RetryableError(f"archive: head s3://{bucket}/{key}: {describe(exc)}") from None
        found = str(head.get("ETag", "")).strip('"')
        if etag is not None and found != etag:
            raise RetryableError(f"archive: s3://{bucket}/{key} changed while being archived")
        carried = {k: head[k] for k in _CARRIED if head.get(k)}
        carried["Metadata"] = dict(head.get("Metadata") or {})
        return Source(bucket, key, int(head["ContentLength"]), found, carried)

    async def _archive(self, src: Source) -> dict[str, Any]:
        """Copy one object unless its copy is there; verify; returns how, the copy's ETag and storage class."""
        s = self.settings
        key = self._target_key(src.key)
        where = f"s3://{s.bucket}/{key}"
        existing = await self._head_target(key)
        if existing is not None:
            if _copy_of(existing, src):
                return {"how": "already there", "etag": _etag(existing), "storage_class": _storage(existing)}
            if not s.overwrite:
                raise PermanentError(
                    ErrorClass.PROCESSOR_FAILED,
                    f"archive: another object, not a copy of this upload, is at {where} "
                    f"({existing.get('ContentLength')} bytes); {variable_for(self.name, 'overwrite')}=true replaces it",
                )
        extra: dict[str, Any] = {**src.carried, "Metadata": {**src.carried["Metadata"], MARKER: src.etag}}
        if s.storage_class:
            extra["StorageClass"] = s.storage_class
        if self._tagging:
            extra["Tagging"] = self._tagging
        try:
            if self._remote is not None:
                how, expected = "streamed", await self._stream(src, key, extra)
            elif src.size >= s.multipart_threshold:
                how, expected = "copied in parts", await self._copy_in_parts(src, key, extra)
            else:
                how, expected = "copied", await self._copy_whole(src, key, extra)
        except ClientError as exc:
            raise _mapped(exc, f"archive: copy to {where}", source=False) from None
        except (BotoCoreError, OSError) as exc:
            raise RetryableError(f"archive: copy to {where}: {describe(exc)}") from None
        copy = await self._head_target(key)
        if copy is None or int(copy["ContentLength"]) != src.size or _etag(copy) != expected:
            found = "nothing" if copy is None else f"{copy['ContentLength']} bytes, ETag {_etag(copy)}"
            raise RetryableError(
                f"archive: the copy at {where} does not verify: {found}; expected {src.size} bytes, ETag {expected}"
            )
        if s.storage_class and _storage(copy) != s.storage_class:
            log.warning("archive: the copy's storage class is not the one asked for", asked=s.storage_class)
        return {"how": how, "etag": expected, "storage_class": _storage(copy)}

    async def _head_target(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = await self._target_client().head_object(Bucket=self.settings.bucket, Key=key)
            return head
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _mapped(exc, f"archive: head s3://{self.settings.bucket}/{key}", source=False) from None
        except (BotoCoreError, OSError) as exc:
            raise RetryableError(f"archive: head s3://{self.settings.bucket}/{key}: {describe(exc)}") from None

    async def _copy_whole(self, src: Source, key: str, extra: dict[str, Any]) -> str:
        """CopyObject: the service copies the bytes; the copy's ETag is the source's MD5."""
        response = await self._source_client().copy_object(
            Bucket=self.settings.bucket,
            Key=key,
            CopySource={"Bucket": src.bucket, "Key": src.key},
            CopySourceIfMatch=f'"{src.etag}"',
            MetadataDirective="REPLACE",  # so the marker is added; the source's headers are carried over
            **({"TaggingDirective": "REPLACE"} if "Tagging" in extra else {}),
            **extra,
        )
        etag = str(response["CopyObjectResult"]["ETag"]).strip('"')
        return src.etag if "-" not in src.etag else etag

    async def _copy_in_parts(self, src: Source, key: str, extra: dict[str, Any]) -> str:
        """UploadPartCopy: the service copies each range; the copy's ETag follows from the parts' MD5s."""
        client, bucket = self._source_client(), self.settings.bucket
        upload = await client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, (first, last) in enumerate(part_ranges(src.size, self.settings.part_size), 1):
                response = await client.upload_part_copy(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": src.bucket, "Key": src.key},
                    CopySourceRange=f"bytes={first}-{last}",
                    CopySourceIfMatch=f'"{src.etag}"',
                )
                parts.append({"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]})
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await _abort(client, bucket, key, upload_id)
            raise
        return multipart_etag([bytes.fromhex(p["ETag"].strip('"')) for p in parts])

    async def _stream(self, src: Source, key: str, extra: dict[str, Any]) -> str:
        """Between two services: GET from the upload's, PUT (in parts when large) to the other; one part
        in memory at a time. Each part carries its MD5 (the service checks it); the whole stream's MD5
        is checked against the source's ETag when that is an MD5."""
        remote, bucket = self._target_client(), self.settings.bucket
        response = await self._source_client().get_object(Bucket=src.bucket, Key=src.key, IfMatch=f'"{src.etag}"')
        body = response["Body"]
        whole = hashlib.md5()
        part = max(STREAM_PART, math.ceil(src.size / MAX_PARTS))
        try:
            if src.size <= part:
                data = await _read(body, src.size)
                whole.update(data)
                digest = hashlib.md5(data).digest()
                await remote.put_object(
                    Bucket=bucket, Key=key, Body=data, ContentMD5=base64.b64encode(digest).decode(), **extra
                )
                expected = digest.hex()
            else:
                expected = await self._stream_parts(body, remote, bucket, key, extra, part, whole)
        finally:
            body.close()
        if "-" not in src.etag and whole.hexdigest() != src.etag:
            raise RetryableError(f"archive: the bytes read from s3://{src.bucket}/{src.key} are not its content")
        return expected

    async def _stream_parts(
        self, body: Any, remote: Any, bucket: str, key: str, extra: dict[str, Any], part: int, whole: Any
    ) -> str:
        upload = await remote.create_multipart_upload(Bucket=bucket, Key=key, **extra)
        upload_id = upload["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            digests: list[bytes] = []
            while data := await _read(body, part):
                whole.update(data)
                digest = hashlib.md5(data).digest()
                response = await remote.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=len(parts) + 1,
                    Body=data,
                    ContentMD5=base64.b64encode(digest).decode(),
                )
                parts.append({"PartNumber": len(parts) + 1, "ETag": response["ETag"]})
                digests.append(digest)
                del data
            await remote.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await _abort(remote, bucket, key, upload_id)
            raise
        return multipart_etag(digests)


async def _read(body: Any, size: int) -> bytes:
    """Up to `size` bytes of a streaming body (fewer only at its end)."""
    chunks, have = [], 0
    while have < size and (chunk := await body.read(min(size - have, 1 << 20))):
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


async def _abort(client: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort an unfinished upload (its parts would be billed for ever); never masks the first error."""
    try:
        await asyncio.shield(client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
    except Exception as exc:  # noqa: BLE001
        log.warning("archive: could not abort an unfinished upload", key=key, error=describe(exc))


def _etag(head: dict[str, Any]) -> str:
    return str(head.get("ETag", "")).strip('"')


def _storage(head: dict[str, Any]) -> str:
    return str(head.get("StorageClass") or "STANDARD")


def _copy_of(head: dict[str, Any], src: Source) -> bool:
    """A copy of `src` made by us (marked with its ETag), or byte-identical by size and MD5 ETag."""
    if int(head.get("ContentLength", -1)) != src.size:
        return False
    marked = (head.get("Metadata") or {}).get(MARKER)
    return marked == src.etag or ("-" not in src.etag and _etag(head) == src.etag)


def s3_error_code(exc: ClientError) -> str:
    """S3's error code (`NoSuchKey`), or its HTTP status where the answer had no body (a HEAD's `404`)."""
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _mapped(exc: ClientError, what: str, source: bool) -> PermanentError | RetryableError:
    """The source gone is not_found; anything else (a missing or forbidden archive bucket, throttling,
    a precondition failed because the source changed) is retried, with S3's code in the reason."""
    error = exc.response.get("Error", {})
    code = s3_error_code(exc)
    if source and code in ("404", "NoSuchKey", "NotFound"):
        return PermanentError(ErrorClass.NOT_FOUND, f"{what}: {code}")
    return RetryableError(f"{what}: S3 error {code} {error.get('Message', '')}".strip())
