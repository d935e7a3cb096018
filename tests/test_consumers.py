"""Several consumers on one stream, each doing its own job (the seed's Process → Notify → Archive), and what
makes them independent: their own idempotency records, result events, dead letters and replays. Also
chains that fetch only what they need, and several instances of one processor. Real daemons throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from helpers import (
    connect,
    dead_letters,
    make_files,
    plugins,
    publish_raw,
    publish_uploads,
    read_stream,
    results_by_event,
    until,
    wait_ready,
    wait_settled,
)
from nats.js.errors import BucketNotFoundError
from webhook_receiver import Answer, WebhookReceiver

from uploads_consumer.deadletter import stored_messages
from uploads_consumer.embedded import TcpProxy, free_port
from uploads_consumer.producer import event_json


def webhook(url: str, secret: str, **extra: str) -> dict[str, str]:
    return {"PROCESSORS": "webhook", "WEBHOOK_URL": url, "WEBHOOK_SECRET": secret, **extra}


def stopped(daemon):
    """SIGSTOP the daemon (a consumer running behind); SIGCONT when the block ends."""

    class Paused:
        def __enter__(self):
            os.kill(daemon.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(daemon.proc.pid, signal.SIGCONT)

    return Paused()


async def buckets(url: str) -> set[str]:
    nc = await connect(url)
    try:
        js = nc.jetstream(timeout=5)
        found = set()
        for name in ("file_processor_done", "notifier_done", "notify_done", "archive_done"):
            try:
                await js.key_value(name)
                found.add(name)
            except BucketNotFoundError:
                pass
        return found
    finally:
        await nc.close()


async def test_a_notifier_behind_the_processor_still_notifies_every_upload_once(
    tmp_path, settings_for, start_daemon, nats_server, downloads, webhook_receiver, webhook_secret
):
    """The issue's report, as a user tries it: the second daemon changes only its consumer name and chain.
    It used to send 0 of 12 webhooks: the shared default DEDUPE_BUCKET made every upload look done."""
    processor = start_daemon("processor.log")  # every default: file_processor, PROCESSORS=save
    notifier = start_daemon(
        "notifier.log",
        NATS_CONSUMER_NAME="notifier",
        HTTP_PORT=str(free_port()),
        **webhook(webhook_receiver.url + "/hook", webhook_secret),
    )
    await wait_ready(processor, nats_server.url)
    await wait_ready(notifier)
    with stopped(notifier):
        events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 12))
        await wait_settled(nats_server.url, 12, daemon=processor)
    await wait_settled(nats_server.url, 12, daemon=notifier, consumer="notifier")
    assert processor.terminate() == 0 and notifier.terminate() == 0

    ids = sorted(e.event_id for e in events)
    assert sorted(d.webhook_id for d in webhook_receiver.deliveries) == ids, "each upload notified, once"
    assert {d.verified for d in webhook_receiver.deliveries} == {"ok"}
    assert "duplicate acknowledged" not in notifier.log_text()
    assert sum(1 for _ in downloads.glob("user@example.com/*/*.bin")) == 12
    results = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))
    assert sorted(results) == ids
    for event in events:
        by = {r["consumer"]: r for r in results[event.event_id]}
        assert set(by) == {"file_processor", "notifier"}, "one result event per consumer"
        assert by["file_processor"]["fetched"] == "plaintext" and by["notifier"]["fetched"] == "event"
    assert await buckets(nats_server.url) == {"file_processor_done", "notifier_done"}


async def test_process_notify_archive_each_do_their_job_once_with_the_processor_stopped_until_the_others_finish(
    tmp_path,
    settings_for,
    start_daemon,
    nats_server,
    downloads,
    webhook_receiver,
    webhook_secret,
    s3_client,
    bucket,
):
    archive_bucket = bucket + "-archive"
    s3_client.create_bucket(Bucket=archive_bucket)
    process = start_daemon("process.log")
    notify = start_daemon(
        "notify.log",
        NATS_CONSUMER_NAME="notify",
        HTTP_PORT=str(free_port()),
        **webhook(webhook_receiver.url + "/hook", webhook_secret),
    )
    archive = start_daemon(
        "archive.log",
        NATS_CONSUMER_NAME="archive",
        HTTP_PORT=str(free_port()),
        PROCESSORS="archive",
        ARCHIVE_BUCKET=archive_bucket,
    )
    await wait_ready(process, nats_server.url)
    await wait_ready(notify)
    await wait_ready(archive)
    with stopped(process):
        events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 6))
        await wait_settled(nats_server.url, 6, daemon=notify, consumer="notify")
        await wait_settled(nats_server.url, 6, daemon=archive, consumer="archive")
    await wait_settled(nats_server.url, 6, daemon=process)
    for daemon in (process, notify, archive):
        assert daemon.terminate() == 0

    ids = sorted(e.event_id for e in events)
    assert sorted(d.webhook_id for d in webhook_receiver.deliveries) == ids
    archived = {o["Key"] for o in s3_client.list_objects_v2(Bucket=archive_bucket)["Contents"]}
    assert archived == {k for e in events for k in (e.s3_data_key, e.s3_metadata_key)}
    assert sum(1 for _ in downloads.glob("user@example.com/*/*.bin")) == 6
    results = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))
    assert {e: sorted(r["consumer"] for r in rs) for e, rs in results.items()} == {
        e: ["archive", "file_processor", "notify"] for e in ids
    }
    for daemon, name in ((process, "file_processor"), (notify, "notify"), (archive, "archive")):
        assert "duplicate acknowledged" not in daemon.log_text(), name


async def test_a_webhook_only_consumer_makes_no_s3_request_yet_skips_duplicates_and_dead_letters_a_forged_event(
    tmp_path, settings_for, start_daemon, nats_server, s3_server, webhook_receiver, webhook_secret
):
    with TcpProxy(s3_server.port) as s3_counter:  # the daemon's only way to S3: every connection counted
        daemon = start_daemon(S3_ENDPOINT_URL=s3_counter.url, **webhook(webhook_receiver.url, webhook_secret))
        await wait_ready(daemon, nats_server.url)
        events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 3))
        await wait_settled(nats_server.url, 3, daemon=daemon)
        forged = events[0].model_copy(update={"s3_data_key": "uploads/someone@else.com/x/y.enc"})
        # the same upload again (a new message, as a backend retry would publish), then a forged event
        await publish_raw(nats_server.url, "file.uploads", [event_json(events[1]), event_json(forged)])
        await wait_settled(nats_server.url, 5, daemon=daemon)
        assert daemon.metric("uploads_consumer_messages_total", 'outcome="duplicate"') == 1
        assert daemon.terminate() == 0
        assert s3_counter.connections == 0, "a chain of webhooks reads nothing from S3"

    assert sorted(d.webhook_id for d in webhook_receiver.deliveries) == sorted(e.event_id for e in events)
    body = webhook_receiver.deliveries[0].json["data"]
    assert body["fetched"] == "event" and body["consumer"] == "file_processor"
    assert (body["original_filename"], body["size"], body["sha256"], body["content_type"]) == (None,) * 4
    [dead] = await dead_letters(nats_server.url)
    assert dead.headers["Uploads-Error-Class"] == "forbidden" and dead.headers["Uploads-Consumer"] == "file_processor"


async def test_two_webhook_instances_deliver_to_their_own_receivers_with_their_own_secrets_and_formats(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    slack = WebhookReceiver()
    await slack.start()
    try:
        # slack fails the first delivery of each upload: ops, already done, is not sent again
        slack.respond = lambda d: Answer(503) if d.attempt == 1 else Answer(200)
        daemon = start_daemon(
            PROCESSORS="webhook:ops,webhook:slack",
            WEBHOOK_TIMEOUT="5s",  # shared by both: an instance falls back to WEBHOOK_*
            WEBHOOK_OPS_URL=webhook_receiver.url + "/ops",
            WEBHOOK_OPS_SECRET=webhook_secret,
            WEBHOOK_SLACK_URL=slack.url + "/slack",
            WEBHOOK_SLACK_FORMAT="slack",
        )
        await wait_ready(daemon, nats_server.url)
        events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
        await wait_settled(nats_server.url, 2, daemon=daemon)
        assert daemon.metric("uploads_consumer_processor_outcomes_total", 'processor="webhook:ops",outcome="ok"') == 2
        assert daemon.metric("uploads_consumer_processor_outcomes_total", 'processor="webhook:slack",outcome="ok"') == 2
        assert (
            daemon.metric("uploads_consumer_processor_outcomes_total", 'processor="webhook:slack",outcome="retry"') == 2
        )
        assert daemon.terminate() == 0
    finally:
        await slack.stop()

    ids = sorted(e.event_id for e in events)
    assert sorted(d.webhook_id for d in webhook_receiver.deliveries) == ids, "ops: once each, signed"
    assert {(d.path, d.verified) for d in webhook_receiver.deliveries} == {("/ops", "ok")}
    assert sorted(d.answer.status for d in slack.deliveries) == [200, 200, 503, 503], "slack: retried once each"
    assert all(
        "webhook-signature" not in d.headers and d.json["text"].startswith("user@example.com uploaded ")
        for d in slack.deliveries
    )
    for event in events:
        [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
        assert result["processors"] == ["webhook:ops", "webhook:slack"]
        assert result["outputs"]["webhook:ops"] == {"status": 200} == result["outputs"]["webhook:slack"]


def dlq_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "dlq", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_dlq_replay_gives_a_dead_letter_back_to_the_consumer_that_made_it_and_to_no_other(
    tmp_path, settings_for, start_daemon, nats_server, daemon_env, webhook_receiver, webhook_secret
):
    # notify refuses one upload (410 on its first delivery); process does its job; both keep running
    notify_env = webhook(webhook_receiver.url, webhook_secret, NATS_CONSUMER_NAME="notify", HTTP_PORT=str(free_port()))
    webhook_receiver.respond = lambda d: Answer(410) if d.attempt == 1 else Answer(200)
    process = start_daemon("process.log", **plugins(tmp_path, "save,uc_test_plugins:record"))
    notify = start_daemon("notify.log", **notify_env)
    await wait_ready(process, nats_server.url)
    await wait_ready(notify)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=process)
    await wait_settled(nats_server.url, 1, daemon=notify, consumer="notify")
    [dead] = await dead_letters(nats_server.url)
    assert (dead.headers["Uploads-Consumer"], dead.headers["Uploads-Error-Class"]) == ("notify", "processor_failed")

    assert json.loads(dlq_cli(daemon_env, "list", "--json", "--consumer", "file_processor").stdout or "null") is None
    [listed] = [
        json.loads(line) for line in dlq_cli(daemon_env, "list", "--json", "--consumer", "notify").stdout.splitlines()
    ]
    assert listed["consumer"] == "notify" and listed["event_id"] == event.event_id
    replay = dlq_cli(daemon_env, "replay", "--all")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 message (1 to file.uploads.replay.notify)" in replay.stdout

    await until(lambda: len(webhook_receiver.succeeded()) == 1, 30, "the replayed upload notified", notify)
    await wait_settled(nats_server.url, 2, daemon=notify, consumer="notify")
    info = await wait_settled(nats_server.url, 1, daemon=process)
    assert process.terminate() == 0 and notify.terminate() == 0
    assert info.delivered.stream_seq == 1, "the processing consumer never saw the replay"
    assert (tmp_path / "record.log").read_text().count(event.event_id) == 1, "processed once, not again"
    assert await dead_letters(nats_server.url) == []


async def test_dlq_replay_refuses_where_only_the_shared_subject_would_reach_the_consumer(
    tmp_path, settings_for, nats_server, daemon_env
):
    """A stream made elsewhere (the backend's: file.uploads alone) and two consumers: replaying on
    file.uploads would make the other consumer process the upload again. Refused, saying what to do;
    after `setup --enable-replay` the replay goes to the consumer's own subject."""
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(name="FILE_UPLOADS", subjects=["file.uploads"])
    finally:
        await nc.close()
    for name in ("file_processor", "notify"):
        setup = subprocess.run(
            [sys.executable, "-m", "uploads_consumer", "setup"],
            env={**daemon_env, "NATS_CONSUMER_NAME": name},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert setup.returncode == 0 and "--enable-replay" in setup.stdout, setup.stdout + setup.stderr
    await publish_raw(
        nats_server.url,
        "file.uploads.dlq",
        [b'{"not": "an upload"}'],
        [{"Uploads-Consumer": "notify", "Uploads-Error-Class": "invalid_message", "Nats-Msg-Id": "x"}],
    )
    refused = dlq_cli(daemon_env, "replay", "--all")
    assert refused.returncode == 1 and "replayed 0 messages" in refused.stdout
    assert "file.uploads would reach file_processor too" in refused.stderr and "setup --enable-replay" in refused.stderr

    enabled = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "setup", "--enable-replay"],
        env={**daemon_env, "NATS_CONSUMER_NAME": "notify"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enabled.returncode == 0, enabled.stderr
    assert "added   subject file.uploads.replay.> to stream FILE_UPLOADS" in enabled.stdout
    assert "added   filter file.uploads.replay.notify to consumer notify" in enabled.stdout
    replay = dlq_cli(daemon_env, "replay", "--all")
    assert replay.returncode == 0 and "(1 to file.uploads.replay.notify)" in replay.stdout, replay.stderr
    nc = await connect(nats_server.url)
    try:
        [stored] = await stored_messages(nc.jetstream(timeout=5), "FILE_UPLOADS")
    finally:
        await nc.close()
    assert stored.subject == "file.uploads.replay.notify"


async def test_a_dead_letter_reason_with_non_ascii_text_reads_back_as_it_was_written(nats_server, daemon_env):
    """nats-py hands back a stored message's UTF-8 header as undecoded bytes in an email Header: `dlq list
    --json` could not even serialise it. Every reader of stored messages gets the text as published."""
    reason = "content type of «Résumé…» is not allowed"
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="DLQX", subjects=["x.dlq"])
        await js.publish("x.dlq", b"{}", headers={"Uploads-Error": reason, "Uploads-Consumer": "nötify"})
        [stored] = await stored_messages(js, "DLQX")
    finally:
        await nc.close()
    assert stored.headers["Uploads-Error"] == reason and stored.headers["Uploads-Consumer"] == "nötify"
    listed = dlq_cli({**daemon_env, "DLQ_STREAM_NAME": "DLQX"}, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["reason"] == reason


async def test_ack_wait_alone_is_enough_the_pull_timeout_follows_it(start_daemon, nats_server):
    """`ACK_WAIT=5s` alone used to stop the start: "FETCH_TIMEOUT: must be shorter than ACK_WAIT (5s)",
    about a variable the operator never set (FETCH_TIMEOUT empty counts as unset)."""
    daemon = start_daemon(ACK_WAIT="5s", FETCH_TIMEOUT="")
    await wait_ready(daemon, nats_server.url)
    assert daemon.terminate() == 0
    refused = start_daemon("refused.log", ACK_WAIT="5s", FETCH_TIMEOUT="5s", HTTP_PORT=str(free_port()))
    assert refused.proc.wait(30) == 2
    assert "FETCH_TIMEOUT: must be shorter than ACK_WAIT (5s)" in refused.log_text()


async def test_dlq_replay_refuses_where_another_consumer_would_take_in_the_replay_subject_too(
    settings_for, nats_server, daemon_env
):
    """A consumer made elsewhere without a filter (or with a wildcard one) would get any replay subject."""
    from helpers import provision_now
    from nats.js.api import AckPolicy, ConsumerConfig

    await provision_now(settings_for(NATS_CONSUMER_NAME="notify"))
    nc = await connect(nats_server.url)
    try:
        await nc.jetstream(timeout=10).add_consumer(
            "FILE_UPLOADS", ConsumerConfig(durable_name="catchall", ack_policy=AckPolicy.EXPLICIT)
        )
    finally:
        await nc.close()
    await publish_raw(
        nats_server.url,
        "file.uploads.dlq",
        [b'{"not": "an upload"}'],
        [{"Uploads-Consumer": "notify", "Uploads-Error-Class": "invalid_message", "Nats-Msg-Id": "y"}],
    )
    refused = dlq_cli(daemon_env, "replay", "--all")
    assert refused.returncode == 1 and "replayed 0 messages" in refused.stdout
    assert "file.uploads.replay.notify would reach catchall too" in refused.stderr
    assert len(await dead_letters(nats_server.url)) == 1, "left in place"
