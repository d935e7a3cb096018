"""The seed document's Python consumer, read faithfully: one message at a time, whole files in memory.

pull_subscribe on the durable `file_processor`, fetch(batch=10, timeout=5), then per message:
get metadata, get object, unwrap the data key, decrypt in memory, save, ack.
Configured by the same environment variables as the daemon. Not part of the product: the benchmark's
baseline only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from pathlib import Path

import boto3
import nats
from botocore.config import Config
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


async def main() -> None:
    master_key = base64.b64decode(os.environ["ENCRYPTION_MASTER_KEY"])
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}),
    )
    out_root = Path(os.environ.get("DECRYPT_DOWNLOAD_PATH", "./downloads"))
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://localhost:4222"))
    js = nc.jetstream()
    sub = await js.pull_subscribe("file.uploads", durable="file_processor", stream="FILE_UPLOADS")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=10, timeout=5)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            event = json.loads(msg.data)
            if isinstance(event, str):
                event = json.loads(event)
            bucket = event["bucket_name"]
            metadata = json.loads(s3.get_object(Bucket=bucket, Key=event["s3_metadata_key"])["Body"].read())
            encrypted = s3.get_object(Bucket=bucket, Key=event["s3_data_key"])["Body"].read()
            kek = base64.b64decode(metadata["kek"])
            dek = AESGCM(master_key).decrypt(kek[:12], kek[12:], None)
            plaintext = AESGCM(dek).decrypt(encrypted[:12], encrypted[12:], None)
            name = metadata["original_filename"].removesuffix(".encrypted")
            target = out_root / event["email"] / event["file_uuid"] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(plaintext)
            await msg.ack()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
