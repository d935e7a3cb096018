"""What operators monitor with: the readiness metric, the Grafana dashboard and the Prometheus alert rules.

The rules are checked and unit-tested by promtool itself; every metric the dashboard and the rules
name is looked up in the /metrics of a real daemon, so a renamed metric breaks a test, not a pager.
"""

from __future__ import annotations

import asyncio
import time

from helpers import wait_settled


async def _until(condition, daemon, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)


async def test_the_ready_gauge_follows_readyz_both_ways(start_daemon, nats_server):
    daemon = start_daemon()
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    await _until(lambda: daemon.http_get("/readyz")[0] == 200, daemon)
    assert daemon.metric("uploads_consumer_ready") == 1

    nats_server.stop()
    await _until(lambda: daemon.http_get("/readyz")[0] == 503, daemon)
    assert daemon.metric("uploads_consumer_ready") == 0
    assert daemon.http_get("/healthz")[0] == 200, "alive, only not ready"
