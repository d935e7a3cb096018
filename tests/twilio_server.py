"""A Twilio-shaped Messages API for the tests: aiohttp on a free loopback port, in the test's event loop.

It checks every request as Twilio would — the path `/2010-04-01/Accounts/{AccountSid}/Messages.json`,
HTTP Basic authentication with the account SID and auth token or an API key's SID and secret, a form
with `To` (E.164), exactly one of `From` and `MessagingServiceSid`, and a `Body` of at most 1600
characters — and counts the body's segments with its own reading of GSM 03.38, independent of the
processor's. Each request is recorded with what was wrong with it (nothing, for a good one); what it
answers is up to the test: `201` with a message resource by default, or a Twilio error (`400` with
`code` 21211, `429` with `Retry-After`, …).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loopback_http import LoopbackHttpServer

# GSM 03.38: the default alphabet, and the extension table reached by an escape (two septets each).
GSM_DEFAULT = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_ESCAPED = "\f^{}\\[~]|€"
E164 = re.compile(r"^\+[1-9]\d{1,14}$")
# What the tests configure: an account, its auth token, an API key and its secret, two recipients.
ACCOUNT = "AC" + "0123456789abcdef" * 2
TOKEN = "tok-never-shown-5d2c9e"
API_KEY = "SK" + "fedcba9876543210" * 2
API_SECRET = "keysecret-never-shown-77a1"
ONCALL, BACKUP = "+16505550142", "+447700900123"


def septets(body: str) -> list[int] | None:
    """Septets per character in GSM-7, or None when the body needs UCS-2."""
    out = []
    for c in body:
        if c in GSM_ESCAPED:
            out.append(2)
        elif c in GSM_DEFAULT and c != "\x1b":
            out.append(1)
        else:
            return None
    return out


def count_segments(body: str) -> tuple[str, int]:
    """(encoding, segments) as a carrier counts them: 160/153 septets or 70/67 UTF-16 units a segment,
    an escaped character or a surrogate pair never split between two."""
    units = septets(body)
    encoding = "GSM-7"
    one, many = 160, 153
    if units is None:
        encoding, one, many = "UCS-2", 70, 67
        units = [len(c.encode("utf-16-le")) // 2 for c in body]
    if sum(units) <= one:
        return encoding, 1 if units else 0
    segments, room = 1, many
    for size in units:
        if size > room:
            segments, room = segments + 1, many
        room -= size
    return encoding, segments


@dataclass(frozen=True)
class Answer:
    status: int = 201
    code: int | None = None  # a Twilio error code, for a 4xx
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Request:
    at: float
    path: str
    login: str | None
    form: dict[str, str]
    problems: list[str]
    encoding: str = ""
    segments: int = 0
    answer: Answer = field(default_factory=Answer)
    sid: str | None = None

    @property
    def to(self) -> str:
        return self.form.get("To", "")

    @property
    def body(self) -> str:
        return self.form.get("Body", "")


class TwilioServer(LoopbackHttpServer):
    """`credentials` maps a login (an account SID or an API key SID) to its secret; `account` is the
    account SID that must be in the path. `respond(request)` decides each answer (201 by default)."""

    def __init__(self, account: str, credentials: dict[str, str]) -> None:
        super().__init__()
        self.account = account
        self.credentials = credentials
        self.respond: Callable[[Request], Answer] = lambda _request: Answer()
        self.requests: list[Request] = []
        self._sids = itertools.count(1)

    def _check(self, request: web.Request, form: dict[str, str]) -> tuple[str | None, list[str]]:
        problems = []
        if request.method != "POST":
            problems.append(f"method {request.method}")
        if request.path != f"/2010-04-01/Accounts/{self.account}/Messages.json":
            problems.append(f"path {request.path}")
        if request.content_type != "application/x-www-form-urlencoded":
            problems.append(f"content type {request.content_type}")
        login = None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            problems.append("no Basic authentication")
        else:
            login, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            if self.credentials.get(login) != secret:
                problems.append("wrong credentials")
        if not E164.match(form.get("To", "")):
            problems.append("To is not E.164")
        senders = [k for k in ("From", "MessagingServiceSid") if k in form]
        if len(senders) != 1:
            problems.append(f"senders {senders}")
        body = form.get("Body", "")
        if not body:
            problems.append("no Body")
        if len(body) > 1600:
            problems.append("Body over 1600 characters")
        unknown = set(form) - {"To", "From", "MessagingServiceSid", "Body"}
        if unknown:
            problems.append(f"unexpected fields {sorted(unknown)}")
        return login, problems

    async def _handle(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        login, problems = self._check(request, form)
        record = Request(time.monotonic(), request.path, login, form, problems)
        record.encoding, record.segments = count_segments(record.body)
        record.answer = (
            Answer(401, 20003)
            if "wrong credentials" in problems
            else Answer(400, 21604)
            if problems
            else self.respond(record)
        )
        self.requests.append(record)
        if record.answer.delay:
            await asyncio.sleep(record.answer.delay)
        answer = record.answer
        if answer.status == 201:
            record.sid = f"SM{next(self._sids):032x}"
            return web.json_response(self._resource(record), status=201, headers=answer.headers)
        body: dict[str, Any] = {
            "code": answer.code,
            "message": f"The 'To' number {record.to} is not a valid phone number." if answer.code == 21211 else "Error",
            "more_info": f"https://www.twilio.com/docs/errors/{answer.code}",
            "status": answer.status,
        }
        return web.json_response(body, status=answer.status, headers=answer.headers)

    def _resource(self, record: Request) -> dict[str, Any]:
        return {
            "sid": record.sid,
            "account_sid": self.account,
            "to": record.to,
            "from": record.form.get("From"),
            "messaging_service_sid": record.form.get("MessagingServiceSid"),
            "body": record.body,
            "status": "queued",
            "num_segments": str(record.segments),
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "error_code": None,
        }

    def accepted(self) -> list[Request]:
        return [r for r in self.requests if r.answer.status == 201]

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {count} requests within {timeout}s"
            await asyncio.sleep(0.05)


def twilio_variables(server: TwilioServer, **extra: str) -> dict[str, str]:
    """The SMS_* variables that send through `server` with the account SID and auth token, to ONCALL."""
    return {
        "SMS_PROVIDER": "twilio",
        "SMS_TWILIO_ACCOUNT_SID": ACCOUNT,
        "SMS_TWILIO_AUTH_TOKEN": TOKEN,
        "SMS_TWILIO_API_URL": server.url,
        "SMS_FROM": "+15005550006",
        "SMS_TO": ONCALL,
        **extra,
    }
