"""The upload event the backend publishes, and the checks made on it before any S3 access."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator
from pydantic_core import ErrorDetails

from uploads_consumer.errors import ErrorClass, PermanentError

MAX_EVENT_BYTES = 64 * 1024
JAVA_LONG = 1 << 63  # the backend's timestamp is a Java long


class FileUploadEvent(BaseModel):
    """One upload, as the backend announces it. Unknown extra fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: StrictStr = Field(description="the event's id, a UUID", json_schema_extra={"format": "uuid"})
    email: StrictStr = Field(description="the uploader: one folder name of the object keys")
    file_uuid: StrictStr = Field(description="the upload's id, a UUID", json_schema_extra={"format": "uuid"})
    s3_data_key: StrictStr = Field(description="the encrypted object: uploads/{email}/{file_uuid}/{name}.enc")
    s3_metadata_key: StrictStr = Field(description="its envelope: uploads/{email}/{file_uuid}/metadata.json")
    bucket_name: StrictStr = Field(description="the bucket holding both")
    timestamp: StrictInt = Field(description="when the upload was stored, epoch milliseconds (a Java long)")

    @property
    def stored_name(self) -> str:
        """The upload's name as stored: the last part of `s3_data_key`, less `.enc` (no metadata read)."""
        return self.s3_data_key.rpartition("/")[2].removesuffix(".enc")

    @field_validator("event_id", "file_uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            raise ValueError("is not a UUID") from None
        # Canonical lower-case form: it is used as a key-value key and a folder name.
        return str(parsed)

    @field_validator("email", "bucket_name", "s3_data_key", "s3_metadata_key")
    @classmethod
    def _usable_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        try:  # JSON can carry lone surrogates ("\ud800"); they can be neither an S3 key nor a file name
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text") from None
        return value

    @field_validator("timestamp")
    @classmethod
    def _java_long(cls, value: int) -> int:
        if not -JAVA_LONG <= value < JAVA_LONG:
            raise ValueError("is out of range for epoch milliseconds")
        return value


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A message as the pipeline takes it: the upload, and — for a stage (AFTER) — what each stage
    before this consumer reported of it, by consumer name, nearest last (see `stages.parse_result`)."""

    event: FileUploadEvent
    upstream: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


Fetched = Literal["event", "object", "plaintext"]
SHA256_HEX = r"^[0-9a-f]{64}$"


class StageReport(BaseModel):
    """What one consumer reported of an upload: the part of its result event (`messages.ResultEvent`)
    that a stage after it keeps in `upstream`."""

    model_config = ConfigDict(frozen=True)

    fetched: Fetched = Field(description="what that consumer read of the upload")
    original_filename: str | None = Field(description="the clean file name; null when no one read the metadata")
    size: int | None = Field(ge=0, description="plaintext size in bytes; null when unknown")
    sha256: str | None = Field(pattern=SHA256_HEX, description="hex SHA-256 of the plaintext; null when unknown")
    content_type: str | None = Field(description="the detected content type; null when unknown")
    processors: list[str] = Field(description="the processors that applied, in chain order")
    skipped: list[str] = Field(description="the processors that did not apply, or skipped the upload")
    outputs: dict[str, dict[str, Any]] = Field(
        description="what each processor in `processors` reported, keyed by its name"
    )
    processed_at: int = Field(description="when that consumer finished, epoch milliseconds")


STAGE_FIELDS = tuple(StageReport.model_fields)
"""What a stage's `upstream` keeps of each earlier stage's result event."""


def _describe(error: ErrorDetails) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "body"
    return f"{where} {error['msg'].removeprefix('Value error, ')}"


def parse_event(body: bytes) -> FileUploadEvent:
    """Body → event. Plain and double-encoded JSON are both accepted; anything else is invalid_message."""
    if len(body) > MAX_EVENT_BYTES:
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE, f"body is {len(body)} bytes, over the {MAX_EVENT_BYTES} byte limit for an event"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(ErrorClass.INVALID_MESSAGE, "body is not UTF-8") from None
    try:
        data = json.loads(text)
        if isinstance(data, str):  # the backend's messaging connector double-encodes
            data = json.loads(data)
    except RecursionError:
        raise PermanentError(ErrorClass.INVALID_MESSAGE, "body is JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE, f"body is not JSON ({exc.msg} at position {exc.pos})"
        ) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python will convert
        raise PermanentError(ErrorClass.INVALID_MESSAGE, f"body is not usable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE, f"body is a JSON {type(data).__name__}, not an upload event object"
        )
    if "event_id" not in data and "s3_data_key" not in data:
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE,
            "not an upload event (no event_id or s3_data_key; e.g. the backend's startup test message)",
        )
    try:
        return FileUploadEvent.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_input=False, include_url=False)[:3])
        raise PermanentError(ErrorClass.INVALID_MESSAGE, f"not a valid upload event: {problems}") from None
    except RecursionError:
        raise PermanentError(ErrorClass.INVALID_MESSAGE, "body is JSON nested too deeply") from None


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def check_event(event: FileUploadEvent, allowed_buckets: Collection[str]) -> None:
    """The event may only point at its own folder in an allowed bucket; else forbidden."""
    if allowed_buckets and event.bucket_name not in allowed_buckets:
        raise PermanentError(
            ErrorClass.FORBIDDEN, f"bucket {event.bucket_name!r} is not allowed (S3_BUCKET_NAME / S3_ALLOWED_BUCKETS)"
        )
    # The email names one folder: with a separator, `.`/`..` or control characters, "its own
    # folder" would be some other folder (or none an S3 key or a file name can be).
    if any(c in event.email for c in "/\\") or event.email in (".", "..") or _has_control(event.email):
        raise PermanentError(ErrorClass.FORBIDDEN, f"email {event.email!r} is not a single folder name")
    prefix = f"uploads/{event.email}/{event.file_uuid}/"
    for field in ("s3_data_key", "s3_metadata_key"):
        key: str = getattr(event, field)
        if _has_control(key):
            raise PermanentError(ErrorClass.FORBIDDEN, f"{field} {key!r} contains control characters")
        head, rest = key[: len(prefix)], key[len(prefix) :]
        # The email is compared case-insensitively; file_uuid is canonical lower case, the key may not be.
        if head.lower() != prefix.lower() or not rest or "/" in rest or rest in (".", ".."):
            raise PermanentError(ErrorClass.FORBIDDEN, f"{field} {key!r} is not a file directly under {prefix}")
    if not event.s3_metadata_key.endswith("/metadata.json"):
        raise PermanentError(
            ErrorClass.FORBIDDEN, f"s3_metadata_key {event.s3_metadata_key!r} does not end in metadata.json"
        )
    if event.s3_data_key == event.s3_metadata_key:
        raise PermanentError(ErrorClass.FORBIDDEN, "s3_data_key and s3_metadata_key are the same object")


def parse_result(body: bytes, after: str) -> Incoming:
    """A result event of consumer `after` → the upload it completed, with the stages before this one.

    Anything else on the stage's subjects — a result of another consumer, one without the upload (from a
    version before stages), not JSON — is `invalid_message`, with what it is."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise PermanentError(ErrorClass.INVALID_MESSAGE, f"not a result event of {after} (not JSON)") from None
    if not isinstance(data, dict) or data.get("status") != "processed":
        raise PermanentError(ErrorClass.INVALID_MESSAGE, f"not a result event of {after}")
    if data.get("consumer") != after:
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE,
            f"a result event of {str(data.get('consumer'))[:100]!r}, not of {after}, this stage's upstream",
        )
    upload = data.get("upload")
    if not isinstance(upload, dict):
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE,
            f"a result event of {after} without the upload (published by a version before stages)",
        )
    try:
        event = FileUploadEvent.model_validate(upload)
    except ValidationError as exc:
        problem = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise PermanentError(
            ErrorClass.INVALID_MESSAGE, f"the upload in {after}'s result event: {where} {problem['msg']}"
        ) from None
    if data.get("event_id") != event.event_id:
        raise PermanentError(ErrorClass.INVALID_MESSAGE, f"{after}'s result event names another upload than it carries")
    before = data.get("upstream")
    reports = {**before} if isinstance(before, dict) else {}
    reports[after] = {k: data[k] for k in STAGE_FIELDS if k in data}
    upstream: dict[str, dict[str, Any]] = {}
    for name, report in reports.items():
        try:
            upstream[str(name)] = StageReport.model_validate(report).model_dump(mode="json")
        except ValidationError as exc:
            problem = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in problem["loc"]) or "it"
            raise PermanentError(
                ErrorClass.INVALID_MESSAGE,
                f"{after}'s result event: what {str(name)[:100]!r} reported: {where} {problem['msg']}",
            ) from None
    return Incoming(event, upstream)


def upload_of(body: bytes) -> FileUploadEvent | None:
    """The upload a delivered message is about: an upload event, or the upload a result event carries
    (what a stage reads); None when it is neither (for records of messages that could not be parsed)."""
    try:
        return parse_event(body)
    except PermanentError:
        pass
    try:
        data = json.loads(body)
        return parse_result(body, str(data.get("consumer"))).event if isinstance(data, dict) else None
    except (PermanentError, ValueError, RecursionError):
        return None


def utc_text(epoch_ms: int) -> str:
    """Epoch milliseconds (an event's `timestamp`, a record's time) as ISO 8601 UTC: `2026-01-26T09:50:17.042Z`."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
