"""Twilio's Programmable Messaging API: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, a form
with `To`, `From` (or `MessagingServiceSid`) and `Body`, HTTP Basic authentication with the account SID
and its auth token, or an API key's SID and secret.

Answers: `201` with the message's `sid` is done. `429` and `5xx` are retried, with Twilio's
`Retry-After` when it sends one. A `4xx` carries Twilio's error `code`: the codes that refuse the
recipient (below) are the same on every attempt; those that refuse the account, the sender or the URL
are the operator's to fix. The API has no idempotency key: a request whose answer is lost may have
sent the message.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from yarl import URL

from uploads_consumer import __version__, tracing
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, one_line
from uploads_consumer.processors.sms.message import Misconfigured, RecipientRefused, Sent, masked
from uploads_consumer.processors.webhook import client_error_cause, retry_delay

API_VERSION = "2010-04-01"
# Twilio's codes that refuse a recipient for good: the same answer on every attempt.
RECIPIENT_CODES = {
    21211: "not a valid phone number",
    21214: "a number that cannot be reached",
    21217: "not a valid phone number",
    21219: "not a verified number (a trial account sends only to those)",
    21265: "a short code, which cannot receive this message",
    21266: "the same number as the sender",
    21408: "in a region this account may not send to (Messaging Geo Permissions)",
    21608: "not a verified number (a trial account sends only to those)",
    21610: "a number that has opted out (replied STOP)",
    21612: "a number Twilio cannot reach from this sender",
    21614: "not a mobile number",
    21635: "a landline",
}
# Twilio's codes that the operator must act on: credentials, the account, the sender.
ACCOUNT_CODES = {
    20003: "refused the credentials: check {credentials}",
    20005: "says the account is not active",
    20404: "does not know this account or URL: check {account} and {url}",
    21212: "refused the sender: check {sender}",
    21603: "refused the sender: check {sender}",
    21606: "refused the sender (not a number of this account that can send here): check {sender}",
    21659: "refused the sender: check {sender}",
    21703: "refused the Messaging Service: check {sender}",
    21704: "says the Messaging Service has no sender: check {sender}",
}
RETRYABLE_STATUSES = frozenset({408, 429})


class TwilioSender:
    """One Twilio account (or API key) sending from one sender (a number, an alphanumeric ID, or a
    Messaging Service `MG…`)."""

    provider = "twilio"

    def __init__(
        self,
        api_url: str,
        account_sid: str,
        login: str,
        secret: str,
        sender: str,
        timeout: float,
        max_retry_delay: float,
        variables: dict[str, str],
    ) -> None:
        self._url = f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}/Messages.json"
        self.origin = str(URL(api_url).origin())
        self._authorization = "Basic " + base64.b64encode(f"{login}:{secret}".encode()).decode("ascii")
        self._sender = {"MessagingServiceSid": sender} if sender.startswith("MG") else {"From": sender}
        self._timeout = timeout
        self._max_retry_delay = max_retry_delay
        self._variables = variables
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": f"uploads-consumer/{__version__}"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, to: str, body: str) -> Sent:
        if self._session is None:
            raise RetryableError("sms: not started")
        form = {"To": to, **self._sender, "Body": body}
        try:
            async with self._session.post(
                self._url,
                data=form,
                headers=tracing.inject({"Authorization": self._authorization}),
                allow_redirects=False,
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                text = await response.content.read(64 * 1024)
        except TimeoutError:
            raise RetryableError(
                f"sms: {self.origin} did not answer within {self._timeout:g}s ({self._variables['timeout']})"
            ) from None
        except aiohttp.ClientError as exc:
            raise RetryableError(f"sms: cannot reach {self.origin} ({client_error_cause(exc)})") from None
        answer = _json(text)
        if status in (200, 201):
            sid = answer.get("sid")
            if not isinstance(sid, str) or not sid:
                raise RetryableError(f"sms: {self.origin} answered {status} without a message sid")
            return Sent(sid, _int(answer.get("num_segments")))
        code = _int(answer.get("code"))
        said = f"{self.origin} answered {status}" + (f", Twilio error {code}" if code is not None else "")
        if status in RETRYABLE_STATUSES or status >= 500:
            raise RetryableError(f"sms: {said}", delay=retry_delay(retry_after, self._max_retry_delay))
        if code in RECIPIENT_CODES:
            raise RecipientRefused(f"Twilio error {code}: {RECIPIENT_CODES[code]}")
        if code in ACCOUNT_CODES or status in (401, 403, 404):
            v = self._variables
            problem = ACCOUNT_CODES.get(code or 0, "refused the request: check {credentials} and {account}").format(
                credentials=v["credentials"], account=v["account"], url=v["url"], sender=v["sender"]
            )
            raise Misconfigured(f"{said}: {problem}")
        message = answer.get("message")
        detail = f" ({masked(one_line(message, 200))})" if isinstance(message, str) and message else ""
        raise PermanentError(ErrorClass.PROCESSOR_FAILED, f"sms: {said}{detail}")


def _json(text: bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
