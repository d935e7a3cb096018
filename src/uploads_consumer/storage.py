"""S3 access: aioboto3 for credentials, endpoints and signing; the GETs over one long-lived aiohttp session.

A GET through botocore's whole request pipeline (endpoint rules, event hooks, serialising, parsing,
retry handler) took about half of the event loop's CPU per upload. So the hot path keeps
what only botocore knows — the credential chain (refreshable credentials included), the endpoint
and addressing for a bucket (resolved once per bucket, by presigning a probe), and SigV4 — and sends
the signed GET itself, with the same retries and error mapping. Anything it does not handle (a
bucket in another region, no credentials, another signature version) goes through aioboto3 as before.
Writes (`put_*`, `ensure_bucket`) are not hot and stay on aioboto3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aioboto3
import aiohttp
from aiobotocore.session import AioSession
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.httpsession import get_cert_path
from botocore.utils import get_environ_proxies, is_valid_ipv6_endpoint_url, percent_encode
from yarl import URL

from uploads_consumer import __version__, tracing
from uploads_consumer.config import Settings
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, UploadsError, describe

CHUNK_SIZE = 1 << 20
BODY_ATTEMPTS = 3  # botocore does not retry a body that breaks mid-stream; we start over this often
GET_ATTEMPTS = 3  # botocore's "standard" retry mode: 3 attempts, for the GET itself (not its body)
MAX_BACKOFF = 20.0
MAX_ERROR_BODY = 64 * 1024
MAX_ENDPOINTS = 256  # buckets remembered; the daemon only ever reads its allowed ones
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_LOG = logging.getLogger("uploads_consumer.storage")
# What botocore's standard retry mode retries, besides connection errors and timeouts.
_RETRY_STATUS = {500, 502, 503, 504}
_RETRY_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "EC2ThrottledException",
}
# The bucket lives elsewhere than the endpoint we resolved: botocore's region redirector knows what to do.
_REDIRECT_CODES = {"PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed"}
_PROBE_KEY = "uploads-consumer-endpoint-probe"

# A body that breaks half-way surfaces as one of these.
_BROKEN_BODY = (
    ResponseStreamingError,
    IncompleteReadError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
)


class _HideSigningSecrets(logging.Filter):
    """botocore logs, at DEBUG, the signature, the canonical request (session token included), the
    signed headers, and the bodies of STS responses (role credentials). The lines stay; the secrets
    in them do not."""

    _SECRET = re.compile(
        r"(?i)((?<![a-z-])signature[=:]\s*|x-amz-signature=|x-amz-security-token[=:]\s*|'x-amz-security-token': b?')"
        r"[^\s&,'\"]+"
        r"|(<(?:SecretAccessKey|SessionToken)>)[^<]*"
        r"|(\"(?:SecretAccessKey|SessionToken|Token)\"\s*:\s*\")[^\"]*"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = self._SECRET.sub(lambda m: (m[1] or m[2] or m[3]) + "***", message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


for _name in ("botocore.auth", "botocore.endpoint", "botocore.parsers", "aiobotocore.endpoint"):
    logging.getLogger(_name).addFilter(_HideSigningSecrets())


@dataclass(frozen=True)
class ObjectInfo:
    """An object's length and ETag (quotes removed), as the store reports them."""

    size: int
    etag: str


def _etag(value: object) -> str:
    return str(value or "").strip('"')


class ObjectBody(Protocol):
    """A GET answered 200: the object's length and ETag, and its body to read in chunks and then close."""

    length: int
    etag: str

    async def read(self, size: int = -1) -> bytes: ...

    def close(self) -> None: ...


class _HttpBody:
    def __init__(self, response: aiohttp.ClientResponse, length: int) -> None:
        self._response = response
        self.length = length
        self.etag = _etag(response.headers.get("ETag"))

    async def read(self, size: int = -1) -> bytes:
        return await self._response.content.read(size)

    def close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read whole: the connection can serve the next GET
        else:
            self._response.close()  # unread or broken: the connection cannot


class _BotocoreBody:
    def __init__(self, response: dict[str, Any]) -> None:
        self._body = response["Body"]
        self.length = int(response["ContentLength"])
        self.etag = _etag(response.get("ETag"))

    async def read(self, size: int = -1) -> bytes:
        data: bytes = await self._body.read(size if size >= 0 else None)
        return data

    def close(self) -> None:
        self._body.close()


