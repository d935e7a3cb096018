"""The built-in `scan` processor: ClamAV's clamd checks the verified plaintext before anything else sees it.

The file is streamed with clamd's INSTREAM command (length-prefixed chunks, a zero-length chunk to
end), read from disk a chunk at a time: memory stays bounded whatever the size. It fails closed:
clamd unreachable, too slow or answering an error is a transient failure (the message is retried),
never a pass.

Protocol traps this client handles:
- clamd answers `INSTREAM size limit exceeded. ERROR` and closes the connection as soon as a
  stream passes its StreamMaxLength, while the client is still sending: the write then fails
  (EPIPE, ECONNRESET) but the reply is there to read. The reply is read concurrently with the
  sending, on the socket itself: an asyncio stream transport would close the socket on the failed
  write, the reply unread.
- clamd passes files over its MaxFileSize as clean (unless AlertExceedsMax is on): SCAN_MAX_SIZE
  refuses them here, before anything is sent.
- Commands use the `z` form (NUL-terminated command and reply), one command per connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from uploads_consumer.config import PositiveDuration, PositiveSize
from uploads_consumer.errors import ErrorClass, PermanentError, ProcessorTimeout, RetryableError, describe
from uploads_consumer.observability import get_logger
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    variable_for,
)

log = get_logger("uploads_consumer.processors.scan")

DEFAULT_PORT = 3310
CHUNK = 64 * 1024
MAX_REPLY = 4096
START_PING_TIMEOUT = 5.0
VERSION_TTL = 300.0  # the engine version in each report is at most this old (freshclam updates it)
REPLY_AFTER_CLOSE = 2.0  # how long to wait for the reply once clamd has closed its side


@dataclass(frozen=True)
class ClamdAddress:
    """Where clamd listens: a unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_clamd_url(url: str) -> ClamdAddress:
    """`unix:///var/run/clamav/clamd.ctl` or `tcp://host[:3310]` → a ClamdAddress."""
    text = url.strip()
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
        if not path.startswith("/"):
            raise ValueError("a unix socket needs an absolute path: unix:///path/to/clamd.ctl")
        return ClamdAddress(path=path)
    if text.startswith("tcp://"):
        try:
            parts = urlsplit(text)
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("expected tcp://host:port") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError("expected tcp://host:port")
        return ClamdAddress(host=parts.hostname, port=port)
    raise ValueError("expected tcp://host:port or unix:///path/to/clamd.ctl")


class ClamdError(Exception):
    """clamd could not be asked, or did not answer as it should."""


@dataclass(frozen=True)
class Verdict:
    """What clamd said of one stream."""

    clean: bool
    signature: str | None = None


def read_verdict(reply: str) -> Verdict:
    """`stream: OK` / `stream: <signature> FOUND`; a size-limit reply is TOO_LARGE; anything else a ClamdError."""
    if reply == "stream: OK":
        return Verdict(clean=True)
    if reply.startswith("stream: ") and reply.endswith(" FOUND"):
        return Verdict(clean=False, signature=reply.removeprefix("stream: ").removesuffix(" FOUND"))
    if "size limit exceeded" in reply.lower():
        raise PermanentError(
            ErrorClass.TOO_LARGE, f"scan: clamd refused the stream ({reply}); its StreamMaxLength is below the file"
        )
    raise ClamdError(f"clamd answered {reply!r}")


