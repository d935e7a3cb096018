"""S3 reads: a body that breaks half-way starts over with a fresh decryptor; errors map to outcomes;
credentials (wrong, refreshable, session tokens) checked for real by moto with IAM authentication on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from helpers import make_files, provision_now, publish_uploads, read_stream, wait_settled

from uploads_consumer.embedded import S3Server, TcpProxy
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError
from uploads_consumer.storage import ObjectStore, host_header


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
        info = await store.download(bucket, "k", sink, max_size=10 * 1024 * 1024)
    assert info.size == len(payload)
    assert info.etag == hashlib.md5(payload).hexdigest(), "the ETag as stored, quotes removed"
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


# ---- the signed GET: errors map as botocore's did, against real servers ------------------------


async def test_a_missing_key_or_bucket_is_not_found_and_names_the_code(settings_for, bucket):
    async with ObjectStore(settings_for()) as store:
        with pytest.raises(PermanentError) as key:
            await store.read_small(bucket, "uploads/nope/metadata.json", 1024)
        with pytest.raises(PermanentError) as missing_bucket:
            await store.download("no-such-bucket-here", "k", RecordingSink(), max_size=1024)
    assert key.value.error_class is ErrorClass.NOT_FOUND
    assert key.value.reason == f"get metadata s3://{bucket}/uploads/nope/metadata.json: NoSuchKey"
    assert missing_bucket.value.error_class is ErrorClass.NOT_FOUND
    assert missing_bucket.value.reason == "get object s3://no-such-bucket-here/k: NoSuchBucket"


async def test_an_object_requested_ahead_serves_the_download_and_a_discarded_one_is_released(
    settings_for, s3_client, bucket
):
    payload = os.urandom(300_000)
    s3_client.put_object(Bucket=bucket, Key="k", Body=payload)
    async with ObjectStore(settings_for()) as store:
        sink = RecordingSink()
        ahead = store.request_ahead(bucket, "k")
        assert (await store.download(bucket, "k", sink, max_size=1 << 20, ahead=ahead)).size == len(payload)
        ahead.discard()
        unread = store.request_ahead(bucket, "k")
        await unread.response()
        unread.discard()
        missing = store.request_ahead(bucket, "nope")
        with pytest.raises(PermanentError):
            await missing.response()
        missing.discard()
        assert await store.read_small(bucket, "k", 1 << 20) == payload  # the pool still serves
    assert bytes(sink.data) == payload and sink.starts == [len(payload)]


class S3ErrorServer:
    """A tiny HTTP server answering every request with one S3 error response; counts what it got."""

    def __init__(
        self, status: int, code: str | None, headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.status, self.code, self.headers, self.tls = status, code, headers or {}, tls
        self.requests: list[dict[str, str]] = []
        self.url = ""

    async def handle(self, request):
        from aiohttp import web

        self.requests.append(dict(request.headers))
        body = b""
        if self.code:
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
                b"<Message>Please reduce your request rate &amp; try again.</Message>"
                b"<RequestId>4442587FB7D0A2F9</RequestId></Error>" % self.code.encode()
            )
        return web.Response(status=self.status, body=body, headers=self.headers, content_type="application/xml")

    async def __aenter__(self) -> S3ErrorServer:
        from aiohttp import web

        from uploads_consumer.embedded import free_port

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.tls).start()
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


@pytest.mark.parametrize(
    ("status", "code", "reason", "attempts"),
    [
        (503, "SlowDown", "S3 error SlowDown Please reduce your request rate & try again.", 3),
        (500, None, "S3 error 500 Internal Server Error", 3),
        (400, "RequestTimeout", "S3 error RequestTimeout Please reduce your request rate & try again.", 3),
        (403, "AccessDenied", "S3 error AccessDenied Please reduce your request rate & try again.", 1),
        (400, "InvalidArgument", "S3 error InvalidArgument Please reduce your request rate & try again.", 1),
    ],
)
async def test_server_errors_are_retried_like_botocore_then_retryable(settings_for, status, code, reason, attempts):
    async with S3ErrorServer(status, code) as server, ObjectStore(settings_for(S3_ENDPOINT_URL=server.url)) as store:
        with pytest.raises(RetryableError) as err:
            await store.read_small("uploads", "uploads/a/b/metadata.json", 1024)
    assert err.value.reason == f"get metadata s3://uploads/uploads/a/b/metadata.json: {reason}"
    assert len(server.requests) == attempts
    assert all("Signature=" in r["Authorization"] for r in server.requests)


async def test_a_404_without_a_body_is_not_found(settings_for):
    async with S3ErrorServer(404, None) as server, ObjectStore(settings_for(S3_ENDPOINT_URL=server.url)) as store:
        with pytest.raises(PermanentError) as err:
            await store.download("uploads", "k", RecordingSink(), max_size=1024)
    assert err.value.error_class is ErrorClass.NOT_FOUND and err.value.reason == "get object s3://uploads/k: 404"
    assert len(server.requests) == 1


async def test_a_bucket_answered_from_another_region_is_left_to_botocore(settings_for):
    async with (
        S3ErrorServer(301, "PermanentRedirect", {"x-amz-bucket-region": "eu-west-1"}) as server,
        ObjectStore(settings_for(S3_ENDPOINT_URL=server.url)) as store,
    ):
        with pytest.raises(RetryableError, match="PermanentRedirect"):
            await store.read_small("uploads", "k", 1024)
    assert server.requests[0]["User-Agent"].startswith("uploads-consumer/")
    assert "botocore/" in server.requests[-1]["User-Agent"], "then botocore's own pipeline"


async def test_https_endpoints_are_trusted_as_botocore_trusts_them(settings_for, tmp_path, monkeypatch):
    from secure_support import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    async with S3ErrorServer(404, "NoSuchKey", tls=tls) as server:
        settings = settings_for(S3_ENDPOINT_URL=server.url)
        async with ObjectStore(settings) as store:  # a private CA is not in botocore's bundle
            with pytest.raises(RetryableError, match="certificate verify failed"):
                await store.read_small("uploads", "k", 1024)
        assert server.requests == []
        monkeypatch.setenv("AWS_CA_BUNDLE", str(pki.ca))
        async with ObjectStore(settings) as store:
            with pytest.raises(PermanentError, match="NoSuchKey"):
                await store.read_small("uploads", "k", 1024)
        assert len(server.requests) == 1


@pytest.mark.parametrize("bucket", ["uploads--use1-az4--x-s3", "arn:aws:s3:us-east-1:123456789012:accesspoint/uploads"])
async def test_directory_buckets_and_arns_are_left_to_botocore(settings_for, bucket):
    async with (
        S3ErrorServer(404, "NoSuchKey") as server,
        ObjectStore(settings_for(S3_ENDPOINT_URL=server.url)) as store,
    ):
        with contextlib.suppress(PermanentError, RetryableError):
            await store.read_small(bucket, "k", 1024)
    assert not any(r.get("User-Agent", "").startswith("uploads-consumer/") for r in server.requests)


# ---- credentials, checked for real: moto with IAM authentication on ------------------------------

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass
class AuthS3:
    server: S3Server
    access_key: str
    secret_key: str
    role_arn: str
    bucket: str

    def client(self, service: str, **credentials: str):
        return boto3.client(
            service,
            endpoint_url=self.server.url,
            region_name="us-east-1",
            aws_access_key_id=credentials.get("key", self.access_key),
            aws_secret_access_key=credentials.get("secret", self.secret_key),
            config=Config(s3={"addressing_style": "path"}),
        )

    def assume_role(self) -> dict:
        return self.client("sts").assume_role(RoleArn=self.role_arn, RoleSessionName="uploads-consumer")["Credentials"]


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server checking every request's signature against its IAM users and roles."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")  # the three IAM calls below; then every request is checked
        server = S3Server(log_path=tmp_path_factory.mktemp("s3auth") / "moto.log")
        server.start()
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="uploads-consumer")
        iam.put_user_policy(UserName="uploads-consumer", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="uploads-consumer")["AccessKey"]
        auth = AuthS3(server, key["AccessKeyId"], key["SecretAccessKey"], "", "uploads-auth")
        trust = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
        role = auth.client("iam").create_role(
            RoleName="uploads-consumer",
            AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [trust]}),
        )["Role"]
        auth.client("iam").put_role_policy(RoleName="uploads-consumer", PolicyName="all", PolicyDocument=ALLOW_ALL)
        auth.role_arn = role["Arn"]
        auth.client("s3").create_bucket(Bucket=auth.bucket)
        yield auth
    finally:
        server.stop()


async def test_keys_of_every_kind_are_signed_right(settings_for, auth_s3):
    keys = ["plain.bin", "uploads/me@example.com/with space/ünï+plus%25=&?#.bin", "a//b", "~*(1)!'", "/leading"]
    s3 = auth_s3.client("s3")
    for key in keys:
        s3.put_object(Bucket=auth_s3.bucket, Key=key, Body=key.encode())
    settings = settings_for(
        S3_ENDPOINT_URL=auth_s3.server.url,
        AWS_ACCESS_KEY_ID=auth_s3.access_key,
        AWS_SECRET_ACCESS_KEY=auth_s3.secret_key,
    )
    async with ObjectStore(settings) as store:
        for key in keys:
            assert await store.read_small(auth_s3.bucket, key, 1024) == key.encode()


async def test_a_wrong_secret_is_refused_and_retryable_and_not_shown(settings_for, auth_s3):
    auth_s3.client("s3").put_object(Bucket=auth_s3.bucket, Key="k", Body=b"x")
    wrong = "wrong-" + os.urandom(12).hex()
    settings = settings_for(
        S3_ENDPOINT_URL=auth_s3.server.url, AWS_ACCESS_KEY_ID=auth_s3.access_key, AWS_SECRET_ACCESS_KEY=wrong
    )
    async with ObjectStore(settings) as store:
        with pytest.raises(RetryableError) as err:
            await store.download(auth_s3.bucket, "k", RecordingSink(), max_size=1024)
    assert "SignatureDoesNotMatch" in err.value.reason
    assert wrong not in str(err.value) and "Signature=" not in str(err.value)


class ContainerCredentials:
    """The ECS/EKS container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI), handing out a
    fresh role session at every call, each said to expire in 5 minutes: inside botocore's mandatory
    refresh window, so every use of the credentials refreshes them."""

    def __init__(self, auth: AuthS3, token: str | None = None) -> None:
        self.auth = auth
        self.token = token  # a session token to hand out instead of the real one
        self.handed_out: list[dict] = []

    async def handle(self, request):
        from aiohttp import web

        creds = await asyncio.to_thread(self.auth.assume_role)
        self.handed_out.append(creds)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return web.json_response(
            {
                "AccessKeyId": creds["AccessKeyId"],
                "SecretAccessKey": creds["SecretAccessKey"],
                "Token": self.token or creds["SessionToken"],
                "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    async def start(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        from aiohttp import web

        from uploads_consumer.embedded import free_port

        app = web.Application()
        app.router.add_get("/creds", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{port}/creds")

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def container_credentials(auth_s3, monkeypatch, tmp_path):
    endpoint = ContainerCredentials(auth_s3)
    await endpoint.start(monkeypatch, tmp_path)
    yield endpoint
    await endpoint.stop()


async def test_refreshable_session_credentials_are_used_fresh_for_every_get(
    settings_for, auth_s3, container_credentials
):
    payload = os.urandom(5000)
    auth_s3.client("s3").put_object(Bucket=auth_s3.bucket, Key="k", Body=payload)
    settings = settings_for(S3_ENDPOINT_URL=auth_s3.server.url, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    async with ObjectStore(settings) as store:
        before = len(container_credentials.handed_out)
        for _ in range(3):
            sink = RecordingSink()
            await store.download(auth_s3.bucket, "k", sink, max_size=1 << 20)
            assert bytes(sink.data) == payload
        assert await store.read_small(auth_s3.bucket, "k", 1 << 20) == payload
    assert len(container_credentials.handed_out) - before >= 4, "each GET signed with credentials refreshed for it"


async def test_a_bad_session_token_is_refused_and_retryable_and_not_shown(settings_for, auth_s3, container_credentials):
    container_credentials.token = "bogus-" + os.urandom(16).hex()
    settings = settings_for(S3_ENDPOINT_URL=auth_s3.server.url, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    async with ObjectStore(settings) as store:
        with pytest.raises(RetryableError) as err:
            await store.read_small(auth_s3.bucket, "k", 1024)
    assert "InvalidToken" in err.value.reason and container_credentials.token not in str(err.value)


async def test_debug_logs_show_no_signature_secret_or_session_token(
    settings_for, auth_s3, container_credentials, caplog
):
    caplog.set_level(logging.DEBUG)
    for name in ("botocore", "aiobotocore"):
        caplog.set_level(logging.DEBUG, logger=name)
    settings = settings_for(S3_ENDPOINT_URL=auth_s3.server.url, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    async with ObjectStore(settings) as store:
        await store.put_bytes(auth_s3.bucket, "logged", b"{}")  # aioboto3's own pipeline
        assert await store.read_small(auth_s3.bucket, "logged", 1024) == b"{}"  # the signed GET
    text = caplog.text
    assert "Sending http request" in text and "CanonicalRequest" in text, "botocore did log at DEBUG"
    assert container_credentials.handed_out
    for creds in container_credentials.handed_out:
        assert creds["SecretAccessKey"] not in text and creds["SessionToken"] not in text
    assert re.search(r"Signature[=:]\s*\*\*\*", text), "the lines are there, without the signature"
    assert not re.search(r"(?i)signature[=:]\s*[0-9a-f]{16}", text)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/bucket",
        "https://bucket.s3.eu-west-1.amazonaws.com",
        "https://S3.Example.COM:443/Bucket",
        "http://minio:80/b",
        "https://user:secret@s3.example.com:8443/b",
        "http://[::1]:9000/bucket",
        "https://[2001:db8::5]/b",
    ],
)
def test_the_host_header_given_to_the_signer_is_the_one_it_would_derive(url):
    """The signer is handed the Host header (computed once per endpoint) instead of parsing every URL:
    it must be exactly what botocore derives, or every signature would be refused."""
    from botocore.auth import _host_from_url

    assert host_header(url) == _host_from_url(url)
    assert host_header(url) == _host_from_url(url + "/some/key%20x")
