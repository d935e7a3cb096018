"""A real SMTP server for the tests: aiosmtpd on a free loopback port, in a thread of its own.

STARTTLS with a certificate from a test CA (tests/secure_support.py), or TLS from the first byte
(`implicit_tls`), or neither; AUTH PLAIN and LOGIN against one user, required before MAIL. Every
message it accepts is recorded, parsed with the standard library's `email` package; every RCPT is
recorded too, and what it answers to MAIL, RCPT and DATA is up to the test.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from secure_support import Pki

from uploads_consumer.embedded import free_port

OK = "250 2.0.0 OK"


@dataclass
class Received:
    """One message the server accepted."""

    at: float  # time.monotonic()
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool  # the session was encrypted when the message came
    login: str | None  # who had logged in, if anyone

    @property
    def message(self) -> EmailMessage:
        parsed = BytesParser(policy=policy.default).parsebytes(self.raw)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Rcpt:
    address: str
    attempt: int  # 1 for the first RCPT TO this address
    answer: str


# the sender → the answer to MAIL FROM, or None for 250.
AnswerMail = Callable[[str], str | None]
# (address, its attempt number) → the answer to RCPT TO, or None for 250.
AnswerRcpt = Callable[[str, int], str | None]
# the message about to be accepted → the answer to DATA, or None for 250.
AnswerData = Callable[[Received], str | None]


@dataclass
class SmtpServer:
    pki: Pki | None
    username: str = "uploads"
    password: str = "s3cret-smtp-pw-7f3a"
    implicit_tls: bool = False  # smtps: TLS from the first byte, instead of STARTTLS
    auth: bool = True
    answer_mail: AnswerMail = lambda _sender: None
    answer_rcpt: AnswerRcpt = lambda _address, _attempt: None
    answer_data: AnswerData = lambda _received: None
    messages: list[Received] = field(default_factory=list)
    rcpts: list[Rcpt] = field(default_factory=list)
    logins: list[tuple[str, str, bool]] = field(default_factory=list)  # mechanism, login, accepted
    port: int = 0
    _controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"{'smtps' if self.implicit_tls else 'smtp'}://127.0.0.1:{self.port}"

    def start(self) -> SmtpServer:
        self.port = free_port()
        context = None
        if self.pki is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        kwargs: dict[str, Any] = {"server_hostname": "localhost", "ident": "test SMTP"}
        if self.implicit_tls:
            # aiosmtpd counts only STARTTLS as TLS for AUTH; here the whole connection is.
            kwargs.update(ssl_context=context, auth_require_tls=False)
        elif context is not None:
            kwargs.update(tls_context=context, require_starttls=True)
        if self.auth:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
        logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's own deprecation warnings
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _authenticate(self, _server, _session, _envelope, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == (
            self.username,
            self.password,
        )
        login = data.login.decode() if isinstance(data, LoginPassword) else "?"
        self.logins.append((mechanism, login, ok))
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    # aiosmtpd handler hooks, run in the server's thread.

    async def handle_MAIL(self, _server, _session, envelope, address: str, options) -> str:
        answer = self.answer_mail(address) or OK
        if answer.startswith("2"):
            envelope.mail_from, envelope.mail_options = address, list(options)
        return answer

    async def handle_RCPT(self, _server, _session, envelope, address: str, _options) -> str:
        attempt = 1 + sum(1 for r in self.rcpts if r.address == address)
        answer = self.answer_rcpt(address, attempt) or OK
        self.rcpts.append(Rcpt(address, attempt, answer))
        if answer.startswith("2"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server, session, envelope) -> str:
        received = Received(
            at=time.monotonic(),
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            raw=envelope.original_content or envelope.content,
            tls=server.transport.get_extra_info("ssl_object") is not None,
            login=session.auth_data.login.decode() if session.authenticated else None,
        )
        answer = self.answer_data(received) or OK
        if answer.startswith("2"):
            self.messages.append(received)
        return answer

    def to(self, address: str) -> list[Received]:
        """The messages accepted for this address."""
        return [m for m in self.messages if address in m.rcpt_tos]
