"""A small pipeline in every state an upload can be in, for `trace` and the console's tests.

Three consumers: `process` (save) on the uploads, `notify` after it (a `gate` that holds an upload named
`held` in flight), and `later`, made by `setup` but never run (every upload pending for it). Four uploads:
`ok` (its name a hostile one: markup), processed by both; `held`, processed by process and in flight at
notify; `missing`, whose metadata.json is gone, dead-lettered `not_found` by process; and `ok`'s event
published once more, acknowledged as a duplicate. Both daemons keep an audit trail in one SQLite file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import TESTS, connect, make_files, until, wait_ready, wait_settled

from uploads_consumer.embedded import DaemonProcess, free_port
from uploads_consumer.events import FileUploadEvent

HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass
class World:
    env: dict[str, str]
    """The operator's environment: the servers, NATS_CONSUMER_NAME=process, AUDIT_URL."""
    process: DaemonProcess
    notify: DaemonProcess
    uploads: dict[str, FileUploadEvent]
    seqs: dict[str, int]
    state_dir: Path
    missing_metadata: bytes
    s3: Any
    bucket: str
    outcomes: dict[str, dict[str, str]] = field(default_factory=dict)

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        merged = {**self.env, **env}
        return subprocess.run(
            [sys.executable, "-m", "uploads_consumer", *args], env=merged, capture_output=True, text=True, timeout=120
        )

    def open_gate(self) -> None:
        (self.state_dir / "gate-open").write_text("open")

    def restore_missing(self) -> None:
        event = self.uploads["missing"]
        self.s3.put_object(Bucket=self.bucket, Key=event.s3_metadata_key, Body=self.missing_metadata)

    def daemon_outcomes(self) -> dict[str, dict[str, str]]:
        """What each daemon says it did with each event, from its own log: consumer → event_id → outcome."""
        said = {"processed": "processed", "dead-lettered": "dead_lettered", "duplicate acknowledged": "duplicate"}
        out: dict[str, dict[str, str]] = {}
        for name, daemon in (("process", self.process), ("notify", self.notify)):
            for line in daemon.log_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") in said and entry.get("event_id"):
                    out.setdefault(name, {})[f"{entry['event_id']}@{entry.get('stream_seq')}"] = said[entry["event"]]
        return out


async def build_world(
    tmp_path: Path, daemon_env: dict[str, str], start_daemon: Any, settings_for: Any, s3_client: Any, bucket: str
) -> World:
    from uploads_consumer.envelope import MasterKeyRing
    from uploads_consumer.producer import event_json, upload_file
    from uploads_consumer.storage import ObjectStore

    state = tmp_path / "state"
    state.mkdir()
    env = {
        **daemon_env,
        "NATS_CONSUMER_NAME": "process",
        "AUDIT_URL": f"sqlite:///{tmp_path / 'audit' / 'audit.db'}",
        "PYTHONPATH": TESTS,
        "UC_TEST_STATE_DIR": str(state),
    }
    made = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "setup"],
        env={**env, "NATS_CONSUMER_NAME": "later", "AUDIT_URL": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    process = start_daemon("process.log", **{**env, "PROCESSORS": "save"})
    await wait_ready(process)
    stage = {"NATS_CONSUMER_NAME": "notify", "AFTER": "process", "PROCESSORS": "uc_test_plugins:gate"}
    notify = start_daemon("notify.log", **{**env, **stage, "HTTP_PORT": str(free_port())})
    await wait_ready(notify)

    settings = settings_for()
    current, _ = settings.master_keys()
    ring = MasterKeyRing(current)
    files = make_files(tmp_path / "in", 3, size=4096)
    names = {"ok": HOSTILE_NAME, "held": "held-voice-memo.m4a", "missing": "report.pdf"}
    uploads: dict[str, FileUploadEvent] = {}
    seqs: dict[str, int] = {}
    async with ObjectStore(settings) as store:
        for (key, name), path in zip(names.items(), files, strict=True):
            uploads[key] = await upload_file(store, ring, path, "ana@example.com", bucket, name=name)
    missing_metadata = s3_client.get_object(Bucket=bucket, Key=uploads["missing"].s3_metadata_key)["Body"].read()
    s3_client.delete_object(Bucket=bucket, Key=uploads["missing"].s3_metadata_key)
    nc = await connect(settings.nats_url)
    try:
        js = nc.jetstream(timeout=10)
        for key, event in uploads.items():
            headers = {"Nats-Msg-Id": event.event_id}
            if key == "ok":  # as a backend with tracing on sends it
                headers["traceparent"] = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
            seqs[key] = (await js.publish("file.uploads", event_json(event), headers=headers)).seq
        await wait_settled(settings.nats_url, seqs["missing"], daemon=process, consumer="process")
        # The same event again, as a backend that retried its publish would (no Nats-Msg-Id: stored twice).
        seqs["duplicate"] = (await js.publish("file.uploads", event_json(uploads["ok"]))).seq
    finally:
        await nc.close()
    await wait_settled(settings.nats_url, seqs["duplicate"], daemon=process, consumer="process")

    async def notify_holds_one() -> bool:
        from helpers import consumer_info

        info = await consumer_info(settings.nats_url, "FILE_PROCESSED", "notify")
        return info.delivered.stream_seq >= 2 and info.num_pending == 0 and info.num_ack_pending == 1

    await until(notify_holds_one, 30, "notify holding `held` in flight, `ok` done", notify)
    return World(env, process, notify, uploads, seqs, state, missing_metadata, s3_client, bucket)
