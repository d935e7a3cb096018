"""The daemon: a NATS session, a pull source, the in-flight set and the settler, put together.

Each message: held (inflight) → a processing slot → parse and run the pipeline → `settler.decide()`
chooses ack, nak or dead-letter (the one place of decision) → the settler carries it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, NotFoundError

from uploads_consumer import stages, tracing
from uploads_consumer.audit import Delivered, ensure_anchor_stream, open_trail
from uploads_consumer.config import Settings
from uploads_consumer.connection import grant_hint, known_subjects, no_jetstream, no_jetstream_reason
from uploads_consumer.deadletter import DeadLetterPublisher
from uploads_consumer.dedupe import Deduplicator
from uploads_consumer.envelope import MasterKeyRing
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError, describe
from uploads_consumer.inflight import Held, InFlight
from uploads_consumer.observability import HealthServer, Metrics, get_logger
from uploads_consumer.pipeline import Delivery, Duplicate, Pipeline, Processed
from uploads_consumer.presence import Presence
from uploads_consumer.processors import (
    LoadedProcessor,
    ProcessorEnvironment,
    chain_need,
    load_processors,
    processor_name,
)
from uploads_consumer.provision import ProvisionError, retention_warnings, subject_matches
from uploads_consumer.session import NatsSession
from uploads_consumer.settler import Outcome, Settler, ShuttingDown
from uploads_consumer.source import PullSource
from uploads_consumer.storage import ObjectStore

log = get_logger("uploads_consumer.consumer")

# After SHUTDOWN_GRACE, what stopping may still take (see docs/contract.md, "Shutdown"):
PULL_EXIT_TIMEOUT = 1.0  # the pull loop notices the stop
INBOX_CLOSE_TIMEOUT = 1.0  # the inbox is closed, with what was already on its way handled
SETTLE_TIMEOUT = 7.0  # handing back (nak) or settling what was cut short
# + session.DRAIN_TIMEOUT (flush and close the connection), + PROCESSOR_CLOSE_TIMEOUT
PROCESSOR_CLOSE_TIMEOUT = 1.0
STOP_MARGIN = 15.0
REPORT_CHECK = 0.5  # how often readiness is compared with what this replica last said of it (presence)
DENIAL_MEMORY = 60.0  # a refused permission keeps /readyz at 503 this long (or 2 × ack_wait) after it was last seen


class UploadConsumer:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.nats_consumer_name)
        current, previous = settings.master_keys()
        self._keyring = MasterKeyRing(current, previous)
        del current, previous
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()
        # An unreadable TLS, .creds or nkey file, a bad processor or its settings: ConfigError (exit 2)
        # here, before anything connects.
        self.session = NatsSession(settings, self._stopping)
        self._store = ObjectStore(settings)  # opened by run(), before the processors start
        self._audit = open_trail(settings, self.metrics, self._stopping)  # likewise; closed last
        env = ProcessorEnvironment(
            download_path=settings.decrypt_download_path.resolve(),
            chain=tuple(processor_name(spec) for spec in settings.processors),
            max_retry_delay=max(settings.retry_backoff),
            registry=self.metrics.registry,
            publish=self._publish,
            consumer=settings.nats_consumer_name,
            s3=lambda: self._store.client,
            after=settings.after,
        )
        self._processors: list[LoadedProcessor] = load_processors(
            settings.processors, env, bool(settings.dedupe_bucket)
        )
        self._parse = stages.parser_for(settings)  # an upload event, or a stage's upstream's result
        self.session.known_subjects = known_subjects(settings, [st for p in self._processors for st in p.streams()])
        self._role = stages.role_of(
            settings,
            fetches=str(chain_need(self._processors, settings.allowed_content_types)),
            removes_upload=any(p.removes_upload for p in self._processors),
        )
        source = settings.source
        consumer = f"{source.stream}.{settings.nats_consumer_name}"
        # What it cannot work without: pulling, settling, recording, publishing its results and dead letters.
        self._needs = [
            ("publish", f"$JS.API.CONSUMER.MSG.NEXT.{consumer}"),
            ("publish", f"$JS.ACK.{consumer}.>"),
            ("publish", settings.dlq_subject),
            *([("publish", settings.result_subject)] if settings.result_subject else []),
            *([("publish", f"$KV.{settings.dedupe_bucket}.>")] if settings.dedupe_bucket else []),
            ("subscribe", f"{settings.nats_inbox_prefix}.>"),
        ]
        self._source: PullSource | None = None
        self._settler: Settler | None = None
        self._pipeline: Pipeline | None = None
        self._pull_task: asyncio.Task[None] | None = None
        self.inflight = InFlight(settings.max_in_flight, self._ack_wait, self.metrics)

    def _ack_wait(self) -> float:
        return self._source.ack_wait if self._source is not None else self.settings.ack_wait

    # -- probes

    def alive(self) -> bool:
        """The event loop answers (this runs on it) and the pull loop, once started, still turns.
        Before it starts — NATS unreachable, JetStream not ready — we are alive but not ready."""
        if self._pull_task is None or self._source is None:
            return True
        recent = time.monotonic() - self._source.tick < 3 * self.settings.fetch_timeout + 30
        return not self._pull_task.done() and recent

    def ready(self) -> bool:
        return self.why_not_ready() is None

    def why_not_ready(self) -> str | None:
        """Why /readyz is 503: not connected, not bound to the consumer, or NATS refusing what the daemon
        needs to pull and settle (said for as long as it keeps refusing, and a while after)."""
        if not self.session.is_connected:
            return "not connected to NATS"
        if self._source is None or not self._source.bound:
            return "not bound to its consumer yet"
        within = max(DENIAL_MEMORY, 2 * self._ack_wait())
        for kind, subject in self.session.recent_denials(within):
            if any(kind == need and subject_matches(pattern, subject) for need, pattern in self._needs):
                return f"NATS refuses {kind} on {subject}: {grant_hint(kind, subject, self.settings)}"
        return None

    def stop(self) -> None:
        """First call: stop fetching and let work finish within SHUTDOWN_GRACE. Second call: hurry."""
        if not self._stopping.is_set():
            log.info("shutdown requested", in_flight=len(self.inflight), grace_s=self.settings.shutdown_grace)
            self._stopping.set()
        elif not self._hurry.is_set():
            log.info("second stop request: cutting the grace short", in_flight=len(self.inflight))
            self._hurry.set()

    # -- lifecycle

    async def run(self) -> None:
        s = self.settings
        health = HealthServer(s.http_port, self.metrics, self.alive, self.ready, self.why_not_ready)
        await health.start()
        started: list[LoadedProcessor] = []
        try:
            async with self._store as store, self._audit:
                try:
                    for processor in self._processors:  # heavy resources now, not on the first message
                        await processor.start()
                        started.append(processor)
                    # Which keys this replica holds, by fingerprint: a rotation that missed a replica shows here.
                    log.info(
                        "master keys loaded",
                        keys=len(self._keyring.fingerprints),
                        current=self._keyring.fingerprints[0],
                        previous=self._keyring.fingerprints[1:],
                    )
                    if not await self.session.connect():
                        return
                    try:
                        await self._consume(store)
                    except ShuttingDown:
                        pass  # asked to stop before consuming began
                    finally:
                        tracing.begin_shutdown()  # the last spans leave while NATS drains
                        await self.session.close()
                finally:
                    for processor in reversed(started):
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(processor.close(), PROCESSOR_CLOSE_TIMEOUT)
        finally:
            await health.stop()

    async def _consume(self, store: ObjectStore) -> None:
        s = self.settings
        nc, js = self.session.nc, self.session.js
        assert nc is not None and js is not None
        kv = await self._prepare()
        ledger = Deduplicator(kv)
        presence = Presence(kv)  # where `status` finds whether this replica is ready, and why not
        self._warn_about_the_chain(ledger)
        self._pipeline = Pipeline(s, store, self._keyring, self._processors, ledger, self._publish, self.metrics)
        dead_letters = DeadLetterPublisher(js, s.dlq_subject, s.dlq_stream_name, s.nats_consumer_name)
        self._dead_letters = dead_letters
        self._source = source = PullSource(
            self.session,
            s,
            self.metrics,
            self._deliver,
            self._copy_abandoned,
            self._setup,
            self.inflight.ack_wait_changed,
        )
        self.session.on_reconnected.append(source.on_reconnected)
        self._settler = Settler(
            nc, dead_letters, self.metrics, s.retry_backoff, source.limits, self._stopping, self._audit
        )
        log.info(
            "consuming",
            stream=s.source.stream,
            consumer=s.nats_consumer_name,
            after=s.after,
            max_in_flight=s.max_in_flight,
            fetch_batch=s.fetch_batch,
            processors=[p.name for p in self._processors],
            fetches=str(self._pipeline.need),
        )
        side = [
            asyncio.create_task(self.inflight.progress_loop(), name="progress"),
            asyncio.create_task(source.refresh_loop(), name="consumer-refresh"),
            asyncio.create_task(self._report_loop(presence), name="presence"),
            asyncio.create_task(self._audit.anchoring(js), name="audit-anchors"),
        ]
        self._pull_task = asyncio.create_task(
            source.run(self.inflight.room, self.inflight.wait_for_room, self._stopping), name="pull"
        )
        try:
            await self._stopping.wait()
            await asyncio.wait([self._pull_task], timeout=PULL_EXIT_TIMEOUT)
            self._pull_task.cancel()
            await source.stop_deliveries(INBOX_CLOSE_TIMEOUT)
            await self.inflight.finish(s.shutdown_grace, self._hurry, SETTLE_TIMEOUT)
            await self._audit.seal()  # every record stored and its chain's head anchored, while NATS is up
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            self._pipeline.close()
            await presence.goodbye()

    async def _report_loop(self, presence: Presence) -> None:
        while True:
            await presence.say(self.why_not_ready(), len(self.inflight))
            await asyncio.sleep(REPORT_CHECK)

    async def _setup(self) -> None:
        """What `uploads-consumer setup` does, for this consumer and chain, with the lines logged."""
        js = self.session.js
        assert js is not None
        streams = [stream for p in self._processors for stream in p.streams()]
        report = await stages.setup(js, self.settings, self._role, streams)
        lines, warnings = await ensure_anchor_stream(js, self.settings)  # when audited: AUDIT_ANCHOR_STREAM
        report.lines, report.warnings = report.lines + lines, report.warnings + warnings
        for line in report.lines:
            log.info("setup " + line)
        for warning in report.warnings:
            log.warning("setup: " + warning)

    async def _prepare(self) -> Any:
        """Provision (AUTO_SETUP) and find the idempotency bucket; returns it (None if disabled).

        Something missing without AUTO_SETUP, a stage's upstream not there yet, or JetStream not answering
        (a cluster electing its leader), is waited for with readyz at 503 — said once, not a crash loop.
        Only a shape the daemon cannot work with (ProvisionError) ends the process.
        """
        js = self.session.js
        assert js is not None
        s = self.settings
        said: str | None = None
        delay = 1.0
        while True:
            try:
                if s.auto_setup:
                    await self._setup()
                else:
                    for warning in await stages.verify(js, s, self._role):
                        log.warning("setup: " + warning)
                for warning in await retention_warnings(js, s):
                    log.warning(warning)
                return await js.key_value(s.dedupe_bucket) if s.dedupe_bucket else None
            except stages.UpstreamMissing as exc:
                problem = f"{exc.reason}; waiting for it"
            except ProvisionError:
                raise
            except (NotFoundError, BucketNotFoundError) as exc:
                what = f"key-value bucket {s.dedupe_bucket}" if isinstance(exc, BucketNotFoundError) else "a stream"
                if s.auto_setup:  # deleted by someone else between our setup and its checks
                    problem = f"{what} disappeared while setting up; setting up again"
                else:
                    problem = (
                        f"{what} does not exist; run `uploads-consumer setup` or set AUTO_SETUP=true; waiting for it"
                    )
            except Exception as exc:  # noqa: BLE001 - JetStream not ready yet, or refusing us
                problem = self._unanswered(exc)
            if problem != said:
                log.error(problem)
                said = problem
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, 15.0)
            if self._stopping.is_set():
                raise ShuttingDown()

    def _unanswered(self, exc: Exception) -> str:
        """Why setting up got no answer: a permission NATS refused (ConfigError when AUTO_SETUP would have
        to create what this user may not), or JetStream not ready yet (a cluster electing its leader)."""
        if no_jetstream(exc):
            return f"{no_jetstream_reason(self.settings)}; retrying"
        refused = self.session.recent_denials(2 * self.session.request_timeout)
        if not refused:
            return f"JetStream is not answering yet ({describe(exc)}); retrying"
        kind, subject = refused[-1]
        if self.settings.auto_setup and any(op in subject.upper() for op in (".CREATE.", ".UPDATE.")):
            raise ConfigError(
                "AUTO_SETUP",
                f"is true, but NATS refuses this user {kind} on {subject}, to make what is missing: set "
                "AUTO_SETUP=false and have an admin run `uploads-consumer setup`, or grant this user the admin "
                "role's permissions (uploads-consumer setup --print-permissions --role admin)",
            )
        return f"NATS refuses {kind} on {subject} ({grant_hint(kind, subject, self.settings)}); retrying"

    def _warn_about_the_chain(self, ledger: Deduplicator) -> None:
        # Where `scan` stands in the chain is checked by the scan processor itself, at start.
        external = [p.name for p in self._processors if p.external_effect]
        if external and not ledger.enabled:
            log.warning(
                "DEDUPE_BUCKET is empty: steps with an external effect may be repeated on redelivery",
                processors=external,
            )

    # -- one message

    def _deliver(self, msg: Msg) -> None:
        if not self.inflight.hold(msg, self._handle):
            log.debug("redelivered while still being worked on", stream_seq=msg.metadata.sequence.stream)

    async def _handle(self, held: Held) -> None:
        # Each handler is a task with its own copy of the context: what it binds stays with its message.
        began = time.monotonic()
        meta = held.msg.metadata
        structlog.contextvars.bind_contextvars(stream_seq=meta.sequence.stream, deliveries=meta.num_delivered)
        if meta.num_delivered > 1:
            self.metrics.redeliveries.inc()
        outcome: Outcome
        with tracing.delivery(held.msg, self.settings.nats_consumer_name):
            if await self.inflight.acquire_slot(self._stopping):
                try:
                    outcome = await self._process(held)
                finally:
                    self.inflight.release_slot()
            else:
                outcome = ShuttingDown()
            if isinstance(outcome, ShuttingDown) and self._source is not None:
                await self._source.wait_quiet(SETTLE_TIMEOUT - 2)  # else the nak'ed message comes right back to us
            assert self._settler is not None
            with tracing.span("settle"):
                await self._settler.settle(lambda: held.msg, outcome, began)
        self.metrics.processing_seconds.observe(time.monotonic() - began)

    async def _process(self, held: Held) -> Outcome:
        """How processing ended: Processed, Duplicate, or the exception that stopped it."""
        try:
            incoming = self._parse(held.msg.data)
        except PermanentError as exc:
            return exc
        event = incoming.event
        structlog.contextvars.bind_contextvars(event_id=event.event_id, file_uuid=event.file_uuid)
        tracing.set_attribute("messaging.message.id", event.event_id)
        self.metrics.message_age_seconds.observe(max(0.0, time.time() - event.timestamp / 1000))
        assert self._pipeline is not None
        meta = held.msg.metadata
        delivery = Delivery(meta.stream, meta.sequence.stream, meta.num_delivered)
        work: asyncio.Task[Processed | Duplicate] = asyncio.ensure_future(
            self._pipeline.run(event, log, incoming.upstream, delivery)
        )
        held.work = work
        await asyncio.wait([work])  # not `await work`: cancelling it must not cancel us
        if work.cancelled():
            return ShuttingDown()
        error = work.exception()
        if error is None:
            return work.result()
        return error if isinstance(error, Exception) else ShuttingDown()

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> int:
        """JetStream publish that waits for the stream's acknowledgement (for the pipeline and processors);
        the message's sequence in the stream that stored it."""
        js, nc = self.session.js, self.session.nc
        if js is None or nc is None:
            raise RetryableError(f"publishing to {subject}: not connected to NATS")
        with tracing.producer(subject, len(body), headers.get("Nats-Msg-Id")):
            headers = tracing.inject(headers)  # the next hop continues this upload's trace
            # A message over the server's max_payload can never be stored, however often it is retried
            # (and one whose headers push it over would cost the connection): the upload ends here.
            size = len(body) + len("NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())
            if size > nc.max_payload:
                raise PermanentError(
                    ErrorClass.TOO_LARGE,
                    f"the message for {subject} is {size} bytes, over the NATS server's max_payload of "
                    f"{nc.max_payload}: raise max_payload in the server's configuration, then replay it",
                )
            try:
                ack = await js.publish(subject, body, headers=headers, timeout=10)
            except Exception as exc:
                raise RetryableError(f"publishing to {subject} failed: {describe(exc)}") from exc
            return int(ack.seq)

    async def _copy_abandoned(self, stream_seq: int, deliveries: int) -> None:
        """The server stopped delivering a message (its max_deliver) that nobody settled: copy it."""
        if stream_seq in self.inflight:
            return  # we hold it and settle it ourselves (never by a nak, on its last delivery)
        with structlog.contextvars.bound_contextvars(stream_seq=stream_seq, deliveries=deliveries):
            await self._copy_stored(stream_seq, deliveries)

    async def _copy_stored(self, stream_seq: int, deliveries: int) -> None:
        js = self.session.js
        assert js is not None
        s = self.settings
        reason = (
            f"reached the consumer's max_deliver ({deliveries} deliveries) without being settled "
            "(a crash or an ack-wait expiry on its last delivery)"
        )
        delay = 1.0
        while True:
            try:
                stream = s.source.stream
                stored = await js.get_msg(stream, seq=stream_seq)
                copied = Delivered(stream, stream_seq, deliveries, stored.data or b"")
                # In the upload's own trace, which the copy's headers then carry on.
                with tracing.given_up(
                    stored.subject or "",
                    stored.headers,
                    len(copied.data),
                    copied.stream,
                    stream_seq,
                    deliveries,
                    s.nats_consumer_name,
                ):
                    await self._dead_letters.publish_stored(
                        stored, stream, deliveries, ErrorClass.MAX_DELIVERIES, reason
                    )
                    assert self._settler is not None
                    await self._settler.abandoned_copied(copied, reason)
            except NotFoundError:
                log.warning("a message reached max_deliver but is no longer in its stream; nothing to copy")
                return
            except Exception as exc:  # noqa: BLE001 - keep trying: this copy is the message's last chance
                log.error("copying a message that reached max_deliver failed; retrying", error=describe(exc))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return
                delay = min(delay * 2, 30.0)
                continue
            return


def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (a second one hurries the stop); returns the exit code."""

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
    tracing.start()  # only with an OTLP endpoint set (OTEL_EXPORTER_OTLP_ENDPOINT)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
    finally:
        tracing.shutdown()  # within tracing.FLUSH_TIMEOUT, begun as the in-flight work settled
    log.info("stopped")
    return 0
