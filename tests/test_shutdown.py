"""SIGTERM: stop fetching, finish or hand back in-flight work, exit 0, leave nothing unsettled."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

from helpers import (
    STOP_MARGIN,
    connect,
    consumer_info,
    make_files,
    publish_uploads,
    read_stream,
    stop_limit,
    wait_settled,
)

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


def _events(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def test_sigterm_finishes_in_flight_work_exits_0_and_leaves_nothing_unsettled(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    # A grace and an ACK_WAIT longer than the test may run. The work takes 0.7 s: a daemon that exits
    # at all finished it rather than waiting out the grace, and a message it left unsettled could not
    # come back in time for the second daemon to finish everything.
    env = _plugin_env(tmp_path, 0.7, MAX_IN_FLIGHT="4", SHUTDOWN_GRACE="300s", ACK_WAIT="600s")
    daemon = start_daemon(**env)
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    events = await publish_uploads(settings, make_files(tmp_path / "in", 20))
    await _wait_acked(daemon, 2)

    assert daemon.terminate(timeout=120) == 0, "exits once its work is done, not after the 300 s grace"
    done = len(list(downloads.rglob("*.bin")))
    assert 2 <= done < 20
    log = daemon.log_text()
    assert "Traceback" not in log
    assert log.count('"event": "processed"') == done, "every saved file was acknowledged before exit"
    # The work in flight when the grace began finished and was acked: none was cut short. (A message
    # that arrived after the stop, from the last pull, is handed back before it starts: that nak
    # carries no event_id, since the event is parsed only once the message has a processing slot.)
    after_stop = list(itertools.dropwhile(lambda e: e["event"] != "shutdown requested", _events(log)))
    assert after_stop, log[-3000:]
    cut_short = [e for e in after_stop if e["event"] == "will retry" and "event_id" in e]
    assert cut_short == []
    in_grace = list(itertools.dropwhile(lambda e: e["event"] != "waiting for in-flight work", after_stop))
    if in_grace:
        assert sum(e["event"] == "processed" for e in in_grace) >= in_grace[0]["count"], log[-3000:]
    # (The consumer's num_ack_pending would prove nothing: a nak'ed message counts in it until it is
    # delivered again.)
    info = await consumer_info(nats_server.url)
    assert info.ack_floor.stream_seq >= done

    # A second daemon finishes the rest: nothing waited out ACK_WAIT (600 s).
    second = start_daemon("second.log", **_plugin_env(tmp_path, 0.05, ACK_WAIT="600s"))
    await wait_settled(nats_server.url, 20, daemon=second, timeout=120)
    assert second.terminate() == 0
    assert len(list(downloads.rglob("*.bin"))) == 20
    results = await read_stream(nats_server.url, "FILE_PROCESSED")
    assert sorted(json.loads(m.data)["event_id"] for m in results) == sorted(e.event_id for e in events)
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
    assert daemon.terminate(timeout=stop_limit(1) + 30) == 0
    took = time.monotonic() - began
    assert took < stop_limit(1), f"the contract: SHUTDOWN_GRACE (1s) + {STOP_MARGIN:g}s at most; took {took:.1f}s"
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
