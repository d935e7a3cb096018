"""What operators monitor with: the readiness metric, the Grafana dashboard and the Prometheus alert rules.

The rules are checked and unit-tested by promtool itself; every metric the dashboard and the rules
name is looked up in the /metrics of a real daemon, so a renamed metric breaks a test, not a pager.
"""

from __future__ import annotations

import asyncio
import time

from helpers import wait_settled
from prometheus_client.parser import text_string_to_metric_families

from uploads_consumer.errors import ErrorClass


def exported_samples(daemon) -> dict[tuple[str, frozenset], float]:
    """Every sample of the daemon's /metrics, parsed by prometheus_client: (name, labels) → value."""
    status, text = daemon.http_get("/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


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


async def test_every_dead_letter_class_is_exported_at_zero_before_the_first_dead_letter(start_daemon):
    daemon = start_daemon()
    daemon.wait_http()
    dead_letterable = [c for c in ErrorClass if c is not ErrorClass.TRANSIENT]
    samples = exported_samples(daemon)
    for error_class in dead_letterable:
        assert samples[("uploads_consumer_dead_letters_total", frozenset({("error_class", str(error_class))}))] == 0
