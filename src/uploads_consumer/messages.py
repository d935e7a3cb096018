"""The messages the daemon publishes, as models: the one place their fields and headers are defined.

The pipeline builds the result event from `ResultEvent`, `transcribe` its message from
`TranscriptionMessage`, the dead-letter publisher its headers from `DeadLetterHeaders`. The AsyncAPI
document (docs/asyncapi.yaml) takes its schemas from these models (`scripts/gen_docs.py`), and the tests
hold real messages against both, so the document, the code and what goes out cannot drift apart.

Readers must ignore fields they do not know: fields are added, never renamed or removed without a
new subject. (The upload event the backend publishes is `events.FileUploadEvent`.)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from uploads_consumer.errors import ErrorClass
from uploads_consumer.events import FileUploadEvent, StageReport

TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True)


class ResultEvent(StageReport):
    """Published after an upload was processed, once per upload per consumer, to
    `{NATS_RESULT_SUBJECT}.{consumer}` (docs/contract.md 8.1)."""

    event_id: str = Field(description="the upload event's event_id", json_schema_extra={"format": "uuid"})
    file_uuid: str = Field(description="the upload's file_uuid", json_schema_extra={"format": "uuid"})
    email: str = Field(description="the uploader")
    status: Literal["processed"] = Field(default="processed", description='always "processed"')
    consumer: str = Field(description="the consumer that processed it (NATS_CONSUMER_NAME)")
    after: str | None = Field(
        description="the consumer this one follows (AFTER); null for a consumer of the upload stream"
    )
    upload: FileUploadEvent = Field(description="the upload event this consumer processed, in canonical form")
    upstream: dict[str, StageReport] = Field(
        description="what each stage before this consumer reported, by consumer name, nearest last; "
        "{} for a consumer of the upload stream"
    )

    # The fields in the order they are published (the contract's order), whatever the classes' order.
    def published(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {name: data[name] for name in RESULT_FIELDS}


RESULT_FIELDS = (
    "event_id",
    "file_uuid",
    "email",
    "status",
    "consumer",
    "fetched",
    "original_filename",
    "size",
    "sha256",
    "content_type",
    "processors",
    "skipped",
    "outputs",
    "processed_at",
    "after",
    "upload",
    "upstream",
)


class Segment(_Message):
    start_time: float = Field(ge=0, description="seconds from the start of the audio")
    end_time: float = Field(ge=0, description="seconds from the start of the audio")
    text: str


class TranscriptionMessage(_Message):
    """Published by `transcribe` to TRANSCRIBE_RESULT_SUBJECT, once per upload, with the fields the
    upload backend's voice-to-text design expects (docs/contract.md 8.2)."""

    event_id: str = Field(description="the upload event's event_id", json_schema_extra={"format": "uuid"})
    file_uuid: str = Field(description="the upload's file_uuid", json_schema_extra={"format": "uuid"})
    transcription: str = Field(description="the full text; empty when there is no speech")
    language: str = Field(description="language code, detected or TRANSCRIBE_LANGUAGE")
    duration_seconds: float = Field(ge=0, description="length of the audio in seconds")
    word_count: int = Field(ge=0, description="words in `transcription`")
    segments: list[Segment] = Field(description="timed pieces of the text")
    timestamp: int = Field(description="when the transcription finished, epoch milliseconds")
    status: Literal["SUCCESS"] = "SUCCESS"


class TraceHeaders(_Message):
    """W3C trace context, present when tracing is on (docs/contract.md 4.18); other headers may follow."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    traceparent: str | None = Field(
        default=None, pattern=TRACEPARENT, description="W3C trace context: the trace this message continues"
    )
    tracestate: str | None = Field(default=None, description="W3C vendor trace state, when the trace has one")

    def headers(self) -> dict[str, str]:
        """The NATS headers, by their names; unset ones left out."""
        return {k: str(v) for k, v in self.model_dump(by_alias=True, exclude_none=True).items()}


class UploadHeaders(TraceHeaders):
    """Headers the daemon reads on an upload event (the backend may send none)."""

    msg_id: str | None = Field(
        default=None,
        alias="Nats-Msg-Id",
        description="JetStream deduplication id; `uploads-consumer publish` uses the event_id",
    )


class ResultHeaders(TraceHeaders):
    msg_id: str = Field(
        alias="Nats-Msg-Id",
        pattern=r"^[^:]+:[^:]+:processed$",
        description="`{event_id}:{consumer}:processed`: one result event per upload per consumer",
    )


class TranscriptionHeaders(TraceHeaders):
    msg_id: str = Field(
        alias="Nats-Msg-Id",
        pattern=r"^[^:]+:transcription$",
        description="`{event_id}:transcription`: one transcript per upload",
    )


class DeadLetterHeaders(TraceHeaders):
    """Headers of a dead-letter copy: the original body is the payload, unchanged (docs/contract.md 7.3)."""

    msg_id: str = Field(
        alias="Nats-Msg-Id",
        pattern=r"^[^:]+:\d+:[^:]+:\d+$",
        description="`{stream}:{stream sequence}:{consumer}:{stored}` of the original, `{stored}` when it was "
        "stored in its stream (epoch milliseconds): a duplicate acknowledgement is a copy already stored",
    )
    consumer: str = Field(alias="Uploads-Consumer", description="the consumer that dead-lettered it")
    error_class: ErrorClass = Field(
        alias="Uploads-Error-Class", description="the error class (contract 7.1); never transient, which is retried"
    )
    error: str = Field(
        alias="Uploads-Error", max_length=300, description="the reason on one line, without secrets (UTF-8)"
    )
    stream: str = Field(alias="Uploads-Stream", description="the stream the original was in")
    stream_seq: str = Field(alias="Uploads-Stream-Seq", pattern=r"^[0-9]+$", description="its sequence there")
    subject: str = Field(alias="Uploads-Subject", description="its subject")
    deliveries: str = Field(
        alias="Uploads-Deliveries", pattern=r"^[0-9]+$", description="how many times it had been delivered"
    )
    failed_at: str = Field(
        alias="Uploads-Failed-At",
        pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$",
        description="when, RFC 3339 UTC with milliseconds",
    )


class AuditAnchor(_Message):
    """One audit writer's chain head, published by the daemon to `{AUDIT_ANCHOR_SUBJECT}.{consumer}`
    (captured by `AUDIT_ANCHOR_STREAM`, which denies deletes and purges) every `AUDIT_ANCHOR_INTERVAL`
    in which the chain moved, and at a clean stop, with `Nats-Msg-Id: {writer}:{seq}` (docs/contract.md 12.5)."""

    writer: str = Field(description="the chain's writer: `{host}/{pid}/{8 hex digits}`, one per process")
    consumer: str = Field(description="the consumer the writer records for (NATS_CONSUMER_NAME)")
    seq: int = Field(ge=1, description="the sequence of the chain's last record the store holds")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="that record's SHA-256, hex")
    at: int = Field(ge=0, description="when the anchor was made, epoch milliseconds")
    key: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{16}$",
        description="with AUDIT_SIGNING_KEY: the first 16 hex digits of the SHA-256 of the public key",
    )
    signature: str | None = Field(
        default=None,
        description="with AUDIT_SIGNING_KEY: base64 of the Ed25519 signature of "
        "`uploads-consumer audit anchor 1\\n` and the canonical JSON of at, consumer, hash, seq and writer",
    )
