"""How a message ends. `decide()` is the one place where an outcome becomes ack, nak or dead-letter;
`Settler` carries the decision out, one method per kind, each confirmed by the server.

Nothing is lost: a message is terminated only after its dead-letter copy is stored, and it is never
nak'ed on the consumer's last allowed delivery (the server would not deliver it again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from uploads_consumer import tracing
from uploads_consumer.audit import Audit, Delivered, NoAudit, Settlement
from uploads_consumer.audit import Outcome as Recorded
from uploads_consumer.deadletter import DeadLetterPublisher
from uploads_consumer.errors import (
    ErrorClass,
    PermanentError,
    ProcessorTimeout,
    RetryableError,
    UploadsError,
    describe,
)
from uploads_consumer.observability import Metrics, get_logger
from uploads_consumer.pipeline import Duplicate, Processed

log = get_logger("uploads_consumer.settler")

ACK_TIMEOUT = 5.0


class ShuttingDown(Exception):
    """The work was cut short by shutdown, or never started: hand the message back at once."""


@dataclass(frozen=True)
class CopyFailed:
    """A dead-letter copy could not be stored (the dead-letter stream did not acknowledge it)."""

    error: str


Outcome = Processed | Duplicate | CopyFailed | Exception
"""How processing ended: a result, a duplicate, a failed dead-letter copy, or the error that stopped it."""


@dataclass(frozen=True)
class Limits:
    """Delivery limits: MAX_DELIVER (the daemon's) and the consumer's own `max_deliver` (-1: none)."""

    max_deliver: int = -1
    server_max_deliver: int = -1

    @property
    def retry_limit(self) -> int:
        """Deliveries after which a retryable failure is dead-lettered: the smaller limit, or -1."""
        limits = [n for n in (self.max_deliver, self.server_max_deliver) if n > 0]
        return min(limits) if limits else -1

    def is_last_delivery(self, num_delivered: int) -> bool:
        """The server will not deliver this message again: a nak now would lose it."""
        return 0 < self.server_max_deliver <= num_delivered


@dataclass(frozen=True)
class Ack:
    duplicate: bool = False


@dataclass(frozen=True)
class Nak:
    delay: float | None
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    error_class: ErrorClass
    reason: str


@dataclass(frozen=True)
class Hold:
    """Keep the message (progress goes on) and try its dead-letter copy again after `delay`."""

    delay: float
    reason: str


Decision = Ack | Nak | DeadLetter | Hold


def backoff_delay(backoff: tuple[float, ...], num_delivered: int) -> float:
    """RETRY_BACKOFF by delivery count (1st failure → first delay); the last delay repeats."""
    return backoff[min(max(num_delivered, 1), len(backoff)) - 1]


def decide(outcome: Outcome, num_delivered: int, limits: Limits, backoff: tuple[float, ...]) -> Decision:
    """What happens to a message, given how its processing ended. Pure; see docs/contract.md."""
    last = limits.is_last_delivery(num_delivered)
    if isinstance(outcome, Processed):
        return Ack()
    if isinstance(outcome, Duplicate):
        return Ack(duplicate=True)
    if isinstance(outcome, CopyFailed):
        reason = f"dead-letter copy not stored ({outcome.error})"
        if last:
            return Hold(backoff_delay(backoff, num_delivered), reason + "; on its last delivery: trying again")
        return Nak(backoff_delay(backoff, num_delivered), reason + "; will retry")
    if isinstance(outcome, ShuttingDown):
        if last:
            return DeadLetter(
                ErrorClass.MAX_DELIVERIES,
                f"shutdown interrupted delivery {num_delivered}, the consumer's last (max_deliver "
                f"{limits.server_max_deliver}); replay it with `uploads-consumer dlq replay`",
            )
        return Nak(None, "shutting down before processing finished")
    if isinstance(outcome, PermanentError):
        return DeadLetter(outcome.error_class, outcome.reason)
    if isinstance(outcome, ProcessorTimeout) and outcome.exhausted:
        return DeadLetter(
            ErrorClass.PROCESSOR_TIMEOUT,
            f"{outcome.reason}; step {outcome.step} timed out {outcome.timeouts} times on this upload "
            f"(PROCESSOR_TIMEOUT_RETRIES={outcome.retries})",
        )
    if isinstance(outcome, RetryableError):
        reason, delay = outcome.reason, outcome.delay
    else:
        reason, delay = f"unexpected {describe(outcome)}", None
    limit = limits.retry_limit
    if limit > 0 and num_delivered >= limit:
        return DeadLetter(ErrorClass.MAX_DELIVERIES, f"gave up after {num_delivered} deliveries; last error: {reason}")
    return Nak(delay if delay is not None else backoff_delay(backoff, num_delivered), reason)


class Settler:
    """Carries out decisions. Never raises: a settlement that fails leaves the message pending."""

    def __init__(
        self,
        nc: Client,
        dead_letters: DeadLetterPublisher,
        metrics: Metrics,
        backoff: tuple[float, ...],
        limits: Callable[[bool], Awaitable[Limits]],
        stopping: asyncio.Event,
        audit: Audit | None = None,
    ) -> None:
        self._nc = nc
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._backoff = backoff
        self._limits = limits
        self._stopping = stopping
        self._audit = audit or NoAudit()

    async def settle(self, msg: Callable[[], Msg], outcome: Outcome, received: float | None = None) -> None:
        """`msg` gives the newest delivery of the message (a redelivery may replace it meanwhile);
        `received`, when it arrived (time.monotonic()), for the audit record's duration."""
        if isinstance(outcome, Exception) and not isinstance(outcome, UploadsError | ShuttingDown):
            log.error("unexpected error while processing", exc_info=outcome)
        try:
            # Before a nak or a dead letter, the consumer's limits are read afresh (a live edit counts).
            settled = isinstance(outcome, Processed | Duplicate)
            limits = await self._limits(not settled)
            decision = decide(outcome, msg().metadata.num_delivered, limits, self._backoff)
            known = outcome.known if isinstance(outcome, UploadsError) else None  # for the audit record
            while isinstance(decision, DeadLetter):
                failed = await self.dead_letter(msg(), decision, received, known)
                if failed is None:
                    return
                after = decide(failed, msg().metadata.num_delivered, await self._limits(True), self._backoff)
                if not isinstance(after, Hold):
                    decision = after
                    break
                log.error("dead-letter copy not stored; holding the message", reason=after.reason)
                if not await self._wait(after.delay):
                    log.error(
                        "stopping with a dead-letter copy not stored; the server's max-deliveries advisory "
                        "has it copied once a daemon runs again"
                    )
                    return
            if isinstance(decision, Nak):
                await self.nak(msg(), decision, received, known)
            elif isinstance(decision, Ack):
                await self.ack(msg(), decision, outcome.result if isinstance(outcome, Processed) else None, received)
        except Exception as exc:  # noqa: BLE001 - the message stays pending and comes back after ACK_WAIT
            log.error("settling failed; the message will be redelivered", error=describe(exc))

    async def ack(
        self, msg: Msg, decision: Ack, result: dict[str, Any] | None = None, received: float | None = None
    ) -> None:
        recorded = Recorded.DUPLICATE if decision.duplicate else Recorded.PROCESSED
        try:
            await self._confirm(msg, b"+ACK", Settlement(recorded, received, result))
        except Exception as exc:  # noqa: BLE001 - the effect is recorded: a redelivery is a duplicate
            log.warning("ack not confirmed; a redelivery will be recognised as a duplicate", error=describe(exc))
            return
        tracing.settled("duplicate" if decision.duplicate else "acked")
        if decision.duplicate:
            self._metrics.messages.labels("duplicate").inc()
            log.info("duplicate acknowledged")
        else:
            self._metrics.messages.labels("acked").inc()
            result = result or {}
            log.info("processed", size=result.get("size"), sha256=result.get("sha256"), outputs=result.get("outputs"))

    async def nak(
        self, msg: Msg, decision: Nak, received: float | None = None, known: Mapping[str, Any] | None = None
    ) -> None:
        payload = b"-NAK" if not decision.delay else b'-NAK {"delay": %d}' % int(decision.delay * 1e9)
        await self._confirm(msg, payload, Settlement(Recorded.RETRIED, received, known, reason=decision.reason))
        self._metrics.messages.labels("nacked").inc()
        tracing.settled("nacked", delay=decision.delay)
        log.warning("will retry", reason=decision.reason, delay_s=decision.delay)

    async def dead_letter(
        self, msg: Msg, decision: DeadLetter, received: float | None = None, known: Mapping[str, Any] | None = None
    ) -> CopyFailed | None:
        """Store the copy, then terminate the original. Returns CopyFailed when the copy is not stored.
        `known`: what the pipeline knew of the upload when it stopped (for the audit record)."""
        try:
            await self._dead_letters.publish(msg, decision.error_class, decision.reason)
        except Exception as exc:  # noqa: BLE001 - never terminate without the copy
            return CopyFailed(describe(exc))
        settlement = Settlement(
            Recorded.DEAD_LETTERED, received, known, error_class=str(decision.error_class), reason=decision.reason
        )
        await self._confirm(msg, b"+TERM", settlement)
        self._dead_lettered(str(decision.error_class), "dead-lettered", reason=decision.reason)
        return None

    async def abandoned_copied(self, delivered: Delivered, reason: str) -> None:
        """A message the server stopped delivering by itself (its max_deliver) has had its dead-letter
        copy stored: there is nothing to send the server, only the record, the metrics and the log."""
        settlement = Settlement(Recorded.DEAD_LETTERED, error_class=str(ErrorClass.MAX_DELIVERIES), reason=reason)
        try:
            await self._audit.record(delivered, settlement)
        except Exception as exc:  # noqa: BLE001 - only when stopping with the store away: the copy is stored
            log.error("the audit record of a copied message was not written", error=describe(exc))
        self._dead_lettered(str(ErrorClass.MAX_DELIVERIES), "dead-lettered a message the server stopped delivering")

    def _dead_lettered(self, error_class: str, said: str, **fields: Any) -> None:
        """A dead letter stored (and its original terminated, or given up by the server): counted,
        marked on the delivery's span, and logged."""
        self._metrics.messages.labels("dead_lettered").inc()
        self._metrics.dead_letters.labels(error_class).inc()
        tracing.settled("dead_lettered", error_class)
        log.warning(said, error_class=error_class, **fields)

    async def _confirm(self, msg: Msg, payload: bytes, settlement: Settlement) -> None:
        """Send an ack/nak/term and wait for the server to confirm it (a request, not a bare publish).
        Its audit record is durable first: the server never has a settlement the audit trail lacks."""
        await self._audit.record(Delivered.of(msg), settlement)
        await self._nc.request(msg.reply, payload, timeout=ACK_TIMEOUT)

    async def _wait(self, seconds: float) -> bool:
        """Sleep unless stopping; False if stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()
