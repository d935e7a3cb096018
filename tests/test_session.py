"""The NATS session relies on one undocumented nats-py detail; this pins it, so an upgrade that breaks it fails here."""

from __future__ import annotations

import asyncio

import nats

from uploads_consumer.embedded import NatsServer


async def test_reconnecting_can_be_turned_on_after_the_first_connect(tmp_path):
    """session.py connects with reconnecting off (so SIGTERM can stop a connect that never succeeds)
    and turns it on through Client.options once connected; nats-py must then reconnect by itself."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    reconnected = asyncio.Event()

    async def on_reconnected() -> None:
        reconnected.set()

    nc = await nats.connect(
        server.url,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.2,
        reconnected_cb=on_reconnected,
    )
    try:
        assert {"allow_reconnect", "max_reconnect_attempts"} <= set(nc.options)
        nc.options.update(allow_reconnect=True, max_reconnect_attempts=-1)
        server.kill()
        await asyncio.sleep(1)  # nats-py notices the loss and keeps trying (it would close, were it still off)
        assert not nc.is_closed
        server.start()  # same port and store
        await asyncio.wait_for(reconnected.wait(), 20)
        await nc.flush(timeout=5)
        assert nc.is_connected
    finally:
        await nc.close()
        server.stop()
