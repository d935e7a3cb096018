"""The bare floor: the least a consumer can do per upload, to measure the daemon against. No guarantees.

pull fetch with up to 64 messages in flight; per message two SigV4-signed GETs (metadata, object) over
one keep-alive aiohttp session, the data key unwrapped and the object decrypted in memory, the file
written (no fsync), and a plain `msg.ack()` (no confirmation). No idempotency check, no result event,
no retries, no dead letters, no size limits. Path-style addressing on S3_ENDPOINT_URL; configured by
the daemon's environment variables. Not part of the product: the benchmark's floor only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from pathlib import Path
from urllib.parse import quote

import aiohttp
import nats
import nats.errors
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.msg import Msg
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


async def handle(msg: Msg, s3: SignedGetter, master: AESGCM, out_root: Path) -> None:
    try:
        event = json.loads(msg.data)
        if isinstance(event, str):
            event = json.loads(event)
        bucket = event["bucket_name"]
        metadata_body, encrypted = await asyncio.gather(
            s3.get(bucket, event["s3_metadata_key"]), s3.get(bucket, event["s3_data_key"])
        )
        metadata = json.loads(metadata_body)
        kek = base64.b64decode(metadata["kek"])
        dek = master.decrypt(kek[:12], kek[12:], None)
        plaintext = AESGCM(dek).decrypt(encrypted[:12], encrypted[12:], None)
        target = (
            out_root / event["email"] / event["file_uuid"] / metadata["original_filename"].removesuffix(".encrypted")
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(plaintext)
        await msg.ack()
    except Exception as exc:  # noqa: BLE001 - no guarantees: left unacknowledged, redelivered after ack_wait
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)


async def main() -> None:
    master = AESGCM(base64.b64decode(os.environ["ENCRYPTION_MASTER_KEY"]))
    s3 = SignedGetter(
        os.environ["S3_ENDPOINT_URL"],
        os.environ.get("AWS_REGION", "us-east-1"),
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    out_root = Path(os.environ.get("DECRYPT_DOWNLOAD_PATH", "./downloads"))
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://localhost:4222"))
    sub = await nc.jetstream().pull_subscribe("file.uploads", durable="file_processor", stream="FILE_UPLOADS")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        if len(tasks) >= IN_FLIGHT:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            msgs = await sub.fetch(batch=IN_FLIGHT - len(tasks), timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            task = asyncio.create_task(handle(msg, s3, master, out_root))
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
