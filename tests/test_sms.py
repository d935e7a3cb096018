"""The sms processor: through the real daemon against a Twilio-shaped server (exactly once across a kill
before the acknowledgement, a 429 waited out, a refused number dead-lettered, no secret in the log) and
against moto's SNS; in-process for each answer a provider gives; segments counted as a carrier does."""

from __future__ import annotations

import base64
import json
import signal
import urllib.request
from pathlib import Path

import pytest
import structlog
from helpers import (
    dead_letters,
    make_files,
    provision_now,
    publish_uploads,
    read_stream,
    until,
    wait_ready,
    wait_settled,
)
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from twilio_server import ACCOUNT, API_KEY, API_SECRET, BACKUP, ONCALL, TOKEN, Answer, count_segments, twilio_variables

from uploads_consumer.embedded import S3Server
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError
from uploads_consumer.events import parse_event
from uploads_consumer.processors import ProcessingContext, ProcessorEnvironment, StepSkipped, load_processor
from uploads_consumer.processors.sms import Sms, SmsSettings
from uploads_consumer.processors.sms.message import fit, segments

TESTS = str(Path(__file__).parent)
INTEROP = Path(__file__).parent / "interop"


# --- through the daemon -----------------------------------------------------------------------


async def test_through_the_daemon_each_upload_is_texted_once_per_number_across_a_kill_before_the_ack(
    tmp_path, twilio, settings_for, start_daemon, nats_server
):
    """A 429 with Retry-After is waited out, a number Twilio refuses dead-letters its upload naming the
    number's position, a kill after the send and before the ack sends nothing again, and neither the
    auth token nor the numbers appear in the log, the result events or the dead letters."""
    twilio.respond = lambda r: (
        Answer(429, 20429, {"Retry-After": "1"})
        if "busy" in r.body and len([q for q in twilio.requests if "busy" in q.body]) == 0
        else Answer(400, 21211)
        if "refused" in r.body and r.to == BACKUP
        else Answer()
    )
    await provision_now(settings_for(ACK_WAIT="3s"))
    variables = twilio_variables(
        twilio, SMS_TO=f"{ONCALL}, {BACKUP}", SMS_BODY="${filename} (${size_human}) from ${email}"
    )
    chain = {"PROCESSORS": "save,sms,uc_test_plugins:mark_then_slow", "PYTHONPATH": TESTS}
    state = {"UC_TEST_STATE_DIR": str(tmp_path), "LOG_LEVEL": "DEBUG"}
    first = start_daemon(**variables, **chain, **state, UC_TEST_SLOW_SECONDS="60")
    await wait_ready(first, nats_server.url)
    settings = settings_for()
    [killed] = await publish_uploads(settings, make_files(tmp_path / "killed", 1, prefix="killed"))
    await until(lambda: (tmp_path / f"reached-{killed.event_id}").exists(), 30, "sms done, next step reached", first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert [r.to for r in twilio.accepted()] == [ONCALL, BACKUP]

    second = start_daemon("second.log", **variables, **chain, **state, UC_TEST_SLOW_SECONDS="0")
    await wait_ready(second, nats_server.url)
    [busy] = await publish_uploads(settings, make_files(tmp_path / "busy", 1, prefix="busy"))
    [refused] = await publish_uploads(settings, make_files(tmp_path / "refused", 1, prefix="refused"))
    await wait_settled(nats_server.url, 3, daemon=second, timeout=60)
    assert second.terminate() == 0

    assert not [r.problems for r in twilio.requests if r.problems], "every request as Twilio takes it"
    accepted = twilio.accepted()
    by_upload = {name: [r.to for r in accepted if name in r.body] for name in ("killed", "busy", "refused")}
    assert by_upload == {"killed": [ONCALL, BACKUP], "busy": [ONCALL, BACKUP], "refused": [ONCALL]}
    [waited] = [r for r in twilio.requests if "busy" in r.body and r.answer.status == 429]
    [after] = [r for r in accepted if "busy" in r.body and r.to == ONCALL]
    assert after.at - waited.at >= 1.0, "Retry-After honoured"
    assert all(r.login == ACCOUNT and r.form["From"] == "+15005550006" for r in twilio.requests)
    assert all(r.body.startswith(("killed-0.bin (2.0 KiB) from user@example.com", "busy", "refused")) for r in accepted)

    results = {
        json.loads(m.data)["event_id"]: json.loads(m.data) for m in await read_stream(nats_server.url, "FILE_PROCESSED")
    }
    assert set(results) == {killed.event_id, busy.event_id}
    for event, name in ((killed, "killed"), (busy, "busy")):
        sms = results[event.event_id]["outputs"]["sms"]
        assert sms["message_ids"] == [r.sid for r in accepted if r.body.startswith(name)]
        assert (sms["provider"], sms["recipients"], sms["segments"], sms["encoding"], sms["truncated"]) == (
            "twilio",
            2,
            1,
            "GSM-7",
            False,
        )
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    assert dead[refused.event_id]["Uploads-Error-Class"] == "processor_failed"
    assert dead[refused.event_id]["Uploads-Error"] == (
        "sms: twilio refused recipient 2 of 2 in SMS_TO (Twilio error 21211: not a valid phone number); "
        "sent to 1 of 2 before it"
    )

    log = first.log_text() + second.log_text()
    assert "step already done; not repeated" in second.log_text()
    basic = base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
    everything = log + json.dumps(results) + json.dumps({k: dict(v) for k, v in dead.items()})
    for secret in (TOKEN, basic, ONCALL, BACKUP, BACKUP.removeprefix("+")):
        assert secret not in everything


def moto_texts(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/moto-api/data.json", timeout=10) as response:
        return json.load(response)["sns"]["SMS"]


async def test_through_the_daemon_sns_publishes_one_text_per_number(tmp_path, settings_for, start_daemon, nats_server):
    # A moto server of its own: its /moto-api/ lists every model it holds, and the S3 server the other
    # tests share holds objects that cannot be listed there.
    with S3Server(log_path=tmp_path / "sns.log") as sns:
        daemon = start_daemon(
            PROCESSORS="sms",
            SMS_PROVIDER="sns",
            SMS_SNS_ENDPOINT_URL=sns.url,
            SMS_FROM="Uploads",
            SMS_TO=f"{ONCALL},{BACKUP}",
            SMS_BODY="sns ${file_uuid}: ${filename} ✓",
        )
        await wait_ready(daemon, nats_server.url)
        [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
        await wait_settled(nats_server.url, 1, daemon=daemon)
        assert daemon.terminate() == 0
        texts = moto_texts(sns.url)
    assert sorted(t["phone_number"] for t in texts) == sorted([ONCALL, BACKUP])
    assert {t["message"] for t in texts} == {f"sns {event.file_uuid}: {event.stored_name} ✓"}
    [result] = [json.loads(m.data) for m in await read_stream(nats_server.url, "FILE_PROCESSED")]
    assert sorted(result["outputs"]["sms"]["message_ids"]) == sorted(t["message_id"] for t in texts)
    assert result["outputs"]["sms"]["encoding"] == "UCS-2"


# --- in-process: the processor against the server, answer by answer ------------------------------

BASIC = (INTEROP / "messages" / "basic.bin").read_bytes()


def upload(outputs: dict | None = None) -> ProcessingContext:
    ctx = ProcessingContext(
        event=parse_event(BASIC),
        download_path=Path("/nonexistent"),
        work_dir=Path("/nonexistent/work"),
        log=structlog.get_logger("test"),
        outputs=outputs or {},
    )
    ctx.current = "sms"
    return ctx


@pytest.fixture
async def processor(monkeypatch, tmp_path):
    """`processor(**variables)` → the sms processor as the daemon loads it, started, with only these SMS_*
    variables set."""
    made: list[Sms] = []

    async def make(chain: tuple[str, ...] = ("sms",), max_retry_delay: float = 300.0, **variables: str) -> Sms:
        for field in SmsSettings.model_fields:
            monkeypatch.delenv("SMS_" + field.upper(), raising=False)
        for variable, value in variables.items():
            monkeypatch.setenv(variable, value)
        env = ProcessorEnvironment(tmp_path, chain, max_retry_delay, CollectorRegistry(), consumer="notify")
        loaded = load_processor(chain[-1], env)
        assert isinstance(loaded.instance, Sms)
        await loaded.start()
        made.append(loaded.instance)
        return loaded.instance

    yield make
    for sms in made:
        await sms.close()


async def test_an_api_key_and_a_messaging_service_are_sent_as_twilio_takes_them(processor, twilio):
    variables = twilio_variables(twilio, SMS_FROM="MG" + "ab" * 16, SMS_TWILIO_API_KEY=API_KEY)
    variables["SMS_TWILIO_API_SECRET"] = API_SECRET
    del variables["SMS_TWILIO_AUTH_TOKEN"]
    sms = await processor(**variables)
    ctx = upload()
    await sms.run(ctx)
    await sms.close()
    [request] = twilio.requests
    assert request.problems == []
    assert request.login == API_KEY
    assert request.form["MessagingServiceSid"] == "MG" + "ab" * 16 and "From" not in request.form
    assert ctx.outputs["sms"]["message_ids"] == [request.sid]


async def test_429_and_503_are_retried_after_the_providers_delay_capped_at_the_longest_backoff(processor, twilio):
    sms = await processor(max_retry_delay=5.0, **twilio_variables(twilio))
    twilio.respond = lambda r: Answer(429, 20429, {"Retry-After": "3600"})
    with pytest.raises(RetryableError) as caught:
        await sms.run(upload())
    assert caught.value.delay == 5.0
    assert caught.value.reason == f"sms: {twilio.url} answered 429, Twilio error 20429"
    twilio.respond = lambda r: Answer(503, None, {"Retry-After": "2"})
    with pytest.raises(RetryableError) as caught:
        await sms.run(upload())
    assert caught.value.delay == 2.0
    await sms.close()


@pytest.mark.parametrize("code", [21211, 21614, 21408, 21610, 21612, 21635])
async def test_a_refused_number_is_dead_lettered_naming_its_position_never_the_number(processor, twilio, code):
    sms = await processor(**twilio_variables(twilio, SMS_TO=f"{ONCALL},{BACKUP}"))
    twilio.respond = lambda r: Answer(400, code) if r.to == BACKUP else Answer()
    with pytest.raises(PermanentError) as caught:
        await sms.run(upload())
    await sms.close()
    assert caught.value.error_class is ErrorClass.PROCESSOR_FAILED
    assert f"refused recipient 2 of 2 in SMS_TO (Twilio error {code}: " in caught.value.reason
    assert BACKUP not in caught.value.reason and BACKUP[1:] not in caught.value.reason


async def test_after_a_failure_at_the_second_number_a_retry_does_not_text_the_first_again(processor, twilio):
    sms = await processor(**twilio_variables(twilio, SMS_TO=f"{ONCALL},{BACKUP}"))
    twilio.respond = lambda r: Answer(503) if r.to == BACKUP and len(twilio.requests) < 2 else Answer()
    ctx = upload()
    with pytest.raises(RetryableError):
        await sms.run(ctx)
    await sms.run(ctx)
    await sms.close()
    assert [(r.to, r.answer.status) for r in twilio.requests] == [(ONCALL, 201), (BACKUP, 503), (BACKUP, 201)]
    assert ctx.outputs["sms"]["message_ids"] == [twilio.requests[0].sid, twilio.requests[2].sid]


async def test_refused_credentials_are_retried_loudly_naming_the_variable_never_the_token(processor, twilio):
    sms = await processor(**twilio_variables(twilio, SMS_TWILIO_AUTH_TOKEN="wrong-token-3f9a"))
    with capture_logs() as logs, pytest.raises(RetryableError) as caught:
        await sms.run(upload())
    await sms.close()
    assert caught.value.reason == (
        f"sms: {twilio.url} answered 401, Twilio error 20003: refused the credentials: check "
        "SMS_TWILIO_AUTH_TOKEN (retrying)"
    )
    assert any(entry["log_level"] == "error" for entry in logs)
    assert "wrong-token-3f9a" not in json.dumps(logs, default=str) + caught.value.reason


async def test_when_its_condition_does_not_hold_the_step_is_skipped_and_nothing_is_sent(processor, twilio):
    sms = await processor(
        chain=("scan", "sms"), **twilio_variables(twilio, SMS_WHEN="scan_result!=clean,email=*@example.com")
    )
    with pytest.raises(StepSkipped, match=r"sms: SMS_WHEN: scan_result!=clean does not hold"):
        await sms.run(upload({"scan": {"result": "clean"}}))
    assert twilio.requests == []
    await sms.run(upload({"scan": {"result": "Eicar-Signature"}}))
    await sms.close()
    assert len(twilio.accepted()) == 1


async def test_a_file_name_cannot_hide_text_or_control_the_message(processor, twilio):
    sms = await processor(**twilio_variables(twilio, SMS_BODY="${extract_summary}"), chain=("extract", "sms"))
    await sms.run(upload({"extract": {"summary": "invoice\u202egpj.exe\x1b[2J\r\nend"}}))
    await sms.close()
    assert twilio.requests[0].body == "invoice gpj.exe [2J \nend"


async def test_a_long_text_is_cut_to_the_segment_cap_and_says_so(processor, twilio):
    sms = await processor(
        **twilio_variables(twilio, SMS_BODY="${extract_summary}", SMS_MAX_SEGMENTS="2"), chain=("extract", "sms")
    )
    ctx = upload({"extract": {"summary": "€" * 400}})
    await sms.run(ctx)
    await sms.close()
    [request] = twilio.requests
    assert count_segments(request.body) == ("GSM-7", 2)
    assert request.body.endswith("...")
    assert ctx.outputs["sms"]["truncated"] is True and ctx.outputs["sms"]["segments"] == 2


@pytest.mark.parametrize(
    ("variables", "variable", "problem"),
    [
        ({"SMS_TO": "+16505550142,0044 7700 900123"}, "SMS_TO", "recipient 2 of 2 is not an E.164 number"),
        ({"SMS_TO": f"{ONCALL},{ONCALL}"}, "SMS_TO", "recipient 2 repeats recipient 1"),
        ({"SMS_TWILIO_AUTH_TOKEN": ""}, "SMS_TWILIO_AUTH_TOKEN", "is required with twilio"),
        ({"SMS_TWILIO_API_KEY": API_KEY}, "SMS_TWILIO_AUTH_TOKEN", "not both"),
        ({"SMS_TWILIO_ACCOUNT_SID": "AC123"}, "SMS_TWILIO_ACCOUNT_SID", "AC followed by 32 hex digits"),
        ({"SMS_FROM": "a sender that is far too long"}, "SMS_FROM", "is not an E.164 number"),
        ({"SMS_BODY": "${nope}"}, "SMS_BODY", "uses ${nope}, which is not a field"),
        ({"SMS_WHEN": "scan_result!=clean"}, "SMS_WHEN", "uses scan_result, which is not a field"),
        ({"SMS_WHEN": "content_type"}, "SMS_WHEN", "'content_type' is not field=glob or field!=glob"),
        ({"SMS_MAX_SEGMENTS": "11"}, "SMS_MAX_SEGMENTS", "less than or equal to 10"),
    ],
)
async def test_configuration_problems_name_the_variable_never_a_secret_or_a_number(
    processor, twilio, variables, variable, problem
):
    with pytest.raises(ConfigError) as caught:
        await processor(**{**twilio_variables(twilio), **variables})
    assert caught.value.variable == variable
    assert problem in caught.value.reason
    for secret in (TOKEN, ONCALL, "7700 900123"):
        assert secret not in caught.value.reason


# --- segments -------------------------------------------------------------------------------------


def test_gsm7_counts_the_extension_table_twice_and_never_splits_an_escape():
    assert segments("a" * 160) == 1 and segments("a" * 161) == 2
    assert segments("€" * 80) == 1 and segments("a" * 159 + "€") == 2, "€ is two septets"
    # 152 septets, then € (two): it would straddle the first segment's end, so it starts the second.
    assert segments("a" * 152 + "€" + "a" * 152) == 3
    assert segments("a" * 153 * 2) == 2 and segments("a" * (153 * 2 + 1)) == 3


def test_ucs2_counts_utf16_units_and_never_splits_a_surrogate_pair():
    assert segments("é" * 160) == 1, "é is in the GSM alphabet"
    assert segments("ł" * 70) == 1 and segments("ł" * 71) == 2
    assert segments("😀" * 35) == 1 and segments("😀" * 36) == 2, "an emoji is two units"
    assert segments("ł" * 66 + "😀" + "ł" * 66) == 3, "the pair would straddle the end of the first segment"


@given(st.text(alphabet=st.sampled_from("aZ0 €[]{}^~|\\\nłé😀ñ@£"), max_size=700))
def test_the_count_agrees_with_the_servers_own_reading_and_a_cut_text_fits(text):
    assert segments(text) == count_segments(text)[1]
    for cap in (1, 2, 3):
        cut = fit(text, cap)
        assert count_segments(cut.body) == (cut.encoding, cut.segments)
        assert cut.segments <= cap and cut.truncated == (segments(text) > cap)
