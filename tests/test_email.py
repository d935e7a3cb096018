"""The email processor against a real SMTP server (aiosmtpd, STARTTLS with a test CA, AUTH): through the
real daemon once for what a deployment sees, and in-process for each answer a server can give."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import structlog
from aiosmtplib.email import flatten_message
from helpers import (
    INTEROP,
    dead_letters,
    make_files,
    publish_raw,
    publish_uploads,
    read_stream,
    wait_ready,
    wait_settled,
)
from prometheus_client import CollectorRegistry
from secure_support import Pki, make_pki
from smtp_server import SmtpServer
from uc_notify_plugins import TRANSCRIPT

from uploads_consumer.embedded import free_port
from uploads_consumer.envelope import parse_metadata
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError
from uploads_consumer.events import parse_event
from uploads_consumer.processors import ProcessingContext, ProcessorEnvironment, load_processor
from uploads_consumer.processors.announce import RateLimit
from uploads_consumer.processors.email import Email, EmailSettings, message_id

TESTS = str(Path(__file__).parent)
FROM = "Uploads <uploads@example.org>"
MESSAGE_ID = re.compile(r"^<[0-9a-f-]{36}\.[A-Za-z0-9_%-]+\.[A-Za-z0-9_%-]+@[A-Za-z0-9.-]+>$")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("smtp-pki"))


@pytest.fixture
def smtp(pki: Pki) -> Iterator[SmtpServer]:
    """STARTTLS required, AUTH required: what a mail submission service asks."""
    server = SmtpServer(pki).start()
    try:
        yield server
    finally:
        server.stop()


def email_variables(server: SmtpServer, pki: Pki | None, **extra: str) -> dict[str, str]:
    """What the processor needs to send through `server`: its URL, our login, the test CA."""
    variables = {
        "EMAIL_SMTP_URL": server.url,
        "EMAIL_FROM": FROM,
        "EMAIL_USERNAME": server.username,
        "EMAIL_PASSWORD": server.password,
        **({"EMAIL_TLS_CA": str(pki.ca)} if pki is not None else {}),
    }
    return {**variables, **extra}


# --- through the daemon -----------------------------------------------------------------------


async def test_through_the_daemon_one_email_per_upload_exactly_once_refusals_dead_lettered_and_no_password_shown(
    tmp_path, pki, smtp, settings_for, start_daemon, nats_server
):
    greylisted, unknown = "greylisted@example.com", "unknown@example.com"
    smtp.answer_rcpt = lambda address, attempt: (
        "451 4.7.1 Greylisted, try again later"
        if address == greylisted and attempt == 1
        else "550 5.1.1 <unknown@example.com>: user unknown"
        if address == unknown
        else None
    )
    password_file = tmp_path / "smtp-password"
    password_file.write_text(smtp.password + "\n")
    variables = email_variables(
        smtp, pki, EMAIL_ATTACH_TRANSCRIPT="true", EMAIL_SUBJECT="${filename} from ${email} (${transcribe_language})"
    )
    del variables["EMAIL_PASSWORD"]
    daemon = start_daemon(
        **variables,
        EMAIL_PASSWORD_FILE=str(password_file),
        # The transcript's stand-in before; after, a step that fails once per upload: every upload
        # that gets as far as the email is delivered again after it was sent.
        PROCESSORS="uc_notify_plugins:transcribe,email,uc_test_plugins:flaky_once",
        PYTHONPATH=TESTS,
        UC_TEST_STATE_DIR=str(tmp_path),
        LOG_LEVEL="DEBUG",
    )
    await wait_ready(daemon, nats_server.url)
    settings = settings_for()
    files = make_files(tmp_path / "in", 2)
    sent = await publish_uploads(settings, files, email="ada@example.com")
    [grey] = await publish_uploads(settings, make_files(tmp_path / "grey", 1), email=greylisted)
    [refused] = await publish_uploads(settings, make_files(tmp_path / "unknown", 1), email=unknown)
    # A list in the event's address passes the event's checks (it is one folder name) but is not one mailbox.
    [listed] = await publish_uploads(
        settings, make_files(tmp_path / "list", 1), email="ada@example.com,eve@example.net"
    )
    # A line break in it is refused by the event's checks before anything is fetched.
    injected = json.loads((INTEROP / "messages" / "basic.bin").read_bytes())
    injected.update(email="ada@example.com\r\nBcc: eve@example.net", event_id="6f1d7c55-43f5-4a9a-9a53-0c7b1d5b8e01")
    await publish_raw(nats_server.url, settings.nats_subject, [json.dumps(injected).encode()])
    await wait_settled(nats_server.url, 6, daemon=daemon)
    assert daemon.terminate() == 0

    # Once per upload that may have it, through a later step's failure and a greylisting.
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == ["ada@example.com", "ada@example.com", greylisted]
    assert [(r.attempt, r.answer[:3]) for r in smtp.rcpts if r.address == greylisted] == [(1, "451"), (2, "250")]
    for event, path in zip([*sent, grey], [*files, None], strict=True):
        [received] = [m for m in smtp.messages if event.event_id in m.message["Message-ID"]]
        assert received.tls and received.login == smtp.username, "STARTTLS, then AUTH, then the message"
        assert received.mail_from == "uploads@example.org"
        msg = received.message
        assert msg["Message-ID"] == f"<{event.event_id}.file_processor.email@example.org>"
        assert msg["From"] == FROM and msg["To"] == event.email
        assert msg["Auto-Submitted"] == "auto-generated"
        assert abs(parsedate_to_datetime(msg["Date"]).timestamp() - time.time()) < 120
        name = path.name if path is not None else event.s3_data_key.rpartition("/")[2].removesuffix(".enc")
        assert msg["Subject"] == f"{name} from {event.email} (en)", "an earlier step's output, by name"
        body = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
        assert body == (
            f"{event.email} uploaded {name}.\n\nUpload {event.file_uuid} (event {event.event_id}), "
            f"processed by file_processor.\n\n{TRANSCRIPT}\n"
        )
        [attachment] = msg.iter_attachments()
        assert (attachment.get_filename(), attachment.get_content().rstrip()) == (f"{name}.txt", TRANSCRIPT)

    results = {
        json.loads(m.data)["event_id"]: json.loads(m.data) for m in await read_stream(nats_server.url, "FILE_PROCESSED")
    }
    assert set(results) == {e.event_id for e in [*sent, grey]}
    for event in [*sent, grey]:
        assert results[event.event_id]["outputs"]["email"] == {
            "message_id": f"<{event.event_id}.file_processor.email@example.org>",
            "to": [event.email],
        }
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    assert dead[refused.event_id]["Uploads-Error-Class"] == "processor_failed"
    assert "550 5.1.1 <unknown@example.com>: user unknown" in dead[refused.event_id]["Uploads-Error"]
    assert dead[listed.event_id]["Uploads-Error-Class"] == "forbidden"
    assert "is not one plain address" in dead[listed.event_id]["Uploads-Error"]
    assert dead[injected["event_id"]]["Uploads-Error-Class"] == "forbidden"
    assert {r.address for r in smtp.rcpts} == {"ada@example.com", greylisted, unknown}, "nobody else was written to"

    log = daemon.log_text()
    assert "step already done; not repeated" in log
    plain = base64.b64encode(f"\0{smtp.username}\0{smtp.password}".encode()).decode()
    login = base64.b64encode(smtp.password.encode()).decode()
    everything = log + json.dumps(results) + json.dumps(dead)
    for secret in (smtp.password, plain, login):
        assert secret not in everything


def test_the_daemon_names_every_missing_email_variable_in_one_run(start_daemon):
    daemon = start_daemon(PROCESSORS="save,email")
    assert daemon.proc.wait(60) == 2
    assert daemon.log_text().strip().splitlines() == [
        "uploads-consumer: configuration error: EMAIL_SMTP_URL: is required; EMAIL_FROM: is required"
    ]


# --- in-process: the processor against the server, answer by answer ------------------------------

BASIC = (INTEROP / "messages" / "basic.bin").read_bytes()
BASIC_METADATA = json.loads((INTEROP / "objects" / "basic" / "1.bin").read_bytes())
SECRET = "pw-never-shown-4c1e"


def upload(
    email: str = "ada@example.com", filename: str | None = None, transcript: str | None = None
) -> ProcessingContext:
    """An upload's context as the pipeline gives it: the event alone, or with the metadata when
    `filename` is given; with an earlier transcribe step's outputs when `transcript` is."""
    event = parse_event(BASIC).model_copy(update={"email": email})
    metadata = None
    if filename is not None:
        metadata = parse_metadata(json.dumps({**BASIC_METADATA, "original_filename": filename}).encode())
    outputs = {"transcribe": {"text": transcript, "language": "en"}} if transcript is not None else {}
    ctx = ProcessingContext(
        event=event,
        metadata=metadata,
        download_path=Path("/nonexistent"),
        work_dir=Path("/nonexistent/work"),
        log=structlog.get_logger("test"),
        outputs=outputs,
    )
    ctx.current = "email"
    return ctx


