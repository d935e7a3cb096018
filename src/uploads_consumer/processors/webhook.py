"""The built-in `webhook` processor: announce each processed upload with one HTTP POST.

`standard` signs the request the Standard Webhooks way (standardwebhooks.com), so any of its
libraries verifies it on the receiving side; `slack` and `discord` post one human line to an
incoming-webhook URL. The request is made once per attempt; retrying is the daemon's business
(a transient failure naks the message, and `Retry-After` becomes the nak delay).

Nothing here logs the URL beyond its scheme, host and port: a Slack or Discord webhook URL is a
credential in its path, and any URL may carry credentials or tokens in its user info or query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
from pydantic import Field, SecretStr, field_validator
from yarl import URL

from uploads_consumer import __version__, tracing
from uploads_consumer.config import PositiveDuration
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError
from uploads_consumer.observability import get_logger
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    variable_for,
)
from uploads_consumer.processors.announce import human_size, transcription, upload_name

log = get_logger("uploads_consumer.processors.webhook")

SECRET_PREFIX = "whsec_"
# Standard Webhooks: a symmetric signing secret is at least 24 random bytes, at most 64.
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64
RETRYABLE_STATUSES = frozenset({408, 429})
MIN_RETRY_AFTER = 1.0
EVENT_TYPE = "file.processed"
PREVIEW_WORDS, PREVIEW_CHARS = 12, 120


def decode_secrets(value: str) -> list[bytes]:
    """`whsec_<base64>[,whsec_<base64>…]` → the HMAC keys. Errors never echo the value."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"expected {SECRET_PREFIX} followed by base64")
    keys = []
    for number, part in enumerate(parts, 1):
        which = f"secret {number} of {len(parts)}" if len(parts) > 1 else "the secret"
        if not part.startswith(SECRET_PREFIX):
            raise ValueError(f"{which} does not start with {SECRET_PREFIX}")
        encoded = part[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{which} is not {SECRET_PREFIX} followed by base64") from None
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ValueError(
                f"{which} decodes to {len(key)} bytes; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes"
            )
        keys.append(key)
    return keys


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,<base64 HMAC-SHA256>` for each key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delay-seconds or an HTTP date; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(value: str | None, longest: float) -> float | None:
    """The nak delay a `Retry-After` header asks for: at least a second (`Retry-After: 0` on every
    attempt must not become a hot loop), at most `longest` (the longest RETRY_BACKOFF delay); None
    when there is no readable header."""
    delay = retry_after_seconds(value)
    return None if delay is None else min(max(delay, MIN_RETRY_AFTER), longest)


def preview(text: str) -> str:
    """The first words of a transcript, cut short with an ellipsis."""
    words = text.split()
    short = " ".join(words[:PREVIEW_WORDS])
    if len(short) > PREVIEW_CHARS:
        short = short[:PREVIEW_CHARS].rstrip()
    return short + ("…" if short != " ".join(words) else "")


def summary_line(ctx: ProcessingContext) -> str:
    """Who uploaded what, its size and type where they were read, and the transcript's first words
    when there is one."""
    facts = ctx.facts()
    known = [human_size(facts["size"])] if facts["size"] is not None else []
    known += [facts["content_type"]] if facts["content_type"] else []
    line = f"{ctx.event.email} uploaded {upload_name(ctx)}" + (f" ({', '.join(known)})" if known else "")
    text = transcription(ctx).get("text")
    if text is not None:
        line += f': "{preview(text)}"'
    return line


def slack_escape(text: str) -> str:
    # Slack reads <…> as links and mentions (<!channel>): a file name must not ping anyone.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class WebhookSettings(ProcessorSettings):
    url: SecretStr = Field(description="where to POST (http or https); the URL is treated as a secret")
    format: Literal["standard", "slack", "discord"] = Field(
        default="standard", description="standard (Standard Webhooks, signed), slack or discord"
    )
    timeout: PositiveDuration = Field(
        default="10s", validate_default=True, description="for one attempt, connecting included"
    )
    secret: SecretStr | None = Field(
        default=None,
        description="whsec_ + base64 of 24-64 random bytes; several comma-separated sign with each (rotation); "
        "required for the standard format",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value().strip()
        if not text:
            raise ValueError("is required")
        try:
            url = URL(text)
        except (TypeError, ValueError):
            raise ValueError("is not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return SecretStr(text)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        decode_secrets(value.get_secret_value())
        return value


class Webhook(Processor):
    """Announce each processed upload with an HTTP POST: Standard Webhooks (signed), Slack or Discord.

    2xx is done; 408, 429, 5xx, timeouts and connection errors are retried (Retry-After honoured);
    other statuses, redirects included, dead-letter the upload as processor_failed.
    """

    settings_class = WebhookSettings
    needs = Need.EVENT
    external_effect = True

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        assert isinstance(settings, WebhookSettings)
        self.config = settings
        self._url = URL(settings.url.get_secret_value())
        self._keys = decode_secrets(settings.secret.get_secret_value()) if settings.secret else []
        if settings.format == "standard" and not self._keys:
            raise ConfigError(
                variable_for(name, "secret"),
                f"is required when {variable_for(name, 'format')} is standard "
                f"({SECRET_PREFIX} followed by base64 of {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes)",
            )
        # Only scheme, host and port ever appear in logs and reasons.
        self.origin = str(self._url.origin())
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            headers={"User-Agent": f"uploads-consumer/{__version__}"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def payload(self, ctx: ProcessingContext) -> dict[str, Any]:
        """The request body, by format."""
        if self.config.format == "slack":
            return {"text": slack_escape(summary_line(ctx))}
        if self.config.format == "discord":
            # No @everyone, role or user pings from a file name or a transcript.
            return {"content": summary_line(ctx), "allowed_mentions": {"parse": []}}
        return {
            "type": EVENT_TYPE,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": {
                "event_id": ctx.event.event_id,
                "file_uuid": ctx.event.file_uuid,
                "email": ctx.event.email,
                "consumer": self.env.consumer,
                # fetched, original_filename, size, sha256, content_type: null where this consumer's
                # chain did not read them (a chain of webhooks alone reads only the event).
                **ctx.facts(),
                # What the steps before this one reported, by name (as in the result event): e.g.
                # outputs.transcribe.text and .language when transcribe ran, here or in a stage before.
                "outputs": {name: out for name, out in ctx.earlier_outputs().items() if name != self.name},
                # In a stage (AFTER): what each consumer before this one reported, by consumer name.
                "upstream": dict(ctx.upstream),
            },
        }

    def headers(self, event_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            # The same id on every attempt: the receiver's idempotency key.
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, event_id, timestamp, body)
        return headers

    async def run(self, ctx: ProcessingContext) -> None:
        if self._session is None:
            raise RetryableError("webhook: not started")
        body = json.dumps(self.payload(ctx), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=tracing.inject(self.headers(ctx.event.event_id, body)),  # the receiver continues the trace
                allow_redirects=False,
            ) as response:
                status, phrase = response.status, response.reason or ""
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            raise RetryableError(
                f"webhook: {self.origin} did not answer within {self.config.timeout:g}s ({variable_for(self.name, 'timeout')})"
            ) from None
        except aiohttp.ClientError as exc:
            raise RetryableError(f"webhook: cannot deliver to {self.origin} ({client_error_cause(exc)})") from None
        answered = f"{self.origin} answered {status} {phrase}".rstrip()
        if 200 <= status < 300:
            ctx.report("status", status)
            ctx.log.info("webhook delivered", to=self.origin, status=status)
            return
        if status in RETRYABLE_STATUSES or 500 <= status < 600:
            raise RetryableError(f"webhook: {answered}", delay=retry_delay(retry_after, self.env.max_retry_delay))
        if 300 <= status < 400:
            raise PermanentError(
                ErrorClass.PROCESSOR_FAILED,
                f"webhook: {answered}; redirects are not followed: set {variable_for(self.name, 'url')} to the final address",
            )
        raise PermanentError(ErrorClass.PROCESSOR_FAILED, f"webhook: {answered}")


def client_error_cause(exc: aiohttp.ClientError) -> str:
    """What went wrong, without str(exc): some aiohttp errors print the whole URL, query included."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return type(exc).__name__
