"""Async helpers the tests use to look at NATS the way an operator would."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

# The backend's interop vectors (written with the JDK's JCE), carried by the repository.
INTEROP = Path(__file__).resolve().parent / "interop"

# The shutdown contract (docs/contract.md, "10. Shutdown"): a stop takes at most SHUTDOWN_GRACE + 15 s;
# the deploy files give exactly that before a forced kill.
STOP_MARGIN = 15.0
# Measured from the test, a stop also includes delivering the signal and the interpreter's exit,
# which a loaded 2-core CI machine can stretch by seconds: slack for the harness, not for the daemon.
STOP_SLACK = 5.0


def stop_limit(shutdown_grace: float) -> float:
    """The longest a test lets `terminate()` take for a daemon with this SHUTDOWN_GRACE."""
    return shutdown_grace + STOP_MARGIN + STOP_SLACK


async def connect(url: str):
    """A short-lived test connection; `url` may list several servers, comma-separated."""
    return await nats.connect(url.split(","), connect_timeout=5, allow_reconnect=False)


async def publish_raw(url: str, subject: str, bodies: list[bytes], headers: list[dict] | None = None) -> list[int]:
    """Publish bodies in order; returns their stream sequences."""
    nc = await connect(url)
    try:
        js = nc.jetstream(timeout=10)
        seqs = []
        for i, body in enumerate(bodies):
            ack = await js.publish(subject, body, headers=headers[i] if headers else None)
            seqs.append(ack.seq)
        return seqs
    finally:
        await nc.close()


async def consumer_info(url: str, stream: str = "FILE_UPLOADS", consumer: str = "file_processor") -> ConsumerInfo:
    nc = await connect(url)
    try:
        return await nc.jetstream(timeout=5).consumer_info(stream, consumer)
    finally:
        await nc.close()


async def until(check: Any, timeout: float, what: str, daemon: Any = None, interval: float = 0.1) -> Any:
    """Poll `check()` (plain or async) until it returns something truthy, and return that. Fails at once
    if the daemon exits meanwhile, and after `timeout` seconds, each time with the daemon's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited with {daemon.proc.returncode} while waiting for {what}:\n{daemon.log_text()[-3000:]}"
            )
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            tail = daemon.log_text()[-3000:] if daemon is not None else ""
            raise AssertionError(f"not within {timeout}s: {what}\n{tail}")
        await asyncio.sleep(interval)


async def wait_settled(
    url: str,
    delivered_at_least: int,
    timeout: float = 60,
    daemon: Any = None,
    stream: str = "FILE_UPLOADS",
    consumer: str = "file_processor",
) -> ConsumerInfo:
    """Wait until every message up to `delivered_at_least` is delivered and none is pending or unacked."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited early with {daemon.proc.returncode}:\n{daemon.log_text()[-4000:]}")
        try:
            info = await consumer_info(url, stream, consumer)
            if info.delivered.stream_seq >= delivered_at_least and info.num_pending == 0 and info.num_ack_pending == 0:
                return info
        except (NotFoundError, nats.errors.TimeoutError, nats.js.errors.APIError, nats.errors.NoRespondersError):
            pass  # not provisioned yet, or the cluster is electing a leader: ask again
        await asyncio.sleep(0.2)
    log = daemon.log_text()[-4000:] if daemon is not None else ""
    raise AssertionError(f"not settled within {timeout}s: {info}\n{log}")


async def read_stream(url: str, stream: str) -> list[Any]:
    """Every message in a stream (RawStreamMsg: .seq, .data, .headers); [] if there is no such stream."""
    from uploads_consumer.deadletter import stored_messages

    nc = await connect(url)
    try:
        return await stored_messages(nc.jetstream(timeout=5), stream)
    except NotFoundError:
        return []
    finally:
        await nc.close()


def results_by_event(messages: list[Any]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for m in messages:
        data = json.loads(m.data)
        out.setdefault(data["event_id"], []).append(data)
    return out


async def publish_uploads(
    settings, files: list, email: str = "user@example.com", msg_id: bool = True, publish: bool = True
) -> list:
    """Encrypt and upload files as the backend does, and publish their events (unless `publish` is
    False); returns the events."""
    from uploads_consumer.envelope import MasterKeyRing
    from uploads_consumer.producer import event_json, upload_file
    from uploads_consumer.storage import ObjectStore

    current, _ = settings.master_keys()
    ring = MasterKeyRing(current)
    nc = await connect(settings.nats_url)
    events = []
    try:
        js = nc.jetstream(timeout=30)
        async with ObjectStore(settings) as store:
            for path in files:
                event = await upload_file(store, ring, path, email, settings.s3_bucket_name)
                events.append(event)
                if not publish:
                    continue
                await js.publish(
                    settings.nats_subject,
                    event_json(event),
                    headers={"Nats-Msg-Id": event.event_id} if msg_id else None,
                )
        return events
    finally:
        await nc.close()


NEUTRAL_HEAD = b"\0uploads-consumer test data\0"


def make_files(folder, count: int, size: int = 2048, prefix: str = "file") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"{prefix}-{i}.bin"
        # Random bytes alone are, once in tens of thousands, a header libmagic names (it read one as a
        # DOS executable in CI): a fixed start says nothing to it, the random rest keeps each file unique.
        head = NEUTRAL_HEAD[: min(size, len(NEUTRAL_HEAD))]
        p.write_bytes(head + os.urandom(size - len(head)))
        paths.append(p)
    return paths


async def provision_now(settings) -> None:
    """What `uploads-consumer setup` does, in-process: streams, consumer and bucket exist afterwards."""
    from uploads_consumer.provision import provision

    nc = await connect(settings.nats_url)
    try:
        await provision(nc.jetstream(timeout=10), settings)
    finally:
        await nc.close()


TESTS = str(Path(__file__).parent)


def plugins(state_dir: Path, chain: str, **extra: str) -> dict[str, str]:
    """Daemon environment for a chain that uses tests/uc_test_plugins.py."""
    return {"PROCESSORS": chain, "PYTHONPATH": TESTS, "UC_TEST_STATE_DIR": str(state_dir), **extra}


async def wait_ready(daemon, url: str | None = None, timeout: float = 60) -> None:
    """The daemon has started its processors, provisioned and bound to its consumer (readyz 200);
    with the server's url, also nothing is pending on the consumer yet."""
    daemon.wait_http(timeout)
    await until(lambda: daemon.http_get("/readyz")[0] == 200, timeout, "/readyz 200", daemon, interval=0.05)
    if url is not None:
        await wait_settled(url, 0, daemon=daemon)


async def dead_letters(url: str) -> list[Any]:
    return await read_stream(url, "FILE_UPLOADS_DLQ")


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def refused_setting(monkeypatch, processor: str, settings_class: Any, **variables: str) -> Any:
    """The ConfigError a processor's settings raise with only `variables` set (none of its others)."""
    from uploads_consumer.errors import ConfigError
    from uploads_consumer.processors import load_settings_for, variable_prefix

    for field in settings_class.model_fields:
        monkeypatch.delenv(variable_prefix(processor) + field.upper(), raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    try:
        load_settings_for(processor, settings_class)
    except ConfigError as exc:
        return exc
    raise AssertionError(f"{variables} were accepted")
