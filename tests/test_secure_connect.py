"""Connecting securely, against a real nats-server configured to require it: TLS with a private CA,
mutual TLS, user/password (variables or URL), token, nkey seed and .creds (operator/account/user JWTs).
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import until, wait_ready
from secure_support import (
    METHODS,
    acked,
    cli,
    make_pki,
    publish_upload,
    secure_setup,
    start_secure_server,
    users_block,
    write_config,
)

from uploads_consumer.embedded import NatsServer, free_port


@pytest.fixture
def servers():
    """Secured nats-servers started by a test, stopped after it."""
    started = []

    def start(setup, store_dir):
        server = start_secure_server(setup, store_dir)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize("method", METHODS)
async def test_the_daemon_connects_provisions_and_processes_an_upload(
    method, tmp_path, servers, start_daemon, settings_for, daemon_env, downloads
):
    setup = secure_setup(method, tmp_path / "secure", free_port())
    servers(setup, tmp_path / "nats")
    daemon = start_daemon(LOG_LEVEL="DEBUG", **setup.env)
    await wait_ready(daemon, timeout=30)  # connected, provisioned (AUTO_SETUP) and bound to the consumer

    original = tmp_path / "in" / "report.pdf"
    original.parent.mkdir()
    original.write_bytes(os.urandom(5000))
    event = await publish_upload(settings_for(**setup.env), original)
    await until(lambda: acked(daemon) == 1, 30, "the upload to be acknowledged", daemon)
    saved = downloads / event.email / event.file_uuid / "report.pdf"
    assert saved.read_bytes() == original.read_bytes()

    env = {**daemon_env, **setup.env}
    table = cli(env, "status")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "pending (lag) 0, ack pending 0/" in table.stdout
    status = cli(env, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    figures = json.loads(status.stdout)
    assert figures["stream"]["messages"] == 1
    assert figures["consumer"]["pending"] == 0 and figures["consumer"]["ack_pending"] == 0
    assert figures["dead_letter"]["messages"] == 0

    assert daemon.terminate() == 0
    shown = daemon.log_text() + table.stdout + table.stderr + status.stdout + status.stderr
    for secret in setup.secrets:
        assert secret not in shown, f"a {method} secret was shown"
    if method == "password_in_url":
        assert figures["server"] == f"nats://***@127.0.0.1:{setup.port}"


FAILURES = {
    # name: (what the client is given, words the one line must contain, distinct warnings allowed)
    "unknown_ca": ("the server's certificate is not trusted", 1),
    "wrong_password": ("the server refused the credentials", 1),
    # With TLS 1.3 the server's refusal arrives either as an alert or as a reset, whichever comes first.
    "client_certificate_refused": ("NATS_TLS_CERT", 2),
}


def _failing_setup(failure: str, folder, port: int) -> tuple:
    if failure == "wrong_password":
        config = write_config(folder, body=users_block(("uploads", "the-right-one")))
        return config, {
            "NATS_URL": f"nats://127.0.0.1:{port}",
            "NATS_USER": "uploads",
            "NATS_PASSWORD": "not-the-right-one",
        }
    pki = make_pki(folder / "pki")
    url = f"tls://127.0.0.1:{port}"
    if failure == "unknown_ca":
        return write_config(folder, tls=pki), {"NATS_URL": url, "NATS_TLS_CA": str(pki.other_ca)}
    return write_config(folder, tls=pki, verify_clients=True), {
        "NATS_URL": url,
        "NATS_TLS_CA": str(pki.ca),
        "NATS_TLS_CERT": str(pki.other_client_cert),
        "NATS_TLS_KEY": str(pki.other_client_key),
    }


def _refused(server_log: str, failure: str) -> int:
    """Refused connections in the server's log."""
    return server_log.count("authentication error" if failure == "wrong_password" else "TLS handshake error")


def _probes(failure: str) -> int:
    """Refusals logged for the port probe at start: a plain TCP connection fails a TLS handshake."""
    return 0 if failure == "wrong_password" else 1


def _daemon_attempts(server_log: str, failure: str) -> int:
    """Refused connections in the server's log, less the `status` run and the port probe at start."""
    return _refused(server_log, failure) - 1 - _probes(failure)


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_connection_that_cannot_succeed_is_said_in_one_line_once(failure, tmp_path, start_daemon, daemon_env):
    port = free_port()
    config, env = _failing_setup(failure, tmp_path / "secure", port)
    server = NatsServer(tmp_path / "nats", port=port, extra_args=["-c", str(config)])
    with server:
        await until(lambda: _refused(server.log_path.read_text(), failure) >= _probes(failure), 30, "the probe")
        refused = _refused(server.log_path.read_text(), failure)
        status = cli({**daemon_env, **env}, "status")  # a `status` that kept retrying would time out here
        assert status.returncode == 1
        lines = (status.stdout + status.stderr).strip().splitlines()
        assert len(lines) == 1, lines
        words, allowed = FAILURES[failure]
        assert lines[0].startswith("uploads-consumer: cannot reach NATS at ") and words in lines[0]
        # Then the answer, not a retry loop: at most two attempts per server (connect_once); one, today.
        await until(lambda: _refused(server.log_path.read_text(), failure) > refused, 30, "the refusal logged")
        assert _refused(server.log_path.read_text(), failure) - refused <= 2, "`status` retried"

        daemon = start_daemon(**env)
        daemon.wait_http()

        # The daemon keeps trying (the server sees the attempts) but says so once, and is not ready.
        await until(
            lambda: _daemon_attempts(server.log_path.read_text(), failure) >= 3,
            30,
            "three attempts by the daemon",
            daemon,
        )
        assert daemon.http_get("/readyz")[0] == 503
        assert daemon.http_get("/healthz")[0] == 200
        assert daemon.terminate() == 0, "SIGTERM stops a daemon that never connected"
    warnings = [json.loads(line) for line in daemon.log_text().splitlines() if "cannot connect to NATS yet" in line]
    assert 1 <= len(warnings) <= allowed, warnings
    assert len({w["error"] for w in warnings}) == len(warnings), "each distinct error is said once"
    assert words in warnings[0]["error"]
    if failure == "wrong_password":
        assert "not-the-right-one" not in daemon.log_text() + status.stdout + status.stderr
