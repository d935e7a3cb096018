"""Secrets — the master key, NATS password/token/creds, the AWS secret — are never shown: not in logs
(DEBUG included), error messages, `status`, dead-letter reasons, metrics or tracebacks. And they can
come from files (container secrets)."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path

from helpers import until, wait_ready
from secure_support import acked, cli, publish_upload, users_block, write_config

from uploads_consumer.connection import connect_once, redact_url
from uploads_consumer.embedded import NatsServer, free_port

TESTS = str(Path(__file__).parent)


def _random(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(24)).decode()


def _forms_of_key(encoded: str) -> dict[str, str | bytes]:
    raw = base64.b64decode(encoded)
    return {
        "base64": encoded,
        "base64 unpadded": encoded.rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).decode(),
        "hex": raw.hex(),
        "bytes repr": repr(raw)[2:-1],
        "raw": raw,
    }


def _dead_lettered(daemon) -> float:
    return daemon.metric("uploads_consumer_messages_total", 'outcome="dead_lettered"')


async def test_no_secret_is_shown_at_debug_through_failures(
    tmp_path, start_daemon, settings_for, daemon_env, s3_client, bucket, master_key
):
    password, aws_secret = _random("nats-pw-"), _random("aws-secret-")
    previous_key = base64.b64encode(os.urandom(32)).decode()
    port = free_port()
    secure = tmp_path / "secure"
    config = write_config(secure, body=users_block(("uploads", _random("someone-elses-"))))  # ours is wrong, for now
    env = {
        "NATS_URL": f"nats://127.0.0.1:{port}",
        "NATS_USER": "uploads",
        "NATS_PASSWORD": password,
        "AWS_SECRET_ACCESS_KEY": aws_secret,
        "ENCRYPTION_PREVIOUS_MASTER_KEYS": previous_key,
        "LOG_LEVEL": "DEBUG",
        # boom: a processor failing once with an unexpected exception (a transient retry) before save
        "PROCESSORS": "uc_test_plugins:boom,save",
        "PYTHONPATH": TESTS,
        "UC_TEST_STATE_DIR": str(tmp_path),
    }
    cli_env = {**daemon_env, **env}
    shown: list[str | bytes] = []
    with NatsServer(tmp_path / "nats", port=port, extra_args=["-c", str(config)]) as server:
        daemon = start_daemon(**env)
        daemon.wait_http()
        refused = [cli(cli_env, "status"), cli(cli_env, "status", "--json")]
        assert all(r.returncode == 1 and "refused the credentials" in r.stdout for r in refused)
        await until(
            lambda: server.log_path.read_text().count("authentication error") >= 5,
            30,
            "the daemon's password to be refused a few times",
            daemon,
        )

        # The server now accepts our password (config reload): the daemon connects by itself.
        write_config(secure, body=users_block(("uploads", password)))
        server.proc.send_signal(signal.SIGHUP)
        await wait_ready(daemon, timeout=30)

        settings = settings_for(**env)
        folder = tmp_path / "in"
        folder.mkdir()
        files = []
        for i in range(4):
            files.append(folder / f"file-{i}.bin")
            files[-1].write_bytes(os.urandom(3000))

        def tamper(event) -> None:
            body = s3_client.get_object(Bucket=bucket, Key=event.s3_data_key)["Body"].read()
            s3_client.put_object(
                Bucket=bucket, Key=event.s3_data_key, Body=body[:100] + bytes([body[100] ^ 1]) + body[101:]
            )

        good = await publish_upload(settings, files[0])
        await publish_upload(settings, files[1], before_publish=tamper)
        await publish_upload(
            settings, files[2], before_publish=lambda e: s3_client.delete_object(Bucket=bucket, Key=e.s3_data_key)
        )
        await publish_upload(
            settings_for(**env, ENCRYPTION_MASTER_KEY=base64.b64encode(os.urandom(32)).decode()), files[3]
        )
        nc = await connect_once(settings, "test-publisher")
        try:
            await nc.jetstream(timeout=10).publish(settings.nats_subject, b"this is not an upload event")
        finally:
            await nc.close()

        await until(
            lambda: acked(daemon) == 1 and _dead_lettered(daemon) == 4,
            30,
            "one upload processed and four dead-lettered",
            daemon,
        )
        assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 1  # boom, once
        shown.append(daemon.http_get("/metrics")[1])
        after = [cli(cli_env, "status"), cli(cli_env, "status", "--json"), cli(cli_env, "dlq", "list", "--json")]
        assert all(r.returncode == 0 for r in after), [r.stderr for r in after]
        assert daemon.terminate() == 0

    log = daemon.log_path.read_bytes()
    # It really went through all of it, at DEBUG.
    text = log.decode(errors="replace")
    assert '"level": "debug"' in text and "cannot connect to NATS yet" in text and "will retry" in text
    reasons = sorted(json.loads(line)["error_class"] for line in after[2].stdout.splitlines())
    assert reasons == ["decrypt_failed", "decrypt_failed", "invalid_message", "not_found"]
    assert good.event_id in text

    for result in refused + after:
        shown += [result.stdout, result.stderr]
    everything = log + "\n".join(str(s) for s in shown).encode()
    secrets: dict[str, str | bytes] = {"NATS password": password, "AWS secret": aws_secret}
    secrets.update({f"master key ({form})": value for form, value in _forms_of_key(master_key).items()})
    secrets.update({f"previous master key ({form})": value for form, value in _forms_of_key(previous_key).items()})
    for name, value in secrets.items():
        needle = value if isinstance(value, bytes) else value.encode()
        assert needle not in everything, f"the {name} was shown"


async def test_the_daemon_reads_the_master_key_from_a_file(
    tmp_path, start_daemon, settings_for, master_key, downloads, nats_server
):
    key_file = tmp_path / "secrets" / "master-key"
    key_file.parent.mkdir()
    key_file.write_text(master_key + "\n")  # as a mounted secret usually is, newline and all
    key_file.chmod(0o400)
    daemon = start_daemon(ENCRYPTION_MASTER_KEY="", ENCRYPTION_MASTER_KEY_FILE=str(key_file))
    await wait_ready(daemon, timeout=30)
    original = tmp_path / "in.bin"
    original.write_bytes(os.urandom(4096))
    event = await publish_upload(settings_for(), original)  # encrypted with the same key, given directly
    await until(lambda: acked(daemon) == 1, 30, "the upload to be acknowledged", daemon)
    assert (downloads / event.email / event.file_uuid / "in.bin").read_bytes() == original.read_bytes()
    assert daemon.terminate() == 0
    assert master_key not in daemon.log_text()


async def test_a_creds_file_that_is_not_one_stops_at_start_naming_the_variable_not_the_content(
    tmp_path, start_daemon, daemon_env
):
    # Only the seed block: nats-py would loop forever looking for the JWT when the server sends a nonce.
    seed = "SUAM" + "A" * 54
    creds = tmp_path / "broken.creds"
    creds.write_text(f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
    status = cli({**daemon_env, "NATS_CREDS": str(creds)}, "status")
    assert status.returncode == 2
    assert status.stderr.strip().splitlines() == [
        f"uploads-consumer: configuration error: NATS_CREDS: {creds} is not a .creds file (user JWT and nkey seed blocks)"
    ]
    daemon = start_daemon(NATS_CREDS=str(creds))
    assert daemon.proc.wait(30) == 2
    assert "NATS_CREDS" in daemon.log_text()
    assert seed not in daemon.log_text() + status.stdout + status.stderr


def test_urls_are_shown_without_their_credentials():
    assert redact_url("nats://uploads:s3cret@nats:4222") == "nats://***@nats:4222"
    assert redact_url("tls://t0ken@nats.example.com:4222") == "tls://***@nats.example.com:4222"
    assert redact_url("uploads:s3cret@nats:4222") == "***@nats:4222"  # nats-py accepts it without a scheme
    assert redact_url("uploads:p@ss@nats:4222") == "***@nats:4222"
    assert redact_url("nats://nats:4222") == "nats://nats:4222"
