"""The bare floor: the least a consumer can do per upload, to measure the daemon against. No guarantees.

pull fetch with up to 64 messages in flight; per message two SigV4-signed GETs (metadata, object) over
one keep-alive aiohttp session, the data key unwrapped and the object decrypted in memory, the file
written (no fsync), and a plain `msg.ack()` (no confirmation). No idempotency check, no result event,
no retries, no dead letters, no size limits. Path-style addressing on S3_ENDPOINT_URL; configured by
the daemon's environment variables. Not part of the product: the benchmark's floor only.

With `--same-work` it also does the work the daemon cannot skip and that is not its own plumbing:
- the two per-file jobs: it sniffs the content type with the daemon's own libmagic call, and places
  the file as the daemon's `save` does (hard link from a private file, `fsync` of the file and its
  folder, in a worker thread);
- the same confirmed NATS operations, with nats-py as the daemon calls it: the idempotency lookup
  (`kv.get`, alongside the S3 GETs), the result event (`js.publish`, acknowledged by the stream), the
  idempotency record (`kv.put`) and a confirmed ack (a request to the reply subject).
The daemon's CPU over this floor's is then what its own code costs (streaming, the pipeline, the
settler, logs, metrics), the work every correct consumer does taken out.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import nats
import nats.errors
import nats.js.errors
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from yarl import URL

IN_FLIGHT = 64


class SignedGetter:
    """GET an object with a SigV4 signature (botocore's signer) over one long-lived aiohttp session."""

    def __init__(self, endpoint: str, region: str, access_key: str, secret_key: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.signer = S3SigV4Auth(Credentials(access_key, secret_key), "s3", region)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2 * IN_FLIGHT),
            timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=60),
        )

    async def get(self, bucket: str, key: str) -> bytes:
        url = f"{self.endpoint}/{bucket}/{quote(key, safe='/~')}"
        request = AWSRequest("GET", url)
        self.signer.add_auth(request)
        async with self.session.get(URL(url, encoded=True), headers=dict(request.headers.items())) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET s3://{bucket}/{key}: HTTP {response.status}")
            return body


async def the_daemons_work(out_root: Path, event: dict, name: str, plaintext: bytes, job: int) -> None:
    """Sniff the type and place the file with the daemon's own functions, each step where the daemon
    does it: sniff and write the private file on the loop, place it in a worker thread."""
    from uploads_consumer.content_type import HEAD_BYTES, content_type  # only with --same-work
    from uploads_consumer.processors.save import place_file

    content_type(plaintext[:HEAD_BYTES], name)
    private = out_root / ".incoming" / f"plain-floor-{os.getpid()}-{job}.part"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, plaintext)
    finally:
        os.close(fd)
    try:
        await asyncio.to_thread(place_file, out_root, event["email"], event["file_uuid"], name, private, len(plaintext))
    finally:
        private.unlink()


async def lookup(kv: KeyValue | None, key: str) -> bool:
    if kv is None:
        return False
    try:
        await kv.get(key)
        return True
    except KeyNotFoundError:
        return False


async def handle(
    msg: Msg, s3: SignedGetter, master: AESGCM, out_root: Path, same_work: bool, job: int, nc: Any, kv: KeyValue | None
) -> None:
    try:
        event = json.loads(msg.data)
        if isinstance(event, str):
            event = json.loads(event)
        bucket = event["bucket_name"]
        key = f"{event['event_id']}.floor"
        metadata_body, encrypted, _seen = await asyncio.gather(
            s3.get(bucket, event["s3_metadata_key"]), s3.get(bucket, event["s3_data_key"]), lookup(kv, key)
        )
        metadata = json.loads(metadata_body)
        kek = base64.b64decode(metadata["kek"])
        dek = master.decrypt(kek[:12], kek[12:], None)
        plaintext = AESGCM(dek).decrypt(encrypted[:12], encrypted[12:], None)
        name = metadata["original_filename"].removesuffix(".encrypted")
        if same_work:
            await the_daemons_work(out_root, event, name, plaintext, job)
            result = {"event_id": event["event_id"], "size": len(plaintext), "status": "processed"}
            await nc.jetstream().publish(
                "file.processed", json.dumps(result).encode(), headers={"Nats-Msg-Id": f"{key}:processed"}
            )
            assert kv is not None
            await kv.put(key, b"1")
            await nc.request(msg.reply, b"+ACK", timeout=5)
        else:
            target = out_root / event["email"] / event["file_uuid"] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(plaintext)
            await msg.ack()
    except Exception as exc:  # noqa: BLE001 - no guarantees: left unacknowledged, redelivered after ack_wait
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)


async def main() -> None:
    same_work = "--same-work" in sys.argv[1:]
    if same_work:  # imported and libmagic loaded before the first delivery, as the daemon does
        import uploads_consumer.processors.save  # noqa: F401 - imported now, not in the measured window
        from uploads_consumer.content_type import sniffing_problem

        sniffing_problem()
    master = AESGCM(base64.b64decode(os.environ["ENCRYPTION_MASTER_KEY"]))
    s3 = SignedGetter(
        os.environ["S3_ENDPOINT_URL"],
        os.environ.get("AWS_REGION", "us-east-1"),
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    out_root = Path(os.environ.get("DECRYPT_DOWNLOAD_PATH", "./downloads"))
    if same_work:
        (out_root / ".incoming").mkdir(parents=True, exist_ok=True)
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://localhost:4222"))
    js = nc.jetstream()
    kv = None
    if same_work:  # made before the first delivery, as the daemon's setup does
        kv = await js.create_key_value(bucket="floor_done", history=1, ttl=7 * 86400)
        try:
            await js.stream_info("FILE_PROCESSED")
        except nats.js.errors.NotFoundError:
            await js.add_stream(name="FILE_PROCESSED", subjects=["file.processed"])
    sub = await js.pull_subscribe("file.uploads", durable="file_processor", stream="FILE_UPLOADS")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    jobs = 0
    while not stop.is_set():
        if len(tasks) >= IN_FLIGHT:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            msgs = await sub.fetch(batch=IN_FLIGHT - len(tasks), timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            jobs += 1
            task = asyncio.create_task(handle(msg, s3, master, out_root, same_work, jobs, nc, kv))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    await s3.session.close()
    await nc.close()


if __name__ == "__main__":
    try:
        from uvloop import run  # as the daemon runs
    except ImportError:
        from asyncio import run
    run(main())
