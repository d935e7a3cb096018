"""What one hostile upload may cost (docs/contract.md, 7.1 and 7.2), through the real daemon with small
limits: a file that hits a limit on its work (CPU time, memory, the audio's duration) is dead-lettered
`resource_limit` on its first delivery, naming the variable to raise; a step that runs out of its
wall-clock time is retried PROCESSOR_TIMEOUT_RETRIES times, counted in the idempotency bucket, then
dead-lettered `processor_timeout`; and `dlq replay` starts that count afresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import connect, dead_letters, publish_uploads, until, wait_ready, wait_settled
from hostile_media import interlaced_png
from speech import ffmpeg, model_path


def made(path: Path, *args: str) -> Path:
    """A file ffmpeg makes from its own sources (`-f lavfi`)."""
    subprocess.run([ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", *args, "-y", str(path)], check=True)
    return path


def tone(path: Path, seconds: int) -> Path:
    """A 440 Hz tone as a small MP3: cheap to decode, costly to loudness-normalise (192 kHz loudnorm
    took 2.3 s of CPU for 120 s of it)."""
    return made(path, "-f", "lavfi", "-i", f"sine=f=440:d={seconds}", "-c:a", "libmp3lame", "-b:a", "32k")


def dead_by_event(messages: list) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for m in messages:
        out.setdefault(json.loads(m.data)["event_id"], []).append(m.headers)
    return out


async def test_a_file_over_a_limit_on_its_work_is_dead_lettered_at_once_naming_the_variable_to_raise(
    tmp_path, settings_for, start_daemon, nats_server
):
    files = tmp_path / "in"
    files.mkdir()
    # x264 spends about 3 s of CPU on a 10-second 1080p preview: over VIDEO_CPU_LIMIT=1s.
    heavy = made(files / "heavy.mp4", "-f", "lavfi", "-i", "testsrc2=s=1920x1080:r=10:d=10", "-c:v", "mpeg4")
    loud = tone(files / "long.mp3", 240)  # about 5 s of CPU to normalise: over TRANSCODE_CPU_LIMIT=1s
    memo = tone(files / "memo.mp3", 5)  # transcoded within its limit, but 5 s of audio, over 2 s
    scan = interlaced_png(files / "scan.png")  # 800 MB decoded whole, over IMAGE_MAX_MEMORY (128 MiB)
    daemon = start_daemon(
        PROCESSORS="video,image,transcode,transcribe",
        VIDEO_PREVIEW="true",
        VIDEO_PREVIEW_SECONDS="10s",
        VIDEO_PREVIEW_SIZE="1920",
        VIDEO_CPU_LIMIT="1s",
        TRANSCODE_NORMALIZE="true",
        TRANSCODE_CPU_LIMIT="1s",
        TRANSCRIBE_MODEL=model_path(),
        TRANSCRIBE_MAX_DURATION="2s",
    )
    await wait_ready(daemon, nats_server.url)
    events = await publish_uploads(settings_for(), [heavy, loud, memo, scan])
    await wait_settled(nats_server.url, 4, daemon=daemon, timeout=120)
    retried = daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"')
    limits = {
        step: daemon.metric("uploads_consumer_processor_outcomes_total", f'outcome="limit",processor="{step}"')
        for step in ("video", "image", "transcode", "transcribe")
    }
    assert daemon.terminate() == 0
    assert limits == {"video": 1, "image": 1, "transcode": 1, "transcribe": 1}, "told apart in the metrics"

    dead = dead_by_event(await dead_letters(nats_server.url))
    assert retried == 0
    assert {e.event_id: len(dead[e.event_id]) for e in events} == {e.event_id: 1 for e in events}
    reasons = {}
    for event in events:
        [headers] = dead[event.event_id]
        assert headers["Uploads-Error-Class"] == "resource_limit"
        assert headers["Uploads-Deliveries"] == "1", "never retried: the same file would do it again"
        reasons[event.event_id] = headers["Uploads-Error"]
    heavy_event, loud_event, memo_event, scan_event = (e.event_id for e in events)
    assert reasons[heavy_event] == (
        "video: ffmpeg used all of VIDEO_CPU_LIMIT (1s of CPU time) on this file; raise VIDEO_CPU_LIMIT to process it"
    )
    assert reasons[loud_event] == (
        "transcode: ffmpeg used all of TRANSCODE_CPU_LIMIT (1s of CPU time) on this file; "
        "raise TRANSCODE_CPU_LIMIT to process it"
    )
    assert reasons[memo_event] == (
        "transcribe: memo.mp3 is 5s of audio, over TRANSCRIBE_MAX_DURATION (2s); raise TRANSCRIBE_MAX_DURATION to "
        "transcribe it"
    )
    assert "over IMAGE_MAX_MEMORY (134217728); raise IMAGE_MAX_MEMORY" in reasons[scan_event]


async def timeout_records(url: str) -> dict[str, dict]:
    """The timeout counts in the consumer's idempotency bucket, by key."""
    nc = await connect(url)
    try:
        kv = await nc.jetstream(timeout=5).key_value("file_processor_done")
        keys = [k for k in await kv.keys() if ".timeouts." in k]
        return {k: json.loads((await kv.get(k)).value) for k in keys}
    finally:
        await nc.close()


