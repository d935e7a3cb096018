"""What `transcribe` reads from its TRANSCRIBE_* variables, checked at start."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from uploads_consumer.config import PositiveDuration
from uploads_consumer.errors import ConfigError
from uploads_consumer.processors import ProcessorSettings

_SUBJECT = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")
_STREAM = re.compile(r"^[A-Za-z0-9_-]+$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
COMPUTE_TYPES = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


class TranscribeSettings(ProcessorSettings):
    backend: Literal["faster-whisper", "openai"] = Field(
        default="faster-whisper", description="faster-whisper (local) or openai (an HTTP API)"
    )
    model: str = Field(
        default="",
        description="faster-whisper (required): a CTranslate2 model directory, or a name (tiny.en, small, large-v3)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="faster-whisper: auto, cpu or cuda")
    compute_type: str = Field(
        default="auto", description="faster-whisper: auto (the fastest the device has), int8, float16, … (CTranslate2)"
    )
    language: str = Field(default="", description="a language code such as en; empty: detect it")
    beam_size: int = Field(default=5, ge=1, le=20, description="faster-whisper: beam search width")
    vad: bool = Field(
        default=True,
        description="faster-whisper: recognise the speech Silero VAD finds, in windows of TRANSCRIBE_WINDOW_SECONDS",
    )
    window_seconds: float = Field(
        default=20.0,
        ge=10.0,
        le=30.0,
        description="faster-whisper with VAD: the most speech a window holds, 10 to 30 s (20: less memory than 30)",
    )
    trim_windows: bool = Field(
        default=True,
        description="faster-whisper with VAD: encode a window at its own length (plus 3 s) rather than padded to 30 s",
    )
    concurrency: int = Field(default=1, ge=1, le=64, description="transcriptions at once in this process")
    cpu_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="faster-whisper: threads per transcription (1: the least CPU; 0: usable cores / concurrency, at most 4)",
    )
    api_url: str = Field(default="", description="openai (required): base URL, e.g. https://api.openai.com/v1")
    api_key: SecretStr | None = Field(default=None, description="openai: bearer token")
    api_model: str = Field(default="whisper-1", description="openai: the model the server should use")
    api_timeout: PositiveDuration = Field(default=600.0, description="openai: longest request; longer is transient")
    timeout: PositiveDuration = Field(
        default="2h",
        validate_default=True,
        description="longest one transcription may take, decoding included; longer is retried PROCESSOR_TIMEOUT_RETRIES times, then processor_timeout",
    )
    max_duration: PositiveDuration = Field(
        default="4h",
        validate_default=True,
        description="longest audio transcribed (from the WAV's header, before recognition); longer is resource_limit",
    )
    result_subject: str = Field(
        default="audio.transcription.result", description="where the result message goes; empty: not published"
    )
    result_stream_name: str = Field(default="TRANSCRIPTIONS", description="the stream that stores result messages")

    empty_is_a_value = frozenset({"result_subject"})  # TRANSCRIBE_RESULT_SUBJECT= turns publishing off

    @field_validator("compute_type")
    @classmethod
    def _compute_type(cls, value: str) -> str:
        if value.lower() not in COMPUTE_TYPES:
            raise ValueError(f"must be one of {', '.join(COMPUTE_TYPES)}")
        return value.lower()

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value and not _LANGUAGE.match(value.lower()):
            raise ValueError("must be a language code such as en, de, es (or empty to detect it)")
        return value.lower()

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL, e.g. https://api.openai.com/v1")
        return value.rstrip("/")

    @field_validator("result_subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        if value and not _SUBJECT.match(value):
            raise ValueError("must be a NATS subject without wildcards, e.g. audio.transcription.result")
        return value

    @field_validator("result_stream_name")
    @classmethod
    def _stream(cls, value: str) -> str:
        if not _STREAM.match(value):
            raise ValueError("must be a stream name: letters, digits, - and _")
        return value

    @model_validator(mode="after")
    def _backend_needs(self) -> TranscribeSettings:
        if self.backend == "faster-whisper" and not self.model:
            raise ConfigError(
                "TRANSCRIBE_MODEL",
                "is required with the faster-whisper backend: a CTranslate2 model directory, "
                "or a model name such as tiny.en, small, large-v3",
            )
        if self.backend == "openai" and not self.api_url:
            raise ConfigError(
                "TRANSCRIBE_API_URL", "is required with TRANSCRIBE_BACKEND=openai, e.g. https://api.openai.com/v1"
            )
        return self