@pytest.fixture
def processor(monkeypatch, tmp_path):
    """`processor(**variables)` → the email processor as the daemon loads it, started, with only
    these EMAIL_* variables set (the consumer is `notify`)."""

    async def make(name: str = "email", chain: tuple[str, ...] = ("email",), **variables: str) -> Email:
        for prefix in ("EMAIL_", "EMAIL_OPS_"):
            for field in EmailSettings.model_fields:
                monkeypatch.delenv(prefix + field.upper(), raising=False)
        for variable, value in variables.items():
            monkeypatch.setenv(variable, value)
        env = ProcessorEnvironment(tmp_path, chain, 300.0, CollectorRegistry(), consumer="notify")
        loaded = load_processor(name, env)
        assert isinstance(loaded.instance, Email)
        await loaded.start()
        return loaded.instance

    return make


async def test_a_field_this_consumer_did_not_fetch_is_unknown_and_without_a_transcript_it_is_empty(processor):
    email = await processor(EMAIL_SMTP_URL="smtp://mail.example.com", EMAIL_FROM=FROM)
    ctx = upload()
    fields = email.fields.values(ctx)
    assert fields == {
        "event_id": ctx.event.event_id,
        "file_uuid": ctx.event.file_uuid,
        "email": "ada@example.com",
        "uploaded_at": fields["uploaded_at"],
        "consumer": "notify",
        "fetched": "event",
        "filename": ctx.event.s3_data_key.rpartition("/")[2].removesuffix(".enc"),
        "size": "unknown",
        "size_human": "unknown",
        "sha256": "unknown",
        "content_type": "unknown",
        "transcript": "",
        "language": "",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["uploaded_at"])
    fuller = email.fields.values(upload(filename="minutes.m4a.encrypted", transcript="Hello team."))
    assert fuller["fetched"] == "object" and fuller["filename"] == "minutes.m4a"
    assert (fuller["size"], fuller["size_human"]) == (str(BASIC_METADATA["original_size"]), "48.0 KiB")
    assert (fuller["transcript"], fuller["language"]) == ("Hello team.", "en")


