"""The daemon: pull-fetch, process with bounded concurrency, and settle every message.

`decide()` + `UploadConsumer._settle()` are the one place where ack / nak / dead-letter+term is decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.connection import connect_options, describe_connect_error, redact_url, redacted_servers
from uploads_consumer.deadletter import DeadLetterPublisher
from uploads_consumer.dedupe import Deduplicator
from uploads_consumer.envelope import MasterKeyRing
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, UploadsError, describe
from uploads_consumer.events import parse_event
from uploads_consumer.observability import HealthServer, Metrics, get_logger
from uploads_consumer.pipeline import Pipeline
from uploads_consumer.processors import load_processors
from uploads_consumer.provision import ProvisionError, provision
from uploads_consumer.storage import ObjectStore

log = get_logger("uploads_consumer.consumer")

DUPLICATE = "duplicate"
ACK_TIMEOUT = 5.0
SETTLE_TIMEOUT = 15.0


# ---- the decision ------------------------------------------------------------------------------


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


Decision = Ack | Nak | DeadLetter


class ShuttingDown(Exception):
    """The work was cut short by shutdown: hand the message back at once."""


def backoff_delay(backoff: tuple[float, ...], num_delivered: int) -> float:
    """RETRY_BACKOFF by delivery count (1st failure → first delay); the last delay repeats."""
    return backoff[min(max(num_delivered, 1), len(backoff)) - 1]


def decide(outcome: object, num_delivered: int, max_deliver: int, backoff: tuple[float, ...]) -> Decision:
    """What happens to a message, given how its processing ended. Pure; see the outcome table in docs/contract.md."""
    if isinstance(outcome, ShuttingDown):
        return Nak(None, "shutting down before processing finished")
    if isinstance(outcome, PermanentError):
        return DeadLetter(outcome.error_class, outcome.reason)
    if isinstance(outcome, BaseException):
        if isinstance(outcome, RetryableError):
            reason, delay = outcome.reason, outcome.delay
        else:
            reason, delay = f"unexpected {describe(outcome)}", None
        if max_deliver > 0 and num_delivered >= max_deliver:
            return DeadLetter(
                ErrorClass.MAX_DELIVERIES, f"gave up after {num_delivered} deliveries; last error: {reason}"
            )
        return Nak(delay if delay is not None else backoff_delay(backoff, num_delivered), reason)
    return Ack(duplicate=outcome == DUPLICATE)


# ---- the daemon --------------------------------------------------------------------------------


class UploadConsumer:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        current, previous = settings.master_keys()
        self._keyring = MasterKeyRing(current, previous)
        del current, previous
        self._processors = load_processors(settings.processors)
        # Built once, and here: an unreadable TLS, .creds or nkey file is a ConfigError (exit 2)
        # before anything connects, like a bad master key or processor above.
        self._connect_options = connect_options(settings, "uploads-consumer")
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._inflight: dict[int, tuple[Msg, asyncio.Task[Any]]] = {}  # id(msg) → (msg, its work task)
        self._handlers: set[asyncio.Task[None]] = set()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: Any = None
        self._max_deliver = settings.max_deliver
        self._ack_wait = settings.ack_wait
        self._fetch_tick = time.monotonic()
        self._fetch_task: asyncio.Task[None] | None = None
        self._connected = False
        self._ever_connected = False
        self._problems_said: set[str] = set()  # connection problems already logged since the last connect
        self._rebind_needed = False
        self._fetch_problem: str | None = None

    # -- probes
    def alive(self) -> bool:
        """The event loop answers (this runs on it) and the fetch loop, once started, still turns.
        Before it starts — NATS unreachable, JetStream not ready — we are alive but not ready."""
        if self._fetch_task is None:
            return True
        recent = time.monotonic() - self._fetch_tick < 3 * self.settings.fetch_timeout + 30
        return not self._fetch_task.done() and recent

    def ready(self) -> bool:
        bound = self._sub is not None and not self._rebind_needed
        return self._connected and bound and self._nc is not None and self._nc.is_connected

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("shutdown requested", in_flight=len(self._inflight), grace_s=self.settings.shutdown_grace)
            self._stopping.set()

    # -- lifecycle
    async def run(self) -> None:
        s = self.settings
        health = HealthServer(s.http_port, self.metrics, self.alive, self.ready)
        await health.start()
        try:
            async with ObjectStore(s) as store:
                if not await self._connect():
                    return
                assert self._nc is not None and self._js is not None
                try:
                    self._pipeline = Pipeline(s, store, self._keyring, self._processors, self._js, self.metrics)
                    self._dedupe = Deduplicator(await self._prepare())
                    self._dlq = DeadLetterPublisher(self._js, s.dlq_subject, s.dlq_stream_name)
                    log.info(
                        "consuming",
                        stream=s.nats_stream_name,
                        consumer=s.nats_consumer_name,
                        max_in_flight=s.max_in_flight,
                        fetch_batch=s.fetch_batch,
                        processors=[p.name for p in self._processors],
                    )
                    await self._consume()
                except ShuttingDown:
                    pass  # asked to stop before consuming began
                finally:
                    await self._close()
        finally:
            await health.stop()

    async def _connect(self) -> bool:
        """Connect, retrying with backoff and jitter until connected or asked to stop.

        Each attempt is made with nats-py's own reconnecting off (one retry per server), and it is
        turned on once connected: with it on, nats.connect() never returns while the server cannot
        be reached (so SIGTERM could not stop us), and after a failed TLS handshake it waits forever
        for a socket that never reports closed (nats-io/nats.py#718).
        """
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._nc = await nats.connect(
                    **self._connect_options,
                    connect_timeout=5,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # 0 would mean "forever" when nats-py picks a server
                    reconnect_time_wait=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
                self._nc.options.update(allow_reconnect=True, max_reconnect_attempts=-1)
                self._js = self._nc.jetstream(timeout=10)
                self._connected = self._ever_connected = True
                self._problems_said.clear()
                url = self._nc.connected_url.geturl() if self._nc.connected_url else None
                log.info("connected to NATS", url=redact_url(url) if url else redacted_servers(self.settings))
                return True
            except Exception as exc:  # noqa: BLE001 - keep trying; say so once per new problem
                if not isinstance(exc, nats.errors.NoServersError):  # its causes went to error_cb already
                    await self._on_error(exc)
                await self._pause(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30)
        return False

    async def _prepare(self) -> Any:
        """Provision (AUTO_SETUP) and find the idempotency bucket; returns it (None if disabled).

        Something missing without AUTO_SETUP, or JetStream not answering yet (a cluster electing
        its leader), is waited for with readyz at 503 — said once, not a crash loop. Only a shape
        the daemon cannot work with (ProvisionError) ends the process.
        """
        assert self._js is not None
        s = self.settings
        said: str | None = None
        delay = 1.0
        while True:
            try:
                if s.auto_setup:
                    report = await provision(self._js, s)
                    for line in report.lines:
                        log.info("setup " + line)
                    for warning in report.warnings:
                        log.warning("setup: " + warning)
                return await self._js.key_value(s.dedupe_bucket) if s.dedupe_bucket else None
            except ProvisionError:
                raise
            except (NotFoundError, BucketNotFoundError) as exc:
                what = f"key-value bucket {s.dedupe_bucket}" if isinstance(exc, BucketNotFoundError) else "a stream"
                problem = f"{what} does not exist; run `uploads-consumer setup` or set AUTO_SETUP=true; waiting for it"
            except Exception as exc:  # noqa: BLE001 - JetStream not ready yet
                problem = f"JetStream is not answering yet ({describe(exc)}); retrying"
            if problem != said:
                log.error(problem)
                said = problem
            await self._pause(delay)
            delay = min(delay * 2, 15.0)
            if self._stopping.is_set():
                raise ShuttingDown()

    async def _on_error(self, exc: Exception) -> None:
        # nats-py calls this on every failed attempt; say each problem once until connected, not once per retry.
        problem = describe(exc) if self._connected else describe_connect_error(exc, self.settings)
        if problem in self._problems_said:
            log.debug("nats client error", error=problem)
            return
        self._problems_said.add(problem)
        if self._ever_connected:
            log.warning("NATS connection problem; retrying", error=problem)
        else:
            log.warning("cannot connect to NATS yet; retrying", servers=redacted_servers(self.settings), error=problem)

    async def _on_disconnected(self) -> None:
        if self._connected and not self._stopping.is_set():
            self._connected = False
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._connected = True
        self._problems_said.clear()
        # The next fetch sends a fresh pull request; the watchdog in _fetch_loop covers the rest.
        if self._stopping.is_set():
            return
        url = self._nc.connected_url.geturl() if self._nc and self._nc.connected_url else "?"
        log.info("reconnected to NATS", url=redact_url(url))

    async def _on_closed(self) -> None:
        self._connected = False

    async def _bind(self) -> None:
        """(Re)create the pull subscription on the durable consumer; re-provision it if it vanished."""
        assert self._js is not None
        s = self.settings
        if self._sub is not None:
            old, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await old.unsubscribe()
            self._adopt_stranded(old)
        try:
            info = await self._js.consumer_info(s.nats_stream_name, s.nats_consumer_name)
        except NotFoundError:
            if not s.auto_setup:
                raise ProvisionError(
                    f"consumer {s.nats_consumer_name} on stream {s.nats_stream_name} does not exist; "
                    "run `uploads-consumer setup` or set AUTO_SETUP=true"
                ) from None
            log.warning(
                "consumer or stream missing; provisioning again",
                stream=s.nats_stream_name,
                consumer=s.nats_consumer_name,
            )
            report = await provision(self._js, s)
            for line in report.lines:
                log.info("setup " + line)
            info = await self._js.consumer_info(s.nats_stream_name, s.nats_consumer_name)
        # The consumer's own settings rule (it may have been made by the backend or the script).
        self._max_deliver = info.config.max_deliver or -1
        self._ack_wait = info.config.ack_wait or s.ack_wait
        self._sub = await self._js.pull_subscribe_bind(
            durable=s.nats_consumer_name,
            stream=s.nats_stream_name,
            pending_msgs_limit=max(1000, 4 * s.max_in_flight),
        )
        self._rebind_needed = False

    async def _consume(self) -> None:
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name="fetch-loop")
        side_tasks = [
            asyncio.create_task(self._progress_loop(), name="progress"),
            asyncio.create_task(self._stats_loop(), name="stats"),
        ]
        try:
            await self._stopping.wait()
            await self._fetch_task
            if self._sub is not None:
                self._adopt_stranded(self._sub)
            await self._finish_in_flight()
        finally:
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)

    async def _fetch_loop(self) -> None:
        """Pull batches while there is room; when idle, make sure idleness is real.

        An idle fetch ends in a timeout. Then the consumer is asked (at most every few seconds):
        gone → provision it again (AUTO_SETUP); messages pending that nobody is fetching → our
        pull is dead (a lost pull request after a restart or reconnect): subscribe anew.
        Fetch idle heartbeats are not used: nats-py sends the *remaining* time as `expires`,
        which the server rejects when it is under twice the heartbeat.
        """
        s = self.settings
        stalled = 0
        last_check = 0.0
        while not self._stopping.is_set():
            self._fetch_tick = time.monotonic()
            free = s.max_in_flight - len(self._handlers)  # counts messages not yet started too
            if free <= 0:
                self._slot_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), s.fetch_timeout)
                continue
            try:
                if self._rebind_needed or self._sub is None:
                    await self._bind()
                msgs = await self._sub.fetch(batch=min(s.fetch_batch, free), timeout=s.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                if time.monotonic() - last_check >= min(5.0, 2 * s.fetch_timeout) and not self._stopping.is_set():
                    last_check = time.monotonic()
                    stalled = stalled + 1 if await self._looks_stalled() else 0
                    if stalled >= 2:
                        log.warning("messages are pending but none arrive; subscribing again")
                        self._rebind_needed = True
                        stalled = 0
                continue
            except ProvisionError as exc:
                self._report_fetch_problem(exc.reason)
                await self._pause(5.0)
                continue
            except Exception as exc:  # noqa: BLE001 - disconnected, server busy, consumer gone: retry
                self._report_fetch_problem(describe(exc))
                await self._pause(1.0)
                if isinstance(exc, nats.js.errors.APIError):
                    await self._looks_stalled()  # a deleted consumer is noticed here
                continue
            self._fetch_problem = None
            stalled = 0
            for msg in msgs:
                self._start(msg)

    async def _looks_stalled(self) -> bool:
        """True if the consumer has undelivered messages and room to deliver them, yet we got none."""
        assert self._js is not None
        try:
            info = await self._js.consumer_info(self.settings.nats_stream_name, self.settings.nats_consumer_name)
        except NotFoundError:
            self._rebind_needed = True  # _bind provisions it again, or says why it cannot
            return False
        except Exception:  # noqa: BLE001 - cannot tell now; ask again later
            return False
        room = (info.num_ack_pending or 0) < (info.config.max_ack_pending or 1 << 30)
        return bool(info.num_pending) and room

    def _adopt_stranded(self, sub: Any) -> None:
        """Messages that reached a subscription's inbox after its last fetch gave up would sit
        unacknowledged until ACK_WAIT; hand them to handlers (which nak them if we are stopping)."""
        queue = getattr(getattr(sub, "_sub", None), "_pending_queue", None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if msg.reply and not JetStreamContext.is_status_msg(msg):
                self._start(msg)

    def _report_fetch_problem(self, problem: str) -> None:
        if problem != self._fetch_problem:  # once per new problem, not once per attempt
            self._fetch_problem = problem
            log.warning("fetch failed; retrying", error=problem)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _start(self, msg: Msg) -> None:
        handler = asyncio.create_task(self._handle(msg))
        self._handlers.add(handler)
        handler.add_done_callback(self._handler_done)

    def _handler_done(self, handler: asyncio.Task[None]) -> None:
        self._handlers.discard(handler)
        self._slot_freed.set()
        if not handler.cancelled() and handler.exception() is not None:
            # A bug in our own code: the message stays pending and is redelivered after ACK_WAIT.
            log.error("message handler failed", exc_info=handler.exception())

    async def _handle(self, msg: Msg) -> None:
        # Each handler is a task with its own copy of the context: what it binds stays with its message.
        started = time.monotonic()
        meta = msg.metadata
        structlog.contextvars.bind_contextvars(stream_seq=meta.sequence.stream, deliveries=meta.num_delivered)
        if meta.num_delivered > 1:
            self.metrics.redeliveries.inc()
        outcome = await self._process(msg)
        await self._settle(msg, outcome)
        self.metrics.processing_seconds.observe(time.monotonic() - started)

    async def _process(self, msg: Msg) -> object:
        """How processing ended: the result event, DUPLICATE, or the exception that stopped it."""
        if self._stopping.is_set():
            return ShuttingDown()
        try:
            event = parse_event(msg.data)
        except PermanentError as exc:
            return exc
        structlog.contextvars.bind_contextvars(event_id=event.event_id, file_uuid=event.file_uuid)
        self.metrics.message_age_seconds.observe(max(0.0, time.time() - event.timestamp / 1000))
        work = asyncio.create_task(self._work(event))  # a task of its own, so shutdown can cut it short
        self._inflight[id(msg)] = (msg, work)
        self.metrics.in_flight.inc()
        try:
            await asyncio.wait([work])
        finally:
            del self._inflight[id(msg)]
            self.metrics.in_flight.dec()
        if work.cancelled():
            return ShuttingDown()
        return work.exception() or work.result()

    async def _work(self, event: Any) -> object:
        """Steps 2–8a: dedupe, process, record. Returns the result event or DUPLICATE."""
        async with self._dedupe.claim(event.event_id):
            if await self._dedupe.seen(event.event_id):
                return DUPLICATE
            result = await self._pipeline.run(event, log)
            await self._dedupe.mark(event.event_id)
            return result

    async def _settle(self, msg: Msg, outcome: object) -> None:
        """Carry out the decision. Never raises; a failed settle leaves the message for redelivery."""
        meta = msg.metadata
        decision = decide(outcome, meta.num_delivered, self._max_deliver, self.settings.retry_backoff)
        if isinstance(outcome, BaseException) and not isinstance(outcome, UploadsError | ShuttingDown):
            log.error("unexpected error while processing", exc_info=outcome)
        try:
            if isinstance(decision, DeadLetter):
                try:
                    await self._dlq.publish(msg, decision.error_class, decision.reason)
                except Exception as exc:  # noqa: BLE001 - never terminate without the copy
                    reason = f"dead-letter publish failed ({describe(exc)}); will retry"
                    decision = Nak(backoff_delay(self.settings.retry_backoff, meta.num_delivered), reason)
                else:
                    await self._confirm(msg, b"+TERM")
                    self.metrics.messages.labels("dead_lettered").inc()
                    self.metrics.dead_letters.labels(str(decision.error_class)).inc()
                    log.warning("dead-lettered", error_class=str(decision.error_class), reason=decision.reason)
                    return
            if isinstance(decision, Nak):
                payload = b"-NAK" if not decision.delay else b'-NAK {"delay": %d}' % int(decision.delay * 1e9)
                await self._confirm(msg, payload)
                self.metrics.messages.labels("nacked").inc()
                log.warning("will retry", reason=decision.reason, delay_s=decision.delay)
                return
            try:
                await self._confirm(msg, b"+ACK")
            except Exception as exc:  # noqa: BLE001
                # The effect is recorded; a redelivery will be recognised as a duplicate.
                log.warning("ack not confirmed; redelivery will be treated as a duplicate", error=describe(exc))
                return
            if decision.duplicate:
                self.metrics.messages.labels("duplicate").inc()
                log.info("duplicate acknowledged")
            else:
                self.metrics.messages.labels("acked").inc()
                result = outcome if isinstance(outcome, dict) else {}
                log.info(
                    "processed", size=result.get("size"), sha256=result.get("sha256"), outputs=result.get("outputs")
                )
        except Exception as exc:  # noqa: BLE001 - the message stays pending and comes back after ACK_WAIT
            log.error("settling failed; the message will be redelivered", error=describe(exc))

    async def _confirm(self, msg: Msg, payload: bytes) -> None:
        """Send an ack/nak/term and wait for the server to confirm it (a request, not a bare publish)."""
        assert self._nc is not None
        await self._nc.request(msg.reply, payload, timeout=ACK_TIMEOUT)

    async def _progress_loop(self) -> None:
        """+WPI for every message in flight, well inside ACK_WAIT."""
        interval = max(0.2, self._ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for msg, _ in list(self._inflight.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _stats_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                info = await self._sub.consumer_info()
                self.metrics.consumer_pending.set(info.num_pending or 0)
                self.metrics.consumer_ack_pending.set(info.num_ack_pending or 0)
            await asyncio.sleep(10)

    async def _finish_in_flight(self) -> None:
        """Let work finish within SHUTDOWN_GRACE, then cut it short (those messages are nak'ed)."""
        if self._inflight:
            log.info("waiting for in-flight messages", count=len(self._inflight))
            work = [task for _, task in self._inflight.values()]
            _, pending = await asyncio.wait(work, timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=SETTLE_TIMEOUT)

    async def _close(self) -> None:
        self._stopping.set()  # from here on a disconnect is ours, not news
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 10)
            with contextlib.suppress(Exception):
                await self._nc.close()


def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""

    async def main() -> None:
        consumer = UploadConsumer(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stop)
        await consumer.run()

    loop_factory = None
    if os.environ.get("UPLOADS_CONSUMER_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # an optional speed-up (Linux/macOS); asyncio's own loop works too
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    log.info("stopped")
    return 0
