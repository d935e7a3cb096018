"""Processors the tests load into the daemon with PROCESSORS=uc_test_plugins:NAME (tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError
from uploads_consumer.processors import StepSkipped


async def slow(ctx) -> None:
    """Sleeps UC_TEST_SLOW_SECONDS, then reports it."""
    await asyncio.sleep(float(os.environ.get("UC_TEST_SLOW_SECONDS", "1")))
    ctx.report("slept", True)


async def flaky_once(ctx) -> None:
    """Fails with a retryable error the first time it sees an event, succeeds after."""
    marker = Path(os.environ["UC_TEST_STATE_DIR"]) / ctx.event.event_id
    if not marker.exists():
        marker.write_text("seen")
        raise RetryableError("flaky_once: not this time")
    ctx.report("flaky_once", "ok")


async def always_retry(ctx) -> None:
    raise RetryableError("always_retry: the downstream service is down")


async def reject(ctx) -> None:
    raise PermanentError(ErrorClass.PROCESSOR_FAILED, "reject: this file type is not supported")


async def boom(ctx) -> None:
    """Fails with an unexpected exception the first time, then succeeds: a transient failure."""
    marker = Path(os.environ["UC_TEST_STATE_DIR"]) / ("boom-" + ctx.event.event_id)
    if not marker.exists():
        marker.write_text("seen")
        raise KeyError("unexpected")
    ctx.report("boom", "recovered")


async def record(ctx) -> None:
    """Appends what it saw: proves processors run in order on verified plaintext."""
    with open(Path(os.environ["UC_TEST_STATE_DIR"]) / "record.log", "a") as f:
        f.write(f"{ctx.event.event_id} {ctx.size} {ctx.sha256} {ctx.plaintext_path.exists()}\n")
    ctx.report("recorded", True)


async def flaky_then_slow(ctx) -> None:
    """First sight of an event: a retryable failure. After that: sleeps UC_TEST_SLOW_SECONDS."""
    marker = Path(os.environ["UC_TEST_STATE_DIR"]) / ("fts-" + ctx.event.event_id)
    if not marker.exists():
        marker.write_text("seen")
        raise RetryableError("flaky_then_slow: not this time")
    await asyncio.sleep(float(os.environ.get("UC_TEST_SLOW_SECONDS", "1")))


_running = 0
_most = 0


async def concurrency(ctx) -> None:
    """Sleeps a moment and reports the most uploads this process had inside it at once."""
    global _running, _most
    _running += 1
    _most = max(_most, _running)
    try:
        await asyncio.sleep(float(os.environ.get("UC_TEST_SLOW_SECONDS", "0.3")))
    finally:
        _running -= 1
    ctx.report("most_at_once", _most)


def not_async(ctx) -> None:
    """A plain function: not a valid processor (the daemon must refuse it at start)."""


async def peek(ctx) -> None:
    """Reports which attributes the context offers (a processor must not see the daemon's settings)."""
    ctx.report("attributes", sorted(a for a in dir(ctx) if not a.startswith("_")))


async def verbose(ctx) -> None:
    """Reports an output larger than a NATS message may be (1 MiB by default): the result event cannot go."""
    ctx.report("text", "word " * (300 * 1024))


async def skip_me(ctx) -> None:
    """Reports something, then finds the upload is not for it after all."""
    ctx.report("half_done", True)
    raise StepSkipped("skip_me: not for this one")


async def see_skips(ctx) -> None:
    """Reports the steps skipped before it, with their reasons."""
    ctx.report("skipped", dict(ctx.skipped))


async def tracing_probe(ctx) -> None:
    """Reports the OpenTelemetry modules loaded in the daemon and the names of its threads."""
    ctx.report("otel_modules", sorted(m for m in sys.modules if m.partition(".")[0] == "opentelemetry"))
    ctx.report("threads", sorted(t.name for t in threading.enumerate()))


tracing_probe.needs = "event"


async def mark_then_slow(ctx) -> None:
    """Leaves a file named for the event (the steps before it are done, and checkpointed), then sleeps
    UC_TEST_SLOW_SECONDS: time for a test to kill the daemon before the message is acknowledged."""
    (Path(os.environ["UC_TEST_STATE_DIR"]) / f"reached-{ctx.event.event_id}").write_text("reached")
    await asyncio.sleep(float(os.environ.get("UC_TEST_SLOW_SECONDS", "1")))


mark_then_slow.needs = "event"


async def gate(ctx) -> None:
    """Holds an upload whose stored name has `held` in it until the test creates UC_TEST_STATE_DIR/gate-open:
    an upload in flight for as long as a test needs; the others pass at once."""
    if "held" in ctx.event.s3_data_key:
        opened = Path(os.environ["UC_TEST_STATE_DIR"]) / "gate-open"
        while not opened.exists():
            await asyncio.sleep(0.05)
    ctx.report("gate", "passed")


gate.needs = "event"
