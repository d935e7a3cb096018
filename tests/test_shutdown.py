"""SIGTERM: stop fetching, finish or hand back in-flight work, exit 0, leave nothing unsettled."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from helpers import connect, make_files, publish_uploads, read_stream, wait_settled

TESTS = str(Path(__file__).parent)


def _plugin_env(tmp_path: Path, seconds: float, **extra: str) -> dict[str, str]:
    return {
        "PROCESSORS": "uc_test_plugins:slow,save",
        "UC_TEST_SLOW_SECONDS": str(seconds),
        "PYTHONPATH": TESTS,
        "UC_TEST_STATE_DIR": str(tmp_path),
        **extra,
    }


async def _wait_acked(daemon, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') < at_least:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)


async def test_sigterm_finishes_in_flight_work_exits_0_and_leaves_nothing_unsettled(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    daemon = start_daemon(**_plugin_env(tmp_path, 0.7, MAX_IN_FLIGHT="4", SHUTDOWN_GRACE="20s", ACK_WAIT="60s"))
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    events = await publish_uploads(settings, make_files(tmp_path / "in", 20))
    await _wait_acked(daemon, 2)

    began = time.monotonic()
    assert daemon.terminate(timeout=40) == 0
    took = time.monotonic() - began
    done = len(list(downloads.rglob("*.bin")))
    assert 2 <= done < 20
    assert took < 20, f"shutdown took {took:.1f}s"
    assert "Traceback" not in daemon.log_text()
    log = daemon.log_text()
    assert log.count('"event": "processed"') == done, "every saved file was acknowledged before exit"

    # A second daemon finishes the rest at once: nothing was left to wait out ACK_WAIT (60s).
    second = start_daemon("second.log", **_plugin_env(tmp_path, 0.05))
    await wait_settled(nats_server.url, 20, daemon=second, timeout=20)
    assert second.terminate() == 0
    assert len(list(downloads.rglob("*.bin"))) == 20
    results = await read_stream(nats_server.url, "FILE_PROCESSED")
    assert sorted(__import__("json").loads(m.data)["event_id"] for m in results) == sorted(e.event_id for e in events)
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def test_work_that_outlives_the_grace_period_is_handed_back_at_once(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    daemon = start_daemon(**_plugin_env(tmp_path, 60, MAX_IN_FLIGHT="3", SHUTDOWN_GRACE="1s", ACK_WAIT="60s"))
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    await publish_uploads(settings, make_files(tmp_path / "in", 5))
    deadline = time.monotonic() + 20
    while daemon.metric("uploads_consumer_in_flight") < 3:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)

    began = time.monotonic()
    assert daemon.terminate(timeout=30) == 0
    assert time.monotonic() - began < 1 + 1 + 5, "grace (1s) + fetch timeout (1s) + settling"
    # Handed back, not left to time out: with ACK_WAIT 60s, all five can be fetched again at once.
    nc = await connect(nats_server.url)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(durable="file_processor", stream="FILE_UPLOADS")
        again = []
        while len(again) < 5:
            again += await sub.fetch(5 - len(again), timeout=3)
        assert sorted(m.metadata.sequence.stream for m in again) == [1, 2, 3, 4, 5]
        assert sorted(m.metadata.num_delivered for m in again) == [1, 1, 2, 2, 2], "three were in flight"
    finally:
        await nc.close()
    assert list(downloads.rglob("*.bin")) == []
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def test_sigint_also_stops_cleanly(start_daemon, nats_server):
    import signal

    daemon = start_daemon()
    daemon.wait_http()
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 0
