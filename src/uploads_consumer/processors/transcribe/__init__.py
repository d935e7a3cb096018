"""The built-in `transcribe` processor: speech to text, saved beside the upload and published.

Backends: `faster-whisper` (local inference with CTranslate2, the default; local.py) or `openai`,
any server that speaks OpenAI's `POST /audio/transcriptions` (api.py). Both take their settings
(settings.py) and return a Transcript (transcript.py); neither imports this module.
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
import time
from pathlib import Path
from typing import Any, Protocol

from uploads_consumer.errors import ConfigError, ProcessorTimeout, ResourceLimit
from uploads_consumer.events import FileUploadEvent
from uploads_consumer.messages import Segment as MessageSegment
from uploads_consumer.messages import TranscriptionHeaders, TranscriptionMessage
from uploads_consumer.observability import PREFIX
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    StepSkipped,
    variable_prefix,
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
from uploads_consumer.processors.transcribe.settings import TranscribeSettings
from uploads_consumer.processors.transcribe.transcript import Segment, Transcript

__all__ = ["Segment", "Transcribe", "TranscribeSettings", "Transcript", "result_message", "to_srt"]

MAX_OUTPUT_TEXT = 10_000  # characters of the transcript in the result event; the files hold all of it


class Backend(Protocol):
    async def start(self) -> None: ...

    async def transcribe(self, audio: Path, filename: str, content_type: str) -> Transcript:
        """Raises PermanentError (media it cannot use, a request refused) or RetryableError."""
        ...

    async def close(self) -> None: ...


def result_message(event: FileUploadEvent, transcript: Transcript) -> dict[str, Any]:
    """The message on TRANSCRIBE_RESULT_SUBJECT, field for field as the upload backend's design has it."""
    return TranscriptionMessage(
        event_id=event.event_id,
        file_uuid=event.file_uuid,
        transcription=transcript.text,
        language=transcript.language,
        duration_seconds=round(transcript.duration, 3),
        word_count=transcript.word_count,
        segments=[
            MessageSegment(start_time=round(s.start, 3), end_time=round(s.end, 3), text=s.text)
            for s in transcript.segments
        ],
        timestamp=int(time.time() * 1000),
    ).model_dump(mode="json")


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
        self.prefix = variable_prefix(name)
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._audio_seconds = env.counter(PREFIX + "audio_seconds", "Seconds of audio transcribed.").labels(
            env.consumer
        )
        self._backend: Backend
        self._ffmpeg: str | None = None  # faster-whisper: decodes what `transcode` did not convert
        if self.settings.backend == "openai":
            from uploads_consumer.processors.transcribe.api import WhisperApi

            self._backend = WhisperApi(self.settings, env.max_retry_delay)
        else:
            from uploads_consumer.processors.transcribe.local import FasterWhisper

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
            timer = asyncio.timeout(self.settings.timeout)
            try:
                async with timer:
                    transcript = await self._recognise(ctx, audio, transcoded, name)
            except TimeoutError:
                if not timer.expired():
                    raise
                raise ProcessorTimeout(
                    f"{self.prefix}TIMEOUT",
                    f"transcribe: {name} took longer than {self.prefix}TIMEOUT ({self.settings.timeout:g}s)",
                ) from None
        message = result_message(ctx.event, transcript)
        body = json.dumps(message, ensure_ascii=False).encode("utf-8")
        paths = await asyncio.to_thread(self._write_files, ctx, transcript, body)
        subject = self.settings.result_subject
        if subject and self.env.publish is not None:
            headers = TranscriptionHeaders(msg_id=f"{ctx.event.event_id}:transcription")
            await self.env.publish(subject, body, headers.headers())
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

    async def _recognise(self, ctx: ProcessingContext, audio: Path, transcoded: bool, name: str) -> Transcript:
        """The upload's speech as text, within TRANSCRIBE_MAX_DURATION (TRANSCRIBE_TIMEOUT is the caller's)."""
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
                    timeout=self.settings.timeout,
                    logger=ctx.log,
                    who="transcribe",
                    timeout_variable=f"{self.prefix}TIMEOUT",
                )
            except NoAudioStream as exc:
                raise skipped_if_video(ctx, exc) from None
            audio, transcoded = wav, True
        if transcoded:
            self._check_duration(audio, name)
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
        return transcript

    def _check_duration(self, wav: Path, name: str) -> None:
        """Audio longer than TRANSCRIBE_MAX_DURATION is the upload's doing: resource_limit, before any work."""
        layout = read_pcm_wav(wav)
        if layout is None or not layout.sample_rate:
            return
        seconds = layout.frames / layout.sample_rate
        limit = self.settings.max_duration
        if seconds > limit:
            raise ResourceLimit(
                f"{self.prefix}MAX_DURATION",
                f"transcribe: {name} is {seconds:.0f}s of audio, over {self.prefix}MAX_DURATION ({limit:g}s); "
                f"raise {self.prefix}MAX_DURATION to transcribe it",
            )

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
