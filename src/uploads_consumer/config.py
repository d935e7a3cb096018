"""Configuration: one validated settings object, read from environment variables (see docs/contract.md)."""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from uploads_consumer.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
MIN_RETRY_DELAY = 0.1
FETCH_TIMEOUT_DEFAULT = 5.0
STAGE_DEDUPE_TTL = 30 * 86400.0  # the result stream's max age (provision.RESULTS_MAX_AGE)
# NATS refuses these in a durable name (and a name is also a subject token and a bucket-name part here).
_CONSUMER_NAME = re.compile(r"^[^\s.*>/\\]+$")
_INBOX_PREFIX = re.compile(r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")
AUDIT_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_duration(value: Any) -> float:
    """`500ms`, `5s`, `2m`, `1h`, `7d` or plain seconds → seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("expected a duration such as 500ms, 5s, 2m, 1h, 7d or plain seconds")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """`512MiB`, `64KiB`, `1GiB` or plain bytes → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError("expected a size such as 512MiB, 64KiB, 1GiB or plain bytes")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """Seconds as the docs write them: the largest unit that holds it whole, minutes from two on
    (600 → `10m`, 60 → `60s`, 3600 → `1h`, 0.5 → `500ms`)."""
    for unit in ("d", "h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= (2 if unit == "m" else 1) and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds * 1000:g}ms"


def format_size(size: int) -> str:
    """Bytes as the docs write them: the largest unit that holds it whole (5368709120 → `5GiB`)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size >= _SIZE_UNITS[unit] and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def parse_durations(value: Any) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    delays = tuple(parse_duration(item) for item in items if str(item).strip())
    if not delays:
        raise ValueError("expected at least one duration, e.g. 2s,10s,30s,2m,5m")
    return delays


def _split_csv(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return tuple(item.strip() for item in str(value or "").split(",") if item.strip())


def default_dedupe_bucket(consumer: str) -> str:
    """`file_processor` → `file_processor_done`; characters a bucket name cannot hold become `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", consumer) + "_done"


def replay_subject(subject: str, consumer: str) -> str:
    """`file.uploads` + `notifier` → `file.uploads.replay.notifier`."""
    return f"{subject}.replay.{consumer}"


@dataclass(frozen=True)
class SourceStream:
    """Where a consumer reads: the upload stream, or (a stage, AFTER=) its upstream's results."""

    stream: str
    subject: str
    """What it processes: NATS_SUBJECT, or `{NATS_RESULT_SUBJECT}.{AFTER}` for a stage."""
    replay_subject: str
    """Where `dlq replay` gives this consumer back what it dead-lettered: `{base}.replay.{consumer}`."""
    after: str | None = None
    """The upstream consumer of a stage; None for a consumer of the upload stream."""

    @property
    def filters(self) -> list[str]:
        return [self.subject, self.replay_subject]


def result_subject(base: str, consumer: str) -> str:
    """`file.processed` + `process` → `file.processed.process`: one consumer's result events."""
    return f"{base}.{consumer}"


def decode_master_key(encoded: str) -> bytes:
    """A master key is base64 of exactly 32 bytes. Never echo the value in the error."""
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(key) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(key)}")
    return key


def endpoint_url_problem(url: str) -> str | None:
    """What is wrong with an S3 endpoint URL, in words that never repeat it (it may hold credentials)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "is not a URL such as http://localhost:9000 or https://s3.example.com"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "needs a scheme and a host, such as http://localhost:9000 or https://s3.example.com"
    if parts.username or parts.password:
        return "must not hold credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return (
            "must name the S3 service only, with no path: the bucket is not part of it (it goes in "
            "S3_BUCKET_NAME), e.g. http://host:9000"
        )
    return None


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Size = Annotated[int, BeforeValidator(parse_size)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(_positive)]
CsvList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_csv)]


class Settings(BaseSettings):
    """Every variable of docs/contract.md, with its default. Field `x` is read from variable `X`."""

    # Each field's docstring is its variable's description: read by `variable_descriptions` for the reference
    # pages, not at import (pydantic's use_attribute_docstrings parses this file at every command's start).
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    nats_url: str = "nats://localhost:4222"
    """Server URLs, comma-separated (list every node of a cluster); may embed `user:pass@`."""
    nats_user: str | None = None
    """User name, with NATS_PASSWORD."""
    nats_password: SecretStr | None = None
    """Password, with NATS_USER."""
    nats_token: SecretStr | None = None
    """Token authentication."""
    nats_creds: Path | None = None
    """Path to a `.creds` file (user JWT and nkey seed); checked at start."""
    nats_nkey: Path | None = None
    """Path to a user nkey seed file; checked at start."""
    nats_tls_ca: Path | None = None
    """CA bundle that signed the server's certificate."""
    nats_tls_cert: Path | None = None
    """Client certificate, for mutual TLS (with NATS_TLS_KEY)."""
    nats_tls_key: Path | None = None
    """Client certificate's key, for mutual TLS."""
    nats_inbox_prefix: str = "_INBOX"
    """Where replies to this process's requests come: it subscribes to `{NATS_INBOX_PREFIX}.>` (a prefix
    of its own keeps it, on a shared account, from reading the replies meant for other clients)."""

    nats_stream_name: str = "FILE_UPLOADS"
    """The stream holding upload events."""
    nats_subject: str = "file.uploads"
    """The subject of upload events; `dlq replay` republishes to `{NATS_SUBJECT}.replay.{consumer}`."""
    nats_consumer_name: str = "file_processor"
    """The durable pull consumer: one per job on the stream, shared by that job's replicas."""
    after: str | None = None
    """Makes this consumer a stage: it takes an upload only once the consumer named here completed it."""
    nats_result_subject: str = "file.processed"
    """Result events go to `{NATS_RESULT_SUBJECT}.{NATS_CONSUMER_NAME}`; empty disables them."""
    nats_result_stream_name: str = "FILE_PROCESSED"
    """The stream holding result events (created with a 30-day max age)."""
    dlq_stream_name: str = "FILE_UPLOADS_DLQ"
    """The dead-letter stream."""
    dlq_subject: str = "file.uploads.dlq"
    """The dead-letter subject."""
    dedupe_bucket: str = "file_processor_done"
    """Key-value bucket of processed uploads and step checkpoints; unset: `{NATS_CONSUMER_NAME}_done`;
    empty disables it."""
    dedupe_ttl: Duration = 7 * 86400.0
    """How long a processed upload and its checkpoints are remembered; unset: 7 days, 30 for a stage."""
    auto_setup: bool = True
    """Create the missing streams, consumer and bucket at start (and again if they disappear)."""
    nats_replicas: int = Field(default=1, ge=1, le=5)
    """Replicas of every stream and bucket `setup` creates; 3 on a cluster."""

    fetch_batch: int = Field(default=10, ge=1, le=1000)
    """Most messages asked for in one pull."""
    fetch_timeout: PositiveDuration = FETCH_TIMEOUT_DEFAULT
    """How long a pull lasts when nothing is new; unset: 5 s, or half of ACK_WAIT when that is shorter."""
    max_in_flight: int = Field(default=16, ge=1, le=4096)
    """Messages one process works on at once (the S3 connection pool is twice this, at least 10)."""
    ack_wait: PositiveDuration = 30.0
    """The consumer's `ack_wait` when `setup` creates it; the daemon follows the consumer's actual one."""
    max_deliver: int = -1
    """Deliveries allowed per message, enforced by the daemon (never given to the server); -1: unlimited."""
    max_ack_pending: int = Field(default=100, ge=1)
    """The consumer's `max_ack_pending` when `setup` creates it: messages out at once across all replicas."""
    retry_backoff: Annotated[tuple[float, ...], NoDecode, BeforeValidator(parse_durations)] = (
        2.0,
        10.0,
        30.0,
        120.0,
        300.0,
    )
    """The delay asked for with each nak: the n-th on the n-th delivery, the last from then on (each ≥ 100ms)."""
    max_file_size: Size = 512 << 20
    """The largest upload accepted; a larger one is dead-lettered `too_large` unread."""
    processor_timeout_retries: int = Field(default=2, ge=0, le=100)
    """How often a step that ran out of its *_TIMEOUT is retried for one upload before `processor_timeout`."""

    s3_endpoint_url: str | None = None
    """An S3-compatible endpoint (MinIO, …); unset: AWS."""
    aws_access_key_id: str | None = None
    """S3 access key; unset: the usual AWS credential chain."""
    aws_secret_access_key: SecretStr | None = None
    """S3 secret key."""
    aws_region: str = "us-east-1"
    """S3 region."""
    s3_path_style_access: bool = False
    """Path-style addressing (MinIO and most self-hosted stores need it)."""
    s3_bucket_name: str | None = None
    """The bucket uploads live in; an event naming another is `forbidden`. Set it in production."""
    s3_allowed_buckets: CsvList = ()
    """Further allowed buckets, comma-separated."""

    encryption_master_key: SecretStr | None = None
    """Base64 of the 32-byte master key shared with the backend (or ENCRYPTION_MASTER_KEY_FILE)."""
    encryption_master_key_file: Path | None = None
    """A file holding the base64 master key (container secrets)."""
    encryption_previous_master_keys: SecretStr | None = None
    """Base64 keys, comma-separated, still accepted for unwrapping after a rotation."""

    processors: CsvList = ("save",)
    """The processor chain, in order: entry-point names, instances (`webhook:ops`) or `module:attribute`."""
    allowed_content_types: CsvList = ()
    """MIME globs (`audio/*,video/mp4`); another type is dead-lettered `type_not_allowed`; unset: all."""
    decrypt_download_path: Path = Path("./downloads")
    """Root of everything written to disk: `save`'s files, the files beside them, the work folder."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """Port of `/healthz`, `/readyz` and `/metrics`; 0 disables the HTTP server."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    log_format: str | None = None
    """`console` or `json`; unset: console on a terminal, else json."""
    shutdown_grace: Duration = 30.0
    """How long in-flight messages may finish after SIGTERM (the whole stop takes at most this + 15 s)."""

    audit_url: SecretStr | None = None
    """The audit trail: `sqlite:///PATH` or `postgresql://…` (a secret: it may hold a password); unset: none."""
    audit_spool_dir: Path | None = None
    """With PostgreSQL, where each writer spools its records first; unset: `{DECRYPT_DOWNLOAD_PATH}/.audit-spool/{NATS_CONSUMER_NAME}`."""
    audit_spool_max: int = Field(default=100_000, ge=1)
    """Spooled records after which settlements wait for the store."""
    audit_anchor_stream: str = "AUDIT_ANCHORS"
    """The JetStream stream of the audit chains' heads; empty: no anchors (audit/anchors.py)."""
    audit_anchor_subject: str = "audit.anchors"
    """A daemon anchors to `{AUDIT_ANCHOR_SUBJECT}.{NATS_CONSUMER_NAME}`; the stream captures `.>`."""
    audit_anchor_interval: PositiveDuration = 60.0
    """How often, at most, each chain whose head moved is anchored (and once more at a clean stop)."""
    audit_signing_key: SecretStr | None = None
    """Base64 of a 32-byte Ed25519 private key the daemons sign their anchors with; unset: unsigned."""
    audit_verify_key: str | None = None
    """For `audit verify`: public keys, base64, comma-separated; every anchor must be signed by one."""
    audit_retention: Duration | None = None
    """For `audit prune`: records older than this go, in whole chain prefixes; unset: keep every record."""

    console_bind: str = "127.0.0.1"
    """The address `uploads-consumer console` listens on; any but loopback needs CONSOLE_USERS_FILE or
    CONSOLE_TRUSTED_PROXY (the console refuses to start without)."""
    console_port: int = Field(default=8090, ge=1, le=65535)
    """The console's port."""
    console_users_file: Path | None = None
    """The console's users, one `name:hash[:role]` a line: a bcrypt hash (`htpasswd -nB name`, or
    `uploads-consumer console user NAME`) and the role, `viewer` (reads; the default) or `operator` (replays)."""
    console_trusted_proxy: CsvList = ()
    """Addresses or networks (`10.0.0.5`, `10.0.0.0/24`) of a reverse proxy that signs users in: a request
    from one of them names its user in CONSOLE_PROXY_USER_HEADER (its role: CONSOLE_USERS_FILE's, else viewer)."""
    console_proxy_user_header: str = "X-Forwarded-User"
    """The header a trusted proxy names the user in (oauth2-proxy's default)."""
    console_trace_url: str | None = None
    """A link from an upload to its trace in Jaeger or Tempo: an http(s) URL with `{trace_id}`
    (`https://jaeger.example.com/trace/{trace_id}`); unset: no link."""
    console_refresh: PositiveDuration = 5.0
    """How often the console reads the consumers' figures and the new dead letters (its pages show what it
    read last, so a slow NATS never slows a page)."""

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """Defaults that follow another variable, when the operator left them unset (absent or empty).

        - DEDUPE_BUCKET: `{NATS_CONSUMER_NAME}_done`, so that consumers of one stream never take each
          other's records for their own (`file_processor` keeps its `file_processor_done`);
        - FETCH_TIMEOUT: 5 s, or half of ACK_WAIT when that is shorter (`ACK_WAIT=5s` alone is valid);
        - DEDUPE_TTL: 7 days, the upload stream's max age; for a stage (AFTER), 30 days, its source's.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("dedupe_ttl") in (None, "") and data.get("after") not in (None, ""):
            data["dedupe_ttl"] = STAGE_DEDUPE_TTL  # a stage's source, the result stream, keeps 30 days
        if "dedupe_bucket" not in data:  # empty is kept: it disables the bucket
            consumer = data.get("nats_consumer_name") or cls.model_fields["nats_consumer_name"].default
            if isinstance(consumer, str):
                data["dedupe_bucket"] = default_dedupe_bucket(consumer)
        if data.get("fetch_timeout") in (None, ""):
            ack_wait = data.get("ack_wait")
            with contextlib.suppress(ValueError):
                seconds = parse_duration(cls.model_fields["ack_wait"].default if ack_wait in (None, "") else ack_wait)
                if seconds > 0:
                    data["fetch_timeout"] = min(FETCH_TIMEOUT_DEFAULT, seconds / 2)
        return data

    @field_validator("nats_consumer_name")
    @classmethod
    def _durable_name(cls, value: str) -> str:
        if not _CONSUMER_NAME.match(value):
            raise ValueError("must not contain spaces, '.', '*', '>', '/' or '\\' (NATS durable names cannot)")
        return value

    @field_validator("nats_inbox_prefix")
    @classmethod
    def _inbox_prefix(cls, value: str) -> str:
        if not _INBOX_PREFIX.match(value):
            raise ValueError("must be subject tokens (letters, digits, '_', '-', separated by '.'), without wildcards")
        return value

    @model_validator(mode="after")
    def _one_master_key(self) -> Settings:
        if self.encryption_master_key is not None and self.encryption_master_key_file is not None:
            # One of them would be ignored: a rotation made by updating the mounted file would then
            # dead-letter every new upload.
            raise ConfigError(
                "ENCRYPTION_MASTER_KEY",
                "and ENCRYPTION_MASTER_KEY_FILE are both set; set one (the file, for a key kept as a secret)",
            )
        return self

    @field_validator("after")
    @classmethod
    def _one_upstream(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if "," in value:
            raise ValueError(
                "names one consumer: a stage follows one upstream (fan-in, after several, is not supported; "
                "chain them instead, e.g. AFTER=b on a stage whose b runs AFTER=a)"
            )
        if not _CONSUMER_NAME.match(value):
            raise ValueError("must be a consumer name: no spaces, '.', '*', '>', '/' or '\\'")
        return value

    @model_validator(mode="after")
    def _stage_needs_results(self) -> Settings:
        if self.after is None:
            return self
        if self.after == self.nats_consumer_name:
            raise ConfigError(
                "AFTER", f"names this consumer itself ({self.nats_consumer_name}); a stage follows another"
            )
        if not self.nats_result_subject:
            raise ConfigError(
                "NATS_RESULT_SUBJECT",
                "is empty, but AFTER is set: a stage reads its upstream's results under NATS_RESULT_SUBJECT "
                "(and publishes its own there); set it as the upstream has it (file.processed by default)",
            )
        return self

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: Any) -> Any:
        # An exported-but-empty variable means "unset", except where empty is meaningful.
        if value == "" and info.field_name not in ("nats_result_subject", "dedupe_bucket", "audit_anchor_stream"):
            field = cls.model_fields[info.field_name]
            return field.default
        return value

    @field_validator("retry_backoff")
    @classmethod
    def _no_hot_loop(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < MIN_RETRY_DELAY for delay in value):
            raise ValueError(
                f"every delay must be at least {MIN_RETRY_DELAY * 1000:g}ms (shorter ones retry in a hot loop)"
            )
        return value

    @model_validator(mode="after")
    def _fetch_inside_ack_wait(self) -> Settings:
        if self.fetch_timeout >= self.ack_wait:
            # A pull that outlives the ack wait would hold messages it cannot yet work on.
            raise ConfigError("FETCH_TIMEOUT", f"must be shorter than ACK_WAIT ({self.ack_wait:g}s); or leave it unset")
        return self

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and (problem := endpoint_url_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("max_deliver")
    @classmethod
    def _max_deliver(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (unlimited) or a positive count")
        return value

    @field_validator("audit_url")
    @classmethod
    def _audit_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            url = value.get_secret_value()
            if not url.startswith(AUDIT_SCHEMES) or url in AUDIT_SCHEMES:  # never echo it: it may hold a password
                raise ValueError("must be sqlite:///PATH (four slashes for an absolute path) or postgresql://…")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ("console", "json"):
            raise ValueError("must be console or json")
        return value.lower() if value else None

    @field_validator("encryption_master_key", "encryption_previous_master_keys")
    @classmethod
    def _keys_decode(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        if value is not None:
            for part in value.get_secret_value().split(","):
                if part.strip() or info.field_name == "encryption_master_key":
                    decode_master_key(part)
        return value

    @property
    def source(self) -> SourceStream:
        """What this consumer reads: the uploads (NATS_STREAM_NAME, NATS_SUBJECT) or, as a stage, the
        results its upstream publishes (NATS_RESULT_STREAM_NAME, `{NATS_RESULT_SUBJECT}.{AFTER}`)."""
        if self.after is None:
            return SourceStream(
                self.nats_stream_name,
                self.nats_subject,
                replay_subject(self.nats_subject, self.nats_consumer_name),
            )
        return SourceStream(
            self.nats_result_stream_name,
            result_subject(self.nats_result_subject, self.after),
            replay_subject(self.nats_result_subject, self.nats_consumer_name),
            self.after,
        )

    @property
    def replay_subject(self) -> str:
        """Where `dlq replay` puts a dead letter of this consumer back: only this consumer's filter has it."""
        return self.source.replay_subject

    @property
    def result_subject(self) -> str | None:
        """Where this consumer's result events go, `{NATS_RESULT_SUBJECT}.{NATS_CONSUMER_NAME}`; None: disabled."""
        return result_subject(self.nats_result_subject, self.nats_consumer_name) if self.nats_result_subject else None

    @property
    def own_anchor_subject(self) -> str:
        """Where this consumer's daemons publish their audit chains' heads, `{AUDIT_ANCHOR_SUBJECT}.{NATS_CONSUMER_NAME}`:
        a daemon needs permission to publish here, and nothing more (permissions.py, audit/anchors.py)."""
        return f"{self.audit_anchor_subject}.{self.nats_consumer_name}"

    @property
    def audit_spool_path(self) -> Path:
        """Where a writer to a PostgreSQL audit store keeps the records the store has not taken yet."""
        return self.audit_spool_dir or self.decrypt_download_path / ".audit-spool" / self.nats_consumer_name

    @property
    def allowed_buckets(self) -> frozenset[str]:
        return frozenset(b for b in (self.s3_bucket_name, *self.s3_allowed_buckets) if b)

    def master_keys(self) -> tuple[bytes, list[bytes]]:
        """(current, previous) master keys; raises ConfigError when none is configured."""
        if self.encryption_master_key is not None:
            current = decode_master_key(self.encryption_master_key.get_secret_value())
        elif self.encryption_master_key_file is not None:
            try:
                text = self.encryption_master_key_file.read_text().strip()
            except OSError as exc:
                raise ConfigError("ENCRYPTION_MASTER_KEY_FILE", f"cannot read the file ({exc.strerror})") from None
            try:
                current = decode_master_key(text)
            except ValueError as exc:
                raise ConfigError("ENCRYPTION_MASTER_KEY_FILE", f"the file's key is {exc}") from None
        else:
            raise ConfigError(
                "ENCRYPTION_MASTER_KEY",
                "required (base64 of the 32-byte key shared with the upload backend); "
                "or set ENCRYPTION_MASTER_KEY_FILE",
            )
        previous: list[bytes] = []
        if self.encryption_previous_master_keys is not None:
            for part in self.encryption_previous_master_keys.get_secret_value().split(","):
                if part.strip():
                    previous.append(decode_master_key(part))
        return current, previous


VARIABLES = frozenset(name.upper() for name in Settings.model_fields)
"""Every environment variable the settings read."""


def variable_descriptions() -> dict[str, str]:
    """Each Settings field's docstring (the string under its declaration), by field name."""
    (tree,) = ast.parse(inspect.getsource(Settings)).body
    assert isinstance(tree, ast.ClassDef)
    found = {}
    for node, following in zip(tree.body, tree.body[1:], strict=False):
        doc = (
            following.value.value
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            else None
        )
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, str):
            found[node.target.id] = inspect.cleandoc(doc)
    return found


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; any problem becomes a ConfigError naming the variable (never its value)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(variable, message) from None
