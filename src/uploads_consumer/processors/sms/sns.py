"""Amazon SNS: `Publish` straight to a phone number, through aioboto3 with the usual credentials chain
(the environment, the shared files, a container or instance role).

Each message is `Transactional` (SNS's class for alerts: sent at the higher-reliability price). A
number as SMS_FROM is the origination number; letters, the sender ID. Throttling and 5xx are retried
by botocore's standard retry mode first, then by the daemon. SNS's SMS `Publish` has no idempotency
key either (a `MessageDeduplicationId` applies only to FIFO topics).
"""

from __future__ import annotations

import contextlib
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, one_line
from uploads_consumer.processors.sms.message import Misconfigured, RecipientRefused, Sent, is_e164, masked

THROTTLED = frozenset({"Throttling", "ThrottlingException", "ThrottledException", "KMSThrottling"})
ACCOUNT_ERRORS = frozenset(
    {
        "AuthorizationError",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidSecurity",
        "OptInRequired",
    }
)


class SnsSender:
    """SNS in one region (or at SMS_SNS_ENDPOINT_URL)."""

    provider = "sns"

    def __init__(
        self,
        region: str | None,
        endpoint_url: str | None,
        sender: str | None,
        timeout: float,
        variables: dict[str, str],
    ) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        self._attributes: dict[str, dict[str, str]] = {
            "AWS.SNS.SMS.SMSType": {"DataType": "String", "StringValue": "Transactional"}
        }
        if sender:
            key = "AWS.MM.SMS.OriginationNumber" if is_e164(sender) else "AWS.SNS.SMS.SenderID"
            self._attributes[key] = {"DataType": "String", "StringValue": sender}
        self._timeout = timeout
        self._variables = variables
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self.origin = "SNS"

    async def start(self) -> None:
        session = aioboto3.Session(region_name=self._region) if self._region else aioboto3.Session()
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=self._timeout,
            read_timeout=self._timeout,
        )
        self._stack = contextlib.AsyncExitStack()
        try:
            self._client = await self._stack.enter_async_context(
                session.client("sns", endpoint_url=self._endpoint_url, config=config)
            )
        except NoRegionError:
            await self._stack.aclose()
            raise Misconfigured("no AWS region: set it, or AWS_REGION or AWS_DEFAULT_REGION") from None
        self.origin = f"SNS ({self._client.meta.region_name})"

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = self._client = None

    async def send(self, to: str, body: str) -> Sent:
        if self._client is None:
            raise RetryableError("sms: not started")
        try:
            response = await self._client.publish(PhoneNumber=to, Message=body, MessageAttributes=self._attributes)
        except ClientError as exc:
            raise self._failure(exc) from None
        except NoCredentialsError:
            raise Misconfigured("found no AWS credentials (the environment, the shared files or a role)") from None
        except BotoCoreError as exc:
            # Connection errors and timeouts, after botocore's own retries. Its message names the
            # endpoint, never the credentials.
            raise RetryableError(f"sms: {self.origin}: {one_line(str(exc), 200)}") from None
        message_id = response.get("MessageId")
        if not isinstance(message_id, str) or not message_id:
            raise RetryableError(f"sms: {self.origin} answered without a MessageId")
        return Sent(message_id)

    def _failure(self, exc: ClientError) -> Exception:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = masked(one_line(str(error.get("Message", "")), 200))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        said = f"{self.origin} answered {code or status}"
        if code in THROTTLED or status == 429 or status >= 500:
            return RetryableError(f"sms: {said}")
        if code in ACCOUNT_ERRORS or status in (401, 403):
            return Misconfigured(f"{said}: check the AWS credentials and their permission to sns:Publish")
        if code in ("InvalidParameter", "InvalidParameterValue") and "PhoneNumber" in str(error.get("Message", "")):
            return RecipientRefused(f"SNS {code}: {message}")
        return PermanentError(ErrorClass.PROCESSOR_FAILED, f"sms: {said} ({message})")
