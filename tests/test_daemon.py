"""Outcomes through the real daemon process: duplicates, retries, dead-letters, plugins, probes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats
from helpers import (
    connect,
    consumer_info,
    make_files,
    publish_raw,
    publish_uploads,
    read_stream,
    results_by_event,
    until,
    wait_ready,
    wait_settled,
)
from nats.js.api import StreamConfig
from secure_support import publish_upload

from uploads_consumer.content_type import sniff
from uploads_consumer.embedded import NatsServer, free_port
from uploads_consumer.producer import event_json

TESTS = str(Path(__file__).parent)


def plugins(tmp_path: Path, chain: str) -> dict[str, str]:
    return {"PROCESSORS": chain, "PYTHONPATH": TESTS, "UC_TEST_STATE_DIR": str(tmp_path)}


async def _ready(daemon, url: str) -> None:
    """The daemon has provisioned and bound to its consumer (readyz 200)."""
    daemon.wait_http()
    await wait_settled(url, 0, daemon=daemon)
    deadline = time.monotonic() + 15
    while daemon.http_get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.05)


async def test_two_copies_of_one_event_in_one_batch_are_processed_once(
    tmp_path, settings_for, start_daemon, nats_server, downloads, daemon_env
):
    settings = settings_for()
    # Provision first, then put both copies in the stream before the daemon fetches them in one batch.
    setup = await asyncio.create_subprocess_exec("python", "-m", "uploads_consumer", "setup", env=daemon_env)
    assert await setup.wait() == 0
    [event] = await publish_uploads(settings, make_files(tmp_path / "in", 1))
    await publish_raw(nats_server.url, "file.uploads", [event_json(event)])  # the same event, no Msg-Id
    daemon = start_daemon(**plugins(tmp_path, "save,uc_test_plugins:record"), FETCH_BATCH="10")
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="duplicate"') == 1
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 1
    assert daemon.terminate() == 0
    assert len((tmp_path / "record.log").read_text().splitlines()) == 1
    results = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))
    assert list(results) == [event.event_id] and len(results[event.event_id]) == 1


async def test_an_event_already_recorded_is_acknowledged_as_duplicate_by_a_later_daemon(
    tmp_path, settings_for, start_daemon, nats_server
):
    settings = settings_for()
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:record"))
    await _ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings, make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    again = start_daemon("again.log", **plugins(tmp_path, "uc_test_plugins:record"))
    await _ready(again, nats_server.url)
    await publish_raw(nats_server.url, "file.uploads", [event_json(event)])
    await wait_settled(nats_server.url, 2, daemon=again)
    assert again.metric("uploads_consumer_messages_total", 'outcome="duplicate"') == 1
    assert again.terminate() == 0
    assert len((tmp_path / "record.log").read_text().splitlines()) == 1


async def test_processors_run_in_order_on_verified_plaintext_and_report_outputs(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    daemon = start_daemon(**plugins(tmp_path, "save,uc_test_plugins:record"))
    await _ready(daemon, nats_server.url)
    [source] = make_files(tmp_path / "in", 1, size=5000)
    [event] = await publish_uploads(settings, [source])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    event_id, size, sha, existed = (tmp_path / "record.log").read_text().split()
    assert (event_id, size, existed) == (event.event_id, "5000", "True")
    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
    assert result["sha256"] == sha and result["processors"] == ["save", "record"]
    assert result["outputs"] == {
        "save": {"path": str(downloads / "user@example.com" / event.file_uuid / "file-0.bin")},
        "record": {"recorded": True},
    }
    assert result["skipped"] == [] and result["content_type"] == sniff(source, source.name)
    assert list((downloads / ".incoming").iterdir()) == [], "the temporary plaintext is removed"


async def test_a_retryable_processor_error_is_nacked_with_backoff_then_succeeds(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:flaky_once,save"), RETRY_BACKOFF="1s")
    await _ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings, make_files(tmp_path / "in", 1))
    began = time.monotonic()
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert time.monotonic() - began >= 0.9, "redelivered only after the nak delay"
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 1
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 1
    assert daemon.metric("uploads_consumer_redeliveries_total") == 1
    assert daemon.terminate() == 0
    assert (downloads / "user@example.com" / event.file_uuid / "file-0.bin").exists()
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def test_an_unexpected_processor_exception_is_transient(tmp_path, settings_for, start_daemon, nats_server):
    settings = settings_for()
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:boom"))
    await _ready(daemon, nats_server.url)
    await publish_uploads(settings, make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 1
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 1
    assert daemon.terminate() == 0
    assert "processor boom raised KeyError" in daemon.log_text()


async def test_a_permanent_processor_error_is_dead_lettered_as_processor_failed(
    tmp_path, settings_for, start_daemon, nats_server
):
    settings = settings_for()
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:reject"))
    await _ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings, make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert dead.headers["Uploads-Error-Class"] == "processor_failed"
    assert json.loads(dead.data)["event_id"] == event.event_id
    assert await read_stream(nats_server.url, "FILE_PROCESSED") == []


async def test_a_processor_that_skips_itself_is_skipped_like_a_content_type_and_the_chain_goes_on(
    tmp_path, settings_for, start_daemon, nats_server
):
    chain = "uc_test_plugins:skip_me,uc_test_plugins:see_skips,save"
    daemon = start_daemon(**plugins(tmp_path, chain), SAVE_CONTENT_TYPES="image/*")
    await _ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    skips = daemon.metric("uploads_consumer_processor_outcomes_total", 'outcome="skipped",processor="skip_me"')
    assert daemon.terminate() == 0
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []
    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
    assert (result["processors"], result["skipped"]) == (["see_skips"], ["skip_me", "save"])
    assert result["outputs"] == {"see_skips": {"skipped": {"skip_me": "skip_me: not for this one"}}}, (
        "nothing half done"
    )
    assert skips == 1
    [line] = [json.loads(line) for line in daemon.log_text().splitlines() if '"step skipped"' in line]
    assert (line["processor"], line["reason"], line["event_id"]) == (
        "skip_me",
        "skip_me: not for this one",
        event.event_id,
    )


async def test_retryable_failures_reaching_max_deliver_are_dead_lettered(
    tmp_path, settings_for, start_daemon, nats_server
):
    settings = settings_for()
    daemon = start_daemon(**plugins(tmp_path, "uc_test_plugins:always_retry"), MAX_DELIVER="3", RETRY_BACKOFF="100ms")
    await _ready(daemon, nats_server.url)
    await publish_uploads(settings, make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert dead.headers["Uploads-Error-Class"] == "max_deliveries"
    assert dead.headers["Uploads-Deliveries"] == "3"
    assert "always_retry: the downstream service is down" in dead.headers["Uploads-Error"]


async def test_a_message_is_never_terminated_without_its_dead_letter_copy(tmp_path, start_daemon, nats_server):
    daemon = start_daemon(RETRY_BACKOFF="300ms")
    await _ready(daemon, nats_server.url)
    nc = await connect(nats_server.url)
    js = nc.jetstream()
    await js.delete_stream("FILE_UPLOADS_DLQ")  # the copy cannot be stored now
    [seq] = await publish_raw(nats_server.url, "file.uploads", [b"not json"])
    await asyncio.sleep(2)
    info = await consumer_info(nats_server.url)
    assert info.ack_floor.stream_seq < seq, "not terminated while the dead-letter stream is missing"
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') >= 2
    await js.add_stream(StreamConfig(name="FILE_UPLOADS_DLQ", subjects=["file.uploads.dlq"]))
    await nc.close()
    await wait_settled(nats_server.url, seq, daemon=daemon)
    assert daemon.terminate() == 0
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert dead.data == b"not json" and dead.headers["Uploads-Error-Class"] == "invalid_message"
    assert int(dead.headers["Uploads-Deliveries"]) >= 2


async def test_envelope_and_storage_failures_get_their_error_classes(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket
):
    settings = settings_for()
    daemon = start_daemon(MAX_FILE_SIZE="4KiB")
    await _ready(daemon, nats_server.url)
    [big] = await publish_uploads(settings, make_files(tmp_path / "a", 1, size=5000))
    # The object goes before its event is published: a running daemon may take the event at once.
    small = await publish_upload(
        settings,
        make_files(tmp_path / "b", 1, size=100)[0],
        "user@example.com",
        before_publish=lambda event: s3_client.delete_object(Bucket=bucket, Key=event.s3_data_key),
    )
    other_bucket = small.model_copy(
        update={"bucket_name": "someone-elses-bucket", "event_id": "00000000-0000-4000-8000-000000000001"}
    )
    await publish_raw(nats_server.url, "file.uploads", [event_json(other_bucket)])
    await wait_settled(nats_server.url, 3, daemon=daemon)
    assert daemon.metric("uploads_consumer_dead_letters_total", 'error_class="too_large"') == 1
    assert daemon.terminate() == 0
    classes = {
        json.loads(m.data)["event_id"]: m.headers["Uploads-Error-Class"]
        for m in await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    }
    assert classes == {big.event_id: "too_large", small.event_id: "not_found", other_bucket.event_id: "forbidden"}


async def test_health_readiness_and_metrics_endpoints(tmp_path, settings_for, start_daemon, nats_server):
    daemon = start_daemon()
    await _ready(daemon, nats_server.url)
    assert daemon.http_get("/healthz")[0] == 200
    assert daemon.http_get("/readyz")[0] == 200
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
    await wait_settled(nats_server.url, 2, daemon=daemon)
    status, text = daemon.http_get("/metrics")
    assert status == 200
    for name in (
        "uploads_consumer_messages_total",
        "uploads_consumer_dead_letters_total",
        "uploads_consumer_processing_duration_seconds_bucket",
        "uploads_consumer_message_age_seconds_bucket",
        "uploads_consumer_bytes_decrypted_total",
        "uploads_consumer_in_flight",
        "uploads_consumer_consumer_pending",
        "uploads_consumer_consumer_ack_pending",
        "uploads_consumer_redeliveries_total",
    ):
        assert name in text, name
    assert daemon.metric("uploads_consumer_bytes_decrypted_total") == 2 * 2048
    assert daemon.metric("uploads_consumer_processing_duration_seconds_count") == 2
    assert daemon.terminate() == 0


async def test_readyz_is_503_while_nats_is_unreachable(start_daemon, nats_server):
    nats_server.stop()
    daemon = start_daemon()
    daemon.wait_http()
    assert daemon.http_get("/readyz")[0] == 503
    assert daemon.http_get("/healthz")[0] == 200
    nats_server.start()
    deadline = time.monotonic() + 30
    while daemon.http_get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.2)
    assert daemon.terminate() == 0
    assert daemon.log_text().count("cannot connect to NATS yet") == 1, "said once, not once per attempt"


async def test_a_server_without_jetstream_is_said_once_and_waited_for(start_daemon, tmp_path):
    with NatsServer(tmp_path / "plain-nats", extra_args=["-js=false"]) as plain:
        daemon = start_daemon(NATS_URL=plain.url)
        daemon.wait_http()
        said = f"the server at {plain.url} has no JetStream: start nats-server with -js"
        await until(lambda: said in daemon.log_text(), 30, "the no-JetStream line", daemon)
        assert daemon.http_get("/readyz")[0] == 503
        await asyncio.sleep(3)  # two more attempts at least
        assert daemon.terminate() == 0
    assert daemon.log_text().count(said) == 1, "said once, not once per attempt"


async def test_an_unknown_processor_exits_2_naming_the_variable(start_daemon):
    daemon = start_daemon(PROCESSORS="save,nope")
    assert daemon.proc.wait(30) == 2
    lines = daemon.log_text().strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("uploads-consumer: configuration error: PROCESSORS:")
        and "nope" in lines[0]
    )


async def test_a_taken_http_port_exits_2_naming_the_variable(start_daemon, daemon_env):
    # The README's three consumers on one host each need their own HTTP_PORT; the second one on a
    # taken port crashed with `address already in use` and exit 1.
    first = start_daemon("first.log")
    first.wait_http(30)
    second = start_daemon("second.log", NATS_CONSUMER_NAME="notify", HTTP_PORT=daemon_env["HTTP_PORT"])
    assert second.proc.wait(30) == 2
    lines = second.log_text().strip().splitlines()
    assert lines == [
        f"uploads-consumer: configuration error: HTTP_PORT: port {daemon_env['HTTP_PORT']} is already in use "
        "(another daemon on this host?): give each daemon its own HTTP_PORT, or 0 to run without /healthz, "
        "/readyz and /metrics"
    ]
    assert first.terminate() == 0


async def test_auto_setup_accepts_a_consumer_made_elsewhere_and_changes_nothing(
    tmp_path, settings_for, start_daemon, nats_server
):
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="FILE_UPLOADS", subjects=["file.uploads", "file.other"], max_age=3600))
    # As setup-nats-consumer.sh makes it: --max-pending=100 --wait=30s, but a different ack wait here.
    await js.add_consumer(
        "FILE_UPLOADS",
        ConsumerConfig(
            durable_name="file_processor",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=45,
            max_ack_pending=7,
            max_deliver=-1,
        ),
    )
    await nc.close()
    daemon = start_daemon()
    await _ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    stream = await js.stream_info("FILE_UPLOADS")
    consumer = await js.consumer_info("FILE_UPLOADS", "file_processor")
    await nc.close()
    assert stream.config.subjects == ["file.uploads", "file.other"] and stream.config.max_age == 3600
    assert consumer.config.ack_wait == 45 and consumer.config.max_ack_pending == 7
    assert "found   consumer file_processor" in daemon.log_text()


async def test_work_longer_than_ack_wait_is_kept_alive_with_progress_and_not_redelivered(
    tmp_path, settings_for, start_daemon, nats_server
):
    chain = plugins(tmp_path, "uc_test_plugins:slow,uc_test_plugins:record")
    daemon = start_daemon(**chain, ACK_WAIT="2s", UC_TEST_SLOW_SECONDS="5")
    await _ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
    await wait_settled(nats_server.url, 2, daemon=daemon, timeout=30)
    info = await consumer_info(nats_server.url)
    assert daemon.metric("uploads_consumer_redeliveries_total") == 0
    assert daemon.terminate() == 0
    assert info.delivered.consumer_seq == 2, "one delivery each (num_redelivered counts only unacked ones)"
    assert len((tmp_path / "record.log").read_text().splitlines()) == 2


async def test_at_debug_every_line_is_json_including_nats_and_botocore(
    tmp_path, settings_for, start_daemon, nats_server
):
    daemon = start_daemon(LOG_LEVEL="DEBUG")
    await _ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.strip()]
    loggers = {line.get("logger", "") for line in lines}
    assert any(name.startswith("botocore") for name in loggers), sorted(loggers)
    assert any(line["event"] == "processed" for line in lines)


async def test_stale_plaintext_left_by_a_killed_process_is_removed_at_start(downloads, start_daemon, nats_server):
    import os

    work = downloads / ".incoming"
    stale, fresh = work / "job-old", work / "job-new"  # processors' work folders
    stale.mkdir(parents=True)
    fresh.mkdir()
    (stale / "audio.wav").write_bytes(b"secret audio")
    (fresh / "audio.wav").write_bytes(b"being written by another replica")
    stale_plain, fresh_plain = work / "plain-old.part", work / "plain-new.part"  # plaintext being decrypted
    stale_plain.write_bytes(b"secret plaintext")
    fresh_plain.write_bytes(b"being written by another replica")
    for path in (stale, stale / "audio.wav", stale_plain):
        os.utime(path, (time.time() - 7 * 3600,) * 2)
    daemon = start_daemon()
    await _ready(daemon, nats_server.url)
    assert daemon.terminate() == 0
    assert not stale.exists() and fresh.exists()
    assert not stale_plain.exists() and fresh_plain.exists()


async def test_plaintext_a_killed_process_left_is_removed_at_the_next_start_whatever_its_age(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    """A SIGKILL mid-chain leaves the decrypted plaintext behind; the next process to start removes it at
    once (its owner's lock is free), while a live replica's work in the same folder is left alone; and a
    clean stop leaves nothing of its own."""
    work = downloads / ".incoming"
    slow = {**plugins(tmp_path, "uc_test_plugins:slow"), "UC_TEST_SLOW_SECONDS": "60", "MAX_IN_FLIGHT": "1"}
    killed = start_daemon("killed.log", **slow)
    await _ready(killed, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1, prefix="one"))
    [left] = await until(lambda: list(work.glob("plain-*.part")), 30, "its plaintext", killed)
    replica = start_daemon("replica.log", **slow, HTTP_PORT=str(free_port()), SHUTDOWN_GRACE="1s")
    await wait_ready(replica)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1, prefix="two"))
    [working] = await until(lambda: [p for p in work.glob("plain-*.part") if p != left], 30, "the replica's", replica)
    killed.kill()
    fresh = start_daemon("next.log", HTTP_PORT=str(free_port()))
    await wait_ready(fresh)
    assert not left.exists(), "the killed process's plaintext, seconds old, is gone"
    assert working.exists(), "a live replica's is left alone"
    assert "removed what stopped processes left in the work folder" in fresh.log_text()
    assert replica.terminate() == 0
    assert not working.exists() and not list(work.glob(f"*{working.name.split('-')[1]}*")), (
        "a clean stop leaves nothing"
    )
    assert fresh.terminate() == 0
    assert sorted(p.name for p in work.iterdir()) == [], "nor does the last one"


async def test_liveness_holds_while_waiting_for_nats_however_long(settings_for):
    from uploads_consumer.consumer import UploadConsumer
    from uploads_consumer.source import PullSource

    consumer = UploadConsumer(settings_for())
    assert consumer.alive() and not consumer.ready(), "connecting or waiting for JetStream: not a reason to restart"
    consumer._source = PullSource(consumer.session, consumer.settings, consumer.metrics, print, None, None)  # type: ignore[arg-type]
    consumer._source.tick -= 3600
    consumer._pull_task = asyncio.get_running_loop().create_future()  # the pull loop has started ...
    assert not consumer.alive(), "... and has not turned for an hour: dead"
    consumer._pull_task.cancel()
