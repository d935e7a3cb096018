"""Where messages come from: pull requests on the durable consumer, over one inbox of our own.

One long-lived subscription receives every delivery, so a message that arrives after its pull
request expired is still handled (never stranded in a queue nobody reads). One request is out at
a time, for as many messages as there is room for; a request the server never answered (lost in
a reconnect, a server restart) is replaced after FETCH_TIMEOUT plus a second. A `409` saying the
consumer was deleted makes us bind again (provisioning it again under AUTO_SETUP).

The consumer's own settings are read at bind and every REFRESH_EVERY seconds — `ack_wait` paces
progress, `max_deliver` bounds retries — so a consumer edited live is honoured. JetStream's
max-deliveries advisory tells us of any message that still reached the server's limit (a crash on
its last delivery): it is copied to the dead-letter stream by its stream sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings
from uploads_consumer.errors import describe
from uploads_consumer.observability import Metrics, get_logger
from uploads_consumer.provision import ProvisionError
from uploads_consumer.session import NatsSession
from uploads_consumer.settler import Limits

log = get_logger("uploads_consumer.source")

REFRESH_EVERY = 10.0
FRESH_ENOUGH = 1.0
ADVISORY_QUEUE = "uploads-consumer-advisories"


class PullSource:
    def __init__(
        self,
        session: NatsSession,
        settings: Settings,
        metrics: Metrics,
        deliver: Callable[[Msg], None],
        abandoned: Callable[[int, int], Awaitable[None]],
        setup: Callable[[], Awaitable[None]],
        ack_wait_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._metrics = metrics
        self._deliver = deliver
        self._abandoned = abandoned
        self._setup = setup
        self._stream = settings.source.stream  # the upload stream, or a stage's upstream's results
        self._ack_wait_changed = ack_wait_changed
        self.ack_wait = settings.ack_wait
        self._limits = Limits(settings.max_deliver, -1)
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._inbox: Subscription | None = None
        self._advisories: Subscription | None = None
        self._prefix = ""
        self._request = 0  # the id of the request now out
        self._asked = 0
        self._received = 0
        self._answered = asyncio.Event()
        self._answered.set()  # no request is out yet
        self._sent_at = 0.0
        self.bound = False
        self.tick = time.monotonic()  # the pull loop's heartbeat, for /healthz
        self._problem: str | None = None

    # -- the consumer's settings, kept fresh

    async def limits(self, fresh: bool = False) -> Limits:
        if fresh and time.monotonic() - self._refreshed_at > FRESH_ENOUGH:
            with contextlib.suppress(Exception):
                await self.refresh()
        return self._limits

    async def refresh(self) -> None:
        """Read the consumer's info (one request at a time; callers share it)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_consumer())
        await asyncio.shield(self._refreshing)

    async def _read_consumer(self) -> None:
        js = self._session.js
        assert js is not None
        s = self._settings
        try:
            info = await js.consumer_info(self._stream, s.nats_consumer_name)
        except NotFoundError:
            if self.bound:
                log.warning("the consumer is gone; binding again", consumer=s.nats_consumer_name)
            self.bound = False
            raise
        cfg = info.config
        ack_wait = cfg.ack_wait or s.ack_wait
        if ack_wait != self.ack_wait:
            if self._refreshed_at:
                log.info("the consumer's ack_wait changed", ack_wait_s=ack_wait)
            self.ack_wait = ack_wait
            self._ack_wait_changed()  # progress follows the consumer's value at once, from the first message on
        server_max = cfg.max_deliver if cfg.max_deliver and cfg.max_deliver > 0 else -1
        if server_max != self._limits.server_max_deliver and self._refreshed_at:
            log.info("the consumer's max_deliver changed", max_deliver=server_max)
        self._limits = Limits(s.max_deliver, server_max)
        self._refreshed_at = time.monotonic()
        self._metrics.consumer_pending.set(info.num_pending or 0)
        self._metrics.consumer_ack_pending.set(info.num_ack_pending or 0)

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            if self.bound:
                with contextlib.suppress(Exception):
                    await self.refresh()

    # -- binding

    async def bind(self) -> None:
        """Make sure the consumer exists (provision it under AUTO_SETUP), read it, and listen."""
        nc, js = self._session.nc, self._session.js
        assert nc is not None and js is not None
        s = self._settings
        try:
            await self.refresh()
        except NotFoundError:
            if not s.auto_setup:
                raise ProvisionError(
                    f"consumer {s.nats_consumer_name} on stream {self._stream} does not exist; "
                    "run `uploads-consumer setup` or set AUTO_SETUP=true"
                ) from None
            log.warning(
                "consumer or stream missing; provisioning again", stream=self._stream, consumer=s.nats_consumer_name
            )
            await self._setup()
            await self.refresh()
        if self._inbox is None:
            self._prefix = nc.new_inbox()
            self._inbox = await nc.subscribe(self._prefix + ".*", cb=self._on_inbox, pending_msgs_limit=-1)
        if self._advisories is None:
            subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self._stream}.{s.nats_consumer_name}"
            self._advisories = await nc.subscribe(subject, queue=ADVISORY_QUEUE, cb=self._on_advisory)
        self.bound = True

    # -- pulling

    async def run(
        self, room: Callable[[], int], wait_for_room: Callable[[int, float], Awaitable[None]], stopping: asyncio.Event
    ) -> None:
        """Ask for messages while there is room, until stopping."""
        s = self._settings
        # Ask again once half a batch of room is free (or nothing is held): a pull per freed slot
        # would cost a round trip per message.
        enough = max(1, min(s.fetch_batch, s.max_in_flight) // 2)
        while not stopping.is_set():
            self.tick = time.monotonic()
            free = room()
            if free <= 0 or (free < enough and free < s.max_in_flight):
                await wait_for_room(enough, s.fetch_timeout)
                continue
            try:
                if not self.bound:
                    await self.bind()
                await self._pull(min(s.fetch_batch, free))
            except ProvisionError as exc:
                self._report(exc.reason)
                await self._pause(stopping, 5.0)
                continue
            except Exception as exc:  # noqa: BLE001 - disconnected, server busy, consumer gone: retry
                self._report(describe(exc))
                await self._pause(stopping, 1.0)
                continue
            self._problem = None
            await self._wait_answer(stopping)

    async def _pull(self, batch: int) -> None:
        nc = self._session.nc
        assert nc is not None
        s = self._settings
        self._request += 1
        self._asked, self._received = batch, 0
        self._answered.clear()
        body = json.dumps({"batch": batch, "expires": int(s.fetch_timeout * 1e9)}).encode()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{s.nats_consumer_name}"
        await nc.publish(subject, body, reply=f"{self._prefix}.{self._request}")
        self._sent_at = time.monotonic()

    async def stop_deliveries(self, timeout: float) -> None:
        """Nothing more is delivered to us: the inbox's interest is removed, and what the server sent
        before it knew (up to a round trip's worth) is still handed to `deliver`.

        A pull request of ours may still be open at the server; without an inbox it delivers nothing
        more, so a message handed back (nak) afterwards goes to another replica, not back to us.
        """
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            try:
                await asyncio.wait_for(inbox.drain(), timeout)  # type: ignore[no-untyped-call]
            except Exception as exc:  # noqa: BLE001 - disconnected: the server dropped our requests with it
                log.debug("closing the inbox", error=describe(exc))
        self._answered.set()

    async def wait_quiet(self, limit: float) -> None:
        """Until no request of ours is out (so nothing more can be delivered to us), at most `limit` s.

        Handing a message back (a nak) while a request is still waiting would deliver it right back
        to us, on our way out: it would then sit until its ack wait ran out.
        """
        remaining = min(limit, self._sent_at + self._settings.fetch_timeout + 1.0 - time.monotonic())
        if not self._answered.is_set() and remaining > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._answered.wait(), remaining)

    async def _wait_answer(self, stopping: asyncio.Event) -> None:
        """Until the request is filled or ended by the server, or FETCH_TIMEOUT + 1 s have passed."""
        stop = asyncio.ensure_future(stopping.wait())
        answered = asyncio.ensure_future(self._answered.wait())
        try:
            await asyncio.wait(
                [stop, answered], timeout=self._settings.fetch_timeout + 1.0, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
            answered.cancel()

    async def _on_inbox(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers and not msg.data else None
        if status is None:
            if msg.reply:  # (a delivery carries the stream's subject, not the request it answers)
                self._received += 1
                if self._received >= self._asked:
                    self._answered.set()
                self._deliver(msg)
            return
        ours = msg.subject == f"{self._prefix}.{self._request}"
        description = (msg.headers or {}).get("Description", "")
        if status == "100":  # idle heartbeat (we ask for none, but a server may send them)
            return
        if status == "409" and "deleted" in description.lower():
            self.bound = False  # the consumer (or its stream) is gone: bind again, provisioning it
            log.warning("the consumer was deleted; binding again", description=description)
        elif status not in ("404", "408", "409"):
            log.warning("pull request refused", status=status, description=description)
        if ours:
            self._answered.set()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq, deliveries = int(advisory["stream_seq"]), int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable max-deliveries advisory", body=msg.data[:200])
            return
        await self._abandoned(seq, deliveries)

    def _report(self, problem: str) -> None:
        if problem != self._problem:  # once per new problem, not once per attempt
            self._problem = problem
            log.warning("fetch failed; retrying", error=problem)

    @staticmethod
    async def _pause(stopping: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)

    def on_reconnected(self) -> None:
        """The request in flight may be gone with the old connection: ask again now."""
        self._answered.set()
