"""The scan processor: clamd's protocol against a real clamd, and outcomes through the real daemon."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import structlog
from helpers import make_files, publish_uploads, read_stream, results_by_event, wait_ready, wait_settled
from prometheus_client import CollectorRegistry
from speech import context
from system import require_tool

from uploads_consumer.embedded import EICAR_SIGNATURE, ClamdServer
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, ProcessorTimeout, RetryableError
from uploads_consumer.processors import ProcessorEnvironment, load_processor
from uploads_consumer.processors.scan import ClamdClient, ClamdError, parse_clamd_url, read_verdict

# The EICAR test file, assembled here so that no file of the repository is itself a "virus".
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MiB = 1 << 20


def write_random(path: Path, size: int) -> str:
    """A file of `size` random bytes; returns its `.hdb` signature line (MD5:size:name)."""
    data = os.urandom(size)
    path.write_bytes(data)
    return f"{hashlib.md5(data).hexdigest()}:{size}:Uploads-Test-{size}"


@pytest.fixture
def clamd_server():
    """Start a clamd of the test's own making; stopped (and its folder removed) at teardown."""
    require_tool("clamd")
    started: list[ClamdServer] = []

    def start(**kwargs) -> ClamdServer:
        server = ClamdServer(**kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)


# --- the client, against a real clamd ----------------------------------------------------


async def test_the_client_streams_a_file_of_many_chunks_whole_over_a_unix_socket_and_tcp(tmp_path, clamd_server):
    # A hash signature matches only the exact bytes: the framing of every chunk has to be right.
    infected = write_random(tmp_path / "multi-chunk.bin", 3 * MiB + 12345)
    clean = tmp_path / "clean.bin"
    clean.write_bytes(os.urandom(MiB + 1))
    server = clamd_server(signatures=[EICAR_SIGNATURE, infected], tcp=True)
    for url in (server.url, server.tcp_url):
        client = ClamdClient(parse_clamd_url(url), timeout=30)
        await client.ping()
        assert (await client.version()).startswith("ClamAV 1.")
        reply = await client.instream(tmp_path / "multi-chunk.bin")
        assert reply == f"stream: Uploads-Test-{3 * MiB + 12345}.UNOFFICIAL FOUND"
        assert await client.instream(clean) == "stream: OK"
    empty = tmp_path / "empty"
    empty.touch()
    assert await client.instream(empty) == "stream: OK"


async def test_a_signature_from_a_custom_database_is_reported_whole(tmp_path, clamd):
    (tmp_path / "eicar.com").write_bytes(EICAR)
    client = ClamdClient(parse_clamd_url(clamd.url), timeout=30)
    verdict = read_verdict(await client.instream(tmp_path / "eicar.com"))
    assert not verdict.clean and verdict.signature == "Eicar-Test-Signature.UNOFFICIAL"


async def test_clamd_refusing_a_stream_midway_is_read_as_too_large_not_as_a_broken_connection(tmp_path, clamd_server):
    # clamd answers and closes while the client is still sending: the write fails, the reply counts.
    server = clamd_server(tcp=True, stream_max_length="100K")
    (tmp_path / "big.bin").write_bytes(os.urandom(2 * MiB))
    for url in (server.url, server.tcp_url):
        client = ClamdClient(parse_clamd_url(url), timeout=30)
        for _ in range(3):
            reply = await client.instream(tmp_path / "big.bin")
            assert reply == "INSTREAM size limit exceeded. ERROR"
            with pytest.raises(PermanentError) as caught:
                read_verdict(reply)
            assert caught.value.error_class is ErrorClass.TOO_LARGE


async def test_streaming_holds_one_chunk_at_a_time_in_memory(tmp_path, clamd_server):
    server = clamd_server(stream_max_length="64M")
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(MiB))
    client = ClamdClient(parse_clamd_url(server.url), timeout=60)
    tracemalloc.start()
    try:
        assert await client.instream(big) == "stream: OK"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB, f"peak {peak / MiB:.1f} MiB of Python memory to stream 32 MiB"