async def test_a_file_name_with_a_line_break_cannot_add_a_header(processor):
    email = await processor(EMAIL_SMTP_URL="smtp://mail.example.com", EMAIL_FROM=FROM, EMAIL_SUBJECT="${filename}")
    ctx = upload(filename="minutes\r\nBcc: eve@example.net\u2028.m4a.encrypted")
    flat = flatten_message(email.message(ctx, email.recipients_for(ctx)))
    msg = BytesParser(policy=policy.default).parsebytes(flat)
    assert msg["Subject"] == "minutes Bcc: eve@example.net .m4a", "one line: the break became a space"
    assert "Bcc" not in msg
    head = flat.partition(b"\r\n\r\n")[0]
    names = [line.partition(b":")[0] for line in head.split(b"\r\n") if not line.startswith((b" ", b"\t"))]
    assert sorted(names) == sorted(
        b"From To Subject Date Message-ID Auto-Submitted X-Auto-Response-Suppress Content-Type "
        b"Content-Transfer-Encoding MIME-Version".split()
    ), "no header but ours"


# The expert review's payload (issue 28): on Python 3.11.7 the library's folding decoded it into a
# Reply-To, a Content-Type and an HTML body of the attacker's. Then variants of it.
ENCODED_WORD_INJECTIONS = [
    "x=?utf-8?q?=0D=0AReply-To:_attacker@evil.example=0D=0AContent-Type:_text/html=0D=0A=0D=0A"
    "<h1>Account_locked</h1><a_href=3Dhttp://evil.example>log_in</a>?=.pdf",
    "=?utf-8?b?DQpSZXBseS1UbzogYXR0YWNrZXJAZXZpbC5leGFtcGxlDQoNCjxoMT5waHA8L2gxPg==?=.pdf",
    "=?UTF-8?Q?=0ABcc:_eve@evil.example?= =?UTF-8?Q?=0A=0Aspoofed?=.mp3",
    "a=?iso-8859-1?q?=0D=0AX-Injected:_yes?=b=?us-ascii?Q?=0A?=.wav",
    "Ünïcödé " * 12 + "=?utf-8?q?=0D=0AReply-To:_x@evil.example?=.m4a",
    "=?utf-8?q?=0D=0A?=" * 12 + ".txt",
]
OUR_HEADERS = (
    b"From To Subject Date Message-ID Auto-Submitted X-Auto-Response-Suppress Content-Type "
    b"Content-Transfer-Encoding MIME-Version".split()
)


