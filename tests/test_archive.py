"""The `archive` processor through the real daemon against moto: verified server-side copies, in parts
above the threshold, idempotent on redelivery, a foreign object refused, the source deleted only after
both copies are verified, and a copy streamed to another S3 service with bounded memory."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import (
    dead_letters,
    make_files,
    peak_rss,
    plugins,
    publish_uploads,
    read_stream,
    refused_setting,
    results_by_event,
    wait_ready,
)
from helpers import wait_settled as settled
from prometheus_client import CollectorRegistry

from uploads_consumer.embedded import S3Server, free_port
from uploads_consumer.processors import ProcessorEnvironment, load_processors
from uploads_consumer.processors.archive import MARKER, ArchiveSettings, multipart_etag, part_ranges

MiB = 1 << 20


def decrypt_copy(env: dict[str, str], bucket: str, data_key: str, metadata_key: str, out: Path) -> bytes:
    """The daemon's own `decrypt` on the archived copy: tag verified, plaintext returned."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uploads_consumer",
            "decrypt",
            "--bucket",
            bucket,
            "--data-key",
            data_key,
            "--metadata-key",
            metadata_key,
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_bytes()


@pytest.fixture
def archive_bucket(s3_client) -> str:
    name = f"archive-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def test_part_ranges_cover_every_byte_once_and_never_exceed_ten_thousand_parts():
    assert part_ranges(12 * MiB, 5 * MiB) == [(0, 5 * MiB - 1), (5 * MiB, 10 * MiB - 1), (10 * MiB, 12 * MiB - 1)]
    huge = part_ranges(5 << 40, 5 * MiB)
    assert len(huge) <= 10_000 and huge[0][0] == 0 and huge[-1][1] == (5 << 40) - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(huge))


async def test_copies_verify_byte_for_byte_in_one_piece_and_in_parts_with_storage_class_and_tags(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket, archive_bucket, daemon_env
):
    small = make_files(tmp_path / "in", 2, size=3000)
    big = tmp_path / "in" / "big.bin"
    big.write_bytes(os.urandom(12 * MiB + 123))
    daemon = start_daemon(
        PROCESSORS="archive",
        ARCHIVE_BUCKET=archive_bucket,
        ARCHIVE_PREFIX="kept/",
        ARCHIVE_STORAGE_CLASS="STANDARD_IA",
        ARCHIVE_TAGS="source=uploads,retention=7y",
        ARCHIVE_MULTIPART_THRESHOLD="6MiB",
        ARCHIVE_PART_SIZE="5MiB",
    )
    await wait_ready(daemon, nats_server.url)
    events = await publish_uploads(settings_for(), [*small, big])
    await settled(nats_server.url, 3, daemon=daemon)
    assert daemon.terminate() == 0
    results = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))

    for event, path in zip(events, [*small, big], strict=True):
        [result] = results[event.event_id]
        out = result["outputs"]["archive"]
        data_key, metadata_key = "kept/" + event.s3_data_key, "kept/" + event.s3_metadata_key
        assert (out["bucket"], out["key"], out["metadata_key"]) == (archive_bucket, data_key, metadata_key)
        # byte for byte: the copy is the stored object itself, and the daemon's decrypt verifies its tag
        original = s3_client.get_object(Bucket=bucket, Key=event.s3_data_key)["Body"].read()
        copy = s3_client.get_object(Bucket=archive_bucket, Key=data_key)
        assert copy["Body"].read() == original
        assert s3_client.get_object(Bucket=archive_bucket, Key=metadata_key)["Body"].read() == (
            s3_client.get_object(Bucket=bucket, Key=event.s3_metadata_key)["Body"].read()
        )
        plain = decrypt_copy(daemon_env, archive_bucket, data_key, metadata_key, tmp_path / f"{path.name}.out")
        assert plain == path.read_bytes()
        head = s3_client.head_object(Bucket=archive_bucket, Key=data_key)
        assert head["StorageClass"] == "STANDARD_IA" == out["storage_class"]
        source_etag = s3_client.head_object(Bucket=bucket, Key=event.s3_data_key)["ETag"].strip('"')
        assert head["Metadata"][MARKER] == source_etag, "marked as the copy of that very object"
        tags = s3_client.get_object_tagging(Bucket=archive_bucket, Key=data_key)["TagSet"]
        assert {t["Key"]: t["Value"] for t in tags} == {"source": "uploads", "retention": "7y"}
        assert result["fetched"] == "object" and result["sha256"] is None and result["size"] == path.stat().st_size
        if path is big:
            assert out["copied"] == ["copied in parts", "copied"]
            parts = [original[a : b + 1] for a, b in part_ranges(len(original), 5 * MiB)]
            assert head["ETag"].strip('"') == out["etag"] == multipart_etag([hashlib.md5(p).digest() for p in parts])
        else:
            assert out["copied"] == ["copied", "copied"]
            assert out["etag"] == hashlib.md5(original).hexdigest()
    # A consumer that only copies reads no plaintext: nothing was decrypted.
    assert not any(d.name != ".incoming" for d in (Path(daemon_env["DECRYPT_DOWNLOAD_PATH"])).iterdir())


