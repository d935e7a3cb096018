"""The daemon's side of the document reader (`reader.py`): it starts the reader's server once, as a child
process with an environment of PATH and LC_ALL only, sends it one job a line, and hears how each ended.

A job's wall-clock limit is kept here: over it, or when the message is cancelled (shutdown), the
server is told to kill the job's process group and the job counts as ended. If the server itself
goes (a crash, a kill), every job waiting on it fails as transient and the next job starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploads_consumer.errors import RetryableError, one_line
from uploads_consumer.observability import get_logger

log = get_logger("uploads_consumer.processors.extract")

READER = Path(__file__).with_name("reader.py")
START_TIMEOUT = 60.0
KILL_WAIT = 10.0  # how long a killed job may take to be reported gone
STDERR_LINE = 2000


@dataclass(frozen=True)
class Ended:
    """How a job's process ended (from the server's wait4)."""

    exit: int | None
    signal: int | None
    cpu: float
    """Seconds of CPU time, its Tesseract runs included."""
    max_rss: int
    """Bytes: the largest resident set of the reader or of one of its Tesseract runs."""
    faults: int
    """Minor page faults of the reader: the memory it touched for the first time."""


class JobTimedOut(Exception):
    pass


class ReaderServer:
    """One reader server for the process; jobs run at once, each in a process of its own."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._waiting: dict[str, asyncio.Future[Ended]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._starting = asyncio.Lock()
        self.ready: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        """Start the server (if it is not running) and return what it said when ready."""
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None:
                return self.ready
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-E",  # no PYTHON* variable of the daemon's
                "-s",  # no user site-packages
                "-B",
                str(READER),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # a Ctrl-C on the terminal is the daemon's to handle
                limit=1 << 20,
            )
            assert self._proc.stdout is not None and self._proc.stderr is not None
            try:
                line = await asyncio.wait_for(self._proc.stdout.readline(), START_TIMEOUT)
                ready = json.loads(line) if line else {"ready": False, "problem": "it exited at once"}
            except (TimeoutError, ValueError):
                ready = {"ready": False, "problem": "it did not say it was ready"}
            if not ready.get("ready"):
                await self._stop()
                raise RetryableError(f"extract: the document reader did not start: {ready.get('problem')}")
            self.ready = ready
            self._tasks = [
                asyncio.create_task(self._hear(self._proc.stdout), name="extract-reader"),
                asyncio.create_task(self._stderr(self._proc.stderr), name="extract-reader-stderr"),
            ]
            return ready

    async def run(self, job: dict[str, Any], timeout: float) -> Ended:
        """Run one job; JobTimedOut after `timeout` seconds (the job is killed first)."""
        await self.start()
        job_id = str(next(self._ids))
        ended: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = ended
        try:
            self._send({**job, "id": job_id})
            try:
                return await asyncio.wait_for(asyncio.shield(ended), timeout)
            except TimeoutError:
                await self._kill(job_id, ended)
                raise JobTimedOut() from None
            except asyncio.CancelledError:
                await self._kill(job_id, ended)
                raise
        finally:
            self._waiting.pop(job_id, None)

    def _send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise RetryableError("extract: the document reader is not running")
        proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def _kill(self, job_id: str, ended: asyncio.Future[Ended]) -> None:
        with contextlib.suppress(RetryableError):
            self._send({"kill": job_id})
        with contextlib.suppress(TimeoutError, RetryableError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(ended), KILL_WAIT)

    async def _hear(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            try:
                said = json.loads(line)
                ended = self._waiting.get(str(said["id"]))
                result = Ended(
                    said["exit"], said["signal"], float(said["cpu"]), int(said["max_rss"]), int(said["faults"])
                )
            except (ValueError, KeyError, TypeError):
                log.warning(
                    "extract: the document reader said something unreadable",
                    line=one_line(line.decode(errors="replace")),
                )
                continue
            if ended is not None and not ended.done():
                ended.set_result(result)
        gone = RetryableError("extract: the document reader exited; it is started again for the next document")
        for ended in self._waiting.values():
            if not ended.done():
                ended.set_exception(gone)
        if self._proc is not None:  # not stopped by us
            log.warning("extract: the document reader exited; the next document starts it again")

    async def _stderr(self, stderr: asyncio.StreamReader) -> None:
        # A reader's traceback, or a library's complaint: said in the log, a line at a time, bounded.
        while line := await stderr.readline():
            text = one_line(line.decode("utf-8", "replace"), STDERR_LINE)
            if text:
                log.warning("extract: the document reader says", line=text)

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the server kills its jobs and exits
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        await self._stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