@pytest.mark.parametrize("name", ENCODED_WORD_INJECTIONS, ids=range(len(ENCODED_WORD_INJECTIONS)))
async def test_an_encoded_word_in_a_file_name_is_text_in_the_subject_never_a_header(processor, name):
    email = await processor(EMAIL_SMTP_URL="smtp://mail.example.com", EMAIL_FROM=FROM)
    ctx = upload(filename=name + ".encrypted")
    flat = flatten_message(email.message(ctx, email.recipients_for(ctx)))
    msg = BytesParser(policy=policy.default).parsebytes(flat)
    head = flat.partition(b"\r\n\r\n")[0]
    names = [line.partition(b":")[0] for line in head.split(b"\r\n") if not line.startswith((b" ", b"\t"))]
    assert sorted(names) == sorted(OUR_HEADERS), "no header but ours"
    assert msg["Subject"] == f"New upload: {name}", "the name as it is, every character of it"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().startswith(f"ada@example.com uploaded {name}.")
    subject = re.search(rb"^Subject: .*?(?=\r\n\S)", head, re.M | re.S)
    assert subject and all(len(line) <= 78 for line in subject.group().split(b"\r\n")), "folded as RFC 5322 asks"


@pytest.mark.parametrize("name", ENCODED_WORD_INJECTIONS[:3], ids=range(3))
async def test_an_encoded_word_in_a_file_name_is_text_in_the_attachments_name(processor, name):
    email = await processor(EMAIL_SMTP_URL="smtp://mail.example.com", EMAIL_FROM=FROM, EMAIL_ATTACH_TRANSCRIPT="true")
    ctx = upload(filename=name + ".encrypted", transcript="Hello team.")
    msg = BytesParser(policy=policy.default).parsebytes(flatten_message(email.message(ctx, email.recipients_for(ctx))))
    [attachment] = msg.iter_attachments()
    assert attachment.get_filename() == f"{name}.txt"
    assert [part.get_content_type() for part in msg.walk()] == ["multipart/mixed", "text/plain", "text/plain"]


async def test_a_message_the_library_cannot_write_ends_the_upload_instead_of_being_retried(processor, monkeypatch):
    # A Python with the CVE-2024-6923 fix raises where 3.11.7 wrote the injected lines: whatever the
    # library refuses to write is the upload's end, never a retry for ever.
    from uploads_consumer.processors import email as module

    def refuse(self, *, policy):
        raise module.MessageError("folding a header would put a line break in it")

    email = await processor(EMAIL_SMTP_URL="smtp://mail.example.com", EMAIL_FROM=FROM)
    monkeypatch.setattr(module.EncodedText, "fold", refuse)
    ctx = upload(filename="memo.m4a.encrypted")
    with pytest.raises(PermanentError) as caught:
        await email.run(ctx)
    assert caught.value.error_class is ErrorClass.PROCESSOR_FAILED
    assert caught.value.reason == (
        "email: the message cannot be written: MessageError: folding a header would put a line break in it"
    )