@dataclass(frozen=True)
class _Endpoint:
    """Where a bucket's objects are and how requests to them are signed, as botocore resolved it."""

    base: str  # an object's URL is base + "/" + the encoded key
    region: str
    service: str
    proxy: str | None
    ssl_context: ssl.SSLContext | None
    host: str  # the Host header: given to the signer, which would otherwise parse it out of every URL


def host_header(url: str) -> str:
    """The Host header botocore's signer derives from `url` (lower case, no userinfo, no default port)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_valid_ipv6_endpoint_url(url):
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class _Redirected(Exception):
    """The bucket answered from another region; leave it to botocore's redirector."""


class ObjectRequest:
    """A GET sent ahead of need. `discard()` releases it whether it finished, failed or is pending."""

    def __init__(self, task: asyncio.Future[ObjectBody]) -> None:
        self._task = task

    async def response(self) -> ObjectBody:
        return await self._task

    def discard(self) -> None:
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled() and self._task.exception() is None:
            self._task.result().close()  # unread: close rather than leave it half-read


class ObjectSink(Protocol):
    """Receives one object's bytes; `start` is called again whenever the download starts over."""

    def start(self, length: int) -> None: ...

    def write(self, chunk: bytes) -> None: ...


def map_s3_error(exc: BaseException, what: str, configured_bucket: str | None = None) -> Exception:
    """Any S3 failure → PermanentError(not_found) or RetryableError, with a one-line reason.

    `configured_bucket`: the bucket, when the operator named it (S3_BUCKET_NAME, S3_ALLOWED_BUCKETS).
    Its absence is then a misconfiguration, not the event's fault: retried, and said loudly.
    """
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket" and configured_bucket is not None:
            reason = (
                f"{what}: bucket {configured_bucket!r} does not exist, though S3_BUCKET_NAME/S3_ALLOWED_BUCKETS "
                "name it; check the bucket and S3_ENDPOINT_URL (retrying)"
            )
            _LOG.error(reason)
            return RetryableError(reason)
        if code in _NOT_FOUND:
            return PermanentError(ErrorClass.NOT_FOUND, f"{what}: {code}")
        return RetryableError(f"{what}: S3 error {code} {err.get('Message', '')}".strip())
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)):
        return RetryableError(f"{what}: {describe(exc)}")
    return RetryableError(f"{what}: unexpected {describe(exc)}")


def s3_error(status: int, body: bytes) -> ClientError:
    """An S3 error response as botocore would raise it: the XML's Code and Message, else the HTTP status."""
    code = message = ""
    with contextlib.suppress(ElementTree.ParseError, ValueError):
        root = ElementTree.fromstring(body)
        code, message = root.findtext("Code") or "", root.findtext("Message") or ""
    if not code:
        code = str(status)
        with contextlib.suppress(ValueError):
            message = HTTPStatus(status).phrase
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    with contextlib.suppress(*_BROKEN_BODY):  # an error response cut short still has its status
        while len(data) < limit and (chunk := await response.content.read(limit - len(data))):
            data += chunk
    return bytes(data)


def _backoff(attempt: int) -> float:
    """botocore's standard mode: a random delay of up to 1 s, then 2 s, ... capped."""
    return min(random.random() * 2.0 ** (attempt - 1), MAX_BACKOFF)