async def test_a_redelivery_finds_its_copy_and_a_foreign_object_at_the_key_is_processor_failed(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, archive_bucket
):
    """With no checkpoints (DEDUPE_BUCKET empty) the redelivery runs archive again: it finds its own copy."""
    files = make_files(tmp_path / "in", 2)
    events = await publish_uploads(settings_for(), files, publish=False)
    foreign = events[1]
    s3_client.put_object(Bucket=archive_bucket, Key=foreign.s3_data_key, Body=b"somebody else's object")
    daemon = start_daemon(
        **plugins(tmp_path, "archive,uc_test_plugins:flaky_once"), ARCHIVE_BUCKET=archive_bucket, DEDUPE_BUCKET=""
    )
    await wait_ready(daemon, nats_server.url)
    await publish_events(nats_server.url, events)
    await settled(nats_server.url, 2, daemon=daemon)
    assert daemon.terminate() == 0

    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[events[0].event_id]
    assert result["outputs"]["archive"]["copied"] == ["already there", "already there"], "not copied again"
    assert daemon.log_text().count('"flaky_once: not this time"') == 1
    [dead] = await dead_letters(nats_server.url)
    assert json.loads(dead.data)["event_id"] == foreign.event_id
    assert dead.headers["Uploads-Error-Class"] == "processor_failed"
    reason = dead.headers["Uploads-Error"]
    assert "another object, not a copy of this upload" in reason and "ARCHIVE_OVERWRITE=true" in reason
    assert s3_client.get_object(Bucket=archive_bucket, Key=foreign.s3_data_key)["Body"].read() == (
        b"somebody else's object"
    ), "left as it was"


async def test_with_overwrite_another_object_at_the_key_is_replaced_by_the_copy(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, archive_bucket
):
    [path] = make_files(tmp_path / "in", 1)
    [event] = await publish_uploads(settings_for(), [path], publish=False)
    s3_client.put_object(Bucket=archive_bucket, Key=event.s3_data_key, Body=b"somebody else's object")
    daemon = start_daemon(PROCESSORS="archive", ARCHIVE_BUCKET=archive_bucket, ARCHIVE_OVERWRITE="true")
    await wait_ready(daemon, nats_server.url)
    await publish_events(nats_server.url, [event])
    await settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    assert await dead_letters(nats_server.url) == []
    plain = decrypt_copy({**daemon.env}, archive_bucket, event.s3_data_key, event.s3_metadata_key, tmp_path / "out")
    assert plain == path.read_bytes()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {"PROCESSORS": "archive,save"},
            "PROCESSORS: archive deletes the stored upload after its step, so it must come after every step "
            "that reads it (save comes after it)",
        ),
        ({"PROCESSORS": "save,archive", "DEDUPE_BUCKET": ""}, "DEDUPE_BUCKET: is empty, but archive deletes"),
    ],
    ids=["a-reader-after-it", "no-checkpoints"],
)
def test_deleting_the_source_where_a_redelivery_would_need_it_is_refused_at_start(start_daemon, variables, expected):
    daemon = start_daemon(ARCHIVE_BUCKET="archive", ARCHIVE_DELETE_SOURCE="true", **variables)
    assert daemon.proc.wait(60) == 2
    lines = daemon.log_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uploads-consumer: configuration error: " + expected), lines


def test_an_archive_bucket_that_does_not_exist_stops_the_start_with_exit_2(start_daemon):
    # Started anyway, every upload would be retried on NoSuchBucket for ever.
    daemon = start_daemon(PROCESSORS="save,archive", ARCHIVE_BUCKET="archive-nobody-made")
    assert daemon.proc.wait(60) == 2
    assert daemon.log_text().strip().splitlines() == [
        "uploads-consumer: configuration error: ARCHIVE_BUCKET: bucket archive-nobody-made does not exist at the "
        "S3 service of S3_ENDPOINT_URL: create it, or set ARCHIVE_BUCKET to one that exists"
    ]