@pytest.mark.parametrize(
    "address",
    [
        "ada@example.com\r\nBcc: eve@example.net",
        "ada@example.com\nBcc: eve@example.net",
        "ada@example.com\r\n",
        "ada@exam ple.com",
        "ada@example.com,eve@example.net",
        "ada@example.com eve@example.net",
        "Ada <ada@example.com>",
        '"ada"@example.com',
        "ada(eve@example.net)@example.com",
        "ada",
        "ada@",
        "@example.com",
        "ada@example..com",
    ],
)
async def test_the_uploaders_address_must_be_one_plain_mailbox_or_nothing_is_sent(processor, smtp, pki, address):
    email = await processor(**email_variables(smtp, pki))
    with pytest.raises(PermanentError) as caught:
        await email.run(upload(email=address))
    assert caught.value.error_class is ErrorClass.FORBIDDEN and "nothing was sent" in caught.value.reason
    assert smtp.rcpts == [] and smtp.logins == []


async def test_an_address_with_letters_beyond_ascii_is_one_mailbox(processor):
    email = await processor(EMAIL_SMTP_URL="smtp://mail.example.com", EMAIL_FROM=FROM)
    [address] = email.recipients_for(upload(email="jürgen@bücher.example"))
    assert address.addr_spec == "jürgen@bücher.example"


def test_the_message_id_is_the_same_for_every_attempt_and_differs_by_consumer_and_step():
    event_id = "0ab35a7e-7a72-4e37-b34d-1045459d355f"
    first = message_id(event_id, "notify", "email", "example.org")
    assert first == message_id(event_id, "notify", "email", "example.org") == f"<{event_id}.notify.email@example.org>"
    others = {message_id(event_id, c, s, "example.org") for c, s in [("archive", "email"), ("notify", "email:ops")]}
    assert first not in others and len(others) == 2
    assert message_id(event_id, "notify", "email:ops", "example.org") == f"<{event_id}.notify.email%3Aops@example.org>"
    assert all(MESSAGE_ID.match(i) for i in [first, *others, message_id(event_id, "n ötify/x", "email", "a.b")])


async def test_an_instance_reads_its_own_variables_then_emails(processor):
    email = await processor(
        name="email:ops",
        chain=("email:ops",),
        EMAIL_SMTP_URL="smtp://mail.example.com",
        EMAIL_FROM=FROM,
        EMAIL_OPS_TO="ops@example.com, Oncall <oncall@example.com>",
        EMAIL_OPS_SUBJECT="[ops] ${filename}",
    )
    ctx = upload()
    msg = email.message(ctx, email.recipients_for(ctx))
    assert msg["To"] == "ops@example.com, Oncall <oncall@example.com>"
    assert msg["Subject"].startswith("[ops] ")
    assert msg["Message-ID"] == f"<{ctx.event.event_id}.notify.email%3Aops@example.org>"


