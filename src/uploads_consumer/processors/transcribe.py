"""The built-in `transcribe` processor: speech to text, saved beside the upload and published.

Backends: `faster-whisper` (local inference with CTranslate2, the default; transcribe_local.py)
or `openai`, any server that speaks OpenAI's `POST /audio/transcriptions` (transcribe_api.py).
The input is the WAV `transcode` made when it ran earlier in the chain, else the plaintext.

For each upload: `{name}.txt`, `{name}.srt` and `{name}.json` (the result message) are written
atomically beside the saved upload, then the result message is published to
TRANSCRIBE_RESULT_SUBJECT with `Nats-Msg-Id: {event_id}:transcription`. Publishing is an external
effect: once done it is recorded, and a redelivery of the upload does not publish it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from uploads_consumer.config import PositiveDuration
from uploads_consumer.errors import ConfigError
from uploads_consumer.events import FileUploadEvent
from uploads_consumer.observability import PREFIX
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    StepSkipped,
)
from uploads_consumer.processors.save import place_bytes
from uploads_consumer.processors.transcode import (
    NoAudioStream,
    find_ffmpeg,
    found_no_audio,
    read_pcm_wav,
    skipped_if_video,
    to_wav,
)

DECODE_TIMEOUT = 600.0  # longest ffmpeg run turning an upload `transcode` did not convert into a WAV
MAX_OUTPUT_TEXT = 10_000  # characters of the transcript in the result event; the files hold all of it
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
    compute_type: str = Field(default="default", description="faster-whisper: int8, float16, float32, … (CTranslate2)")
    language: str = Field(default="", description="a language code such as en; empty: detect it")
    beam_size: int = Field(default=5, ge=1, le=20, description="faster-whisper: beam search width")
    vad: bool = Field(default=True, description="faster-whisper: skip non-speech (Silero VAD)")
    concurrency: int = Field(default=1, ge=1, le=64, description="transcriptions at once in this process")
    cpu_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="faster-whisper: threads per transcription (0: usable cores / concurrency, at most 4)",
    )
    api_url: str = Field(default="", description="openai (required): base URL, e.g. https://api.openai.com/v1")
    api_key: SecretStr | None = Field(default=None, description="openai: bearer token")
    api_model: str = Field(default="whisper-1", description="openai: the model the server should use")
    api_timeout: PositiveDuration = Field(default=600.0, description="openai: longest request; longer is transient")
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


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]

    @property
    def word_count(self) -> int:
        return len(self.text.split())


class Backend(Protocol):
    async def start(self) -> None: ...

    async def transcribe(self, audio: Path, filename: str, content_type: str) -> Transcript:
        """Raises PermanentError (media it cannot use, a request refused) or RetryableError."""
        ...

    async def close(self) -> None: ...


def result_message(event: FileUploadEvent, transcript: Transcript) -> dict[str, Any]:
    """The message on TRANSCRIBE_RESULT_SUBJECT, field for field as the upload backend's design has it."""
    return {
        "event_id": event.event_id,
        "file_uuid": event.file_uuid,
        "transcription": transcript.text,
        "language": transcript.language,
        "duration_seconds": round(transcript.duration, 3),
        "word_count": transcript.word_count,
        "segments": [
            {"start_time": round(s.start, 3), "end_time": round(s.end, 3), "text": s.text} for s in transcript.segments
        ],
        "timestamp": int(time.time() * 1000),
        "status": "SUCCESS",
    }


