"""The AsyncAPI document (docs/asyncapi.yaml) is valid AsyncAPI 3.0, its schemas are the models', its
examples are messages the models accept, and what a real daemon publishes is what it describes; a
consumer in another language (examples/node-results-consumer) reads a real daemon's results through it."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import publish_raw
from system import in_ci

from uploads_consumer.events import FileUploadEvent, parse_event
from uploads_consumer.messages import (
    DeadLetterHeaders,
    ResultEvent,
    ResultHeaders,
    TranscriptionHeaders,
    TranscriptionMessage,
    UploadHeaders,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import asyncapi_capture  # noqa: E402
import gen_docs  # noqa: E402

DOCUMENT = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
OFFICIAL = json.loads((Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.schema.json").read_text())
NODE_EXAMPLE = ROOT / "examples" / "node-results-consumer"


def validator(schema_name: str, document: dict[str, Any] = DOCUMENT) -> jsonschema.Validator:
    """A validator for one of the document's component schemas, its refs resolved in the document."""
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return jsonschema.Draft7Validator(root, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def errors(schema_name: str, instance: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(schema_name).iter_errors(instance)]


def test_the_document_is_valid_asyncapi_3_by_the_official_schema():
    official = jsonschema.Draft7Validator(OFFICIAL)
    assert [e.message for e in official.iter_errors(DOCUMENT)] == []
    broken = copy.deepcopy(DOCUMENT)
    broken["operations"]["sendResult"]["action"] = "publish"  # AsyncAPI 2's word: the check does look
    assert list(official.iter_errors(broken))


def test_the_documents_schemas_are_the_models():
    assert DOCUMENT["components"]["schemas"] == gen_docs.message_schemas()


def test_every_channel_the_daemon_uses_is_in_the_document():
    addresses = {channel["address"] for channel in DOCUMENT["channels"].values()}
    assert {
        "file.uploads",
        "file.uploads.replay.{consumer}",
        "file.processed.{consumer}",
        "file.processed.replay.{consumer}",
        "audio.transcription.result",
        "file.uploads.dlq",
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}",
        "audit.anchors.{consumer}",
    } <= addresses


EXAMPLE_MODELS = {
    "upload-event": ("UploadHeaders", UploadHeaders, "FileUploadEvent", FileUploadEvent),
    "result-event": ("ResultHeaders", ResultHeaders, "ResultEvent", ResultEvent),
    "result-event-stage": ("ResultHeaders", ResultHeaders, "ResultEvent", ResultEvent),
    "transcription": ("TranscriptionHeaders", TranscriptionHeaders, "TranscriptionMessage", TranscriptionMessage),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_each_example_is_a_message_the_models_and_the_document_accept(name):
    example = gen_docs.load_examples()[name]
    headers_schema, headers_model, payload_schema, payload_model = EXAMPLE_MODELS[name]
    headers_model.model_validate(example["headers"])
    payload_model.model_validate(example["payload"])
    assert errors(headers_schema, example["headers"]) == [] and errors(payload_schema, example["payload"]) == []


def test_the_double_encoded_example_is_an_upload_event_the_daemon_parses():
    example = gen_docs.load_examples()["upload-event-double-encoded"]
    assert isinstance(example["payload"], str)
    event = parse_event(json.dumps(example["payload"]).encode())
    assert errors("FileUploadEvent", event.model_dump()) == []


def test_the_dead_letter_example_carries_every_header_the_document_names():
    example = gen_docs.load_examples()["dead-letter"]
    DeadLetterHeaders.model_validate(example["headers"])
    assert errors("DeadLetterHeaders", example["headers"]) == []
    assert example["headers"]["Uploads-Error-Class"] == "invalid_message"


@pytest.fixture(scope="module")
def real_run():
    """Two real daemons (process: save, transcode, transcribe; archive after it) on real servers."""
    with asyncapi_capture.pipeline() as run:
        yield run


def test_every_message_a_real_pipeline_publishes_is_what_the_document_describes(real_run):
    checked = []
    for stream, headers_schema, payload_schema in (
        ("FILE_PROCESSED", "ResultHeaders", "ResultEvent"),
        ("TRANSCRIPTIONS", "TranscriptionHeaders", "TranscriptionMessage"),
    ):
        for message in real_run.streams[stream]:
            assert errors(headers_schema, message.headers) == [], (stream, message.headers)
            assert errors(payload_schema, message.json()) == [], (stream, message.json())
            checked.append(stream)
    for message in real_run.streams["FILE_UPLOADS_DLQ"]:
        assert errors("DeadLetterHeaders", message.headers) == [], message.headers
        checked.append("FILE_UPLOADS_DLQ")
    assert sorted(set(checked)) == ["FILE_PROCESSED", "FILE_UPLOADS_DLQ", "TRANSCRIPTIONS"]
    assert {m.json()["consumer"] for m in real_run.streams["FILE_PROCESSED"]} == {"process", "archive"}
    # and a document that said otherwise would be caught: `size` as text, say
    wrong = copy.deepcopy(DOCUMENT)
    wrong["components"]["schemas"]["ResultEvent"]["properties"]["size"] = {"type": "string"}
    first = real_run.streams["FILE_PROCESSED"][0].json()
    assert list(validator("ResultEvent", wrong).iter_errors(first))


def node_example() -> str:
    """The node binary, with the example's packages installed; else skip (locally) or fail (CI=true)."""
    node = shutil.which("node")
    install = (
        f"apt-get install -y --no-install-recommends nodejs npm && (cd {NODE_EXAMPLE.relative_to(ROOT)} && npm ci)"
    )
    if node is None or not (NODE_EXAMPLE / "node_modules" / "nats").is_dir():
        reason = f"the Node.js example needs node and its packages: {install}"
        if in_ci():
            pytest.fail(f"{reason} (under CI a missing toolchain is a failure, not a skip)")
        pytest.skip(reason)
    return node


def test_the_node_example_reads_a_real_daemons_results_and_finds_them_valid(real_run):
    node = node_example()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "NATS_URL": real_run.nats_url,
        "DURABLE": "node_example",
        "STOP_WHEN_IDLE_MS": "1500",
    }
    done = subprocess.run(
        [node, "results-consumer.mjs"], cwd=NODE_EXAMPLE, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    published = {(m.json()["event_id"], m.json()["consumer"]) for m in real_run.streams["FILE_PROCESSED"]}
    assert {(line["event_id"], line["consumer"]) for line in lines} == published
    assert all(line["valid"] for line in lines) and len(lines) == len(published) == 4


async def test_the_node_example_refuses_a_result_event_the_document_does_not_allow(real_run):
    node = node_example()
    forged = {**real_run.streams["FILE_PROCESSED"][0].json(), "consumer": "forged", "size": "large"}
    headers = {"Nats-Msg-Id": f"{forged['event_id']}:forged:processed"}
    await publish_raw(real_run.nats_url, "file.processed.forged", [json.dumps(forged).encode()], [headers])
    env = {"PATH": os.environ.get("PATH", ""), "NATS_URL": real_run.nats_url, "STOP_WHEN_IDLE_MS": "1500"}
    env["RESULTS_FILTER"] = "file.processed.forged"
    done = subprocess.run(
        [node, "results-consumer.mjs"], cwd=NODE_EXAMPLE, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and done.stdout == ""
    refusal = json.loads(done.stderr.splitlines()[0])
    assert refusal["valid"] is False and any(e["instancePath"] == "/size" for e in refusal["errors"])