@pytest.mark.parametrize(
    ("variables", "variable", "problem"),
    [
        ({"EMAIL_SMTP_URL": None}, "EMAIL_SMTP_URL", "is required"),
        ({"EMAIL_FROM": None}, "EMAIL_FROM", "is required"),
        ({"EMAIL_SMTP_URL": "https://mail.example.com"}, "EMAIL_SMTP_URL", "expected smtp://"),
        (
            {"EMAIL_SMTP_URL": f"smtp://uploads:{SECRET}@mail.example.com:587"},
            "EMAIL_SMTP_URL",
            "holds credentials: set EMAIL_USERNAME and EMAIL_PASSWORD instead",
        ),
        ({"EMAIL_FROM": "a@example.com, b@example.com"}, "EMAIL_FROM", "is not one address"),
        ({"EMAIL_TO": "ops@example.com\r\nBcc: eve@example.net"}, "EMAIL_TO", "is not addresses"),
        ({"EMAIL_TO": "ops@example.com, oncall"}, "EMAIL_TO", "is not addresses"),
        ({"EMAIL_SUBJECT": "${filename} is ${size_mb} MB"}, "EMAIL_SUBJECT", "uses ${size_mb}, which is not a field"),
        (
            {"EMAIL_SUBJECT": "archived as ${archive_key}"},  # no archive step before this one
            "EMAIL_SUBJECT",
            "nor an output of an earlier step (none: no step comes before this one)",
        ),
        ({"EMAIL_BODY": "It costs $5."}, "EMAIL_BODY", "write $$ for a dollar sign"),
        ({"EMAIL_BODY": "x", "EMAIL_BODY_FILE": "/nonexistent"}, "EMAIL_BODY", "not both"),
        ({"EMAIL_USERNAME": "uploads"}, "EMAIL_PASSWORD", "is required when the other half"),
        ({"EMAIL_PASSWORD": SECRET}, "EMAIL_USERNAME", "is required when the other half"),
        ({"EMAIL_USERNAME": "u", "EMAIL_PASSWORD": SECRET, "EMAIL_PASSWORD_FILE": "/x"}, "EMAIL_PASSWORD", "not both"),
        ({"EMAIL_USERNAME": "u", "EMAIL_PASSWORD_FILE": "/nonexistent"}, "EMAIL_PASSWORD_FILE", "cannot read the file"),
        ({"EMAIL_TLS_CA": __file__}, "EMAIL_TLS_CA", "holds no PEM certificate"),
        ({"EMAIL_MAX_PER_SECOND": "0"}, "EMAIL_MAX_PER_SECOND", "greater than 0"),
        ({"EMAIL_TIMEOUT": "soon"}, "EMAIL_TIMEOUT", "expected a duration"),
    ],
)
async def test_configuration_problems_name_the_variable_and_never_the_password(processor, variables, variable, problem):
    given = {"EMAIL_SMTP_URL": "smtp://mail.example.com", "EMAIL_FROM": FROM, **variables}
    with pytest.raises(ConfigError) as caught:
        await processor(**{k: v for k, v in given.items() if v is not None})  # None: unset
    assert caught.value.variable == variable and problem in caught.value.reason, caught.value.reason
    assert SECRET not in caught.value.reason


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # aiosmtpd sees only STARTTLS as TLS
async def test_smtps_is_tls_from_the_first_byte(processor, pki):
    server = SmtpServer(pki, implicit_tls=True).start()
    try:
        email = await processor(**email_variables(server, pki))
        await email.run(upload())
    finally:
        server.stop()
    [received] = server.messages
    assert received.tls and received.login == server.username and received.rcpt_tos == ["ada@example.com"]


async def test_a_server_without_starttls_gets_neither_the_password_nor_the_message(processor):
    server = SmtpServer(None).start()  # no TLS at all
    try:
        email = await processor(**email_variables(server, None))
        with pytest.raises(RetryableError, match="does not offer STARTTLS, which EMAIL_STARTTLS requires"):
            await email.run(upload())
    finally:
        server.stop()
    assert server.logins == [] and server.rcpts == [] and server.messages == []


async def test_with_starttls_off_a_relay_on_a_trusted_network_gets_the_message_in_clear(processor):
    server = SmtpServer(None, auth=False).start()
    try:
        email = await processor(EMAIL_SMTP_URL=server.url, EMAIL_FROM=FROM, EMAIL_STARTTLS="false")
        await email.run(upload())
    finally:
        server.stop()
    [received] = server.messages
    assert not received.tls and received.login is None


async def test_a_certificate_from_another_ca_is_not_trusted_and_nothing_is_sent(processor, smtp, pki):
    email = await processor(**email_variables(smtp, pki, EMAIL_TLS_CA=str(pki.other_ca)))
    with pytest.raises(RetryableError, match=r"certificate that is not trusted .*EMAIL_TLS_CA names the CA"):
        await email.run(upload())
    assert smtp.logins == [] and smtp.rcpts == []


