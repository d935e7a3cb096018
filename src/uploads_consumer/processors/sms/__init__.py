"""The built-in `sms` processor: a text message about each processed upload, to each number of SMS_TO,
through Twilio (`twilio.py`) or Amazon SNS (`sns.py`); what they share is in `message.py`.

The body is a template like email's (the upload's fields and the outputs of the steps before it),
checked at start, cleaned of control characters, and cut to SMS_MAX_SEGMENTS segments counted as the
network counts them (GSM-7 or UCS-2). SMS_WHEN sends only when its tests over the same fields hold.
A sent message is checkpointed with the step (`external_effect`), so a redelivery does not send it
again; a crash between the provider's accept and that checkpoint sends it again (neither provider
takes an idempotency key). Within one process, numbers already sent to for an upload are remembered,
so a retry after a failure at the third number does not text the first two again.

No secret (the auth token, the API key's secret) is logged or put in a reason, and no number either:
a recipient is named by its position in SMS_TO.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator

from uploads_consumer.config import PositiveDuration
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError
from uploads_consumer.observability import get_logger
from uploads_consumer.permissions import AwsGrant
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    StepSkipped,
    variable_for,
)
from uploads_consumer.processors.announce import TRANSCRIPT_FIELDS, RateLimit, UploadFields
from uploads_consumer.processors.sms.message import (
    E164_EXAMPLE,
    MAX_SEGMENTS,
    Misconfigured,
    RecipientRefused,
    Sender,
    Sent,
    clean,
    fit,
    is_e164,
)

log = get_logger("uploads_consumer.processors.sms")

DEFAULT_BODY = "New upload: ${filename} from ${email} (${consumer})"
TWILIO_API_URL = "https://api.twilio.com"
REMEMBERED_UPLOADS = 10_000  # uploads whose numbers already texted this process keeps, the oldest dropped first
_SID = {"account": "AC", "api_key": "SK", "service": "MG"}


def _sid(value: str, kind: str) -> bool:
    prefix = _SID[kind]
    rest = value[2:]
    return value.startswith(prefix) and len(rest) == 32 and all(c in "0123456789abcdefABCDEF" for c in rest)


def alphanumeric_sender(value: str) -> bool:
    """An alphanumeric sender ID: 1 to 11 ASCII letters, digits and spaces, at least one letter."""
    return (
        1 <= len(value) <= 11
        and all(c.isascii() and (c.isalnum() or c == " ") for c in value)
        and any(c.isalpha() for c in value)
    )


class _SmsSettings(ProcessorSettings):
    provider: Literal["twilio", "sns"] = Field(description="twilio (Messages API) or sns (Amazon SNS Publish)")
    to: str = Field(description="recipients: E.164 numbers, comma-separated (+14155550123,+447700900123)")
    body: str = Field(default=DEFAULT_BODY, description="template of the text (email's fields and earlier outputs)")
    when: str | None = Field(
        default=None, description="send only when these hold: field=glob or field!=glob, comma-separated"
    )
    max_segments: int = Field(
        default=3, ge=1, le=MAX_SEGMENTS, description="longer texts are cut to this many segments (GSM-7 or UCS-2)"
    )
    max_per_second: float = Field(default=1, gt=0, description="most segments one process sends a second")
    timeout: PositiveDuration = Field(
        default="10s", validate_default=True, description="for one request to the provider"
    )
    twilio_account_sid: str | None = Field(default=None, description="AC…: the account (twilio)")
    twilio_auth_token: SecretStr | None = Field(
        default=None, description="the account's auth token (twilio); never logged"
    )
    twilio_api_key: str | None = Field(default=None, description="SK…: an API key, instead of the auth token (twilio)")
    twilio_api_secret: SecretStr | None = Field(
        default=None, description="that API key's secret (twilio); never logged"
    )
    twilio_api_url: str = Field(default=TWILIO_API_URL, description="Twilio's API (a regional one, or a test server)")
    sns_region: str | None = Field(
        default=None, description="the AWS region for SNS (default: the AWS chain's, else AWS_REGION)"
    )
    sns_endpoint_url: str | None = Field(default=None, description="another SNS endpoint (a test server)")

    @field_validator("twilio_api_url", "sns_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from yarl import URL

        try:
            url = URL(value.strip())
        except (TypeError, ValueError):
            raise ValueError("is not a URL") from None
        if url.scheme not in ("http", "https") or not url.host or url.user or url.password or url.query:
            raise ValueError("must be an http:// or https:// URL with a host, and no credentials or query")
        return str(url).rstrip("/")


# `from` is a Python keyword, so SMS_FROM's field is declared by name.
_FROM: dict[str, Any] = {
    "from": (
        str | None,
        Field(
            default=None,
            description="the sender: an E.164 number, an alphanumeric ID, or (twilio) a Messaging Service SID MG…",
        ),
    )
}
SmsSettings = create_model("SmsSettings", __base__=_SmsSettings, __module__=__name__, **_FROM)


def parse_recipients(value: str, variable: str) -> tuple[str, ...]:
    """SMS_TO → the numbers, in order; a problem names the recipient's position, never its number."""
    numbers = [part.strip() for part in value.split(",")]
    if not any(numbers):
        raise ConfigError(variable, "names no number")
    for position, number in enumerate(numbers, 1):
        if not is_e164(number):
            raise ConfigError(
                variable, f"recipient {position} of {len(numbers)} is not an E.164 number ({E164_EXAMPLE})"
            )
        if numbers.index(number) != position - 1:
            raise ConfigError(variable, f"recipient {position} repeats recipient {numbers.index(number) + 1}")
    return tuple(numbers)


