"""setup-nats-consumer.sh, run as an operator runs it: its fallback against a live server, its nats-CLI path with a recording fake."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import connect, consumer_info
from nats.js.api import AckPolicy, DeliverPolicy, ReplayPolicy
from system import require_tool

from uploads_consumer.embedded import NatsServer, clean_environment

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "setup-nats-consumer.sh"
SEED_FLAGS = [
    "--ack",
    "explicit",
    "--pull",
    "--deliver",
    "all",
    "--max-deliver=-1",
    "--max-pending=100",
    "--wait=30s",
    "--replay",
    "instant",
]


def path_without_nats() -> str:
    """This interpreter's bin (uploads-consumer lives there) and the system dirs, minus any dir holding a `nats`."""
    dirs = [str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]
    kept = [d for d in dict.fromkeys(dirs) if not os.access(os.path.join(d, "nats"), os.X_OK)]
    path = os.pathsep.join(kept)
    assert shutil.which("nats", path=path) is None
    assert shutil.which("uploads-consumer", path=path) is not None
    return path


def clean_env(**extra: str) -> dict[str, str]:
    return clean_environment(**{"PATH": path_without_nats(), **extra})


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


async def stream_config(url: str, name: str = "FILE_UPLOADS"):
    nc = await connect(url)
    try:
        return (await nc.jetstream(timeout=5).stream_info(name)).config
    finally:
        await nc.close()