class ObjectStore:
    """The S3 client the daemon and the tools share. Use as `async with ObjectStore(settings) as s3`."""

    def __init__(self, settings: Settings, pool_size: int | None = None) -> None:
        self._settings = settings
        self._pool = max(pool_size or 0, 2 * settings.max_in_flight, 10)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._prober: Any = None
        self._botocore = AioSession()
        self._credentials: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._endpoints: dict[str, _Endpoint | None] = {}  # None: this bucket goes through aioboto3

    async def __aenter__(self) -> ObjectStore:
        s = self._settings
        session = aioboto3.Session(
            botocore_session=self._botocore,
            aws_access_key_id=s.aws_access_key_id,
            aws_secret_access_key=s.aws_secret_access_key.get_secret_value() if s.aws_secret_access_key else None,
            region_name=s.aws_region,
        )
        config = Config(
            retries={"mode": "standard", "max_attempts": GET_ATTEMPTS},
            max_pool_connections=self._pool,
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path" if s.s3_path_style_access else "auto"},
            # Our requests are built by code, not users; and the GCM tag authenticates every byte
            # end to end, so S3's optional checksums add CPU without adding safety.
            parameter_validation=False,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = await self._stack.enter_async_context(
            session.client("s3", endpoint_url=s.s3_endpoint_url, config=config)
        )
        # The same client, but presigning with SigV4 (botocore presigns with SigV2 in some regions),
        # so that a presigned URL also tells the signing region: see _endpoint.
        self._prober = await self._stack.enter_async_context(
            session.client("s3", endpoint_url=s.s3_endpoint_url, config=config.merge(Config(signature_version="s3v4")))
        )
        # The session's credentials: the client was made with them; refreshable ones refresh when asked.
        self._credentials = await self._botocore.get_credentials()
        self._http = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool, keepalive_timeout=12),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
                auto_decompress=False,  # the bytes as stored, as botocore returns them
                headers={"User-Agent": f"uploads-consumer/{__version__}"},
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def read_small(self, bucket: str, key: str, limit: int, what: str = "metadata") -> bytes:
        """Read a small object whole; an object over `limit` is bad_envelope and is not read."""
        where = f"get {what} s3://{bucket}/{key}"
        body = await self._get(bucket, key, where)
        try:
            if body.length > limit:
                raise PermanentError(
                    ErrorClass.BAD_ENVELOPE, f"{what} is {body.length} bytes, over the {limit} byte limit"
                )
            return await body.read()
        except UploadsError:
            raise
        except Exception as exc:
            raise map_s3_error(exc, where, self._configured(bucket)) from exc
        finally:
            body.close()

    def request_ahead(self, bucket: str, key: str) -> ObjectRequest:
        """Send the GET now (e.g. while the metadata is read); read or discard its body later."""
        return ObjectRequest(asyncio.ensure_future(self._get(bucket, key, f"get object s3://{bucket}/{key}")))

    async def download(
        self, bucket: str, key: str, sink: ObjectSink, max_size: int, ahead: ObjectRequest | None = None
    ) -> ObjectInfo:
        """Stream an object into `sink`, starting over (sink.start again) when the body breaks.

        Checks the size before reading a byte: over `max_size` is too_large. Returns the length and
        ETag. `ahead`, if given, is this object's GET already sent; it serves the first attempt.
        """
        where = f"s3://{bucket}/{key}"
        for attempt in range(1, BODY_ATTEMPTS + 1):
            body = (
                await ahead.response()
                if ahead is not None and attempt == 1
                else await self._get(bucket, key, f"get object {where}")
            )
            try:
                if body.length > max_size:
                    raise PermanentError(
                        ErrorClass.TOO_LARGE, f"object is {body.length} bytes, over MAX_FILE_SIZE ({max_size})"
                    )
                sink.start(body.length)
                try:
                    while chunk := await body.read(CHUNK_SIZE):
                        sink.write(chunk)
                    return ObjectInfo(body.length, body.etag)
                except _BROKEN_BODY as exc:
                    if attempt == BODY_ATTEMPTS:
                        raise RetryableError(
                            f"object body {where} broke {attempt} times, last: {type(exc).__name__}"
                        ) from exc
            finally:
                body.close()
        raise AssertionError("unreachable")

    async def head(self, bucket: str, key: str) -> ObjectInfo:
        """An object's length and ETag, without its bytes (not_found when it is missing)."""
        with tracing.s3("HeadObject", bucket):
            try:
                response = await self.client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                raise map_s3_error(exc, f"head object s3://{bucket}/{key}", self._configured(bucket)) from exc
        return ObjectInfo(int(response["ContentLength"]), _etag(response.get("ETag")))

    @property
    def client(self) -> Any:
        """The aioboto3 S3 client (the configured endpoint, credentials and retries), while open."""
        if self._client is None:
            raise RuntimeError("the object store is not open")
        return self._client

    async def put_file(self, bucket: str, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        await self._client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": content_type})

    async def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/json") -> None:
        await self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    async def ensure_bucket(self, bucket: str) -> None:
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError:
            await self._client.create_bucket(Bucket=bucket)

    # -- the GET

    async def _get(self, bucket: str, key: str, what: str) -> ObjectBody:
        """GET an object; its errors mapped (not_found or retryable), with `what` as their context.
        Traced until the response's headers: its body is read by the caller (in `decrypt`)."""
        with tracing.s3("GetObject", bucket):
            try:
                endpoint = await self._endpoint(bucket)
                body: ObjectBody | None = None
                if endpoint is not None:
                    try:
                        body = await self._signed_get(endpoint, key)
                    except _Redirected:
                        self._endpoints[bucket] = None
                if body is None:
                    body = _BotocoreBody(await self._client.get_object(Bucket=bucket, Key=key))
            except UploadsError:
                raise
            except Exception as exc:
                raise map_s3_error(exc, what, self._configured(bucket)) from exc
            tracing.set_attribute("http.response.body.size", body.length)
            return body

    def _configured(self, bucket: str) -> str | None:
        return bucket if bucket in self._settings.allowed_buckets else None

    async def _endpoint(self, bucket: str) -> _Endpoint | None:
        """The bucket's endpoint, resolved once by botocore itself: a presigned probe URL carries the
        endpoint rules' result (host, path or virtual-host addressing) and the signing region."""
        if bucket in self._endpoints:
            return self._endpoints[bucket]
        if self._credentials is None:
            return None  # botocore raises NoCredentialsError; let it, on its own path
        if bucket.startswith("arn:") or bucket.endswith("--x-s3"):
            return None  # access points, Outposts, multi-region (SigV4A), directory buckets: botocore's own
        url = await self._prober.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=60
        )
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        scope = query.get("X-Amz-Credential", [""])[0].split("/")  # key id / date / region / service / aws4_request
        endpoint = None
        if (
            query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"]
            and len(scope) == 5
            and parts.path.endswith("/" + _PROBE_KEY)
            and parts.scheme in ("http", "https")
        ):
            base = urlunsplit((parts.scheme, parts.netloc, parts.path[: -len(_PROBE_KEY) - 1], "", ""))
            proxy = get_environ_proxies(base).get(parts.scheme)
            context = None
            if parts.scheme == "https":
                context = ssl.create_default_context(
                    cafile=get_cert_path(self._botocore.get_config_variable("ca_bundle") or True)
                )
            endpoint = _Endpoint(base, scope[2], scope[3], proxy, context, host_header(base))
        if len(self._endpoints) >= MAX_ENDPOINTS:
            self._endpoints.clear()
        self._endpoints[bucket] = endpoint
        return endpoint

    async def _signed_get(self, endpoint: _Endpoint, key: str) -> ObjectBody:
        """One GET, signed with the current credentials; retried like botocore's standard mode."""
        assert self._http is not None
        url = f"{endpoint.base}/{percent_encode(key, safe='/~')}"
        for attempt in range(1, GET_ATTEMPTS + 1):
            request = AWSRequest("GET", url, headers={"Host": endpoint.host})
            S3SigV4Auth(await self._credentials.get_frozen_credentials(), endpoint.service, endpoint.region).add_auth(
                request
            )
            try:
                response = await self._http.get(
                    URL(url, encoded=True),
                    headers=dict(request.headers.items()),
                    proxy=endpoint.proxy,
                    ssl=endpoint.ssl_context if endpoint.ssl_context is not None else True,
                    allow_redirects=False,
                )
            except (TimeoutError, aiohttp.ClientError, OSError):
                if attempt == GET_ATTEMPTS:
                    raise
                await asyncio.sleep(_backoff(attempt))
                continue
            if response.status == 200:
                if response.content_length is None:
                    response.close()
                    raise RetryableError(f"{endpoint.base}: a 200 response without Content-Length")
                return _HttpBody(response, response.content_length)
            try:
                error = s3_error(response.status, await _read_up_to(response, MAX_ERROR_BODY))
            finally:
                response.close()
            code = error.response["Error"]["Code"]
            if response.status in (301, 307) or code in _REDIRECT_CODES:
                raise _Redirected()
            if attempt == GET_ATTEMPTS or not (response.status in _RETRY_STATUS or code in _RETRY_CODES):
                raise error
            await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")
