"""Tracing (docs/contract.md 4.18, docs/observability/tracing.md): the real daemon exporting to a real OTLP/HTTP
receiver; W3C trace context from the upload's headers, and on to every message and request it sends.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time

import pytest
import structlog
from helpers import (
    dead_letters,
    make_files,
    plugins,
    publish_raw,
    publish_uploads,
    read_stream,
    until,
    wait_ready,
    wait_settled,
)
from otlp_receiver import OtlpReceiver

from uploads_consumer import tracing
from uploads_consumer.embedded import free_port
from uploads_consumer.producer import event_json

EXPORTER_THREAD = "OtelBatchSpanRecordProcessor"  # the SDK's BatchSpanProcessor worker


def traceparent() -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a sampled upstream span, as the backend would send it."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def parsed(header: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00" and flags == "01", header
    return trace_id, span_id


@pytest.fixture
async def otlp():
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


def consumer_spans(otlp: OtlpReceiver, trace_id: str, outcome: str) -> list:
    return [s for s in otlp.trace(trace_id) if s.kind == "consumer" and s.attributes.get("uploads.outcome") == outcome]


async def test_an_upload_is_traced_from_its_traceparent_through_every_step_and_onwards(
    start_daemon, daemon_env, settings_for, otlp, webhook_receiver, webhook_secret, tmp_path
):
    otlp_token = secrets.token_hex(12)
    aws_secret = "aws-" + secrets.token_hex(12)
    hook_password, hook_token = secrets.token_hex(8), secrets.token_hex(8)
    hook_url = f"http://hookuser:{hook_password}@127.0.0.1:{webhook_receiver.port}/hook?token={hook_token}"
    daemon_env["AWS_SECRET_ACCESS_KEY"] = aws_secret  # moto takes any; unique, so a leak would show
    tracing_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {otlp_token}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    daemon = start_daemon(
        **plugins(tmp_path, "uc_test_plugins:flaky_once,save,webhook,uc_test_plugins:tracing_probe"),
        **tracing_env,
        WEBHOOK_URL=hook_url,
        WEBHOOK_SECRET=webhook_secret,
    )
    url = daemon_env["NATS_URL"]
    await wait_ready(daemon, url)
    settings = settings_for()
    good, untraced = await publish_uploads(settings, make_files(tmp_path / "in", 2), publish=False)
    [bad] = await publish_uploads(
        settings_for(ENCRYPTION_MASTER_KEY=base64.b64encode(os.urandom(32)).decode()),
        make_files(tmp_path / "other-key", 1),
        publish=False,
    )
    good_header, good_trace, upstream_span = traceparent()
    bad_header, bad_trace, _ = traceparent()
    seqs = await publish_raw(
        url,
        "file.uploads",
        [event_json(good), event_json(bad), event_json(untraced)],
        [
            {"Nats-Msg-Id": good.event_id, "traceparent": good_header},
            {"Nats-Msg-Id": bad.event_id, "Traceparent": bad_header},  # a producer's own spelling
            {"Nats-Msg-Id": untraced.event_id},
        ],
    )
    # `uploads-consumer publish` with tracing on starts the trace itself.
    published = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "publish", str(make_files(tmp_path / "cli", 1)[0])],
        env={**daemon_env, **tracing_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert published.returncode == 0, published.stderr

    # The upload with a traceparent: two deliveries (flaky_once fails the first), both under its trace.
    [done] = await otlp.wait_for(lambda: consumer_spans(otlp, good_trace, "acked"), what="the acked delivery")
    [retried] = consumer_spans(otlp, good_trace, "nacked")
    assert done.name == "process file.uploads" and done.parent_span_id == upstream_span
    assert done.links[0][:2] == (good_trace, upstream_span)  # the creation context, as semconv asks
    assert done.attributes == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "file.uploads",
        "messaging.consumer.group.name": "file_processor",
        "messaging.message.id": good.event_id,
        "messaging.message.body.size": len(event_json(good)),
        "messaging.nats.stream": "FILE_UPLOADS",
        "messaging.nats.stream_sequence": seqs[0],
        "messaging.nats.delivery_count": 2,
        "uploads.outcome": "acked",
    }
    assert not done.error and done.resource["service.name"] == "uploads-consumer"
    steps = await otlp.wait_for(
        lambda: (c := otlp.children(done)) and any(s.name == "settle" for s in c) and c, what="the steps"
    )
    assert sorted(s.name for s in steps) == sorted(
        [
            "idempotency lookup",
            "S3.GetObject",  # metadata.json
            "S3.GetObject",  # the object, sent with the lookup
            "decrypt",
            "processor flaky_once",
            "processor save",
            "processor webhook",
            "checkpoint webhook",
            "processor tracing_probe",
            "send file.processed.file_processor",
            "idempotency record",
            "settle",
        ]
    )
    by_name = {s.name: s for s in steps}
    gets = [s for s in steps if s.name == "S3.GetObject"]
    assert all(g.kind == "client" and g.attributes["aws.s3.bucket"] == settings.s3_bucket_name for g in gets)
    assert sorted(g.attributes["http.response.body.size"] for g in gets)[1] == 2048 + 28  # the object's size
    assert by_name["send file.processed.file_processor"].kind == "producer"
    assert (
        by_name["send file.processed.file_processor"].attributes["messaging.message.id"]
        == f"{good.event_id}:file_processor:processed"
    )
    # The first delivery's retry: an event and the error class, on the delivery and on the step.
    assert retried.parent_span_id == upstream_span and retried.attributes["messaging.nats.delivery_count"] == 1
    assert retried.error and retried.attributes["error.type"] == "transient"
    assert retried.event("retry") == {"uploads.error_class": "transient", "uploads.retry_delay_s": 0.2}
    [flaky] = [s for s in otlp.children(retried) if s.name == "processor flaky_once"]
    assert flaky.error and flaky.attributes["error.type"] == "transient"

    # Propagated out: the result event and the webhook continue the same trace, from their own spans.
    results = [m for m in await read_stream(url, "FILE_PROCESSED") if json.loads(m.data)["event_id"] == good.event_id]
    assert parsed(results[0].headers["traceparent"]) == (
        good_trace,
        by_name["send file.processed.file_processor"].span_id,
    )
    [hook] = [d for d in webhook_receiver.deliveries if d.webhook_id == good.event_id]
    assert hook.verified == "ok" and parsed(hook.headers["traceparent"]) == (
        good_trace,
        by_name["processor webhook"].span_id,
    )

    # The dead-lettered upload: error status and class, a dead_letter event, its trace on the copy.
    [dead] = await otlp.wait_for(lambda: consumer_spans(otlp, bad_trace, "dead_lettered"), what="the dead letter")
    assert dead.error and dead.attributes["error.type"] == "decrypt_failed" and dead.status_message == "decrypt_failed"
    assert dead.event("dead_letter")["uploads.error_class"] == "decrypt_failed"
    [decrypt] = [s for s in otlp.children(dead) if s.name == "decrypt"]
    assert decrypt.error and decrypt.attributes["error.type"] == "decrypt_failed"
    [copy] = await dead_letters(url)
    assert parsed(copy.headers["traceparent"])[0] == bad_trace

    # No traceparent: a trace of its own, rooted at the delivery.
    [root] = await otlp.wait_for(
        lambda: [
            s
            for s in otlp.spans
            if s.attributes.get("messaging.message.id") == untraced.event_id
            and s.attributes.get("uploads.outcome") == "acked"
        ],
        what="the untraced upload",
    )
    assert root.parent_span_id == "" and root.links == [] and root.trace_id not in (good_trace, bad_trace)

    # `uploads-consumer publish`: the daemon's delivery is a child of the command's send span.
    [sent] = await otlp.wait_for(lambda: [s for s in otlp.spans if s.name == "send file.uploads"], what="publish")
    assert sent.kind == "producer" and sent.parent_span_id == ""
    [continued] = await otlp.wait_for(lambda: consumer_spans(otlp, sent.trace_id, "acked"), what="its delivery")
    assert continued.parent_span_id == sent.span_id

    # Logs lead to their trace: the lines about the traced upload carry its trace id and a span id.
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    processed = [line for line in lines if line.get("event") == "processed" and line.get("event_id") == good.event_id]
    assert processed and processed[0]["trace_id"] == good_trace and len(processed[0]["span_id"]) == 16

    # The exporter is the SDK's, with the standard variables: OTEL_EXPORTER_OTLP_HEADERS was sent.
    outputs = json.loads(results[0].data)["outputs"]
    assert EXPORTER_THREAD in outputs["tracing_probe"]["threads"]
    assert all(h.get("authorization") == f"Bearer {otlp_token}" for h in otlp.request_headers)

    # Nothing secret ever left: not the master key, the S3 secret, the webhook's secret, password,
    # token or URL, the collector's token, nor a presigned URL.
    leaks = [
        daemon_env["ENCRYPTION_MASTER_KEY"],
        aws_secret,
        webhook_secret,
        webhook_secret.removeprefix("whsec_"),
        hook_password,
        hook_token,
        hook_url,
        otlp_token,
        good.s3_data_key,  # object keys and addresses are not secrets, but not the tracer's business
        good.email,
        "X-Amz-Signature",
        "X-Amz-Credential",
    ]
    texts = otlp.strings()
    assert texts and [(secret, t) for t in texts for secret in leaks if secret in t] == []
    assert daemon.terminate() == 0


async def test_without_an_endpoint_nothing_of_opentelemetry_is_loaded_and_nothing_propagates(
    start_daemon, daemon_env, settings_for, tmp_path
):
    daemon = start_daemon(
        **plugins(tmp_path, "uc_test_plugins:tracing_probe"),
        OTEL_SERVICE_NAME="uploads-consumer-test",  # other OTEL_* variables alone change nothing
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    url = daemon_env["NATS_URL"]
    await wait_ready(daemon, url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1), publish=False)
    header, _, _ = traceparent()
    await publish_raw(
        url, "file.uploads", [event_json(event)], [{"Nats-Msg-Id": event.event_id, "traceparent": header}]
    )
    [result] = await until(lambda: read_stream(url, "FILE_PROCESSED"), 20, "the result event", daemon)
    probe = json.loads(result.data)["outputs"]["tracing_probe"]
    assert probe["otel_modules"] == []
    assert not [name for name in probe["threads"] if name.startswith("OtelBatch")]
    assert "traceparent" not in (result.headers or {})
    assert "trace_id" not in daemon.log_text()
    assert daemon.terminate() == 0


async def test_an_unreachable_collector_costs_no_upload_and_holds_the_stop_at_most_its_share(
    start_daemon, daemon_env, settings_for, tmp_path
):
    daemon = start_daemon(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        OTEL_BSP_SCHEDULE_DELAY="100",
        SHUTDOWN_GRACE="1s",
    )
    url = daemon_env["NATS_URL"]
    await wait_ready(daemon, url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 3))
    await wait_settled(url, 3, daemon=daemon)
    assert len(await read_stream(url, "FILE_PROCESSED")) == 3
    began = time.monotonic()
    assert daemon.terminate() == 0
    # The exporter retries for 10 s (OTEL_EXPORTER_OTLP_TIMEOUT) and the SDK's shutdown waits up to
    # 30 s; the daemon gives it FLUSH_TIMEOUT, alongside the NATS drain.
    assert time.monotonic() - began < tracing.FLUSH_TIMEOUT + 3
    assert "tracing on" in daemon.log_text()


@pytest.mark.parametrize(
    ("environment", "wanted"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
    ],
)
def test_tracing_is_on_only_with_an_otlp_endpoint_and_not_disabled(monkeypatch, environment, wanted):
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing.wanted() is wanted
    assert bool(tracing.log_processors()) is wanted


def test_with_an_endpoint_but_without_the_otel_extra_tracing_stays_off_and_says_so(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed: importing it fails
    with structlog.testing.capture_logs() as logs:
        assert tracing.start() is False
    assert tracing._tracer is None and tracing.log_processors() == []
    assert "not installed (extra `otel`)" in logs[0]["event"]


def test_off_every_hook_is_a_shared_no_op():
    assert tracing._tracer is None  # this test process never starts tracing
    assert tracing.span("decrypt") is tracing.span("processor", "save") is tracing.s3("GetObject", "b")
    headers = {"Nats-Msg-Id": "x"}
    assert tracing.inject(headers) is headers
