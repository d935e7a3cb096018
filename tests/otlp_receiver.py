"""A real OTLP/HTTP trace receiver for the tests: aiohttp on a free loopback port, in the test's event loop.

`POST /v1/traces` bodies are decoded with `opentelemetry-proto` (ExportTraceServiceRequest, the
protobuf the exporter sends) into plain `ReceivedSpan`s, kept for assertions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

KINDS = {value: name.removeprefix("SPAN_KIND_").lower() for name, value in Span.SpanKind.items()}


def any_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which) if which else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    kind: str  # internal, server, client, producer, consumer
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str, dict[str, Any]]]
    error: bool
    status_message: str
    resource: dict[str, Any]

    def event(self, name: str) -> dict[str, Any] | None:
        return next((attrs for event, attrs in self.events if event == name), None)


@dataclass
class OtlpReceiver:
    port: int = 0
    spans: list[ReceivedSpan] = field(default_factory=list)
    request_headers: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT: the exporter appends /v1/traces."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        self.request_headers.append({k.lower(): v for k, v in request.headers.items()})
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=KINDS[span.kind],
                            attributes=attributes(span.attributes),
                            events=[(e.name, attributes(e.attributes)) for e in span.events],
                            links=[
                                (link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes))
                                for link in span.links
                            ],
                            error=span.status.code == Status.STATUS_CODE_ERROR,
                            status_message=span.status.message,
                            resource=resource,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def children(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id]

    def strings(self) -> list[str]:
        """Every text the receiver got: names, status messages and every attribute value, of spans,
        their events and links, and of the resource."""
        out: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    out.append(str(key))
                    walk(inner)
            elif isinstance(value, list | tuple):
                for inner in value:
                    walk(inner)
            elif value is not None:
                out.append(str(value))

        for s in self.spans:
            walk([s.name, s.status_message, s.attributes, s.events, s.links, s.resource])
        return out

    async def wait_for(self, check: Any, timeout: float = 20, what: str = "spans") -> Any:
        deadline = time.monotonic() + timeout
        while not (found := check()):
            assert time.monotonic() < deadline, f"not received within {timeout}s: {what}; got {self.summary()}"
            await asyncio.sleep(0.05)
        return found

    def summary(self) -> list[str]:
        return [f"{s.trace_id[:8]} {s.name} ({s.kind})" for s in self.spans]