def test_an_archive_endpoint_url_with_a_path_is_refused_naming_the_variable(monkeypatch):
    refused = refused_setting(
        monkeypatch, "archive", ArchiveSettings, ARCHIVE_BUCKET="a", ARCHIVE_ENDPOINT_URL="http://offsite:9000/a"
    )
    assert refused.variable == "ARCHIVE_ENDPOINT_URL"
    assert "no path" in refused.reason and "ARCHIVE_BUCKET" in refused.reason and "offsite" not in refused.reason


def test_deleting_the_source_after_every_reader_with_an_event_only_step_after_it_is_allowed():
    env = ProcessorEnvironment(Path("/nonexistent"), ("save", "archive", "webhook"), 30, CollectorRegistry())
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"ARCHIVE_BUCKET": "a", "ARCHIVE_DELETE_SOURCE": "true", "WEBHOOK_URL": "http://h/"}.items():
            patch.setenv(name, value)
        patch.setenv("WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"k" * 32).decode())
        chain = load_processors(("save", "archive", "webhook"), env, checkpoints=True)
    assert [(p.name, p.removes_upload) for p in chain] == [("save", False), ("archive", True), ("webhook", False)]


async def test_the_source_is_deleted_only_once_both_copies_are_verified(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket
):
    archive_bucket = f"archive-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=archive_bucket)  # there at start (checked), then gone: every copy fails
    [path] = make_files(tmp_path / "in", 1)
    daemon = start_daemon(
        PROCESSORS="archive", ARCHIVE_BUCKET=archive_bucket, ARCHIVE_DELETE_SOURCE="true", RETRY_BACKOFF="300ms"
    )
    await wait_ready(daemon, nats_server.url)
    s3_client.delete_bucket(Bucket=archive_bucket)
    [event] = await publish_uploads(settings_for(), [path])
    await until_logged(daemon, "NoSuchBucket", 2)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys == {event.s3_data_key, event.s3_metadata_key}, "no copy, so the source stays"

    s3_client.create_bucket(Bucket=archive_bucket)
    await settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0, "deleted once copied and verified"
    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
    assert result["outputs"]["archive"]["source_deleted"] is True
    env = {**daemon.env}
    plain = decrypt_copy(env, archive_bucket, event.s3_data_key, event.s3_metadata_key, tmp_path / "out")
    assert plain == path.read_bytes()


async def test_a_copy_to_another_s3_service_is_streamed_through_with_bounded_memory(
    tmp_path, settings_for, start_daemon, nats_server, daemon_env
):
    with S3Server(log_path=tmp_path / "other-s3.log") as other:
        other.client().create_bucket(Bucket="offsite")
        warm, big = tmp_path / "warm.bin", tmp_path / "big.bin"
        warm.write_bytes(os.urandom(4096))
        with open(big, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MiB))
        daemon = start_daemon(
            PROCESSORS="archive",
            ARCHIVE_BUCKET="offsite",
            ARCHIVE_ENDPOINT_URL=other.url,
            ARCHIVE_ACCESS_KEY_ID=other.access_key,
            ARCHIVE_SECRET_ACCESS_KEY=other.secret_key,
            ARCHIVE_PATH_STYLE_ACCESS="true",
            MAX_FILE_SIZE="1GiB",
        )
        await wait_ready(daemon, nats_server.url)
        await publish_uploads(settings_for(), [warm])
        await settled(nats_server.url, 1, daemon=daemon)
        baseline = peak_rss(daemon.proc.pid)
        [event] = await publish_uploads(settings_for(), [big])
        await settled(nats_server.url, 2, daemon=daemon, timeout=120)
        growth = peak_rss(daemon.proc.pid) - baseline
        assert daemon.terminate() == 0

        [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
        assert result["outputs"]["archive"]["copied"] == ["streamed", "streamed"]
        env = {**daemon_env, **other.env(), "HTTP_PORT": str(free_port())}
        plain = decrypt_copy(env, "offsite", event.s3_data_key, event.s3_metadata_key, tmp_path / "out")
        assert hashlib.sha256(plain).digest() == hashlib.sha256(big.read_bytes()).digest()
    print(f"peak RSS growth streaming a 64 MiB copy: {growth / MiB:.1f} MiB")
    assert growth < 40 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB for a 64 MiB object"


async def publish_events(url: str, events: list) -> None:
    from helpers import connect

    from uploads_consumer.producer import event_json

    nc = await connect(url)
    try:
        js = nc.jetstream(timeout=10)
        for event in events:
            await js.publish("file.uploads", event_json(event))
    finally:
        await nc.close()


async def until_logged(daemon, text: str, times: int, timeout: float = 30) -> None:
    from helpers import until

    await until(lambda: daemon.log_text().count(text) >= times, timeout, f"{text!r} logged {times} times", daemon)