class ClamdClient:
    """clamd's protocol over a unix socket or TCP: one connection per command, every step under `timeout`.

    It works on the socket itself (loop.sock_*), not on asyncio streams: when clamd refuses a stream
    it closes the connection mid-upload, and a stream transport would then drop the socket, the
    reply still unread in it, on the first failed write.
    """

    def __init__(self, address: ClamdAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self.address.path is not None:
            targets: list[tuple[int, Any]] = [(socket.AF_UNIX, self.address.path)]
        else:
            try:
                infos = await loop.getaddrinfo(self.address.host, self.address.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ClamdError(f"cannot resolve clamd's host {self.address.host} ({describe(exc)})") from None
            targets = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        error: OSError | None = None
        for family, target in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, target)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        reason = (error.strerror or describe(error)) if error is not None else "no address"
        raise ClamdError(f"cannot connect to clamd at {self.address} ({reason})")

    async def command(self, name: str, timeout: float | None = None) -> str:
        """A simple command (PING, VERSION) and its one-line reply."""
        async with asyncio.timeout(timeout or self.timeout):
            sock = await self._connect()
            try:
                await asyncio.get_running_loop().sock_sendall(sock, b"z" + name.encode() + b"\0")
                return await _read_reply(sock, self.address)
            except OSError as exc:
                raise ClamdError(f"clamd at {self.address}: {exc.strerror or describe(exc)}") from None
            finally:
                sock.close()

    async def ping(self, timeout: float | None = None) -> None:
        reply = await self.command("PING", timeout)
        if reply != "PONG":
            raise ClamdError(f"clamd at {self.address} answered PING with {reply!r}")

    async def version(self) -> str:
        return await self.command("VERSION")

    async def instream(self, path: Path) -> str:
        """Stream a file with INSTREAM; clamd's reply (`stream: OK`, `stream: X FOUND`, `… ERROR`)."""
        source: IO[bytes] = await asyncio.to_thread(open, path, "rb")
        try:
            async with asyncio.timeout(self.timeout):
                sock = await self._connect()
                # The reply is read while the file is sent: clamd may answer (and close) before the end.
                reply = asyncio.ensure_future(_read_reply(sock, self.address))
                try:
                    failed = await _send_stream(source, sock, reply)
                    if failed is not None:
                        # clamd closes the connection when it refuses a stream; its reply says why.
                        try:
                            return await asyncio.wait_for(asyncio.shield(reply), REPLY_AFTER_CLOSE)
                        except (ClamdError, TimeoutError):
                            raise ClamdError(
                                f"clamd at {self.address} closed the connection during INSTREAM "
                                f"({failed.strerror or describe(failed)}) without a reply"
                            ) from None
                    return await reply
                finally:
                    if not reply.done():
                        reply.cancel()
                        await asyncio.wait([reply])  # off the socket before it is closed
                    elif not reply.cancelled():
                        reply.exception()  # retrieved: never "exception was never retrieved"
                    sock.close()
        finally:
            source.close()


async def _send_stream(source: IO[bytes], sock: socket.socket, reply: asyncio.Future[str]) -> OSError | None:
    """INSTREAM's body: 4-byte big-endian length, that many bytes, …, then a zero length. Stops early
    when clamd has already replied. Returns the error that ended the sending, if one did."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, b"zINSTREAM\0")
        while not reply.done():
            chunk = await asyncio.to_thread(source.read, CHUNK)  # a disk read never blocks the loop
            # One chunk in flight at a time: memory stays bounded whatever the file's size.
            await loop.sock_sendall(sock, struct.pack(">I", len(chunk)) + chunk)
            if not chunk:  # that was the zero-length chunk: end of stream
                break
    except OSError as exc:
        return exc
    return None


async def _read_reply(sock: socket.socket, address: ClamdAddress) -> str:
    """One NUL-terminated reply (or what came before the connection closed)."""
    loop = asyncio.get_running_loop()
    raw = b""
    try:
        while b"\0" not in raw and len(raw) < MAX_REPLY:
            data = await loop.sock_recv(sock, MAX_REPLY)
            if not data:
                break
            raw += data
    except OSError as exc:
        if not raw:
            raise ClamdError(f"clamd at {address}: {exc.strerror or describe(exc)}") from None
    text = raw.partition(b"\0")[0].decode("utf-8", "replace").strip()
    if not text:
        raise ClamdError(f"clamd at {address} closed the connection without a reply")
    return text


class ScanSettings(ProcessorSettings):
    clamd_url: str = Field(
        default="unix:///var/run/clamav/clamd.ctl", description="tcp://host:3310 or unix:///path/to/clamd.ctl"
    )
    timeout: PositiveDuration = Field(default="2m", validate_default=True, description="for one scan, sending included")
    max_size: PositiveSize = Field(
        default="25MiB",
        validate_default=True,
        description="larger files are dead-lettered too_large, not sent; at most clamd's StreamMaxLength and MaxFileSize",
    )

    @field_validator("clamd_url")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_clamd_url(value)
        return value.strip()


class Scan(Processor):
    """Scan each upload with ClamAV (clamd INSTREAM); infected uploads are dead-lettered and go no further.

    Put scan first in PROCESSORS: the processors before it handle files not yet scanned.
    """

    settings_class = ScanSettings
    needs = Need.PLAINTEXT

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        assert isinstance(settings, ScanSettings)
        self.config = settings
        self.client = ClamdClient(parse_clamd_url(settings.clamd_url), settings.timeout)
        self._version: tuple[float, str] | None = None

    async def start(self) -> None:
        """Warn about processors placed before scan, and ask clamd once whether it is there.

        clamd not answering is a warning, not exit 2: it may start after us (its database loads for
        a while), and meanwhile uploads are retried, never passed on unscanned.
        """
        chain = list(self.env.chain)
        if self.name in chain and chain.index(self.name) > 0:
            before = chain[: chain.index(self.name)]
            them = "them" if len(before) > 1 else "it"
            log.warning(
                f"{', '.join(before)} run{'' if len(before) > 1 else 's'} before {self.name}: an infected upload "
                f"reaches {them} before it is found; put {self.name} first in PROCESSORS"
            )
        try:
            await self.client.ping(min(self.config.timeout, START_PING_TIMEOUT))
            version = await self._engine_version()
        except (ClamdError, TimeoutError) as exc:
            log.warning(
                "clamd is not answering; uploads are retried until it does",
                clamd=str(self.client.address),
                error=str(exc) if isinstance(exc, ClamdError) else "no answer in time",
            )
            return
        log.info("clamd answers", clamd=str(self.client.address), version=version)

    async def _answers(self) -> bool:
        """Whether clamd answers PING now: a scan that timed out while it does is the file's doing (retried
        PROCESSOR_TIMEOUT_RETRIES times); one that timed out while it does not is clamd's (retried for ever)."""
        try:
            await self.client.ping(START_PING_TIMEOUT)
        except (ClamdError, TimeoutError, OSError):
            return False
        return True

    async def _engine_version(self) -> str:
        now = time.monotonic()
        if self._version is None or now - self._version[0] > VERSION_TTL:
            self._version = (now, await self.client.version())
        return self._version[1]

    async def run(self, ctx: ProcessingContext) -> None:
        if ctx.size > self.config.max_size:
            raise PermanentError(
                ErrorClass.TOO_LARGE,
                f"scan: {ctx.size} bytes is over {variable_for(self.name, 'max_size')} ({self.config.max_size}); not scanned",
            )
        try:
            version = await self._engine_version()
            verdict = read_verdict(await self.client.instream(ctx.plaintext_path))
        except TimeoutError:
            variable = variable_for(self.name, "timeout")
            late = f"scan: clamd at {self.client.address} did not answer within {self.config.timeout:g}s ({variable})"
            if await self._answers():  # clamd is there: this file is what takes it so long
                raise ProcessorTimeout(
                    variable, f"{late}, though it answers PING: the file takes it that long"
                ) from None
            raise RetryableError(late) from None
        except ClamdError as exc:
            raise RetryableError(f"scan: {exc}") from None
        if not verdict.clean:
            raise PermanentError(ErrorClass.INFECTED, f"{verdict.signature} FOUND")
        ctx.report("result", "clean")
        ctx.report("engine", version)
