"""The models of the messages the daemon publishes (messages.py) say what the contract says, field for field
and header for header; the code builds its messages from them (what real messages carry is checked against
the AsyncAPI document in tests/test_asyncapi.py)."""

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from uploads_consumer.deadletter import dead_letter_headers
from uploads_consumer.errors import ErrorClass
from uploads_consumer.events import FileUploadEvent
from uploads_consumer.messages import (
    RESULT_FIELDS,
    DeadLetterHeaders,
    ResultEvent,
    ResultHeaders,
    TranscriptionMessage,
)

CONTRACT = (Path(__file__).resolve().parents[1] / "docs" / "contract.md").read_text()


def test_the_result_event_has_the_contracts_fields_in_its_order():
    table = re.findall(r"^\| `(\w+)` \|", CONTRACT.split("### 8.1 The result event", 1)[1].split("```", 1)[0], re.M)
    assert table == list(RESULT_FIELDS) == sorted(ResultEvent.model_fields, key=RESULT_FIELDS.index)


def test_the_transcription_message_has_the_contracts_fields():
    section = CONTRACT.split("### 8.2 The transcription result", 1)[1].split("```", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == list(TranscriptionMessage.model_fields)


def test_the_dead_letter_headers_are_the_contracts():
    section = CONTRACT.split("Headers of the dead-letter copy:", 1)[1].split("\n\n", 2)[1]
    named = re.findall(r"^\| `([\w-]+)` \|", section, re.M)
    aliases = [f.alias for f in DeadLetterHeaders.model_fields.values() if f.alias]
    assert named == aliases
    assert {"traceparent", "tracestate"} <= set(DeadLetterHeaders.model_fields)


def test_dead_letter_headers_are_built_from_the_model():
    stored = datetime(2026, 1, 26, 10, 30, tzinfo=UTC)
    headers = dead_letter_headers(
        "FILE_UPLOADS", 7, "file.uploads", 3, ErrorClass.FORBIDDEN, "x" * 500, "notify", stored
    )
    assert DeadLetterHeaders.model_validate(headers).headers() == headers
    assert len(headers["Uploads-Error"]) == 300
    assert headers["Nats-Msg-Id"] == f"FILE_UPLOADS:7:notify:{int(stored.timestamp() * 1000)}"


def test_a_result_event_is_published_in_the_contracts_order_with_the_upload_in_canonical_form():
    upload = FileUploadEvent(
        event_id="0AB35A7E-7A72-4E37-B34D-1045459D355F",
        email="a@example.com",
        file_uuid="1cbfac96-1cb1-45b2-a682-39c0de4ea705",
        s3_data_key="uploads/a@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/a.txt.enc",
        s3_metadata_key="uploads/a@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/metadata.json",
        bucket_name="uploads",
        timestamp=1,
    )
    event = ResultEvent(
        event_id=upload.event_id,
        file_uuid=upload.file_uuid,
        email=upload.email,
        consumer="process",
        fetched="event",
        original_filename=None,
        size=None,
        sha256=None,
        content_type=None,
        processors=[],
        skipped=[],
        outputs={},
        processed_at=2,
        after=None,
        upload=upload,
        upstream={},
    ).published()
    assert list(event) == list(RESULT_FIELDS)
    assert event["status"] == "processed" and event["upload"]["event_id"] == "0ab35a7e-7a72-4e37-b34d-1045459d355f"


def test_a_result_header_names_the_upload_and_the_consumer():
    assert ResultHeaders(msg_id="e:process:processed").headers() == {"Nats-Msg-Id": "e:process:processed"}
    with pytest.raises(ValidationError):
        ResultHeaders(msg_id="e:process")
