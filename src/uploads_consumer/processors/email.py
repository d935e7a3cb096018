"""The built-in `email` processor: tell someone of each processed upload with one email, over SMTP.

One message per upload, to the uploader (the event's `email`) or to EMAIL_TO, from plain-text
templates (`string.Template`: `${filename}`, `${transcript}`, …) checked at start, so a template
never runs code and never names a field that is not there. STARTTLS is required on `smtp://`
unless EMAIL_STARTTLS=false; `smtps://` is TLS from the first byte; the server's certificate is
always verified. The Message-ID is derived from the event, the consumer and the step, so a
message sent again (a crash between the server's 250 and the step's checkpoint) carries the same
id and the receiving side can drop it.

Nothing here logs or reports the password; an error names the variable, never its value.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import string
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.errors import MessageError
from email.headerregistry import Address, BaseHeader, HeaderRegistry, MessageIDHeader, UnstructuredHeader
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import aiosmtplib
from aiosmtplib.email import flatten_message
from pydantic import Field, SecretStr, create_model

from uploads_consumer.config import PositiveDuration
from uploads_consumer.errors import (
    ConfigError,
    ErrorClass,
    PermanentError,
    RetryableError,
    UploadsError,
    describe,
    one_line,
)
from uploads_consumer.observability import get_logger
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    variable_for,
)
from uploads_consumer.processors.announce import TRANSCRIPT_FIELDS, RateLimit, UploadFields

log = get_logger("uploads_consumer.processors.email")

DEFAULT_PORTS = {"smtp": 587, "smtps": 465}
DEFAULT_SUBJECT = "New upload: ${filename}"
DEFAULT_BODY = """\
${email} uploaded ${filename}.

Upload ${file_uuid} (event ${event_id}), processed by ${consumer}.

