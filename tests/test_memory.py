"""A file is never held whole in memory: the daemon's peak RSS barely moves for a 64 MiB upload."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from helpers import connect, peak_rss, wait_settled

from uploads_consumer.envelope import MasterKeyRing
from uploads_consumer.producer import publish_event, upload_file
from uploads_consumer.storage import ObjectStore

MiB = 1 << 20


async def _publish(settings, path: Path, email: str) -> str:
    current, _ = settings.master_keys()
    nc = await connect(settings.nats_url)
    try:
        async with ObjectStore(settings) as store:
            event = await upload_file(store, MasterKeyRing(current), path, email, settings.s3_bucket_name)
        await publish_event(nc.jetstream(timeout=30), "file.uploads", event)
        return event.file_uuid
    finally:
        await nc.close()


async def test_a_64_mib_upload_decrypts_with_peak_memory_well_under_its_size(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    settings = settings_for()
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(64 * 1024))
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(64):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)

    daemon = start_daemon()
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    # Warm up on a small upload so every code path and buffer exists, then take the baseline.
    await _publish(settings, small, "warm@example.com")
    await wait_settled(nats_server.url, 1, daemon=daemon)
    baseline = peak_rss(daemon.proc.pid)

    file_uuid = await _publish(settings, big, "big@example.com")
    await wait_settled(nats_server.url, 2, daemon=daemon, timeout=120)
    growth = peak_rss(daemon.proc.pid) - baseline
    assert daemon.terminate() == 0

    saved = downloads / "big@example.com" / file_uuid / "big.bin"
    h = hashlib.sha256()
    with open(saved, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    assert h.hexdigest() == digest.hexdigest()
    print(f"peak RSS baseline {baseline / MiB:.1f} MiB, growth for 64 MiB upload {growth / MiB:.1f} MiB")
    assert growth < 16 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB while decrypting a 64 MiB object"
