"""The consumers' state as the console shows it, read in the background (after Flower: a page renders
what was read last and never waits on a slow broker call).

Every CONSOLE_REFRESH: every consumer and stage (`stages.read_pipeline`) with its figures and the age of
its oldest unacknowledged message, what its replicas said of themselves lately (presence.py), the dead
letters stored since the last time (letters.py), and the result events published since, counted per
consumer and minute for the last hour. Those come from the result stream, headers only: the first read
goes an hour back, each later one reads only what is new.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.console.letters import DeadLetterIndex
from uploads_consumer.errors import describe
from uploads_consumer.observability import get_logger
from uploads_consumer.presence import read_reports
from uploads_consumer.stages import Topology, oldest_pending_age, read_pipeline
from uploads_consumer.stream_reader import Seen, scan

log = get_logger("uploads_consumer.console")

WINDOW_MINUTES = 60


@dataclass
class ConsumerRow:
    name: str
    after: str | None
    stream: str
    pending: int
    ack_pending: int
    max_ack_pending: int | None
    redelivered: int
    oldest_pending_age_s: float | None
    per_minute: list[int] | None
    """Uploads it completed (result events) in each of the last 60 minutes, oldest first; None when it
    publishes no results."""
    dead_letters: dict[str, int]
    replicas: list[dict[str, Any]] | str

    @property
    def last_hour(self) -> int | None:
        return sum(self.per_minute) if self.per_minute is not None else None


@dataclass
class Snapshot:
    at: float = 0.0
    rows: list[ConsumerRow] = field(default_factory=list)
    topology: Topology = field(default_factory=Topology)
    took_ms: float = 0.0
    """How long that read took (NATS, in the background)."""
    problem: str | None = None
    """Why the last refresh failed (NATS away, a permission refused); the rows are then the last good ones."""


class ResultRates:
    """Result events per consumer per minute, from the result stream's headers."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._read_to = 0
        self.minutes: dict[str, dict[int, int]] = {}

    async def refresh(self, js: Any) -> None:
        base = self._settings.nats_result_subject
        if not base:
            return
        prefix = base + "."
        now_minute = int(time.time() // 60)

        def count(seen: Seen) -> bool:
            consumer = seen.subject[len(prefix) :]
            minute = seen.time_ns // 60_000_000_000
            per = self.minutes.setdefault(consumer, {})
            per[minute] = per.get(minute, 0) + 1
            self._read_to = seen.seq
            return False

        try:
            if self._read_to:
                await scan(
                    js,
                    self._settings.nats_result_stream_name,
                    count,
                    subject=f"{base}.*",
                    start_seq=self._read_to + 1,
                    headers_only=True,
                )
            else:
                start = datetime.now(UTC) - timedelta(minutes=WINDOW_MINUTES)
                await scan(
                    js,
                    self._settings.nats_result_stream_name,
                    count,
                    subject=f"{base}.*",
                    start_time=start,
                    headers_only=True,
                )
        except NotFoundError:  # no result stream yet: nothing to count
            pass
        oldest = now_minute - WINDOW_MINUTES + 1
        for per in self.minutes.values():
            for minute in [m for m in per if m < oldest]:
                del per[minute]

    def last_hour(self, consumer: str) -> list[int]:
        now_minute = int(time.time() // 60)
        per = self.minutes.get(consumer, {})
        return [per.get(m, 0) for m in range(now_minute - WINDOW_MINUTES + 1, now_minute + 1)]


class ConsoleState:
    """What the pages render: refreshed by `run` until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.letters = DeadLetterIndex(settings)
        self.rates = ResultRates(settings)
        self.snapshot = Snapshot()
        self.js: Any = None
        self._said: str | None = None

    async def refresh(self) -> None:
        js = self.js
        if js is None:
            return
        began = time.perf_counter()
        topology = await read_pipeline(js, self.settings)
        await self.letters.refresh(js)
        await self.rates.refresh(js)
        counts = self.letters.by_class()
        rows = await asyncio.gather(*(self._row(js, node, counts) for node in topology.order()))
        self.snapshot = Snapshot(time.time(), list(rows), topology, (time.perf_counter() - began) * 1000)

    async def _row(self, js: Any, node: Any, counts: dict[str, dict[str, int]]) -> ConsumerRow:
        info = node.info
        age = await oldest_pending_age(js, node.stream, info)
        replicas: list[dict[str, Any]] | str = []
        if node.bucket:
            reports = await read_reports(js, node.bucket)
            replicas = reports if isinstance(reports, str) else [r.__dict__ for r in reports]
        return ConsumerRow(
            name=node.name,
            after=node.after,
            stream=node.stream,
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            max_ack_pending=info.config.max_ack_pending,
            redelivered=info.num_redelivered or 0,
            oldest_pending_age_s=None if age is None else round(age, 1),
            per_minute=self.rates.last_hour(node.name) if node.results else None,
            dead_letters=dict(sorted(counts.get(node.name, {}).items())),
            replicas=replicas,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.refresh()
                if self._said is not None:
                    log.info("console reads NATS again")
                self._said = None
            except Exception as exc:  # noqa: BLE001 - said once per new problem; the pages show the last good read
                problem = describe(exc)
                self.snapshot.problem = problem
                if problem != self._said:
                    log.warning("console cannot read NATS", error=problem)
                    self._said = problem
            try:
                await asyncio.wait_for(stopping.wait(), self.settings.console_refresh)
            except TimeoutError:
                pass