def test_script_is_executable_strict_and_shellcheck_clean():
    assert os.access(SCRIPT, os.X_OK)
    assert "set -euo pipefail" in SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = subprocess.run([require_tool("shellcheck"), str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_without_nats_cli_it_falls_back_to_setup_and_creates_the_seed_consumer(nats_server):
    env = clean_env(NATS_URL=nats_server.url)
    first = run_script(env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "nats CLI not found" in first.stdout and "created consumer file_processor" in first.stdout

    config = asyncio.run(stream_config(nats_server.url))
    assert config.subjects == ["file.uploads", "file.uploads.replay.>"]
    info = asyncio.run(consumer_info(nats_server.url))
    c = info.config
    assert c.durable_name == "file_processor" and not c.deliver_subject  # durable pull consumer
    assert c.ack_policy == AckPolicy.EXPLICIT
    assert c.deliver_policy == DeliverPolicy.ALL
    assert c.replay_policy == ReplayPolicy.INSTANT
    assert (c.max_deliver, c.max_ack_pending, c.ack_wait) == (-1, 100, 30.0)
    assert not c.filter_subject and c.filter_subjects == ["file.uploads", "file.uploads.replay.file_processor"]
    assert not c.backoff

    second = run_script(env)
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout and "found   consumer file_processor" in second.stdout
    again = asyncio.run(consumer_info(nats_server.url))
    assert again.created == info.created and again.config.max_ack_pending == 100


def test_fallback_passes_nats_credentials_through(tmp_path):
    with NatsServer(tmp_path / "nats", extra_args=["--user", "guest", "--pass", "guest"]) as server:
        refused = run_script(clean_env(NATS_URL=server.url))
        assert refused.returncode != 0
        accepted = run_script(clean_env(NATS_URL=server.url, NATS_USER="guest", NATS_PASSWORD="guest"))
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert "created consumer file_processor" in accepted.stdout
        in_url = run_script(clean_env(NATS_URL=server.url.replace("nats://", "nats://guest:guest@")))
        assert in_url.returncode == 0 and "found   consumer file_processor" in in_url.stdout


# --- the nats-CLI path, with a fake `nats` first on PATH that records its arguments --------


@pytest.fixture
def fake_nats(tmp_path: Path):
    """Returns (env, calls): env runs the script with the fake; calls() reads the recorded argv lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "nats-calls.jsonl"
    fake = bin_dir / "nats"
    fake.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        args = sys.argv[1:]
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(args) + "\\n")
        verb = next((a for a in args if a in ("info", "add")), None)
        if verb == "info":  # FAKE_NATS_EXISTS: 1 (stream and consumer), stream (the stream only)
            exists = os.environ.get("FAKE_NATS_EXISTS")
            sys.exit(0 if exists == "1" or (exists == "stream" and "stream" in args) else 1)
        sys.exit(int(os.environ.get("FAKE_NATS_ADD_EXIT", "0")))
        """)
    )
    fake.chmod(0o755)

    def env(**extra: str) -> dict[str, str]:
        e = clean_env(**extra)
        e["PATH"] = f"{bin_dir}{os.pathsep}{e['PATH']}"
        return e

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def values_of(args: list[str], flag: str) -> list[str]:
    """Every value a repeatable flag was given, in order."""
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def subcommand(call: list[str]) -> list[str]:
    """The argv after the connection flags: from `stream`/`consumer` on."""
    start = next(i for i, a in enumerate(call) if a in ("stream", "consumer"))
    return call[start:]


def test_with_nats_cli_it_creates_stream_and_consumer_with_the_exact_seed_flags(fake_nats):
    env, calls = fake_nats
    result = run_script(env(NATS_URL="nats://n1:4222,nats://n2:4222"))
    assert result.returncode == 0, result.stderr
    recorded = calls()
    assert [subcommand(c)[:2] for c in recorded] == [
        ["stream", "info"],
        ["stream", "add"],
        ["consumer", "info"],
        ["consumer", "add"],
    ]
    for call in recorded:
        assert call[:2] == ["--server", "nats://n1:4222,nats://n2:4222"]

    stream_add = subcommand(recorded[1])
    assert stream_add[2] == "FILE_UPLOADS"
    assert values_of(stream_add, "--subjects") == ["file.uploads", "file.uploads.replay.>"]
    assert "--defaults" in stream_add
    for flag in ("--max-age=7d", "--retention", "--discard", "--storage"):
        assert any(f == flag or f.startswith(flag) for f in stream_add), flag

    consumer_add = subcommand(recorded[3])
    assert consumer_add[2:4] == ["FILE_UPLOADS", "file_processor"]
    flags = consumer_add[4:]
    joined = " ".join(flags)
    assert " ".join(SEED_FLAGS) in joined, joined
    assert values_of(flags, "--filter") == ["file.uploads", "file.uploads.replay.file_processor"]
    assert "--defaults" in flags  # never prompts
    assert not any(f.startswith("--backoff") for f in flags)  # a server BackOff list would replace ACK_WAIT
    assert "created consumer file_processor" in result.stdout


def test_with_nats_cli_credentials_become_cli_flags(fake_nats):
    env, calls = fake_nats
    result = run_script(
        env(
            NATS_URL="nats://nats:4222",
            NATS_USER="alice",
            NATS_PASSWORD="s3cret",
            NATS_CREDS="/etc/uploads-consumer/app.creds",
            NATS_TLS_CA="/etc/ca.pem",
        )
    )
    assert result.returncode == 0, result.stderr
    for call in calls():
        conn = call[: call.index(subcommand(call)[0])]
        assert conn == [
            "--server",
            "nats://nats:4222",
            "--user",
            "alice",
            "--password",
            "s3cret",
            "--creds",
            "/etc/uploads-consumer/app.creds",
            "--tlsca",
            "/etc/ca.pem",
        ]


def test_with_nats_cli_a_token_is_passed_as_user(fake_nats):
    env, calls = fake_nats
    assert run_script(env(NATS_TOKEN="t0ken")).returncode == 0
    for call in calls():
        conn = call[: call.index(subcommand(call)[0])]
        assert conn == ["--server", "nats://localhost:4222", "--user", "t0ken"]


def test_with_nats_cli_the_daemons_variables_are_honoured(fake_nats):
    env, calls = fake_nats
    result = run_script(
        env(
            NATS_STREAM_NAME="UP",
            NATS_SUBJECT="up.files",
            NATS_CONSUMER_NAME="worker",
            ACK_WAIT="45",
            MAX_DELIVER="20",
            MAX_ACK_PENDING="64",
        )
    )
    assert result.returncode == 0, result.stderr
    consumer_add = subcommand(calls()[3])
    assert consumer_add[2:4] == ["UP", "worker"]
    for flag in ("--wait=45s", "--max-pending=64"):
        assert flag in consumer_add
    # MAX_DELIVER is the daemon's to enforce: a server-side limit would drop messages silently.
    assert "--max-deliver=-1" in consumer_add and "--max-deliver=20" not in consumer_add
    assert values_of(consumer_add, "--filter") == ["up.files", "up.files.replay.worker"]


def test_with_nats_cli_what_exists_is_left_alone(fake_nats):
    env, calls = fake_nats
    result = run_script(env(FAKE_NATS_EXISTS="1"))
    assert result.returncode == 0, result.stderr
    assert [subcommand(c)[:2] for c in calls()] == [["stream", "info"], ["consumer", "info"]]
    assert "found   stream FILE_UPLOADS" in result.stdout and "created" not in result.stdout


def test_with_nats_cli_a_failed_create_fails_the_script(fake_nats):
    env, calls = fake_nats
    result = run_script(env(FAKE_NATS_ADD_EXIT="1"))
    assert result.returncode != 0
    assert [subcommand(c)[:2] for c in calls()] == [["stream", "info"], ["stream", "add"]]


def test_the_consumer_name_is_its_argument_and_each_consumer_of_the_stream_gets_its_own(nats_server):
    env = clean_env(NATS_URL=nats_server.url)
    for name in ("process", "notify"):
        result = run_script(env, name)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"created consumer {name}" in result.stdout
    for name in ("process", "notify"):
        c = asyncio.run(consumer_info(nats_server.url, consumer=name)).config
        assert c.durable_name == name and c.filter_subjects == ["file.uploads", f"file.uploads.replay.{name}"]
    refused = run_script(env, "no.dots")
    assert refused.returncode == 2 and "must not contain" in refused.stderr


def test_with_nats_cli_a_stream_made_elsewhere_gets_a_consumer_of_the_upload_subject_only(fake_nats):
    env, calls = fake_nats
    result = run_script(env(FAKE_NATS_EXISTS="stream"), "notify")
    assert result.returncode == 0, result.stderr
    recorded = calls()
    assert [subcommand(c)[:2] for c in recorded] == [["stream", "info"], ["consumer", "info"], ["consumer", "add"]]
    consumer_add = subcommand(recorded[2])
    assert consumer_add[2:4] == ["FILE_UPLOADS", "notify"]
    # The backend's stream captures file.uploads alone: a filter on the replay subject would be refused.
    assert values_of(consumer_add, "--filter") == ["file.uploads"]
    assert "setup --enable-replay" in result.stdout