async def test_a_refused_login_is_retried_loudly_naming_the_variables_never_the_password(processor, smtp, pki):
    email = await processor(**email_variables(smtp, pki, EMAIL_PASSWORD=SECRET))
    with structlog.testing.capture_logs() as logs, pytest.raises(RetryableError) as caught:
        await email.run(upload())
    assert "refused the login (535 5.7.8 Authentication credentials invalid)" in caught.value.reason
    assert "check EMAIL_USERNAME and EMAIL_PASSWORD" in caught.value.reason
    assert [e["log_level"] for e in logs if "refused the login" in e["event"]] == ["error"]
    shown = caught.value.reason + repr(logs)
    for secret in (
        SECRET,
        base64.b64encode(SECRET.encode()).decode(),
        base64.b64encode(f"\0uploads\0{SECRET}".encode()).decode(),
    ):
        assert secret not in shown
    assert smtp.rcpts == [] and [ok for _, _, ok in smtp.logins] == [False] * len(smtp.logins)


@pytest.mark.parametrize(
    ("stage", "answer", "outcome"),
    [
        ("rcpt", "452 4.2.2 Mailbox full", RetryableError),
        ("rcpt", "550 5.1.1 No such user", ErrorClass.PROCESSOR_FAILED),
        ("rcpt", "553 5.1.3 Bad destination address", ErrorClass.PROCESSOR_FAILED),
        ("data", "451 4.3.0 Try again later", RetryableError),
        ("data", "554 5.7.1 Rejected as spam", ErrorClass.PROCESSOR_FAILED),
        ("mail", "421 4.7.0 Too many messages, slow down", RetryableError),
        ("mail", "553 5.7.1 Sender not allowed", RetryableError),  # EMAIL_FROM: the operator's to fix
        ("mail", "552 5.3.4 Message size exceeds fixed limit", ErrorClass.PROCESSOR_FAILED),  # this message's SIZE
    ],
)
async def test_each_answer_is_retried_or_dead_lettered_with_the_code(processor, smtp, pki, stage, answer, outcome):
    setattr(smtp, f"answer_{stage}", lambda *_: answer)
    email = await processor(**email_variables(smtp, pki))
    expected = RetryableError if outcome is RetryableError else PermanentError
    with pytest.raises(expected) as caught:
        await email.run(upload())
    assert answer in caught.value.reason and caught.value.reason.startswith(f"email: {smtp.url} ")
    if outcome is not RetryableError:
        assert caught.value.error_class is outcome
    assert smtp.messages == []


async def test_recipients_refused_beside_others_accepted_are_reported_and_not_sent_again(processor, smtp, pki):
    smtp.answer_rcpt = lambda address, _attempt: "550 5.1.1 No such user" if address == "gone@example.com" else None
    email = await processor(**email_variables(smtp, pki, EMAIL_TO="ops@example.com, gone@example.com"))
    ctx = upload()
    await email.run(ctx)
    [received] = smtp.messages
    assert received.rcpt_tos == ["ops@example.com"]
    assert ctx.outputs["email"]["to"] == ["ops@example.com"]
    assert ctx.outputs["email"]["refused"] == {"gone@example.com": "550 5.1.1 No such user"}


async def test_a_server_that_is_not_there_is_retried(processor, pki):
    email = await processor(EMAIL_SMTP_URL=f"smtp://127.0.0.1:{free_port()}", EMAIL_FROM=FROM)
    with pytest.raises(RetryableError, match=r"email: cannot reach smtp://127\.0\.0\.1:\d+ \("):
        await email.run(upload())


async def test_the_rate_limit_spaces_sends_evenly_however_many_wait_at_once():
    limit = RateLimit(20)
    began = time.monotonic()
    times = []

    async def one() -> None:
        await limit.wait()
        times.append(time.monotonic() - began)

    await asyncio.gather(*(one() for _ in range(6)))
    gaps = [b - a for a, b in zip(sorted(times), sorted(times)[1:], strict=False)]
    assert times[0] < 0.04 and all(g >= 0.045 for g in gaps), gaps
