"""Nothing lost at the edges: each edge an expert review reproduced, through real servers and the real daemon.

A consumer made elsewhere (with its own ack_wait or max_deliver), edited live, a crash or a shutdown on
the last delivery, a dead-letter stream that is away, a stream re-created, a full disk, a hostile twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import secrets
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    connect,
    consumer_info,
    dead_letters,
    make_files,
    plugins,
    provision_now,
    publish_raw,
    publish_uploads,
    read_stream,
    results_by_event,
    until,
    wait_ready,
    wait_settled,
)
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from otlp_receiver import OtlpReceiver

from uploads_consumer.producer import event_json

STREAM, CONSUMER, SUBJECT = "FILE_UPLOADS", "file_processor", "file.uploads"


async def make_consumer(url: str, **config: object) -> None:
    """The upload stream and a consumer created elsewhere (the backend, a script), with its own settings."""
    nc = await connect(url)
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
        await js.add_consumer(
            STREAM,
            ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=100, **config),
        )
    finally:
        await nc.close()


def metric(daemon, outcome: str) -> float:
    return daemon.metric("uploads_consumer_messages_total", f'outcome="{outcome}"')


async def dead_letter_count(url: str) -> int:
    return len(await dead_letters(url))


# ---- 1: progress follows the consumer's own ack_wait ---------------------------------------------


async def test_progress_keeps_a_7s_job_on_a_3s_ack_wait_consumer_made_elsewhere(
    tmp_path, settings_for, start_daemon, nats_server
):
    await make_consumer(nats_server.url, ack_wait=3)
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:slow,save", UC_TEST_SLOW_SECONDS="7"))  # ACK_WAIT 30s
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon, timeout=60)
    info = await consumer_info(nats_server.url)
    # One delivery in all: num_redelivered alone would not tell, it counts only messages not yet acked.
    assert info.delivered.consumer_seq == 1, "progress must come well inside the consumer's 3 s ack_wait"
    assert daemon.metric("uploads_consumer_redeliveries_total") == 0
    assert metric(daemon, "acked") == 1
    assert daemon.terminate() == 0


# ---- 2, 3, 7: the last delivery, a live edit, a dead-letter stream that is away ---------------------


async def test_sigterm_on_the_consumers_last_delivery_dead_letters_instead_of_losing_it(
    tmp_path, settings_for, start_daemon, nats_server
):
    await make_consumer(nats_server.url, ack_wait=30, max_deliver=2)
    env = plugins(tmp_path, "uc_test_plugins:flaky_then_slow,save", UC_TEST_SLOW_SECONDS="60")
    daemon = start_daemon(**env, RETRY_BACKOFF="200ms", SHUTDOWN_GRACE="1s")
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await until(lambda: daemon.metric("uploads_consumer_redeliveries_total") == 1, 30, "second delivery", daemon)
    assert daemon.terminate() == 0
    [copy] = await dead_letters(nats_server.url)
    assert copy.headers["Uploads-Error-Class"] == "max_deliveries"
    assert copy.headers["Uploads-Deliveries"] == "2"
    assert json.loads(copy.data)["event_id"] == event.event_id
    info = await consumer_info(nats_server.url)
    assert (info.num_pending, info.num_ack_pending) == (0, 0), "terminated after its copy was stored"


async def test_a_live_edit_of_max_deliver_is_honoured_while_failing(tmp_path, settings_for, start_daemon, nats_server):
    await make_consumer(nats_server.url, ack_wait=30, max_deliver=10)
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:always_retry"), RETRY_BACKOFF="1s")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await until(lambda: metric(daemon, "nacked") >= 1, 30, "first nak", daemon)
    nc = await connect(nats_server.url)
    try:  # `nats consumer edit --max-deliver=3`, as an operator would, while the daemon runs
        js = nc.jetstream(timeout=10)
        config = (await js.consumer_info(STREAM, CONSUMER)).config
        config.max_deliver = 3
        await js.add_consumer(STREAM, config)  # an existing consumer of that name is updated
    finally:
        await nc.close()
    await until(lambda: dead_letter_count(nats_server.url), 30, "a dead-letter copy", daemon)
    [copy] = await dead_letters(nats_server.url)
    assert (copy.headers["Uploads-Error-Class"], copy.headers["Uploads-Deliveries"]) == ("max_deliveries", "3")
    assert "always_retry" in copy.headers["Uploads-Error"]
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0


async def test_a_crash_on_the_last_delivery_is_copied_from_the_max_deliveries_advisory(
    tmp_path, settings_for, start_daemon, nats_server
):
    await make_consumer(nats_server.url, ack_wait=3, max_deliver=1)
    first = start_daemon(**plugins(tmp_path, "uc_test_plugins:slow,save", UC_TEST_SLOW_SECONDS="60"))
    await wait_ready(first, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1), publish=False)
    trace_id = secrets.token_hex(16)
    upstream = {"Nats-Msg-Id": event.event_id, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    await publish_raw(nats_server.url, SUBJECT, [event_json(event)], [upstream])
    await until(lambda: first.metric("uploads_consumer_in_flight") == 1, 30, "work under way", first)
    first.kill()  # SIGKILL on its only delivery: the server will never deliver it again
    audit = tmp_path / "audit.db"
    otlp = OtlpReceiver()
    await otlp.start()
    try:
        second = start_daemon(
            "second.log",
            **plugins(tmp_path, "save"),
            AUDIT_URL=f"sqlite:///{audit}",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        await until(lambda: dead_letter_count(nats_server.url), 60, "the advisory's copy", second)
        # The copy is made in the upload's own trace, and carries it on.
        [span] = await otlp.wait_for(lambda: [s for s in otlp.trace(trace_id) if s.kind == "consumer"])
    finally:
        await otlp.stop()
    assert (span.attributes["uploads.outcome"], span.attributes["error.type"]) == ("dead_lettered", "max_deliveries")
    assert span.attributes["messaging.nats.stream_sequence"] == 1
    [copy] = await dead_letters(nats_server.url)
    assert copy.headers["traceparent"].split("-")[1:3] == [trace_id, span.span_id]
    assert copy.headers["Uploads-Error-Class"] == "max_deliveries"
    assert copy.headers["Uploads-Stream-Seq"] == "1"
    assert json.loads(copy.data)["event_id"] == event.event_id
    await until(lambda: second.metric("uploads_consumer_audit_records_total"), 10, "its audit record", second)
    assert second.terminate() == 0
    # The audit trail says what became of the upload, though no settlement of ours ended it.
    with contextlib.closing(sqlite3.connect(audit)) as db:
        db.row_factory = sqlite3.Row
        [record] = [dict(row) for row in db.execute("SELECT * FROM audit_records")]
    assert (record["outcome"], record["error_class"]) == ("dead_lettered", "max_deliveries")
    assert (record["event_id"], record["stream_seq"], record["deliveries"]) == (event.event_id, 1, 1)
    assert record["reason"] == copy.headers["Uploads-Error"]


async def test_a_dead_letter_stream_that_is_away_on_the_last_delivery_holds_the_message_until_stored(
    tmp_path, start_daemon, nats_server
):
    await make_consumer(nats_server.url, ack_wait=3, max_deliver=1)
    daemon = start_daemon(RETRY_BACKOFF="1s")
    await wait_ready(daemon, nats_server.url)
    nc = await connect(nats_server.url)
    try:
        # Had progress stopped, the server would give the message up (max_deliver 1) and say so here.
        gave_up = await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.{CONSUMER}")
        js = nc.jetstream(timeout=10)
        await js.delete_stream("FILE_UPLOADS_DLQ")
        await js.publish(SUBJECT, b"not an event")  # dead-lettered on its one and only delivery
        await until(lambda: "holding the message" in daemon.log_text(), 20, "the copy to fail", daemon)
        await asyncio.sleep(7)  # more than twice the ack wait: only progress keeps it ours
        await js.add_stream(StreamConfig(name="FILE_UPLOADS_DLQ", subjects=["file.uploads.dlq"]))
        await until(lambda: dead_letter_count(nats_server.url), 30, "the copy", daemon)
        assert gave_up.pending_msgs == 0, "the ack wait ran out while the message was held"
    finally:
        await nc.close()
    [copy] = await dead_letters(nats_server.url)
    assert copy.data == b"not an event" and copy.headers["Uploads-Error-Class"] == "invalid_message"
    info = await consumer_info(nats_server.url)
    assert info.num_ack_pending == 0
    assert daemon.terminate() == 0


# ---- 5, 8: the upload stream is created with an age limit; a re-created stream's sequences ----------


async def test_setup_gives_the_upload_stream_seven_days_and_warns_about_a_shorter_dedupe_ttl(
    tmp_path, start_daemon, nats_server
):
    daemon = start_daemon(DEDUPE_TTL="1d")
    await wait_ready(daemon, nats_server.url)
    nc = await connect(nats_server.url)
    try:
        info = await nc.jetstream(timeout=5).stream_info(STREAM)
        consumer = await nc.jetstream(timeout=5).consumer_info(STREAM, CONSUMER)
    finally:
        await nc.close()
    assert info.config.max_age == 7 * 86400
    assert (str(info.config.discard), str(info.config.storage)) in {
        ("old", "file"),
        ("DiscardPolicy.OLD", "StorageType.FILE"),
    }
    assert consumer.config.max_deliver == -1, "MAX_DELIVER is the daemon's to enforce, never the server's"
    assert daemon.terminate() == 0
    assert "DEDUPE_TTL is 1 days" in daemon.log_text()


async def test_a_dead_letter_from_a_recreated_stream_is_not_dropped_as_a_duplicate(start_daemon, nats_server):
    daemon = start_daemon()
    await wait_ready(daemon, nats_server.url)
    await publish_raw(nats_server.url, SUBJECT, [b"first bad message"])
    await until(lambda: dead_letter_count(nats_server.url), 30, "first copy", daemon)
    nc = await connect(nats_server.url)
    try:
        await nc.jetstream(timeout=10).delete_stream(STREAM)  # the daemon provisions it again; seqs restart
    finally:
        await nc.close()
    await wait_ready(daemon, nats_server.url, timeout=30)
    [seq] = await publish_raw(nats_server.url, SUBJECT, [b"second bad message"])
    assert seq == 1, "the re-created stream starts over, so both copies are {stream}:1"
    await until(lambda: _count_is(nats_server.url, 2), 30, "second copy", daemon)
    bodies = sorted(m.data for m in await dead_letters(nats_server.url))
    assert bodies == [b"first bad message", b"second bad message"]
    assert daemon.terminate() == 0


async def _count_is(url: str, n: int) -> bool:
    return await dead_letter_count(url) == n


# ---- 4: a full disk never yields an acknowledged, truncated file ---------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only), grown later by the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_never_yields_an_acked_truncated_file(
    tmp_path, settings_for, start_daemon, nats_server, small_disk
):
    daemon = start_daemon(DECRYPT_DOWNLOAD_PATH=str(small_disk), RETRY_BACKOFF="300ms")
    await wait_ready(daemon, nats_server.url)
    [source] = make_files(tmp_path / "in", 1, size=3 * 1024 * 1024)
    [event] = await publish_uploads(settings_for(), [source])
    await until(lambda: metric(daemon, "nacked") >= 2, 30, "retries on the full disk", daemon)
    assert metric(daemon, "acked") == 0
    assert await read_stream(nats_server.url, "FILE_PROCESSED") == []
    assert await dead_letters(nats_server.url) == [], "a full disk is transient, not the upload's fault"
    assert not (small_disk / "user@example.com").exists() or not any((small_disk / "user@example.com").rglob("*.bin"))
    assert "No space left on device" in daemon.log_text()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # the operator frees space
    await wait_settled(nats_server.url, 1, daemon=daemon, timeout=60)
    saved = small_disk / "user@example.com" / event.file_uuid / source.name
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert daemon.terminate() == 0


async def test_a_file_size_limit_cutting_writes_short_never_yields_an_acked_truncated_file(
    tmp_path, settings_for, start_daemon, nats_server
):
    """The same edge without root: RLIMIT_FSIZE makes the write that crosses it short, then EFBIG
    (Python ignores SIGXFSZ), as a full disk or a network file system can."""
    daemon = start_daemon(RETRY_BACKOFF="300ms")
    await wait_ready(daemon, nats_server.url)
    _, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE)
    size = 3 * 1024 * 1024
    # Inside the last chunk: that write is cut short and no later write would fail on its own.
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (size - 1000, hard))
    [source] = make_files(tmp_path / "in", 1, size=size)
    [event] = await publish_uploads(settings_for(), [source])
    await until(lambda: metric(daemon, "nacked") >= 2, 30, "retries at the file size limit", daemon)
    assert metric(daemon, "acked") == 0
    assert await read_stream(nats_server.url, "FILE_PROCESSED") == []
    assert await dead_letters(nats_server.url) == []
    downloads = Path(daemon.env["DECRYPT_DOWNLOAD_PATH"])
    assert not any(downloads.rglob(source.name))
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # the operator lifts the limit
    await wait_settled(nats_server.url, 1, daemon=daemon, timeout=60)
    saved = downloads / "user@example.com" / event.file_uuid / source.name
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert daemon.terminate() == 0


# ---- 9: a hostile event reusing a pending event_id -----------------------------------------------


async def test_a_hostile_event_reusing_an_event_id_cannot_make_the_real_upload_a_duplicate(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    await provision_now(settings)
    [real] = await publish_uploads(settings, make_files(tmp_path / "real", 1, prefix="real"), publish=False)
    [mallory] = await publish_uploads(
        settings, make_files(tmp_path / "m", 1, prefix="mallory"), email="mallory@example.com", publish=False
    )
    # Mallory's own, valid upload announced under the real upload's event_id, and a twin pointing at
    # keys outside its folder; both reach the stream before the real event does.
    hostile_valid = mallory.model_copy(update={"event_id": real.event_id})
    hostile_bad = real.model_copy(update={"s3_data_key": "uploads/mallory@example.com/x/evil.enc"})
    await publish_raw(nats_server.url, SUBJECT, [event_json(e) for e in (hostile_valid, hostile_bad, real)])
    daemon = start_daemon()
    await wait_settled(nats_server.url, 3, daemon=daemon, timeout=60)
    assert (downloads / "user@example.com" / real.file_uuid / "real-0.bin").exists(), "the real upload was processed"
    assert (downloads / "mallory@example.com" / mallory.file_uuid / "mallory-0.bin").exists()
    [bad] = await dead_letters(nats_server.url)
    assert bad.headers["Uploads-Error-Class"] == "forbidden"
    assert metric(daemon, "acked") == 2  # the real upload, and mallory's under the real event_id
    assert metric(daemon, "duplicate") == 0
    assert daemon.terminate() == 0


# ---- 6: the stop path is bounded, and a second signal hurries it ---------------------------------


async def test_stop_with_nats_unreachable_takes_at_most_the_grace_plus_the_margin(
    tmp_path, settings_for, start_daemon, nats_server
):
    daemon = start_daemon(
        **plugins(tmp_path, "uc_test_plugins:slow,save", UC_TEST_SLOW_SECONDS="120"), SHUTDOWN_GRACE="2s"
    )
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
    await until(lambda: daemon.metric("uploads_consumer_in_flight") == 2, 30, "two in flight", daemon)
    nats_server.kill()
    began = time.monotonic()
    assert daemon.terminate(timeout=60) == 0
    took = time.monotonic() - began
    # The contract: SHUTDOWN_GRACE + 15 s at most. The extra 5 s is for a loaded CI machine, not the daemon.
    assert took < 2 + 15 + 5, f"took {took:.1f}s"


async def test_an_upload_published_as_the_daemon_stops_is_not_left_to_its_ack_wait(
    tmp_path, settings_for, start_daemon, nats_server
):
    """Nothing in flight, a pull request waiting at the server: an upload published as the daemon
    stops. The daemon closes its inbox first (what was already on its way is still handed back),
    so the server delivers nothing to a departing process: the next daemon has it at once."""
    daemon = start_daemon(ACK_WAIT="600s", FETCH_TIMEOUT="4s")
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1), publish=False)
    await asyncio.sleep(0.5)  # the pull loop has its request waiting at the server
    daemon.proc.terminate()
    await until(lambda: "shutdown requested" in daemon.log_text(), 10, "the stop", daemon)
    await publish_raw(nats_server.url, SUBJECT, [event_json(event)])
    assert daemon.proc.wait(30) == 0
    # Left unsettled, it would come back after the 600 s ACK_WAIT; handed back, the next daemon has it now.
    second = start_daemon("second.log", ACK_WAIT="600s")
    await wait_settled(nats_server.url, 1, daemon=second, timeout=30)
    assert second.terminate() == 0


async def test_a_second_sigterm_cuts_the_grace_short_and_hands_the_work_back(
    tmp_path, settings_for, start_daemon, nats_server
):
    env = plugins(tmp_path, "uc_test_plugins:slow,save", UC_TEST_SLOW_SECONDS="300")
    daemon = start_daemon(**env, SHUTDOWN_GRACE="300s", ACK_WAIT="60s")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await until(lambda: daemon.metric("uploads_consumer_in_flight") == 1, 30, "work under way", daemon)
    daemon.proc.terminate()
    await until(lambda: "shutdown requested" in daemon.log_text(), 10, "the first signal", daemon)
    daemon.proc.terminate()
    assert daemon.proc.wait(60) == 0, "without the second signal it would wait out a 300 s grace"
    assert "cutting the grace short" in daemon.log_text()
    nc = await connect(nats_server.url)
    try:  # handed back at once (a nak), not left to its 60 s ACK_WAIT: another fetch gets it now
        sub = await nc.jetstream(timeout=5).pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        [again] = await sub.fetch(1, timeout=5)
        assert again.metadata.num_delivered == 2
    finally:
        await nc.close()


# ---- 10: smaller edges -----------------------------------------------------------------------------


async def test_max_in_flight_bounds_processing_whatever_arrives(tmp_path, settings_for, start_daemon, nats_server):
    env = plugins(tmp_path, "uc_test_plugins:concurrency", UC_TEST_SLOW_SECONDS="0.4")
    daemon = start_daemon(**env, MAX_IN_FLIGHT="2", FETCH_BATCH="10")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 12))
    await wait_settled(nats_server.url, 12, daemon=daemon, timeout=60)
    assert daemon.terminate() == 0
    results = [r[0] for r in results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED")).values()]
    most = max(r["outputs"]["concurrency"]["most_at_once"] for r in results)
    assert len(results) == 12 and most == 2


async def test_a_plain_function_as_processor_is_refused_at_start(tmp_path, start_daemon):
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:not_async"))
    assert daemon.proc.wait(30) == 2
    log = daemon.log_text()
    assert "PROCESSORS" in log and "async" in log and "Traceback" not in log


async def test_processors_do_not_see_the_daemons_settings(tmp_path, settings_for, start_daemon, nats_server):
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:peek"))
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
    attributes = result["outputs"]["peek"]["attributes"]
    assert "plaintext_path" in attributes and "download_path" in attributes
    assert not {"settings", "env", "keyring"} & set(attributes)


async def test_a_result_over_the_servers_max_payload_is_dead_lettered_not_retried_for_ever(
    tmp_path, settings_for, start_daemon, nats_server
):
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:verbose"), RETRY_BACKOFF="200ms")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    [copy] = await dead_letters(nats_server.url)
    assert copy.headers["Uploads-Error-Class"] == "too_large"
    reason = copy.headers["Uploads-Error"]
    assert "file.processed" in reason and "max_payload" in reason, reason
    assert metric(daemon, "nacked") == 0, "a message the server can never take is not retried"
    assert daemon.terminate() == 0


async def test_metadata_over_max_file_size_is_too_large_before_the_object_is_read(
    tmp_path, settings_for, start_daemon, nats_server
):
    daemon = start_daemon(MAX_FILE_SIZE=str(1000 + 27))  # the object is 1000 + 28 bytes
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1, size=1000))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    [copy] = await dead_letters(nats_server.url)
    assert copy.headers["Uploads-Error-Class"] == "too_large"
    assert "metadata says the object is 1028 bytes" in copy.headers["Uploads-Error"]
    assert daemon.terminate() == 0


async def test_a_configured_bucket_that_does_not_exist_is_retried_loudly_not_dead_lettered(
    tmp_path, settings_for, start_daemon, nats_server
):
    daemon = start_daemon(S3_ALLOWED_BUCKETS="bucket-nobody-created", RETRY_BACKOFF="300ms")
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1), publish=False)
    await publish_raw(
        nats_server.url, SUBJECT, [event_json(event.model_copy(update={"bucket_name": "bucket-nobody-created"}))]
    )
    await until(lambda: metric(daemon, "nacked") >= 2, 30, "retries", daemon)
    assert await dead_letters(nats_server.url) == [], "a misconfiguration is not the upload's fault"
    assert "bucket 'bucket-nobody-created' does not exist" in daemon.log_text()
    assert daemon.terminate() == 0


async def test_progress_follows_the_consumers_ack_wait_from_the_first_message_of_a_backlog(
    tmp_path, settings_for, start_daemon, nats_server
):
    """The backlog is delivered the moment the daemon binds: progress must already follow the consumer's
    3 s ack_wait then, not the first interval taken from ACK_WAIT (30 s) before the consumer was read."""
    await make_consumer(nats_server.url, ack_wait=3)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))  # waiting before the daemon starts
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:slow,save", UC_TEST_SLOW_SECONDS="7"))  # ACK_WAIT 30s
    await wait_settled(nats_server.url, 1, daemon=daemon, timeout=60)
    info = await consumer_info(nats_server.url)
    assert info.delivered.consumer_seq == 1, "redelivered while in progress: progress came after the 3 s ack_wait"
    assert metric(daemon, "acked") == 1
    assert daemon.terminate() == 0
