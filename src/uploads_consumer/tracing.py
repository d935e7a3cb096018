"""Tracing with OpenTelemetry: a span per delivery and per step, W3C trace context in and out.

On only when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set,
`OTEL_SDK_DISABLED` is not true and the `otel` extra is installed. Then the SDK reads every other
`OTEL_*` variable itself (headers, sampler, batching, resource) and spans leave over OTLP/HTTP
from the SDK's own thread; a collector that is slow or away costs that thread, never a message.

Off, nothing of OpenTelemetry is even imported, and each function here returns at its first line:
one global read and a comparison, no span, no allocation.

Never recorded: bodies, object keys, file names, credentials, URLs, reasons and exception messages
(free text may name the uploader or hold a secret). Attributes hold ids, sizes, names of steps and
error classes; the log lines, which carry the span's ids, have the reasons.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from uploads_consumer import __version__
from uploads_consumer.errors import UploadsError
from uploads_consumer.observability import get_logger

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from opentelemetry.trace import Span, Tracer

SERVICE_NAME = "uploads-consumer"
FLUSH_TIMEOUT = 2.0
"""The most a stop waits for the last spans to leave (docs/contract.md §10), from the moment the
in-flight work has settled; it runs alongside the NATS drain."""
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

log = get_logger("uploads_consumer.tracing")

_tracer: Tracer | None = None
_provider: Any = None
_otel: Any = None
"""OpenTelemetry's API modules (`.trace`, `.context`, `.propagate`) once tracing is on: looked up once,
not imported again at every span."""
_stopping: tuple[threading.Thread, float] | None = None
_delivery: ContextVar[Span | None] = ContextVar("uploads_consumer_delivery_span", default=None)
_not_failures: tuple[type[BaseException], ...] = ()
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def wanted() -> bool:
    """The environment asks for traces: an OTLP endpoint is set and the SDK is not disabled."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def start() -> bool:
    """Start exporting, if the environment asks for it (`wanted`). Any problem is logged and leaves
    tracing off: it never stops the daemon."""
    global _tracer, _provider, _otel
    if _tracer is not None or not wanted():
        return _tracer is not None
    try:
        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but OpenTelemetry is not installed (extra `otel`); tracing is off")
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() not in ("otlp", ""):
        log.warning("OTEL_TRACES_EXPORTER: only otlp is supported; exporting over OTLP/HTTP")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if os.environ.get(name, "http/protobuf").strip().lower() not in ("http/protobuf", ""):
            log.warning(f"{name}: only http/protobuf is supported (port 4318, not gRPC's 4317); exporting with it")
    try:
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        # The sampler (OTEL_TRACES_SAMPLER), span limits and the batching (OTEL_BSP_*) come from the
        # environment; the exporter reads its endpoint, headers, timeout, TLS and compression there.
        # No exit hook: the SDK's waits up to 30 s on an unreachable collector; `shutdown` is bounded.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    except Exception as exc:  # noqa: BLE001 - a misconfigured exporter leaves tracing off, the daemon on
        log.warning("tracing is off: the OTLP exporter could not be set up", error=type(exc).__name__)
        return False
    trace.set_tracer_provider(provider)
    _otel = SimpleNamespace(trace=trace, context=context, propagate=propagate)
    _provider = provider
    _tracer = provider.get_tracer("uploads_consumer", __version__)
    log.info("tracing on", service=resource.attributes.get("service.name"))
    return True


def begin_shutdown() -> None:
    """Stop taking spans and send what is left, in a thread of its own (see `shutdown`)."""
    global _tracer, _stopping
    if _provider is None or _stopping is not None:
        return
    _tracer = None
    thread = threading.Thread(target=_provider.shutdown, name="otel-shutdown", daemon=True)
    thread.start()
    _stopping = (thread, time.monotonic())


def shutdown(timeout: float = FLUSH_TIMEOUT) -> None:
    """Wait for the last spans to leave, at most `timeout` seconds after `begin_shutdown`. The SDK's
    own shutdown may wait 30 s on an unreachable collector: what is not sent by then is dropped."""
    begin_shutdown()
    if _stopping is not None:
        thread, began = _stopping
        thread.join(max(0.0, began + timeout - time.monotonic()))


def log_processors() -> list[Any]:
    """The structlog processors that give each log line its `trace_id` and `span_id` ([] when off)."""
    if not wanted():
        return []
    try:
        from opentelemetry import trace
    except ImportError:
        return []

    def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event["trace_id"] = format(context.trace_id, "032x")
            event["span_id"] = format(context.span_id, "016x")
        return event

    return [add_trace_ids]


def not_a_failure(kind: type[BaseException]) -> None:
    """An exception that ends a step without failing it (a processor skipping itself)."""
    global _not_failures
    _not_failures = (*_not_failures, kind)


# -- spans


def delivery(msg: Msg, consumer: str) -> contextlib.AbstractContextManager[None]:
    """The consumer span of one delivery: a child of the `traceparent` among the message's headers
    (the backend's, or `uploads-consumer publish`'s), else a new trace."""
    if _tracer is None:
        return _OFF
    return _delivery_span(_tracer, msg, consumer)


def given_up(
    subject: str, headers: Mapping[str, str] | None, size: int, stream: str, seq: int, deliveries: int, consumer: str
) -> contextlib.AbstractContextManager[None]:
    """The consumer span around the dead-letter copy of a message the server stopped delivering (its
    max_deliver), read back from its stream: in the upload's trace, as its deliveries were."""
    if _tracer is None:
        return _OFF
    return _consumer_span(_tracer, subject, headers, size, stream, seq, deliveries, consumer)


