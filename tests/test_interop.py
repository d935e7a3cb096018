"""Every case of tests/interop/manifest.json through the real daemon process, as the spec says it ends."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time

import pytest
from helpers import INTEROP, publish_raw, read_stream, results_by_event, wait_settled

MANIFEST = json.loads((INTEROP / "manifest.json").read_text())

# The manifest says "dead-letter"; these are the classes the outcome table in docs/contract.md gives each case.
EXPECTED_CLASS = {
    "tampered_data": "decrypt_failed",
    "wrong_master_key": "decrypt_failed",
    "truncated_data": "bad_envelope",
    "missing_object": "forbidden",  # test-endpoint keys lie outside uploads/{email}/{file_uuid}/
    "not_an_event": "invalid_message",
    "not_json": "invalid_message",
    "metadata_without_kek": "bad_envelope",
}


@pytest.fixture
def interop_bucket(s3_client) -> str:
    bucket = MANIFEST["bucket"]
    existing = {b["Name"] for b in s3_client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3_client.create_bucket(Bucket=bucket)
    for case in MANIFEST["cases"]:
        for obj in case["objects"]:
            s3_client.put_object(Bucket=bucket, Key=obj["key"], Body=(INTEROP / obj["file"]).read_bytes())
    return bucket


async def test_every_manifest_case_ends_as_the_manifest_says(
    interop_bucket, daemon_env, start_daemon, nats_server, downloads
):
    assert set(EXPECTED_CLASS) == {c["name"] for c in MANIFEST["cases"] if c["expect"] == "dead-letter"}
    env = {
        "S3_BUCKET_NAME": interop_bucket,
        "ENCRYPTION_MASTER_KEY": MANIFEST["master_key"],
        "ENCRYPTION_PREVIOUS_MASTER_KEYS": ",".join(MANIFEST["previous_master_keys"]),
    }

    # Provision with the CLI, then publish every case in manifest order before the daemon starts.
    setup = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "setup"],
        env={**daemon_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    assert "created consumer file_processor" in setup.stdout
    bodies = [(INTEROP / c["message"]).read_bytes() for c in MANIFEST["cases"]]
    seqs = await publish_raw(nats_server.url, "file.uploads", bodies)
    seq_of = {c["name"]: s for c, s in zip(MANIFEST["cases"], seqs, strict=True)}

    daemon = start_daemon(**env)
    await wait_settled(nats_server.url, seqs[-1], daemon=daemon)
    duplicates = daemon.metric("uploads_consumer_messages_total", 'outcome="duplicate"')
    acked = daemon.metric("uploads_consumer_messages_total", 'outcome="acked"')
    assert daemon.terminate() == 0

    results = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))
    dead = {int(m.headers["Uploads-Stream-Seq"]): m for m in await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")}
    processed = [c for c in MANIFEST["cases"] if c["expect"] == "processed"]

    for case in MANIFEST["cases"]:
        if case["expect"] in ("processed", "duplicate"):
            path = downloads / case["email"] / case["file_uuid"] / case["output_name"]
            data = path.read_bytes()
            assert len(data) == case["size"], case["name"]
            assert hashlib.sha256(data).hexdigest() == case["sha256"], case["name"]
            assert path.stat().st_mode & 0o777 == 0o600
            assert seq_of[case["name"]] not in dead, case["name"]
        else:
            copy = dead.get(seq_of[case["name"]])
            assert copy is not None, f"{case['name']} was not dead-lettered"
            assert copy.data == bodies[MANIFEST["cases"].index(case)], "the dead letter must carry the original body"
            h = copy.headers
            assert h["Uploads-Error-Class"] == EXPECTED_CLASS[case["name"]], (case["name"], h["Uploads-Error"])
            stream, seq, consumer, stored_ms = h["Nats-Msg-Id"].split(":")
            assert (stream, int(seq), consumer) == ("FILE_UPLOADS", seq_of[case["name"]], "file_processor")
            assert abs(int(stored_ms) / 1000 - time.time()) < 600, "when the original was stored, in ms"
            assert h["Uploads-Consumer"] == "file_processor"
            assert h["Uploads-Stream"] == "FILE_UPLOADS" and h["Uploads-Subject"] == "file.uploads"
            assert h["Uploads-Deliveries"] == "1"
            assert h["Uploads-Failed-At"].endswith("Z")
            assert "\n" not in h["Uploads-Error"] and h["Uploads-Error"]

    assert len(dead) == len(EXPECTED_CLASS)
    # Processed once each: one result event per processed case, none for the duplicate.
    assert sorted(results) == sorted(_event_id(c) for c in processed)
    assert all(len(v) == 1 for v in results.values())
    assert duplicates == 1 and acked == len(processed)
    basic = next(c for c in processed if c["name"] == "basic")
    r = results[_event_id(basic)][0]
    assert r["status"] == "processed" and r["sha256"] == basic["sha256"] and r["size"] == basic["size"]
    assert r["original_filename"] == "audio.mp3" and r["processors"] == ["save"]
    assert r["outputs"]["save"]["path"].endswith("/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/audio.mp3")
    # Nothing but the saved files under the download path (the work folder is left empty).
    files = sorted(p.relative_to(downloads).as_posix() for p in downloads.rglob("*") if p.is_file())
    assert files == sorted(f"{c['email']}/{c['file_uuid']}/{c['output_name']}" for c in processed)


def _event_id(case: dict) -> str:
    body = json.loads((INTEROP / case["message"]).read_bytes())
    return (json.loads(body) if isinstance(body, str) else body)["event_id"]


async def test_every_message_log_line_carries_its_identity(interop_bucket, daemon_env, start_daemon, nats_server):
    env = {"S3_BUCKET_NAME": interop_bucket, "ENCRYPTION_MASTER_KEY": MANIFEST["master_key"]}
    basic = next(c for c in MANIFEST["cases"] if c["name"] == "basic")
    daemon = start_daemon(**env)
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)  # consumer exists once the daemon has set up
    await publish_raw(nats_server.url, "file.uploads", [(INTEROP / basic["message"]).read_bytes(), b"not json"])
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.terminate() == 0
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    about_messages = [line for line in lines if line["event"] in ("processed", "dead-lettered")]
    assert len(about_messages) == 2
    for line in about_messages:
        assert "stream_seq" in line and "deliveries" in line
    processed = next(line for line in about_messages if line["event"] == "processed")
    assert processed["event_id"] == "0ab35a7e-7a72-4e37-b34d-1045459d355f"
    assert processed["file_uuid"] == basic["file_uuid"]
    assert base64.b64decode(MANIFEST["master_key"]) and MANIFEST["master_key"] not in daemon.log_text()
