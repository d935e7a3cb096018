"""Fixtures: real servers on free ports (nats-server, moto's S3 server, clamd, a webhook receiver) and the real
daemon process."""

from __future__ import annotations

import base64
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from system import require_tool
from twilio_server import ACCOUNT, API_KEY, API_SECRET, TOKEN, TwilioServer
from webhook_receiver import WebhookReceiver

from uploads_consumer.config import VARIABLES, Settings
from uploads_consumer.embedded import (
    ClamdServer,
    DaemonProcess,
    NatsServer,
    PostgresServer,
    S3Server,
    clean_environment,
    free_port,
)

OUR_VARIABLES = VARIABLES


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(log_path=tmp_path_factory.mktemp("s3") / "moto.log")
    with server:
        yield server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def s3_client(s3_server: S3Server):
    return s3_server.client()


@pytest.fixture
def bucket(s3_client) -> str:
    name = f"uploads-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def master_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def daemon_env(
    nats_server: NatsServer, s3_server: S3Server, bucket: str, master_key: str, downloads: Path
) -> dict[str, str]:
    """A clean environment for the daemon: none of the caller's uploads-consumer variables leak in."""
    env = clean_environment(**s3_server.env())
    env.update(
        {
            "NATS_URL": nats_server.url,
            "S3_BUCKET_NAME": bucket,
            "ENCRYPTION_MASTER_KEY": master_key,
            "DECRYPT_DOWNLOAD_PATH": str(downloads),
            "HTTP_PORT": str(free_port()),
            "LOG_FORMAT": "json",
            "RETRY_BACKOFF": "200ms",
            "FETCH_TIMEOUT": "1s",
        }
    )
    return env


@pytest.fixture
def settings_for(daemon_env: dict[str, str]) -> Callable[..., Settings]:
    """Settings the test process uses to talk to the same servers as the daemon."""

    def make(**overrides: str) -> Settings:
        values = {k.lower(): v for k, v in daemon_env.items() if k.upper() in OUR_VARIABLES}
        values.update({k.lower(): v for k, v in overrides.items()})
        return Settings(**values)

    return make


@pytest.fixture
def start_daemon(daemon_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start `python -m uploads_consumer` with the test environment plus overrides; killed at teardown."""
    started: list[DaemonProcess] = []

    def start(log_name: str = "daemon.log", args: list[str] | None = None, **overrides: str) -> DaemonProcess:
        env = {**daemon_env, **overrides}
        daemon = DaemonProcess(env, tmp_path / log_name, args=args)
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def clamd() -> Iterator[ClamdServer]:
    """A real clamd on a private unix socket whose database detects EICAR (about a second to start)."""
    require_tool("clamd")
    server = ClamdServer()
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture
def webhook_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
async def webhook_receiver(webhook_secret: str) -> AsyncIterator[WebhookReceiver]:
    """A webhook receiver on a free loopback port that checks signatures made with `webhook_secret`."""
    receiver = WebhookReceiver(webhook_secret)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioServer]:
    """A Twilio-shaped Messages API on a free loopback port that knows the tests' account and API key."""
    server = TwilioServer(ACCOUNT, {ACCOUNT: TOKEN, API_KEY: API_SECRET})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL for the session: initdb and pg_ctl in a temporary folder, on a free port."""
    server = PostgresServer(bin_dir=Path(require_tool("initdb")).parent)
    with server:
        yield server


@pytest.fixture
async def audit_db(postgres: PostgresServer) -> str:
    """A fresh, empty database of its own on the session's server; its name."""
    import asyncpg

    name = f"audit_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit store of each kind: a SQLite file, or a database of its own on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    server = request.getfixturevalue("postgres")
    return server.url(database=request.getfixturevalue("audit_db"))