class Sms(Processor):
    """Tell someone of each processed upload with a text message (Twilio or Amazon SNS).

    To each number of SMS_TO, from a template checked at start, cut to SMS_MAX_SEGMENTS; only when
    SMS_WHEN holds. 429 and 5xx are retried (Retry-After honoured); a number the provider refuses for
    good dead-letters the upload as processor_failed naming its position; a sent text is checkpointed.
    """

    settings_class = SmsSettings
    needs = Need.EVENT
    external_effect = True

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        assert isinstance(settings, _SmsSettings)
        self.config = settings
        self.variable = {field: variable_for(name, field) for field in type(settings).model_fields}
        self.recipients = parse_recipients(settings.to, self.variable["to"])
        self.fields = UploadFields(name, env)
        self.body = self.fields.template(settings.body, self.variable["body"])
        self.when = self.fields.condition(settings.when, self.variable["when"])
        self.sender: Sender = self._twilio() if settings.provider == "twilio" else self._sns()
        self._rate = RateLimit(settings.max_per_second)
        self._sent: OrderedDict[str, dict[int, Sent]] = OrderedDict()

    def grants(self, uploads: tuple[str, ...]) -> list[AwsGrant]:
        if self.config.provider != "sns":
            return []
        # A phone number has no ARN: SNS's Publish to one is allowed on "*" (a condition can narrow it).
        return [AwsGrant(("sns:Publish",), ("*",), "sms: SNS Publish to SMS_TO's numbers")]

    def _sender_id(self) -> str | None:
        sender: str | None = getattr(self.config, "from")
        if sender is None:
            return None
        sender = sender.strip()
        twilio = self.config.provider == "twilio"
        if is_e164(sender) or alphanumeric_sender(sender) or (twilio and _sid(sender, "service")):
            return sender
        expected = "an E.164 number or an alphanumeric sender ID (1-11 letters, digits, spaces)"
        raise ConfigError(
            self.variable["from"], f"is not {expected}{', or a Messaging Service SID MG…' if twilio else ''}"
        )

    def _twilio(self) -> Sender:
        from uploads_consumer.processors.sms.twilio import TwilioSender

        c, v = self.config, self.variable
        account = c.twilio_account_sid
        if account is None or not _sid(account.strip(), "account"):
            raise ConfigError(v["twilio_account_sid"], "is required with twilio: AC followed by 32 hex digits")
        sender = self._sender_id()
        if sender is None:
            raise ConfigError(v["from"], "is required with twilio")
        if c.twilio_auth_token is not None and (c.twilio_api_key is not None or c.twilio_api_secret is not None):
            raise ConfigError(
                v["twilio_auth_token"], f"set it, or {v['twilio_api_key']} and {v['twilio_api_secret']}, not both"
            )
        if c.twilio_auth_token is not None:
            login, secret, credentials = account.strip(), c.twilio_auth_token, v["twilio_auth_token"]
        elif c.twilio_api_key is not None and c.twilio_api_secret is not None:
            if not _sid(c.twilio_api_key.strip(), "api_key"):
                raise ConfigError(v["twilio_api_key"], "is not an API key SID: SK followed by 32 hex digits")
            login, secret = c.twilio_api_key.strip(), c.twilio_api_secret
            credentials = f"{v['twilio_api_key']} and {v['twilio_api_secret']}"
        else:
            missing = "twilio_api_secret" if c.twilio_api_key is not None else "twilio_auth_token"
            also = "" if c.twilio_api_key is not None else f" (or {v['twilio_api_key']} and {v['twilio_api_secret']})"
            raise ConfigError(v[missing], f"is required with twilio{also}")
        return TwilioSender(
            api_url=c.twilio_api_url,
            account_sid=account.strip(),
            login=login,
            secret=secret.get_secret_value(),
            sender=sender,
            timeout=c.timeout,
            max_retry_delay=self.env.max_retry_delay,
            variables={
                "credentials": credentials,
                "account": v["twilio_account_sid"],
                "url": v["twilio_api_url"],
                "sender": v["from"],
                "timeout": v["timeout"],
            },
        )

    def _sns(self) -> Sender:
        from uploads_consumer.processors.sms.sns import SnsSender

        c, v = self.config, self.variable
        twilio_only = [f for f in type(c).model_fields if f.startswith("twilio_") and f in c.model_fields_set]
        if twilio_only:
            log.warning(
                "sms: Twilio settings are set but SMS_PROVIDER is sns; they are not used",
                processor=self.name,
                variables=[v[f] for f in twilio_only],
            )
        return SnsSender(
            # botocore reads AWS_DEFAULT_REGION and its config files; AWS_REGION is what the other SDKs read.
            region=c.sns_region or os.environ.get("AWS_REGION") or None,
            endpoint_url=c.sns_endpoint_url,
            sender=self._sender_id(),
            timeout=c.timeout,
            variables={"region": v["sns_region"], "timeout": v["timeout"]},
        )

    async def start(self) -> None:
        try:
            await self.sender.start()
        except Misconfigured as exc:  # only SNS's start can say so: no region anywhere
            raise ConfigError(self.variable["sns_region"], exc.problem) from None
        if self.config.provider == "twilio" and not self.config.twilio_api_url.startswith("https://"):
            log.warning(
                "sms: the Twilio API URL is not https: the credentials and the texts go in clear",
                processor=self.name,
                variable=self.variable["twilio_api_url"],
            )
        if TRANSCRIPT_FIELDS & set(self.body.get_identifiers()) and not self.fields.transcribed_before():
            log.warning(
                "sms: the body uses the transcript but no transcribe step comes before this one; it stays empty",
                processor=self.name,
            )
        log.info(
            "sms: ready",
            processor=self.name,
            provider=self.config.provider,
            to=self.sender.origin,
            recipients=len(self.recipients),
        )

    async def close(self) -> None:
        await self.sender.close()

    async def run(self, ctx: ProcessingContext) -> None:
        values = self.fields.values(ctx)
        failing = self.when.failing(values)
        if failing is not None:
            raise StepSkipped(f"sms: {self.variable['when']}: {failing} does not hold")
        text = fit(clean(self.body.substitute(values)), self.config.max_segments)
        if not text.body:
            raise StepSkipped(f"sms: {self.variable['body']} rendered an empty text; nothing to send")
        sent = self._sent.setdefault(ctx.event.event_id, {})
        self._sent.move_to_end(ctx.event.event_id)
        while len(self._sent) > REMEMBERED_UPLOADS:
            self._sent.popitem(last=False)
        total = len(self.recipients)
        for position, number in enumerate(self.recipients, 1):
            if position in sent:
                continue  # texted on an earlier attempt in this process: not again
            await self._rate.wait(text.segments)
            try:
                sent[position] = await self.sender.send(number, text.body)
            except RecipientRefused as exc:
                before = f"; sent to {len(sent)} of {total} before it" if sent else ""
                raise PermanentError(
                    ErrorClass.PROCESSOR_FAILED,
                    f"sms: {self.sender.provider} refused recipient {position} of {total} in "
                    f"{self.variable['to']} ({exc.detail}){before}",
                ) from None
            except Misconfigured as exc:
                reason = f"sms: {exc.problem} (retrying)"
                ctx.log.error(reason)
                raise RetryableError(reason) from None
        messages = [sent[p] for p in range(1, total + 1)]
        ctx.report("provider", self.config.provider)
        ctx.report("message_ids", [m.message_id for m in messages])
        ctx.report("recipients", total)
        ctx.report("segments", text.segments)
        ctx.report("encoding", text.encoding)
        ctx.report("truncated", text.truncated)
        ctx.log.info(
            "sms sent",
            provider=self.config.provider,
            recipients=total,
            segments=text.segments,
            encoding=text.encoding,
            truncated=text.truncated,
        )
