"""The error tree. Every error carries its outcome; `settler.decide` turns it into ack/nak/term."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorClass(StrEnum):
    """The value of the `Uploads-Error-Class` dead-letter header."""

    INVALID_MESSAGE = "invalid_message"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    BAD_ENVELOPE = "bad_envelope"
    DECRYPT_FAILED = "decrypt_failed"
    PROCESSOR_FAILED = "processor_failed"
    TYPE_NOT_ALLOWED = "type_not_allowed"
    INFECTED = "infected"
    UNSUPPORTED_MEDIA = "unsupported_media"
    RESOURCE_LIMIT = "resource_limit"
    PROCESSOR_TIMEOUT = "processor_timeout"
    MAX_DELIVERIES = "max_deliveries"
    TRANSIENT = "transient"


def one_line(text: str, limit: int = 300) -> str:
    """Collapse a reason to one printable line of bounded length (it travels in a header)."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    """`Type: message` on one line: how an exception is named in logs, headers and reasons."""
    return one_line(f"{type(exc).__name__}: {exc}")


class UploadsError(Exception):
    """Base of every error this project raises on purpose."""

    known: dict[str, Any] | None = None
    """What was known of the upload when processing stopped, once its chain had begun (the pipeline
    sets it): the facts a result event reports, and the `processors` run and `skipped` by then."""

    def __init__(self, reason: str) -> None:
        self.reason = one_line(reason)
        super().__init__(self.reason)


class PermanentError(UploadsError):
    """Retrying cannot help: the message is dead-lettered, then terminated."""

    def __init__(self, error_class: ErrorClass, reason: str) -> None:
        if error_class is ErrorClass.TRANSIENT:
            raise ValueError("a permanent error cannot have the transient class")
        self.error_class = error_class
        super().__init__(reason)


class RetryableError(UploadsError):
    """Might work later: the message is nak'ed with a delay (RETRY_BACKOFF unless `delay` is set)."""

    error_class = ErrorClass.TRANSIENT

    def __init__(self, reason: str, delay: float | None = None) -> None:
        self.delay = delay
        super().__init__(reason)


class ResourceLimit(PermanentError):
    """The upload's work hit a limit on what one upload may cost (CPU time, memory, the media's
    duration): the file's doing, and the same next time, so it is dead-lettered at once
    (`resource_limit`). `variable` is the setting to raise, and the reason names it."""

    def __init__(self, variable: str, reason: str) -> None:
        self.variable = variable
        super().__init__(ErrorClass.RESOURCE_LIMIT, reason)


class ProcessorTimeout(RetryableError):
    """A step ran out of its wall-clock time (`variable`, a `*_TIMEOUT`). A busy host may be why, so
    it is retried, but only so often for one upload and step: the pipeline counts the step's timeouts
    (`timeouts`, this one included) and sets `retries` (PROCESSOR_TIMEOUT_RETRIES); once `timeouts`
    is over `retries`, `settler.decide` dead-letters it as `processor_timeout`."""

    def __init__(self, variable: str, reason: str, delay: float | None = None) -> None:
        self.variable = variable
        self.step: str | None = None
        self.timeouts: int | None = None
        self.retries: int | None = None
        super().__init__(reason, delay)

    @property
    def exhausted(self) -> bool:
        """Counted, and timed out more often than retried: the upload ends here."""
        return self.timeouts is not None and self.retries is not None and self.timeouts > self.retries


class ConfigError(UploadsError):
    """Invalid configuration: the process exits 2 with this one line."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {problem}")