def span(name: str, target: str = "") -> contextlib.AbstractContextManager[None]:
    """A step of the current delivery, named `name` or `name target` (`processor webhook:ops`)."""
    if _tracer is None:
        return _OFF
    return _step(_tracer, f"{name} {target}" if target else name)


def s3(operation: str, bucket: str) -> contextlib.AbstractContextManager[None]:
    """An S3 request (`GetObject`, `HeadObject`): the bucket, never the key (it holds the uploader's
    address) nor a URL (presigned or not)."""
    if _tracer is None:
        return _OFF
    return _step(
        _tracer,
        f"S3.{operation}",
        "client",
        {"rpc.system": "aws-api", "rpc.service": "S3", "rpc.method": operation, "aws.s3.bucket": bucket},
    )


def producer(subject: str, size: int, message_id: str | None) -> contextlib.AbstractContextManager[None]:
    """Publishing one message (result event, transcription, upload event): inject within it."""
    if _tracer is None:
        return _OFF
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": subject,
        "messaging.message.body.size": size,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    return _step(_tracer, f"send {subject}", "producer", attributes)


def set_attribute(key: str, value: str | int | float | bool) -> None:
    """On the current span: an id or a size, never content."""
    if _tracer is None:
        return
    _otel.trace.get_current_span().set_attribute(key, value)


def settled(outcome: str, error_class: str | None = None, delay: float | None = None) -> None:
    """How the delivery ended (`uploads.outcome`, as the messages metric counts it). A dead letter and
    a retry are events of the delivery's span, which then has an error status with the class; a nak
    without delay (handed back at shutdown) is no failure."""
    if _tracer is None:
        return
    delivered = _delivery.get()
    if delivered is None:
        return
    delivered.set_attribute("uploads.outcome", outcome)
    if outcome == "dead_lettered":
        delivered.add_event("dead_letter", {"uploads.error_class": error_class or ""})
    elif outcome == "nacked" and delay is not None:
        error_class = error_class or "transient"
        delivered.add_event("retry", {"uploads.error_class": error_class, "uploads.retry_delay_s": delay})
    elif outcome == "nacked":
        delivered.add_event("handed_back")
    if error_class:
        _fail(delivered, error_class)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with `traceparent` (and `tracestate`, baggage) of the current span added, so the next
    hop continues this trace; the same dict, untouched, when tracing is off."""
    if _tracer is None:
        return headers
    carrier = dict(headers)
    _otel.propagate.inject(carrier)
    return carrier


# -- the SDK side (only ever reached with tracing on)


def _delivery_span(tracer: Tracer, msg: Msg, consumer: str) -> _Current:
    meta = msg.metadata
    return _consumer_span(
        tracer, msg.subject, msg.headers, len(msg.data), meta.stream, meta.sequence.stream, meta.num_delivered, consumer
    )


def _consumer_span(
    tracer: Tracer,
    subject: str,
    headers: Mapping[str, str] | None,
    size: int,
    stream: str,
    seq: int,
    deliveries: int,
    consumer: str,
) -> _Current:
    trace = _otel.trace
    # NATS keeps a header's case; W3C names are lower-case, but a producer may write `Traceparent`.
    parent = _otel.propagate.extract({name.lower(): str(value) for name, value in (headers or {}).items()})
    upstream = trace.get_current_span(parent).get_span_context()
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": subject,
        "messaging.consumer.group.name": consumer,
        "messaging.message.body.size": size,
        "messaging.nats.stream": stream,
        "messaging.nats.stream_sequence": seq,
        "messaging.nats.delivery_count": deliveries,
    }
    span = tracer.start_span(
        f"process {subject}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=[trace.Link(upstream)] if upstream.is_valid else None,  # semconv: the creation context
        record_exception=False,  # an exception's text may hold what must not leave (a URL, a key)
        set_status_on_exception=False,
    )
    return _Current(span, delivery=True)


def _step(tracer: Tracer, name: str, kind: str = "internal", attributes: dict[str, Any] | None = None) -> _Current:
    span = tracer.start_span(
        name,
        kind=_otel.trace.SpanKind[kind.upper()],
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )
    return _Current(span)


class _Current:
    """A started span, current until the block ends, then ended; what ends the block marks it.
    (A class rather than the SDK's nested generator context managers: a third of the cost.)"""

    __slots__ = ("_delivery", "_restore", "_span", "_token")

    def __init__(self, span: Span, delivery: bool = False) -> None:
        self._span, self._delivery = span, delivery

    def __enter__(self) -> None:
        self._token = _otel.context.attach(_otel.trace.set_span_in_context(self._span))
        if self._delivery:
            self._restore = _delivery.set(self._span)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is not None:
            _ended_by(self._span, exc)
        if self._delivery:
            _delivery.reset(self._restore)
        self._span.end()
        _otel.context.detach(self._token)


def _ended_by(current: Span, exc: BaseException) -> None:
    """A project error is a failure of its class; a skip is not one; a cancellation is an event."""
    if isinstance(exc, _not_failures):
        current.add_event("skipped")
    elif isinstance(exc, UploadsError):
        _fail(current, str(getattr(exc, "error_class", None) or type(exc).__name__))
    elif isinstance(exc, Exception):
        _fail(current, type(exc).__name__)
    else:
        current.add_event("cancelled")


def _fail(current: Span, error_type: str) -> None:
    current.set_attribute("error.type", error_type)
    current.set_status(_otel.trace.Status(_otel.trace.StatusCode.ERROR, error_type))