async def test_no_clamd_is_a_client_error_naming_the_address(tmp_path):
    client = ClamdClient(parse_clamd_url(f"unix://{tmp_path}/nobody.sock"), timeout=5)
    with pytest.raises(ClamdError, match=f"cannot connect to clamd at unix://{tmp_path}/nobody.sock"):
        await client.ping()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://clamav:3310", "expected tcp://host:port or unix:///path/to/clamd.ctl"),
        ("unix://clamd.ctl", "absolute path"),
        ("tcp://:3310", "expected tcp://host:port"),
        ("tcp://clamav:notaport", "expected tcp://host:port"),
    ],
)
def test_a_clamd_url_that_is_not_one_is_a_configuration_error(monkeypatch, tmp_path, url, problem):
    monkeypatch.setenv("SCAN_CLAMD_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_processor("scan", environment(tmp_path, ("scan",)))
    assert caught.value.variable == "SCAN_CLAMD_URL" and problem in caught.value.reason


def test_clamd_urls_are_read_with_their_defaults():
    assert str(parse_clamd_url("tcp://clamav")) == "tcp://clamav:3310"
    assert str(parse_clamd_url("tcp://[::1]:3311")) == "tcp://[::1]:3311"
    assert parse_clamd_url("unix:///var/run/clamav/clamd.ctl").path == "/var/run/clamav/clamd.ctl"


async def test_at_start_processors_placed_before_scan_and_a_missing_clamd_are_warnings(monkeypatch, tmp_path):
    monkeypatch.setenv("SCAN_CLAMD_URL", f"unix://{tmp_path}/nobody.sock")
    scan = load_processor("scan", environment(tmp_path, ("save", "webhook", "scan")))
    with structlog.testing.capture_logs() as logs:
        await scan.start()
    warnings = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    assert warnings == [
        "save, webhook run before scan: an infected upload reaches them before it is found; "
        "put scan first in PROCESSORS",
        "clamd is not answering; uploads are retried until it does",
    ]


def environment(tmp_path: Path, chain: tuple[str, ...]) -> ProcessorEnvironment:
    return ProcessorEnvironment(
        download_path=tmp_path, chain=chain, max_retry_delay=300.0, registry=CollectorRegistry()
    )


# --- through the daemon ------------------------------------------------------------------


async def test_an_infected_upload_is_dead_lettered_infected_and_neither_saved_nor_announced(
    tmp_path, settings_for, start_daemon, nats_server, downloads, clamd, webhook_receiver, webhook_secret, daemon_env
):
    daemon = start_daemon(
        PROCESSORS="scan,save,webhook",
        SCAN_CLAMD_URL=clamd.url,
        WEBHOOK_URL=webhook_receiver.url + "/hook",
        WEBHOOK_SECRET=webhook_secret,
    )
    await wait_ready(daemon, nats_server.url)
    assert '"event": "clamd answers"' in daemon.log_text()
    (tmp_path / "eicar.com").write_bytes(EICAR)
    (tmp_path / "notes.txt").write_text("nothing to see here\n")
    infected, clean = await publish_uploads(settings_for(), [tmp_path / "eicar.com", tmp_path / "notes.txt"])
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.terminate() == 0

    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert json.loads(dead.data)["event_id"] == infected.event_id
    assert dead.headers["Uploads-Error-Class"] == "infected"
    assert dead.headers["Uploads-Error"] == "Eicar-Test-Signature.UNOFFICIAL FOUND"
    assert not (downloads / "user@example.com" / infected.file_uuid).exists(), "never saved"
    assert [d.webhook_id for d in webhook_receiver.deliveries] == [clean.event_id], "never announced"

    assert (downloads / "user@example.com" / clean.file_uuid / "notes.txt").read_text() == "nothing to see here\n"
    scan_output = webhook_receiver.deliveries[0].json["data"]["outputs"]["scan"]
    assert scan_output == {"result": "clean", "engine": "ClamAV " + clamd_version()}
    [result] = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[clean.event_id]
    assert result["processors"] == ["scan", "save", "webhook"] and result["outputs"]["scan"] == scan_output
    assert clamd.log_text().count("instream(") == 2, "both uploads were scanned"

    # What an operator sees: the class and the signature.
    listing = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "dlq", "list"],
        env=daemon_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [line] = [row for row in listing.splitlines() if infected.event_id in row]
    assert "infected" in line and line.endswith("Eicar-Test-Signature.UNOFFICIAL FOUND")


