"""S3 reads: a body that breaks half-way starts over with a fresh decryptor; errors map to outcomes."""

from __future__ import annotations

import hashlib
import os

import pytest
from helpers import make_files, provision_now, publish_uploads, read_stream, wait_settled

from uploads_consumer.embedded import TcpProxy
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError
from uploads_consumer.storage import ObjectStore


class RecordingSink:
    def __init__(self) -> None:
        self.starts: list[int] = []
        self.data = bytearray()

    def start(self, length: int) -> None:
        self.starts.append(length)
        self.data.clear()

    def write(self, chunk: bytes) -> None:
        self.data += chunk


@pytest.fixture
def s3_proxy(s3_server):
    with TcpProxy(s3_server.port) as proxy:
        yield proxy


async def test_a_body_cut_half_way_is_read_again_from_the_start(settings_for, s3_client, bucket, s3_proxy):
    payload = os.urandom(3 * 1024 * 1024)
    s3_client.put_object(Bucket=bucket, Key="k", Body=payload)
    s3_proxy.cut_responses(2, after_bytes=700_000)
    sink = RecordingSink()
    async with ObjectStore(settings_for(S3_ENDPOINT_URL=s3_proxy.url)) as store:
        length = await store.download(bucket, "k", sink, max_size=10 * 1024 * 1024)
    assert length == len(payload)
    assert sink.starts == [len(payload)] * 3, "two broken bodies, then a whole one"
    assert hashlib.sha256(sink.data).digest() == hashlib.sha256(payload).digest()


async def test_a_body_that_keeps_breaking_is_a_retryable_error(settings_for, s3_client, bucket, s3_proxy):
    s3_client.put_object(Bucket=bucket, Key="k", Body=os.urandom(2 * 1024 * 1024))
    s3_proxy.cut_responses(10, after_bytes=500_000)
    async with ObjectStore(settings_for(S3_ENDPOINT_URL=s3_proxy.url)) as store:
        with pytest.raises(RetryableError, match="broke 3 times"):
            await store.download(bucket, "k", RecordingSink(), max_size=10 * 1024 * 1024)


async def test_missing_objects_and_buckets_are_not_found(settings_for, bucket):
    async with ObjectStore(settings_for()) as store:
        for b, k in ((bucket, "nope"), ("no-such-bucket-here", "k")):
            with pytest.raises(PermanentError) as err:
                await store.download(b, k, RecordingSink(), max_size=1024)
            assert err.value.error_class is ErrorClass.NOT_FOUND


async def test_an_object_over_the_limit_is_too_large_and_not_read(settings_for, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="big", Body=b"x" * 5000)
    sink = RecordingSink()
    async with ObjectStore(settings_for()) as store:
        with pytest.raises(PermanentError) as err:
            await store.download(bucket, "big", sink, max_size=4096)
    assert err.value.error_class is ErrorClass.TOO_LARGE and sink.starts == []


async def test_an_unreachable_endpoint_is_retryable(settings_for, bucket):
    from uploads_consumer.embedded import free_port

    settings = settings_for(S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    async with ObjectStore(settings) as store:
        with pytest.raises(RetryableError):
            await store.read_small(bucket, "k", 1024)


async def test_the_daemon_recovers_a_broken_body_within_one_delivery(
    tmp_path, settings_for, start_daemon, nats_server, s3_proxy, downloads
):
    await provision_now(settings_for())
    [event] = await publish_uploads(settings_for(), make_files(tmp_path / "in", 1, size=2 * 1024 * 1024))
    s3_proxy.cut_responses(1, after_bytes=600_000)
    daemon = start_daemon(S3_ENDPOINT_URL=s3_proxy.url)
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 1
    assert daemon.metric("uploads_consumer_redeliveries_total") == 0
    assert daemon.terminate() == 0
    saved = downloads / "user@example.com" / event.file_uuid / "file-0.bin"
    assert saved.read_bytes() == (tmp_path / "in" / "file-0.bin").read_bytes()
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []
