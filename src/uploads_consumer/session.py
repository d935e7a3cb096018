"""The daemon's NATS connection: connect for ever with backoff, say each problem once, drain at the end."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from uploads_consumer.config import Settings
from uploads_consumer.connection import (
    connect_options,
    denial,
    describe_connect_error,
    grant_hint,
    known_subjects,
    redact_url,
    redacted_servers,
)
from uploads_consumer.errors import describe
from uploads_consumer.observability import get_logger

log = get_logger("uploads_consumer.session")

DRAIN_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0  # JetStream API requests; a request NATS refuses is never answered: it ends here


class NatsSession:
    """One connection for the life of the daemon; nats-py reconnects it once it has been made."""

    def __init__(self, settings: Settings, stopping: asyncio.Event) -> None:
        self.settings = settings
        self._stopping = stopping
        # Built once, and here: an unreadable TLS, .creds or nkey file is a ConfigError (exit 2)
        # before anything connects.
        self._options = connect_options(settings, "uploads-consumer")
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.connected = False
        self._ever_connected = False
        self._problems_said: set[str] = set()  # said since the last successful connect
        self.on_reconnected: list[Any] = []  # callbacks run after each reconnect
        self.on_denied: list[Callable[[str, str], None]] = []  # (publish|subscribe, subject) the server refused
        self.denied: dict[tuple[str, str], float] = {}  # each refusal, when it was last said (time.monotonic())
        self.request_timeout = REQUEST_TIMEOUT
        self.known_subjects: list[str] = known_subjects(settings)  # to give a refused subject its case back

    @property
    def is_connected(self) -> bool:
        return self.connected and self.nc is not None and self.nc.is_connected

    async def connect(self) -> bool:
        """Connect, retrying with backoff and jitter until connected (True) or asked to stop (False).

        Each attempt is made with nats-py's own reconnecting off (one try per server), and it is
        turned on once connected: with it on, nats.connect() never returns while no server can be
        reached (so SIGTERM could not stop us), and after a failed TLS handshake it waits for ever
        for a socket that never reports closed (nats-io/nats.py#718). nats-py has no public setter
        for this, hence `options` (pinned nats-py range in pyproject.toml; tests/test_session.py).
        """
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self.nc = await nats.connect(
                    **self._options,
                    connect_timeout=5,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # 0 would mean "forever" when nats-py picks a server
                    reconnect_time_wait=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
                self.nc.options.update(allow_reconnect=True, max_reconnect_attempts=-1)
                self.js = self.nc.jetstream(timeout=self.request_timeout)
                self.connected = self._ever_connected = True
                self._problems_said.clear()
                url = self.nc.connected_url.geturl() if self.nc.connected_url else None
                log.info("connected to NATS", url=redact_url(url) if url else redacted_servers(self.settings))
                return True
            except Exception as exc:  # noqa: BLE001 - keep trying; say so once per new problem
                if not isinstance(exc, nats.errors.NoServersError):  # its causes went to error_cb already
                    await self._on_error(exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30)
        return False

    def recent_denials(self, within: float = 60.0) -> list[tuple[str, str]]:
        """The permissions the server refused in the last `within` seconds."""
        now = time.monotonic()
        return [what for what, at in self.denied.items() if now - at <= within]

    def _on_denied(self, kind: str, subject: str) -> None:
        """Said once per subject (a refused ack would otherwise be said per message), with what to grant."""
        first = (kind, subject) not in self.denied
        self.denied[(kind, subject)] = time.monotonic()
        if first:
            log.error(
                "NATS refused a permission this daemon needs",
                denied=f"{kind} {subject}",
                grant=grant_hint(kind, subject, self.settings),
            )
        for callback in self.on_denied:
            callback(kind, subject)

    async def _on_error(self, exc: Exception) -> None:
        if (refused := denial(exc, self.known_subjects)) is not None:
            self._on_denied(*refused)
            return
        # nats-py calls this on every failed attempt; say each problem once until connected.
        problem = describe(exc) if self.connected else describe_connect_error(exc, self.settings)
        if problem in self._problems_said:
            log.debug("nats client error", error=problem)
            return
        self._problems_said.add(problem)
        if self._ever_connected:
            log.warning("NATS connection problem; retrying", error=problem)
        else:
            log.warning("cannot connect to NATS yet; retrying", servers=redacted_servers(self.settings), error=problem)

    async def _on_disconnected(self) -> None:
        if self.connected and not self._stopping.is_set():
            self.connected = False
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self.connected = True
        self._problems_said.clear()
        if self._stopping.is_set():
            return
        url = self.nc.connected_url.geturl() if self.nc and self.nc.connected_url else "?"
        log.info("reconnected to NATS", url=redact_url(url))
        for callback in self.on_reconnected:
            callback()

    async def _on_closed(self) -> None:
        self.connected = False

    async def close(self) -> None:
        """Drain (flushes what we sent: acks, naks) within DRAIN_TIMEOUT, then close."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        if nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), DRAIN_TIMEOUT)