def clamd_version() -> str:
    out = subprocess.run([require_tool("clamd"), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


async def test_a_file_over_scan_max_size_is_dead_lettered_too_large_without_being_sent(
    tmp_path, settings_for, start_daemon, nats_server, downloads, clamd
):
    daemon = start_daemon(PROCESSORS="scan,save", SCAN_CLAMD_URL=clamd.url, SCAN_MAX_SIZE="1KiB")
    await wait_ready(daemon, nats_server.url)
    small, big = await publish_uploads(
        settings_for(), [*make_files(tmp_path / "a", 1, size=1024), *make_files(tmp_path / "b", 1, size=1025)]
    )
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.terminate() == 0
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert json.loads(dead.data)["event_id"] == big.event_id
    assert dead.headers["Uploads-Error-Class"] == "too_large"
    assert dead.headers["Uploads-Error"] == "scan: 1025 bytes is over SCAN_MAX_SIZE (1024); not scanned"
    assert not (downloads / "user@example.com" / big.file_uuid).exists()
    assert (downloads / "user@example.com" / small.file_uuid / "file-0.bin").exists()
    assert clamd.log_text().count("instream(") == 1, "only the small file was sent to clamd"


async def test_a_stream_clamd_refuses_as_too_long_is_dead_lettered_too_large(
    tmp_path, settings_for, start_daemon, nats_server, downloads, clamd_server
):
    server = clamd_server(tcp=True, stream_max_length="100K")
    daemon = start_daemon(PROCESSORS="scan,save", SCAN_CLAMD_URL=server.tcp_url)
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1, size=300_000))
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert dead.headers["Uploads-Error-Class"] == "too_large"
    assert "INSTREAM size limit exceeded" in dead.headers["Uploads-Error"]
    assert not (downloads / "user@example.com" / event.file_uuid).exists()


async def test_while_clamd_is_down_uploads_are_retried_unsaved_and_are_scanned_once_it_is_back(
    tmp_path, settings_for, start_daemon, nats_server, downloads, clamd
):
    clamd.stop()
    daemon = start_daemon(PROCESSORS="scan,save", SCAN_CLAMD_URL=clamd.url, RETRY_BACKOFF="300ms")
    await wait_ready(daemon, nats_server.url)
    assert "clamd is not answering; uploads are retried until it does" in daemon.log_text(), "a warning, not exit 2"
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1))
    deadline = time.monotonic() + 20
    while daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') < 3:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)
    saved = downloads / "user@example.com" / event.file_uuid / "file-0.bin"
    assert not saved.exists(), "fail closed: never passed on unscanned"
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []
    assert f"scan: cannot connect to clamd at {clamd.url}" in daemon.log_text()

    clamd.start()
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 1
    assert daemon.terminate() == 0
    assert saved.exists()
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def scanner(monkeypatch, tmp_path: Path, **variables: str):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    loaded = load_processor("scan", environment(tmp_path, ("scan",)))
    await loaded.start()
    return loaded


async def test_a_scan_past_its_timeout_while_clamd_answers_ping_is_a_processor_timeout(tmp_path, monkeypatch, clamd):
    # 24 MiB of random bytes take clamd far longer than 50 ms; meanwhile it answers PING: the file's doing.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * MiB))
    scan = await scanner(monkeypatch, tmp_path, SCAN_CLAMD_URL=clamd.url, SCAN_TIMEOUT="50ms")
    with pytest.raises(ProcessorTimeout) as caught:
        await scan.run(context(big, tmp_path / "work", content_type="application/octet-stream"))
    assert caught.value.variable == "SCAN_TIMEOUT"
    assert caught.value.reason.endswith(
        "did not answer within 0.05s (SCAN_TIMEOUT), though it answers PING: the file takes it that long"
    )


async def test_a_scan_past_its_timeout_while_clamd_is_hung_is_an_ordinary_retry(tmp_path, monkeypatch, clamd):
    # clamd stopped (SIGSTOP) still takes connections in the kernel, and answers nothing: clamd's fault.
    small = tmp_path / "memo.txt"
    small.write_bytes(b"hello")
    scan = await scanner(monkeypatch, tmp_path, SCAN_CLAMD_URL=clamd.url, SCAN_TIMEOUT="1s")
    clamd.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(RetryableError) as caught:
            await scan.run(context(small, tmp_path / "work", content_type="text/plain"))
    finally:
        clamd.proc.send_signal(signal.SIGCONT)
    assert not isinstance(caught.value, ProcessorTimeout)
    assert caught.value.reason.endswith("did not answer within 1s (SCAN_TIMEOUT)")