${transcript}
"""
# Characters that have a meaning in an address header (lists, display names, comments, quoting,
# routes): the uploader's address may hold none of them, so it is one mailbox and nothing more.
ADDRESS_SPECIALS = frozenset('()<>[]:;,"\\')
ID_SAFE = frozenset((string.ascii_letters + string.digits + "_-").encode())


class OneLineMessageID(MessageIDHeader, BaseHeader):
    """A Message-ID written on one line however long: folded, it reaches some readers with the line
    break or a space in front (Python's own parser among them), and a resend would not compare equal."""

    max_count: ClassVar[Literal[1]] = 1

    def fold(self, *, policy: Policy) -> str:
        return f"{self.name}: {self}{policy.linesep}"


ENCODED_WORD_BYTES = 42  # of UTF-8 in one encoded word: `=?utf-8?b?` + 56 base64 characters + `?=`, 68 in all


def encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 encoded words (UTF-8, base64), every character of it, each word at most
    ENCODED_WORD_BYTES bytes and never splitting a character. A reader decodes them once, to `text`:
    an `=?…?=` the text itself holds stays the characters it is, never another encoded word."""
    chunks: list[bytes] = []
    chunk = b""
    for char in text:
        data = char.encode("utf-8")
        if chunk and len(chunk) + len(data) > ENCODED_WORD_BYTES:
            chunks.append(chunk)
            chunk = b""
        chunk += data
    if chunk or not chunks:
        chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(piece).decode('ascii')}?=" for piece in chunks]


class EncodedText(UnstructuredHeader, BaseHeader):
    """A header whose value is text from an upload (the Subject), kept as given and written as encoded
    words by construction. Python's own header parsing decodes encoded words it finds in a value it
    is given, and its folding can write what they decode to (CR, LF, a `Reply-To:`) as raw header
    lines (CVE-2024-6923, in Python 3.11.7); newer Pythons raise instead. Here nothing is parsed:
    the value is the text, and `fold` writes every character of it encoded."""

    max_count: ClassVar[Literal[1]] = 1

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        kwds["decoded"] = header_text(str(value))
        kwds["parse_tree"] = None

    def fold(self, *, policy: Policy) -> str:
        return f"{self.name}: " + f"{policy.linesep} ".join(encoded_words(str(self))) + policy.linesep


_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("message-id", OneLineMessageID)
_HEADERS.map_to_type("subject", EncodedText)
MESSAGE_POLICY = policy.SMTP.clone(header_factory=_HEADERS)


class _EmailSettings(ProcessorSettings):
    smtp_url: str = Field(
        description="smtp://host:port (STARTTLS, port 587 by default) or smtps://host:port (implicit TLS, 465)"
    )
    starttls: bool = Field(
        default=True, description="with smtp://, refuse to log in or send unless the connection is upgraded to TLS"
    )
    username: str | None = Field(default=None, description="for SMTP AUTH (CRAM-MD5, PLAIN or LOGIN)")
    password: SecretStr | None = Field(default=None, description="for SMTP AUTH; never logged")
    password_file: Path | None = Field(default=None, description="a file holding the password (container secrets)")
    tls_ca: Path | None = Field(
        default=None, description="a CA bundle (PEM) to verify the server with instead of the system's"
    )
    to: str | None = Field(
        default=None, description="recipients, comma-separated; unset: the uploader (the event's email)"
    )
    subject: str = Field(default=DEFAULT_SUBJECT, description="template of the subject line")
    body: str | None = Field(default=None, description="template of the plain-text body (default: a short notice)")
    body_file: Path | None = Field(default=None, description="a file holding the body's template")
    attach_transcript: bool = Field(
        default=False, description="attach an earlier transcribe step's text as {filename}.txt"
    )
    max_per_second: float = Field(default=5, gt=0, description="most emails one process sends a second")
    timeout: PositiveDuration = Field(
        default="30s", validate_default=True, description="for connecting, and for each SMTP command"
    )


# `from` is a Python keyword, so EMAIL_FROM's field is declared by name.
_FROM: dict[str, Any] = {"from": (str, Field(description="the sender: an address, or Name <address>"))}
EmailSettings = create_model("EmailSettings", __base__=_EmailSettings, __module__=__name__, **_FROM)


def plain_address(text: str) -> str:
    """`text` if it is one mailbox and nothing more (local@domain, no display name, list, comment
    or line break); otherwise ValueError saying why. Non-ASCII letters are allowed (SMTPUTF8)."""
    if any(unicodedata.category(c)[0] in "CZ" for c in text):
        raise ValueError("contains a line break, a space or another control character")
    if any(c in ADDRESS_SPECIALS for c in text):
        raise ValueError("is not one plain address (a list, a display name, a comment or a quoted part)")
    local, at, domain = text.rpartition("@")
    if not at or not local or "@" in local or not domain or "" in domain.split("."):
        raise ValueError("is not local@domain")
    return text


def parse_addresses(value: str, variable: str, one: bool) -> list[Address]:
    """EMAIL_FROM (one) or EMAIL_TO (one or more, comma-separated) → addresses; ConfigError otherwise."""
    header = policy.SMTP.header_factory("To", value)
    addresses = list(header.addresses)
    if header.defects or not addresses or (one and len(addresses) > 1):
        expected = "one address (or Name <address>)" if one else "addresses, comma-separated"
        raise ConfigError(variable, f"is not {expected}")
    for address in addresses:
        try:
            plain_address(address.addr_spec)
        except ValueError as exc:
            raise ConfigError(variable, f"{address.addr_spec!r} {exc}") from None
    return addresses


def header_text(text: str) -> str:
    """A rendered header value on one line: CR, LF and other control characters become spaces."""
    return one_line(text, limit=250)


def id_part(text: str) -> str:
    """`text` made safe for a Message-ID's left side: letters, digits, `_` and `-` kept, any other
    byte %XX (so distinct names stay distinct)."""
    return "".join(chr(b) if b in ID_SAFE else f"%{b:02X}" for b in text.encode())


def message_id(event_id: str, consumer: str, step: str, domain: str) -> str:
    """`<{event_id}.{consumer}.{step}@{domain}>`: the same for every attempt of one step of one consumer."""
    return f"<{event_id}.{id_part(consumer)}.{id_part(step)}@{domain}>"


def id_domain(domain: str) -> str:
    """The sender's domain, in ASCII, for the Message-ID's right side."""
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return "uploads-consumer.invalid"


def read_file(path: Path, variable: str) -> str:
    """A password or a template from a file, read at start; its last line break dropped."""
    try:
        text = path.read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(variable, f"cannot read the file ({reason})") from None
    if not text:
        raise ConfigError(variable, "the file is empty")
    return text


def tls_context(ca: Path | None, variable: str) -> ssl.SSLContext:
    """Verifies the server's certificate and name always: against EMAIL_TLS_CA when set, else the system's CAs."""
    try:
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except ssl.SSLError:
        raise ConfigError(variable, "holds no PEM certificate") from None
    except OSError as exc:
        raise ConfigError(variable, f"cannot read the file ({exc.strerror})") from None


@dataclass(frozen=True)
class SmtpEndpoint:
    scheme: Literal["smtp", "smtps"]
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_smtp_url(value: str, name: str) -> SmtpEndpoint:
    """EMAIL_SMTP_URL (of processor `name`) → where to connect, and how; ConfigError otherwise, never echoing it."""
    variable = variable_for(name, "smtp_url")
    expected = "expected smtp://host:port or smtps://host:port"
    try:
        url = urlsplit(value.strip())
        port = url.port
    except ValueError:
        raise ConfigError(variable, expected) from None
    if url.username is not None or url.password is not None:
        raise ConfigError(
            variable,
            f"holds credentials: set {variable_for(name, 'username')} and {variable_for(name, 'password')} instead",
        )
    if url.scheme not in DEFAULT_PORTS or not url.hostname or url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(variable, expected)
    scheme: Literal["smtp", "smtps"] = "smtps" if url.scheme == "smtps" else "smtp"
    return SmtpEndpoint(scheme, url.hostname, port or DEFAULT_PORTS[scheme])


class Email(Processor):
    """Tell someone of each processed upload with one email (SMTP with STARTTLS or TLS, AUTH).

    To the uploader or EMAIL_TO, from templates checked at start. 4xx answers and connection
    problems are retried; a 5xx for the recipient or the message dead-letters the upload as
    processor_failed; a sent email is checkpointed and never sent again for the same upload.
    """

    settings_class = EmailSettings
    needs = Need.EVENT
    external_effect = True

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        assert isinstance(settings, _EmailSettings)
        self.config = settings
        self.server = parse_smtp_url(settings.smtp_url, name)
        self.sender = parse_addresses(getattr(settings, "from"), variable_for(name, "from"), one=True)[0]
        self.recipients = parse_addresses(settings.to, variable_for(name, "to"), one=False) if settings.to else None
        self.fields = UploadFields(name, env)
        self.subject = self.fields.template(settings.subject, variable_for(name, "subject"))
        if settings.body is not None and settings.body_file is not None:
            raise ConfigError(variable_for(name, "body"), f"set it or {variable_for(name, 'body_file')}, not both")
        if settings.body_file is not None:
            body_variable = variable_for(name, "body_file")
            self.body = self.fields.template(read_file(settings.body_file, body_variable), body_variable)
        else:
            self.body = self.fields.template(settings.body or DEFAULT_BODY, variable_for(name, "body"))
        self._password = self._read_password()
        if (settings.username is None) != (self._password is None):
            missing = "password" if settings.username is not None else "username"
            raise ConfigError(variable_for(name, missing), "is required when the other half of the login is set")
        self._tls = tls_context(settings.tls_ca, variable_for(name, "tls_ca"))
        self._domain = id_domain(self.sender.domain)
        self._rate = RateLimit(settings.max_per_second)
        self._local_hostname: str | None = None

    def _read_password(self) -> str | None:
        settings = self.config
        if settings.password is not None and settings.password_file is not None:
            raise ConfigError(
                variable_for(self.name, "password"), f"set it or {variable_for(self.name, 'password_file')}, not both"
            )
        if settings.password_file is not None:
            return read_file(settings.password_file, variable_for(self.name, "password_file"))
        return settings.password.get_secret_value() if settings.password is not None else None

    async def start(self) -> None:
        # EHLO names this host; asked once, off the loop (a slow resolver must not stall uploads).
        self._local_hostname = await asyncio.to_thread(socket.getfqdn) or "localhost"
        # The default body ends with the transcript when there is one: only the operator's own use is worth a word.
        uses = set(self.subject.get_identifiers())
        if self.config.body is not None or self.config.body_file is not None:
            uses |= set(self.body.get_identifiers())
        if (uses & TRANSCRIPT_FIELDS or self.config.attach_transcript) and not self.fields.transcribed_before():
            log.warning(
                "email: the templates use the transcript but no transcribe step comes before this one; it stays empty",
                processor=self.name,
            )
        if self.server.scheme == "smtp" and not self.config.starttls:
            log.warning(
                "email: STARTTLS is off: messages"
                + (" and the password" if self._password is not None else "")
                + " go to the server in clear",
                processor=self.name,
                server=str(self.server),
                variable=variable_for(self.name, "starttls"),
            )

    def recipients_for(self, ctx: ProcessingContext) -> list[Address]:
        if self.recipients is not None:
            return self.recipients
        try:
            local, _, domain = plain_address(ctx.event.email).rpartition("@")
        except ValueError as exc:
            # The event chose the address: a list or a header in it would send the upload's
            # notice to someone else. Refused, as an event pointing outside its own folder is.
            raise PermanentError(
                ErrorClass.FORBIDDEN, f"email: the uploader's address {ctx.event.email!r} {exc}; nothing was sent"
            ) from None
        return [Address(username=local, domain=domain)]

    def message(self, ctx: ProcessingContext, to: list[Address]) -> EmailMessage:
        values = self.fields.values(ctx)
        msg = EmailMessage(policy=MESSAGE_POLICY)
        msg["From"] = self.sender
        msg["To"] = to
        msg["Subject"] = header_text(self.subject.substitute(values))
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = message_id(ctx.event.event_id, self.env.consumer, self.name, self._domain)
        # RFC 3834: no vacation replies or other automatic answers to this.
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"
        msg.set_content(self.body.substitute(values).rstrip() + "\n")
        if self.config.attach_transcript and values["transcript"]:
            # RFC 2231 always (charset, language, value): the name is percent-encoded, never a quoted string
            # that a reader might search for encoded words.
            name = ("utf-8", "", header_text(values["filename"]) + ".txt")
            msg.add_attachment(values["transcript"], subtype="plain", filename=name)
        return msg

    def written(self, ctx: ProcessingContext, to: list[Address]) -> EmailMessage:
        """The message, written out once here: a message the library cannot write ends the upload
        (`processor_failed`) instead of failing in the SMTP client on every delivery for ever."""
        try:
            msg = self.message(ctx, to)
            flatten_message(msg)
        except (ValueError, TypeError, LookupError, MessageError) as exc:
            raise PermanentError(
                ErrorClass.PROCESSOR_FAILED, f"email: the message cannot be written: {describe(exc)}"
            ) from None
        return msg

    async def run(self, ctx: ProcessingContext) -> None:
        to = self.recipients_for(ctx)  # refused before it takes a place in the rate limit
        await self._rate.wait()
        msg = self.written(ctx, to)
        refused = await self.send(msg, [a.addr_spec for a in to], ctx)
        accepted = [a.addr_spec for a in to if a.addr_spec not in refused]
        sent_id = str(msg["Message-ID"])
        ctx.report("message_id", sent_id)
        ctx.report("to", accepted)
        if refused:
            # The others got it: sending again would repeat it to them. Said, and left at that.
            ctx.report("refused", refused)
            ctx.log.warning("email: some recipients were refused", refused=refused)
        ctx.log.info("email sent", server=str(self.server), message_id=sent_id, recipients=len(accepted))

    async def send(self, msg: EmailMessage, to: list[str], ctx: ProcessingContext) -> dict[str, str]:
        """One connection, one message. Returns the recipients refused while others were accepted."""
        server = self.server
        smtp = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            use_tls=server.scheme == "smtps",
            start_tls=False,  # upgraded below, where refusing to go on in clear is ours to say
            tls_context=self._tls,
            timeout=self.config.timeout,
            local_hostname=self._local_hostname,
        )
        try:
            try:
                await smtp.connect()
                if server.scheme == "smtp" and self.config.starttls:
                    await smtp.ehlo()
                    if not smtp.supports_extension("starttls"):
                        raise self._misconfigured(
                            ctx,
                            f"does not offer STARTTLS, which {variable_for(self.name, 'starttls')} requires "
                            "(set it to false only for a relay on a trusted network)",
                        )
                    await smtp.starttls()
                if self.config.username is not None and self._password is not None:
                    await smtp.ehlo()
                    if not smtp.supported_auth_methods:
                        raise self._misconfigured(
                            ctx,
                            f"offers no AUTH method this client speaks (CRAM-MD5, PLAIN, LOGIN), "
                            f"and {variable_for(self.name, 'username')} is set",
                        )
                    await smtp.login(self.config.username, self._password)
                refused, _ = await smtp.send_message(msg, sender=self.sender.addr_spec, recipients=to)
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise self._failure(exc, ctx) from None
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                pass  # the server took the message: how the goodbye goes changes nothing
        finally:
            smtp.close()
        return {address: f"{reply.code} {one_line(reply.message)}" for address, reply in refused.items()}

    def _misconfigured(self, ctx: ProcessingContext, problem: str) -> RetryableError:
        """The same for every upload until the operator acts: retried, and said loudly."""
        reason = f"email: {self.server} {problem} (retrying)"
        ctx.log.error(reason)
        return RetryableError(reason)

    def _failure(self, exc: aiosmtplib.SMTPException | OSError, ctx: ProcessingContext) -> UploadsError:
        """An SMTP failure → retried (4xx, the connection, the operator's setup) or dead-lettered
        (a 5xx refusing this message or its recipients)."""
        server = self.server
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            said = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if any(r.code < 500 for r in exc.recipients):
                return RetryableError(f"email: {server} refused the recipients for now ({said})")
            return PermanentError(ErrorClass.PROCESSOR_FAILED, f"email: {server} refused the recipients ({said})")
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            return self._misconfigured(
                ctx,
                f"refused the login ({exc.code} {exc.message}): check {variable_for(self.name, 'username')} "
                f"and {variable_for(self.name, 'password')}",
            )
        if isinstance(exc, aiosmtplib.SMTPSenderRefused):
            answer = f"{exc.code} {exc.message}"
            if exc.code < 500:
                return RetryableError(f"email: {server} refused the sender for now ({answer})")
            if exc.code == 552:  # MAIL FROM carries the message's SIZE: this one is over the server's limit
                return PermanentError(ErrorClass.PROCESSOR_FAILED, f"email: {server} refused the message ({answer})")
            return self._misconfigured(
                ctx, f"refused the sender {exc.sender} ({answer}): check {variable_for(self.name, 'from')}"
            )
        if isinstance(exc, aiosmtplib.SMTPDataError):
            answer = f"{exc.code} {exc.message}"
            if exc.code < 500:
                return RetryableError(f"email: {server} refused the message for now ({answer})")
            return PermanentError(ErrorClass.PROCESSOR_FAILED, f"email: {server} refused the message ({answer})")
        if isinstance(exc, aiosmtplib.SMTPNotSupported):
            return PermanentError(
                ErrorClass.PROCESSOR_FAILED, f"email: {server} cannot take a non-ASCII address (no SMTPUTF8)"
            )
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return RetryableError(f"email: {server} answered {exc.code} {exc.message}")
        verify = exc if isinstance(exc, ssl.SSLCertVerificationError) else exc.__cause__
        if isinstance(verify, ssl.SSLCertVerificationError):
            return self._misconfigured(
                ctx,
                f"has a certificate that is not trusted ({verify.verify_message}); "
                f"{variable_for(self.name, 'tls_ca')} names the CA to trust",
            )
        if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
            return RetryableError(
                f"email: {server} did not answer within {self.config.timeout:g}s ({variable_for(self.name, 'timeout')})"
            )
        if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
            return RetryableError(f"email: {server} closed the connection")
        if isinstance(exc, aiosmtplib.SMTPConnectError) or not isinstance(exc, aiosmtplib.SMTPException):
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            what = cause.strerror if isinstance(cause, OSError) and cause.strerror else type(cause).__name__
            return RetryableError(f"email: cannot reach {server} ({what})")
        return RetryableError(f"email: {server}: {exc.message}")