async def test_a_step_out_of_time_is_retried_as_often_as_allowed_then_dead_lettered_and_a_replay_starts_afresh(
    tmp_path, settings_for, start_daemon, nats_server, daemon_env
):
    retries = 1
    # Normalising 240 s of tone takes seconds of CPU on one thread: never within TRANSCODE_TIMEOUT=1s.
    slow = tone(tmp_path / "meeting.mp3", 240)
    limits = {"TRANSCODE_NORMALIZE": "true", "TRANSCODE_TIMEOUT": "1s", "PROCESSOR_TIMEOUT_RETRIES": str(retries)}
    daemon = start_daemon(PROCESSORS="transcode", **limits)
    await wait_ready(daemon, nats_server.url)
    [event] = await publish_uploads(settings_for(), [slow])
    await until(lambda: dead_letters(nats_server.url), 60, "the dead letter", daemon)
    [first] = dead_by_event(await dead_letters(nats_server.url))[event.event_id]
    assert first["Uploads-Error-Class"] == "processor_timeout"
    assert first["Uploads-Deliveries"] == str(retries + 1)
    assert first["Uploads-Error"] == (
        "transcode: ffmpeg did not finish within TRANSCODE_TIMEOUT (1s); step transcode timed out 2 times on this "
        "upload (PROCESSOR_TIMEOUT_RETRIES=1)"
    )
    timeouts = daemon.metric("uploads_consumer_processor_outcomes_total", 'outcome="timeout",processor="transcode"')
    assert timeouts == retries + 1, "each timeout counted apart from endpoints that are down"
    [(key, counted)] = (await timeout_records(nats_server.url)).items()
    assert key.endswith(".timeouts.transcode") and counted == {"origin": "FILE_UPLOADS:1", "count": 2}

    # Given back by `dlq replay`, the upload is a new message: its count starts from nothing.
    replay = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "dlq", "replay", "--all"],
        env=daemon_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    again = await until(lambda: replayed_dead_letter(nats_server.url), 60, "the replay's dead letter", daemon)
    assert again["Uploads-Error-Class"] == "processor_timeout"
    assert again["Uploads-Deliveries"] == str(retries + 1), "retried as often as the first time"
    assert "timed out 2 times" in again["Uploads-Error"]
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert (await timeout_records(nats_server.url))[key] == {"origin": "FILE_UPLOADS:2", "count": 2}
    assert daemon.terminate() == 0


async def replayed_dead_letter(url: str) -> dict[str, str] | None:
    """The headers of the dead letter the replayed message (on the consumer's replay subject) became."""
    found = [
        m.headers for m in await dead_letters(url) if m.headers["Uploads-Subject"].startswith("file.uploads.replay.")
    ]
    return found[0] if found else None
