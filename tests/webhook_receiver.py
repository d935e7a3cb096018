"""A real webhook receiver for the tests: aiohttp on a free loopback port, in the test's event loop.

Every request is recorded, and checked with the Standard Webhooks reference library
(`standardwebhooks`) when the receiver knows the secret. What it answers is up to the test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loopback_http import LoopbackHttpServer
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a slow receiver)


@dataclass
class Delivery:
    """One request as it arrived, and what it was answered."""

    at: float  # time.monotonic()
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    attempt: int  # 1 for the first request with this webhook-id (or this path, without one)
    answer: Answer = field(default_factory=Answer)
    verified: str = "no secret"  # "ok", or why the reference library refused it

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


Respond = Callable[[Delivery], Answer]


class WebhookReceiver(LoopbackHttpServer):
    """POSTs to any path are recorded in `deliveries`; `respond(delivery)` decides the answer (200 by default)."""

    def __init__(self, secret: str | None = None, port: int = 0) -> None:
        super().__init__(port)
        self.secret = secret
        self.respond: Respond = lambda _delivery: Answer()
        self.deliveries: list[Delivery] = []
        self._attempts: dict[str, int] = {}

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = headers.get("webhook-id") or request.path
        self._attempts[key] = self._attempts.get(key, 0) + 1
        delivery = Delivery(time.monotonic(), request.path, headers, body, self._attempts[key])
        if self.secret is not None:
            try:
                StandardWebhook(self.secret).verify(body, headers)
                delivery.verified = "ok"
            except WebhookVerificationError as exc:
                delivery.verified = str(exc)
        delivery.answer = self.respond(delivery)
        self.deliveries.append(delivery)
        if delivery.answer.delay:
            await asyncio.sleep(delivery.answer.delay)
        return web.Response(status=delivery.answer.status, headers=delivery.answer.headers)

    def succeeded(self) -> list[Delivery]:
        """The deliveries answered 2xx."""
        return [d for d in self.deliveries if 200 <= d.answer.status < 300]

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries within {timeout}s"
            await asyncio.sleep(0.05)
