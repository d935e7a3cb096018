"""Logs (structlog), metrics (Prometheus) and the health endpoints."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from uploads_consumer.errors import ConfigError, ErrorClass

PREFIX = "uploads_consumer_"


def setup_logging(
    level: str = "INFO", fmt: str | None = None, stream: Any = None, processors: Sequence[Any] = ()
) -> None:
    """One format for the whole process: console on a terminal, JSON otherwise.

    Third-party stdlib loggers (nats, botocore, aiohttp) are routed through the same renderer.
    `processors` add fields to every line (the caller's: trace ids, when tracing is on).
    """
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *processors,
    ]
    renderer: Any = (
        # plain tracebacks: with `rich` installed structlog's default would print every frame's locals (keys included)
        structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            # First: a line below LOG_LEVEL costs one level check, not the whole chain (time, context).
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if fmt == "json" else (lambda _l, _m, e: e),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries stay at WARNING unless we debug.
    for name in ("botocore", "aiobotocore", "aioboto3", "urllib3", "aiohttp.access"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level == "DEBUG" and name != "aiohttp.access" else logging.WARNING
        )


def get_logger(name: str = "uploads_consumer") -> Any:
    return structlog.get_logger(name)


class _Family:
    """A labelled metric whose first label, `consumer`, is this process's: `.labels()` takes the rest."""

    def __init__(self, metric: Any, consumer: str) -> None:
        self._metric, self._consumer = metric, consumer

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._consumer, *values)


class Metrics:
    """The daemon's Prometheus metrics, on a registry of their own (so tests can run several).

    Every series carries `consumer` (NATS_CONSUMER_NAME): several consumers of one stream, each
    doing its own job, are told apart on one dashboard.
    """

    def __init__(self, consumer: str = "file_processor") -> None:
        self.consumer = consumer
        self.registry = CollectorRegistry()
        r = self.registry
        c = ["consumer"]

        def family(metric: Any) -> _Family:
            return _Family(metric, consumer)

        def single(kind: type[Counter] | type[Gauge], name: str, text: str) -> Any:
            """A metric with no label but `consumer`: this process's one series of it."""
            return kind(PREFIX + name, text, c, registry=r).labels(consumer)

        self.messages = family(Counter(PREFIX + "messages", "Messages by final outcome.", [*c, "outcome"], registry=r))
        for outcome in ("acked", "duplicate", "nacked", "dead_lettered"):
            self.messages.labels(outcome)
        self.dead_letters = family(
            Counter(PREFIX + "dead_letters", "Dead-lettered messages by error class.", [*c, "error_class"], registry=r)
        )
        # Every class that can be dead-lettered starts at 0: Prometheus' increase() cannot see the
        # first step of a series that is born at 1, so an alert on the first dead letter would miss it.
        for error_class in ErrorClass:
            if error_class is not ErrorClass.TRANSIENT:  # transient errors are retried, never dead-lettered
                self.dead_letters.labels(str(error_class))
        self.processing_seconds = Histogram(
            PREFIX + "processing_duration_seconds",
            "Time from receipt to settlement of one message.",
            c,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        ).labels(consumer)
        self.message_age_seconds = Histogram(
            PREFIX + "message_age_seconds",
            "Now minus the event's timestamp, when processing starts.",
            c,
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
            registry=r,
        ).labels(consumer)
        self.bytes_decrypted = single(Counter, "bytes_decrypted", "Plaintext bytes decrypted and verified.")
        self.in_flight = single(Gauge, "in_flight", "Messages being processed now.")
        self.consumer_pending = single(Gauge, "consumer_pending", "Messages not yet delivered (lag).")
        self.consumer_ack_pending = single(Gauge, "consumer_ack_pending", "Messages delivered, not yet settled.")
        self.processor_duration = family(
            Histogram(
                PREFIX + "processor_duration_seconds",
                "Time one processor took on one upload.",
                [*c, "processor"],
                buckets=(0.001, 0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800),
                registry=r,
            )
        )
        self.processor_outcomes = family(
            Counter(
                PREFIX + "processor_outcomes",
                "Processor runs by outcome (ok|skipped|retry|failed).",
                [*c, "processor", "outcome"],
                registry=r,
            )
        )
        self.redeliveries = single(Counter, "redeliveries", "Messages received with a delivery count above 1.")
        self.ready = single(Gauge, "ready", "1 while /readyz answers 200, else 0 (set at each scrape).")
        # The audit trail's (AUDIT_URL); exported at 0 without one, so dashboards and alerts always find them.
        self.audit_records = single(
            Counter, "audit_records", "Audit records made durable (in the store, or in the local spool)."
        )
        self.audit_spool_depth = single(
            Gauge, "audit_spool_depth", "Audit records in the local spool, not yet in the store."
        )
        self.audit_flush_errors = single(
            Counter,
            "audit_flush_errors",
            "Failed attempts to write audit records (to the local journal, or from the spool to the store).",
        )
        self.audit_anchors = single(Counter, "audit_anchors", "Audit chain heads published to the anchor stream.")
        self.audit_anchor_errors = single(
            Counter, "audit_anchor_errors", "Failed attempts to publish an audit anchor (tried again next interval)."
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """`/healthz`, `/readyz`, `/metrics` on one port (0 disables)."""

    def __init__(
        self,
        port: int,
        metrics: Metrics,
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        why_not_ready: Callable[[], str | None] = lambda: None,
        host: str = "0.0.0.0",
    ) -> None:
        self._port, self._host = port, host
        self._metrics, self._alive, self._ready, self._why = metrics, alive, ready, why_not_ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if not self._port:
            return
        app = web.Application()
        app.router.add_get("/healthz", self._probe(self._alive))
        app.router.add_get("/readyz", self._probe(self._ready, self._why))
        app.router.add_get("/metrics", self._render)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except OSError as exc:  # a configuration problem: exit 2 naming the variable, not a traceback
            await self.stop()
            self._runner = None
            if exc.errno == errno.EADDRINUSE:
                problem = (
                    f"port {self._port} is already in use (another daemon on this host?): give each daemon "
                    "its own HTTP_PORT, or 0 to run without /healthz, /readyz and /metrics"
                )
            else:
                problem = f"cannot listen on port {self._port}: {exc.strerror or exc}"
            raise ConfigError("HTTP_PORT", problem) from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _probe(check: Callable[[], bool], why: Callable[[], str | None] = lambda: None) -> Callable[[web.Request], Any]:
        async def handler(_request: web.Request) -> web.Response:
            ok = check()
            return web.Response(status=200 if ok else 503, text="ok\n" if ok else f"not ready: {why() or '-'}\n")

        return handler

    async def _render(self, _request: web.Request) -> web.Response:
        # The same check as /readyz, made at each scrape: nothing else has to keep the gauge current.
        self._metrics.ready.set(1 if self._ready() else 0)
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