def _srt_time(seconds: float) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def to_srt(segments: tuple[Segment, ...]) -> str:
    """SubRip subtitles: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    return "".join(
        f"{i}\n{_srt_time(s.start)} --> {_srt_time(s.end)}\n{s.text}\n\n" for i, s in enumerate(segments, start=1)
    )


def is_empty_audio(path: Path, transcoded: bool) -> bool:
    """An empty upload, or a transcoded WAV without a single sample: nothing to recognise."""
    if os.stat(path).st_size == 0:
        return True
    if transcoded:
        wav = read_pcm_wav(path)
        return wav is not None and wav.frames == 0
    return False


class Transcribe(Processor):
    """Speech to text with Whisper: saves .txt, .srt and .json beside the upload and publishes the result.

    The backend is faster-whisper (a local model, loaded once at start) or any server that speaks
    OpenAI's /audio/transcriptions. The result message goes to TRANSCRIBE_RESULT_SUBJECT once per
    upload; audio without speech is a success with an empty transcription.
    """

    settings_class = TranscribeSettings
    needs = Need.PLAINTEXT
    content_types = ("audio/*", "video/*")
    external_effect = True
    settings: TranscribeSettings

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._audio_seconds = env.counter(PREFIX + "audio_seconds", "Seconds of audio transcribed.").labels(
            env.consumer
        )
        self._backend: Backend
        self._ffmpeg: str | None = None  # faster-whisper: decodes what `transcode` did not convert
        if self.settings.backend == "openai":
            from uploads_consumer.processors.transcribe_api import WhisperApi

            self._backend = WhisperApi(self.settings, env.max_retry_delay)
        else:
            from uploads_consumer.processors.transcribe_local import FasterWhisper

            self._backend = FasterWhisper(self.settings)

    async def start(self) -> None:
        if self.settings.backend == "faster-whisper":
            try:
                self._ffmpeg = find_ffmpeg(None)
            except ConfigError:
                raise ConfigError(
                    "TRANSCRIBE_BACKEND",
                    "faster-whisper needs an ffmpeg to decode uploads on disk (not whole in memory): "
                    "pip install 'uploads-consumer[media]', or put ffmpeg on PATH",
                ) from None
        await self._backend.start()

    async def close(self) -> None:
        await self._backend.close()

    def streams(self) -> list[tuple[str, str]]:
        subject = self.settings.result_subject
        return [(self.settings.result_stream_name, subject)] if subject else []

    async def run(self, ctx: ProcessingContext) -> None:
        transcoded = "audio" in ctx.files
        if not transcoded and (reason := found_no_audio(ctx)):
            raise StepSkipped(f"no audio to transcribe ({reason})")
        audio = ctx.files.get("audio", ctx.plaintext_path)
        name = ctx.metadata.clean_filename
        if is_empty_audio(audio, transcoded):
            transcript = Transcript("", self.settings.language, 0.0, ())
        else:
            if not transcoded and self._ffmpeg is not None:
                # A WAV on disk is read a piece at a time; decoding the upload in memory would hold all
                # of its audio at once (230 MB an hour).
                wav = ctx.work_dir / "transcribe.wav"
                try:
                    await to_wav(
                        self._ffmpeg,
                        audio,
                        wav,
                        name,
                        normalize=False,
                        timeout=DECODE_TIMEOUT,
                        logger=ctx.log,
                        who="transcribe",
                        timeout_variable="its time limit",
                    )
                except NoAudioStream as exc:
                    raise skipped_if_video(ctx, exc) from None
                audio, transcoded = wav, True
            filename, content_type = (f"{name}.wav", "audio/wav") if transcoded else (name, ctx.content_type)
            async with self._slots:
                began = time.monotonic()
                transcript = await self._backend.transcribe(audio, filename, content_type)
            ctx.log.info(
                "transcribed",
                audio_s=round(transcript.duration, 3),
                took_s=round(time.monotonic() - began, 3),
                words=transcript.word_count,
                language=transcript.language,
            )
        message = result_message(ctx.event, transcript)
        body = json.dumps(message, ensure_ascii=False).encode("utf-8")
        paths = await asyncio.to_thread(self._write_files, ctx, transcript, body)
        subject = self.settings.result_subject
        if subject and self.env.publish is not None:
            await self.env.publish(subject, body, {"Nats-Msg-Id": f"{ctx.event.event_id}:transcription"})
        self._audio_seconds.inc(transcript.duration)
        text = transcript.text
        ctx.report("text", text[:MAX_OUTPUT_TEXT])
        if len(text) > MAX_OUTPUT_TEXT:
            ctx.report("text_truncated", True)
        ctx.report("language", transcript.language)
        ctx.report("duration_seconds", message["duration_seconds"])
        ctx.report("word_count", transcript.word_count)
        for kind, path in paths.items():
            ctx.report(f"{kind}_path", str(path))

    def _write_files(self, ctx: ProcessingContext, transcript: Transcript, body: bytes) -> dict[str, Path]:
        name = ctx.metadata.clean_filename
        text = transcript.text + "\n" if transcript.text else ""
        outputs = {"txt": text.encode("utf-8"), "srt": to_srt(transcript.segments).encode("utf-8"), "json": body}
        return {
            kind: place_bytes(
                ctx.download_path, ctx.work_dir, ctx.event.email, ctx.event.file_uuid, f"{name}.{kind}", data
            )
            for kind, data in outputs.items()
        }
