"""Each replica's own view, where `status` can read it: whether it is ready and, if not, why.

The server sees a consumer, not the processes behind it: a replica that may not pull or acknowledge
looks, from there, like one that is merely slow. So every replica keeps a small report in its
consumer's idempotency bucket, under `daemon.{host}.{pid}`: ready or not and why (a permission NATS
refuses, not bound yet...), messages in flight, when it said so. It writes it when that changes and
every REPORT_EVERY seconds, and deletes it at a clean stop; `status` shows those said recently.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

PREFIX = "daemon"
REPORT_EVERY = 15.0
STALE = 3 * REPORT_EVERY  # a report older than this is a replica gone without saying goodbye


@dataclass(frozen=True)
class Report:
    host: str
    pid: int
    ready: bool
    why: str | None
    in_flight: int
    at: int  # epoch milliseconds


def key_for(host: str, pid: int) -> str:
    return f"{PREFIX}.{re.sub(r'[^A-Za-z0-9_-]', '_', host)}.{pid}"


class Presence:
    """The writer, for one replica: `say()` when something may have changed, `goodbye()` at a clean stop."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv  # None: DEDUPE_BUCKET is empty, and nothing is said
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._key = key_for(self.host, self.pid)
        self._said: tuple[bool, str | None] | None = None
        self._said_at = 0.0

    async def say(self, why_not_ready: str | None, in_flight: int) -> None:
        if self._kv is None:
            return
        state = (why_not_ready is None, why_not_ready)
        if state == self._said and time.monotonic() - self._said_at < REPORT_EVERY:
            return
        report = Report(self.host, self.pid, state[0], why_not_ready, in_flight, int(time.time() * 1000))
        try:
            await self._kv.put(self._key, json.dumps(asdict(report)).encode())
        except Exception:  # noqa: BLE001 - a report is a courtesy: never in the way of the work
            return
        self._said, self._said_at = state, time.monotonic()

    async def goodbye(self) -> None:
        if self._kv is not None:
            try:
                await self._kv.delete(self._key)
            except Exception:  # noqa: BLE001 - it goes stale by itself
                pass


async def read_reports(js: JetStreamContext, bucket: str) -> list[Report] | str:
    """The reports said in the last STALE seconds, or why they could not be read."""
    stream = f"KV_{bucket}"
    try:
        info = await js.stream_info(stream, subjects_filter=f"$KV.{bucket}.{PREFIX}.>")
    except NotFoundError:
        return []
    except (TimeoutError, nats.errors.TimeoutError):
        return f"no answer reading {stream} (this user may not read the consumer's bucket)"
    reports: list[Report] = []
    for subject in (info.state.subjects or {}) if info.state else {}:
        try:
            msg = await js.get_last_msg(stream, subject)
        except (NotFoundError, TimeoutError, nats.errors.TimeoutError):
            continue
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            continue
        try:
            report = Report(**json.loads(msg.data))
        except (ValueError, TypeError):
            continue
        if time.time() * 1000 - report.at <= STALE * 1000:
            reports.append(report)
    return sorted(reports, key=lambda r: (r.host, r.pid))
