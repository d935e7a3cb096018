"""The messages this process holds: one map by stream sequence, a semaphore, progress, and the grace.

A message is held from the moment it arrives until it is settled (acked, nak'ed, or terminated
after its dead-letter copy): while it waits for a slot, while it is processed, and while it is
being dead-lettered, `+WPI` keeps it ours, at a third of the consumer's *current* ack wait.
At most MAX_IN_FLIGHT are processed at once, whatever the server delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from uploads_consumer.observability import Metrics, get_logger

log = get_logger("uploads_consumer.inflight")

MIN_PROGRESS_INTERVAL = 0.2


@dataclass
class Held:
    msg: Msg
    """The newest delivery of this stream sequence (progress and the settlement go to its reply)."""
    work: asyncio.Task[Any] | None = None
    """The processing task, while there is one (shutdown cuts it short)."""
    handler: asyncio.Task[None] | None = field(default=None, repr=False)


class InFlight:
    def __init__(self, limit: int, ack_wait: Callable[[], float], metrics: Metrics) -> None:
        self.limit = limit
        self._ack_wait = ack_wait
        self._metrics = metrics
        self._held: dict[int, Held] = {}
        self._slots = asyncio.Semaphore(limit)
        self._changed = asyncio.Event()
        self._ack_wait_changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, stream_seq: int) -> bool:
        return stream_seq in self._held

    def room(self) -> int:
        """How many more messages may be asked for."""
        return self.limit - len(self._held)

    async def wait_for_room(self, enough: int, timeout: float) -> None:
        """Until `enough` more messages may be asked for, or none is held (at most `timeout`)."""
        self._changed.clear()  # before the check: a release in between is not missed
        if self.room() >= enough or not self._held:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def hold(self, msg: Msg, handle: Callable[[Held], Coroutine[Any, Any, None]]) -> bool:
        """Hold a delivered message and start `handle` for it. False if its sequence is already held:
        a redelivery of what we are still working on (the ack wait ran out); the newer delivery
        takes over progress and settlement, and the work is not started twice."""
        seq = msg.metadata.sequence.stream
        held = self._held.get(seq)
        if held is not None:
            held.msg = msg
            return False
        held = Held(msg)
        self._held[seq] = held
        self._metrics.in_flight.set(len(self._held))
        held.handler = asyncio.create_task(handle(held), name=f"message-{seq}")
        held.handler.add_done_callback(lambda task: self._release(seq, task))
        return True

    def _release(self, seq: int, handler: asyncio.Task[None]) -> None:
        self._held.pop(seq, None)
        self._metrics.in_flight.set(len(self._held))
        self._changed.set()
        if not handler.cancelled() and handler.exception() is not None:
            # A bug in our own code: the message stays pending and is redelivered after ACK_WAIT.
            log.error("message handler failed", exc_info=handler.exception())

    async def acquire_slot(self, stopping: asyncio.Event) -> bool:
        """Wait for a processing slot; False (and no slot) if the daemon starts stopping first."""
        if stopping.is_set():
            return False
        if not self._slots.locked():  # a free slot: taken at once, with nothing to race
            await self._slots.acquire()
            return True
        slot = asyncio.ensure_future(self._slots.acquire())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait([slot, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not slot.done():
                slot.cancel()
        if slot.done() and not slot.cancelled():
            if stopping.is_set():
                self._slots.release()
                return False
            return True
        return False

    def release_slot(self) -> None:
        self._slots.release()

    def ack_wait_changed(self) -> None:
        """The consumer's ack wait is not what progress was paced by: pace it anew, at once."""
        self._ack_wait_changed.set()

    async def progress_loop(self) -> None:
        """+WPI for every held message, well inside the consumer's current ack wait.

        A change of it (read when the source binds, or edited live) cuts the current wait short:
        the interval taken from ACK_WAIT before the consumer was read must not outlast a shorter
        `ack_wait` the consumer really has (its first messages would be redelivered while in work).
        """
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ack_wait_changed.wait(), max(MIN_PROGRESS_INTERVAL, self._ack_wait() / 3))
            self._ack_wait_changed.clear()
            for held in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await held.msg.in_progress()

    async def finish(self, grace: float, hurry: asyncio.Event, settle_timeout: float) -> None:
        """Let work finish within `grace` (cut short when `hurry` is set), then cancel what is left.

        The handlers then settle their messages (a cancelled one is handed back); this returns once
        every handler is done, or after `settle_timeout` more.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        hurried = asyncio.ensure_future(hurry.wait())
        busy = sum(1 for h in self._held.values() if h.work is not None and not h.work.done())
        if busy:
            log.info("waiting for in-flight work", count=busy, grace_s=grace)
        try:
            while not hurry.is_set():
                work = [h.work for h in self._held.values() if h.work is not None and not h.work.done()]
                remaining = deadline - loop.time()
                if not work or remaining <= 0:
                    break
                await asyncio.wait([*work, hurried], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        for held in list(self._held.values()):
            if held.work is not None and not held.work.done():
                held.work.cancel()
        # Messages still arriving (from the last pull request) are handed back by their handlers too.
        settle_by = loop.time() + settle_timeout
        while (remaining := settle_by - loop.time()) > 0:
            handlers = [h.handler for h in self._held.values() if h.handler is not None and not h.handler.done()]
            if not handlers:
                break
            await asyncio.wait(handlers, timeout=remaining)
