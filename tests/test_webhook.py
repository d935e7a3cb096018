"""The webhook processor through the real daemon: signed deliveries, retries by status, formats, secrets kept."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from helpers import make_files, publish_uploads, read_stream, results_by_event, wait_ready, wait_settled
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError
from uc_notify_plugins import TRANSCRIPT
from webhook_receiver import Answer, WebhookReceiver

from uploads_consumer.embedded import free_port
from uploads_consumer.errors import ConfigError
from uploads_consumer.processors import ProcessorEnvironment, load_processor
from uploads_consumer.processors.webhook import retry_after_seconds

TESTS = str(Path(__file__).parent)


def webhook_env(tmp_path: Path, url: str, chain: str = "save,webhook", **extra: str) -> dict[str, str]:
    return {
        "PROCESSORS": chain,
        "WEBHOOK_URL": url,
        "PYTHONPATH": TESTS,
        "UC_TEST_STATE_DIR": str(tmp_path),
        **extra,
    }


async def test_each_processed_upload_is_delivered_once_signed_with_its_event_id_and_the_outputs_before_it(
    tmp_path, settings_for, start_daemon, nats_server, downloads, webhook_receiver, webhook_secret
):
    chain = "save,uc_notify_plugins:transcribe,webhook"
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", chain, WEBHOOK_SECRET=webhook_secret)
    daemon = start_daemon(**env)
    await wait_ready(daemon, nats_server.url)
    files = make_files(tmp_path / "in", 3)
    events = await publish_uploads(settings_for(), files)
    began = time.time()
    await wait_settled(nats_server.url, 3, daemon=daemon)
    assert daemon.terminate() == 0

    deliveries = webhook_receiver.deliveries
    assert sorted(d.webhook_id for d in deliveries) == sorted(e.event_id for e in events), "once per upload"
    assert [d.verified for d in deliveries] == ["ok"] * 3
    for event, path in zip(events, files, strict=True):
        [delivery] = [d for d in deliveries if d.webhook_id == event.event_id]
        assert abs(int(delivery.headers["webhook-timestamp"]) - began) < 60
        assert delivery.headers["content-type"] == "application/json"
        body = delivery.json
        assert body["type"] == "file.processed"
        assert abs(datetime.fromisoformat(body["timestamp"]) - datetime.now(UTC)) < timedelta(minutes=1)
        assert body["data"] == {
            "event_id": event.event_id,
            "file_uuid": event.file_uuid,
            "email": "user@example.com",
            "consumer": "file_processor",
            "fetched": "plaintext",
            "original_filename": path.name,
            "size": 2048,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "content_type": "application/octet-stream",
            "outputs": {
                "save": {"path": str(downloads / "user@example.com" / event.file_uuid / path.name)},
                "transcribe": {"text": TRANSCRIPT, "language": "en"},
            },
            "upstream": {},
        }
    results = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))
    assert {r["outputs"]["webhook"]["status"] for rs in results.values() for r in rs} == {200}


async def test_503_then_429_with_retry_after_then_200_is_one_successful_delivery_and_the_wait_is_the_headers(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    script = {1: Answer(503), 2: Answer(429, {"Retry-After": "1"})}
    webhook_receiver.respond = lambda d: script.get(d.attempt, Answer(200))
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", WEBHOOK_SECRET=webhook_secret)
    # Without the header the second retry would wait 5s; the header cannot ask for more than that (the cap).
    daemon = start_daemon(**env, RETRY_BACKOFF="200ms,5s")
    await wait_ready(daemon, nats_server.url)
    events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 4
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 2
    assert daemon.terminate() == 0

    for event in events:
        attempts = [d for d in webhook_receiver.deliveries if d.webhook_id == event.event_id]
        assert [d.answer.status for d in attempts] == [503, 429, 200]
        assert [d.verified for d in attempts] == ["ok"] * 3, "signed afresh on every attempt"
        after_503 = attempts[1].at - attempts[0].at  # RETRY_BACKOFF: 200ms
        after_429 = attempts[2].at - attempts[1].at  # Retry-After: 1
        assert after_503 < 0.9 and 0.95 <= after_429 < 4, (after_503, after_429)
    assert len(webhook_receiver.succeeded()) == 2
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def test_a_retry_after_longer_than_the_longest_backoff_is_cut_to_it(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    webhook_receiver.respond = lambda d: Answer(503, {"Retry-After": "3600"}) if d.attempt == 1 else Answer(200)
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", WEBHOOK_SECRET=webhook_secret)
    daemon = start_daemon(**env, RETRY_BACKOFF="200ms,1s")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon, timeout=20)
    assert daemon.terminate() == 0
    first, second = webhook_receiver.deliveries
    assert 0.9 <= second.at - first.at < 5, "Retry-After 3600 capped at the longest RETRY_BACKOFF (1s)"


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    now = time.time()
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds(format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True), now) == (
        pytest.approx(30, abs=1)
    )
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0, "a date in the past: at once"
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("-5") is None
    assert retry_after_seconds("²") is None


async def test_400_and_410_are_dead_lettered_as_processor_failed_naming_the_status(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    statuses = {"file-0.bin": 400, "file-1.bin": 410}
    webhook_receiver.respond = lambda d: Answer(statuses[d.json["data"]["original_filename"]])
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", WEBHOOK_SECRET=webhook_secret)
    daemon = start_daemon(**env)
    await wait_ready(daemon, nats_server.url)
    events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.terminate() == 0
    assert len(webhook_receiver.deliveries) == 2, "not retried"
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")}
    for event, status in zip(events, (400, 410), strict=True):
        assert dead[event.event_id]["Uploads-Error-Class"] == "processor_failed"
        assert f"answered {status} " in dead[event.event_id]["Uploads-Error"]
    assert await read_stream(nats_server.url, "FILE_PROCESSED") == []


async def test_a_redirect_is_not_followed(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    elsewhere = webhook_receiver.url + "/elsewhere"
    webhook_receiver.respond = lambda d: Answer(302, {"Location": elsewhere}) if d.path == "/hook" else Answer(200)
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", WEBHOOK_SECRET=webhook_secret)
    daemon = start_daemon(**env)
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    assert [d.path for d in webhook_receiver.deliveries] == ["/hook"]
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert dead.headers["Uploads-Error-Class"] == "processor_failed"
    assert "answered 302 Found; redirects are not followed" in dead.headers["Uploads-Error"]


async def test_with_two_secrets_each_delivery_carries_two_signatures_each_verifying_with_its_own_secret(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    old = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", WEBHOOK_SECRET=f"{webhook_secret}, {old}")
    daemon = start_daemon(**env)
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [delivery] = webhook_receiver.deliveries
    signatures = delivery.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    for secret, signature in zip((webhook_secret, old), signatures, strict=True):
        StandardWebhook(secret).verify(delivery.body, {**delivery.headers, "webhook-signature": signature})
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(old).verify(delivery.body, {**delivery.headers, "webhook-signature": signatures[0]})


async def test_slack_gets_one_escaped_line_with_the_transcripts_first_words(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver
):
    env = webhook_env(tmp_path, webhook_receiver.url + "/slack", "uc_notify_plugins:transcribe,webhook")
    daemon = start_daemon(**env, WEBHOOK_FORMAT="slack")
    await wait_ready(daemon, nats_server.url)
    upload = tmp_path / "minutes & notes <!channel>.txt"
    upload.write_text("hello " * 500)
    await publish_uploads(settings_for(), [upload], email="ada@example.com")
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [delivery] = webhook_receiver.deliveries
    assert "webhook-signature" not in delivery.headers
    assert delivery.json == {
        "text": "ada@example.com uploaded minutes &amp; notes &lt;!channel&gt;.txt (2.9 KiB, text/plain): "
        '"Good morning everyone and welcome to the quarterly review of the uploads…"'
    }


async def test_discord_gets_one_line_in_content_and_pings_nobody(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver
):
    env = webhook_env(tmp_path, webhook_receiver.url + "/discord", "webhook")
    daemon = start_daemon(**env, WEBHOOK_FORMAT="discord")
    await wait_ready(daemon, nats_server.url)
    upload = tmp_path / "@everyone.bin"
    upload.write_bytes(os.urandom(68))
    await publish_uploads(settings_for(), [upload], email="ada@example.com")
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [delivery] = webhook_receiver.deliveries
    assert delivery.json == {
        # A chain of the webhook alone reads only the event: the stored name, no size or type.
        "content": "ada@example.com uploaded @everyone.bin",
        "allowed_mentions": {"parse": []},
    }


async def test_neither_the_secret_nor_the_urls_credentials_and_query_reach_the_log(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    webhook_receiver.respond = lambda d: Answer(503) if d.attempt == 1 else Answer(400)
    url = f"http://hook-user:hook-pass-8f2c@127.0.0.1:{webhook_receiver.port}/hook?token=query-token-5d1e"
    env = webhook_env(tmp_path, url, WEBHOOK_SECRET=webhook_secret, LOG_LEVEL="DEBUG")
    daemon = start_daemon(**env)
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    first = webhook_receiver.deliveries[0]
    assert first.headers["authorization"] == "Basic " + base64.b64encode(b"hook-user:hook-pass-8f2c").decode()
    log = daemon.log_text()
    origin = f"http://127.0.0.1:{webhook_receiver.port}"
    assert f"webhook: {origin} answered 503" in log and f"webhook: {origin} answered 400" in log
    for secret in (webhook_secret, webhook_secret.removeprefix("whsec_"), "hook-pass-8f2c", "query-token-5d1e"):
        assert secret not in log


async def test_a_bad_secret_is_exit_2_naming_the_variable_not_the_value(tmp_path, start_daemon):
    bad = "whsec_" + base64.b64encode(b"too short").decode()
    daemon = start_daemon(**webhook_env(tmp_path, "https://example.com/hook", WEBHOOK_SECRET=bad))
    assert daemon.proc.wait(30) == 2
    log = daemon.log_text()
    assert "WEBHOOK_SECRET: the secret decodes to 9 bytes" in log
    assert bad not in log and bad.removeprefix("whsec_") not in log


URL = "https://example.com/x"
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(
    ("variables", "variable", "problem"),
    [
        ({}, "WEBHOOK_URL", "is required"),
        (
            {"WEBHOOK_URL": "ftp://example.com/x", "WEBHOOK_SECRET": SECRET},
            "WEBHOOK_URL",
            "must be an http:// or https://",
        ),
        ({"WEBHOOK_URL": URL}, "WEBHOOK_SECRET", "is required when WEBHOOK_FORMAT is standard"),
        (
            {"WEBHOOK_URL": URL, "WEBHOOK_SECRET": SECRET.removeprefix("whsec_")},
            "WEBHOOK_SECRET",
            "does not start with whsec_",
        ),
        (
            {"WEBHOOK_URL": URL, "WEBHOOK_SECRET": "whsec_%%not-base64%%"},
            "WEBHOOK_SECRET",
            "is not whsec_ followed by base64",
        ),
        (
            {"WEBHOOK_URL": URL, "WEBHOOK_SECRET": f"{SECRET},whsec_"},
            "WEBHOOK_SECRET",
            "secret 2 of 2 decodes to 0 bytes",
        ),
        (
            {"WEBHOOK_URL": URL, "WEBHOOK_SECRET": SECRET, "WEBHOOK_FORMAT": "teams"},
            "WEBHOOK_FORMAT",
            "'standard', 'slack' or 'discord'",
        ),
        (
            {"WEBHOOK_URL": URL, "WEBHOOK_SECRET": SECRET, "WEBHOOK_TIMEOUT": "0"},
            "WEBHOOK_TIMEOUT",
            "must be greater than zero",
        ),
    ],
)
def test_configuration_problems_name_the_variable_and_never_the_secret(
    monkeypatch, tmp_path, variables, variable, problem
):
    for name in ("WEBHOOK_URL", "WEBHOOK_SECRET", "WEBHOOK_FORMAT", "WEBHOOK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_processor("webhook", environment(tmp_path))
    assert caught.value.variable == variable and problem in caught.value.reason
    assert SECRET.removeprefix("whsec_") not in caught.value.reason


def test_slack_and_discord_need_no_secret(monkeypatch, tmp_path):
    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("WEBHOOK_URL", "https://hooks.slack.com/services/T0/B0/abc")
    monkeypatch.setenv("WEBHOOK_FORMAT", "slack")
    assert load_processor("webhook", environment(tmp_path)).external_effect


def environment(tmp_path: Path) -> ProcessorEnvironment:
    from prometheus_client import CollectorRegistry

    return ProcessorEnvironment(
        download_path=tmp_path, chain=("webhook",), max_retry_delay=300.0, registry=CollectorRegistry()
    )


async def test_a_webhook_that_succeeded_is_not_sent_again_when_a_later_step_fails_once(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    env = webhook_env(
        tmp_path,
        webhook_receiver.url + "/hook",
        "save,webhook,uc_test_plugins:flaky_once",
        WEBHOOK_SECRET=webhook_secret,
    )
    daemon = start_daemon(**env)
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 1
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 1
    assert daemon.terminate() == 0
    assert [d.webhook_id for d in webhook_receiver.deliveries] == [event.event_id]
    assert "step already done; not repeated" in daemon.log_text()
    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[event.event_id]
    assert result["outputs"]["webhook"] == {"status": 200}, "the first delivery's outputs, reused"


async def test_a_receiver_slower_than_the_timeout_is_retried(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    webhook_receiver.respond = lambda d: Answer(200, delay=3) if d.attempt == 1 else Answer(200)
    env = webhook_env(tmp_path, webhook_receiver.url + "/hook", WEBHOOK_SECRET=webhook_secret)
    daemon = start_daemon(**env, WEBHOOK_TIMEOUT="500ms")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 1
    assert daemon.terminate() == 0
    assert len(webhook_receiver.deliveries) == 2
    assert "did not answer within 0.5s (WEBHOOK_TIMEOUT)" in daemon.log_text()
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def test_an_unreachable_receiver_is_retried_until_it_answers(
    tmp_path, settings_for, start_daemon, nats_server, webhook_secret
):
    port = free_port()
    env = webhook_env(tmp_path, f"http://127.0.0.1:{port}/hook", WEBHOOK_SECRET=webhook_secret)
    daemon = start_daemon(**env, RETRY_BACKOFF="300ms")
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    deadline = time.monotonic() + 20
    while daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') < 2:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)
    receiver = WebhookReceiver(webhook_secret, port=port)
    await receiver.start()
    try:
        await wait_settled(nats_server.url, 1, daemon=daemon)
    finally:
        await receiver.stop()
    assert daemon.terminate() == 0
    assert [(d.webhook_id, d.verified) for d in receiver.deliveries] == [(event.event_id, "ok")]
    assert f"webhook: cannot deliver to http://127.0.0.1:{port} (" in daemon.log_text()
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []
