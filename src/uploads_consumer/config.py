"""Configuration: one validated settings object, read from environment variables (see docs/contract.md)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from pathlib import Path
from typing import Annotated, Any

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
# NATS refuses these in a durable name (and a name is also a subject token and a bucket-name part here).
_CONSUMER_NAME = re.compile(r"^[^\s.*>/\\]+$")
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


def decode_master_key(encoded: str) -> bytes:
    """A master key is base64 of exactly 32 bytes. Never echo the value in the error."""
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(key) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(key)}")
    return key


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

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    nats_url: str = "nats://localhost:4222"
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_creds: Path | None = None
    nats_nkey: Path | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None

    nats_stream_name: str = "FILE_UPLOADS"
    nats_subject: str = "file.uploads"
    nats_consumer_name: str = "file_processor"
    nats_result_subject: str = "file.processed"
    nats_result_stream_name: str = "FILE_PROCESSED"
    dlq_stream_name: str = "FILE_UPLOADS_DLQ"
    dlq_subject: str = "file.uploads.dlq"
    dedupe_bucket: str = "file_processor_done"
    """Unset: `{NATS_CONSUMER_NAME}_done` (so each consumer remembers its own uploads); see `_derived_defaults`."""
    dedupe_ttl: Duration = 7 * 86400.0
    auto_setup: bool = True
    nats_replicas: int = Field(default=1, ge=1, le=5)

    fetch_batch: int = Field(default=10, ge=1, le=1000)
    fetch_timeout: PositiveDuration = FETCH_TIMEOUT_DEFAULT
    """Unset: 5 s, or half of ACK_WAIT when that is shorter; see `_derived_defaults`."""
    max_in_flight: int = Field(default=16, ge=1, le=4096)
    ack_wait: PositiveDuration = 30.0
    max_deliver: int = -1
    max_ack_pending: int = Field(default=100, ge=1)
    retry_backoff: Annotated[tuple[float, ...], NoDecode, BeforeValidator(parse_durations)] = (
        2.0,
        10.0,
        30.0,
        120.0,
        300.0,
    )
    max_file_size: Size = 512 << 20

    s3_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_region: str = "us-east-1"
    s3_path_style_access: bool = False
    s3_bucket_name: str | None = None
    s3_allowed_buckets: CsvList = ()

    encryption_master_key: SecretStr | None = None
    encryption_master_key_file: Path | None = None
    encryption_previous_master_keys: SecretStr | None = None

    processors: CsvList = ("save",)
    allowed_content_types: CsvList = ()
    decrypt_download_path: Path = Path("./downloads")
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: str | None = None
    shutdown_grace: Duration = 30.0

    audit_url: SecretStr | None = None
    """`sqlite:///path` or `postgresql://…`; unset: no audit trail. May hold a password: a secret."""
    audit_spool_dir: Path | None = None
    """Unset: `{DECRYPT_DOWNLOAD_PATH}/.audit-spool/{NATS_CONSUMER_NAME}`; see `audit_spool_path`."""
    audit_spool_max: int = Field(default=100_000, ge=1)
    audit_anchor_stream: str = "AUDIT_ANCHORS"
    """Empty: no anchors. The stream, its permissions and what verify makes of it: audit/anchors.py."""
    audit_anchor_subject: str = "audit.anchors"
    audit_anchor_interval: PositiveDuration = 60.0
    audit_signing_key: SecretStr | None = None
    audit_verify_key: str | None = None
    audit_retention: Duration | None = None

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """Defaults that follow another variable, when the operator left them unset (absent or empty).

        - DEDUPE_BUCKET: `{NATS_CONSUMER_NAME}_done`, so that consumers of one stream never take each
          other's records for their own (`file_processor` keeps its `file_processor_done`);
        - FETCH_TIMEOUT: 5 s, or half of ACK_WAIT when that is shorter (`ACK_WAIT=5s` alone is valid).
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
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
    def replay_subject(self) -> str:
        """Where `dlq replay` puts a dead letter of this consumer back: only this consumer's filter has it."""
        return replay_subject(self.nats_subject, self.nats_consumer_name)

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


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; any problem becomes a ConfigError naming the variable (never its value)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(variable, message) from None
