"""The `faster-whisper` backend of `transcribe`: Whisper on CTranslate2, in this process.

The model is loaded once, at start. Each transcription runs in a thread of its own (CTranslate2
releases the GIL), never on the event loop; the processor lets TRANSCRIBE_CONCURRENCY run at once.
While one runs, the daemon keeps sending progress for the message, so audio of any length stays
alive. A cancelled transcription (shutdown) is abandoned: its thread stops at the next segment,
and it is a daemon thread, so the process never waits for a model in the middle of a window.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError, describe, one_line
from uploads_consumer.observability import get_logger
from uploads_consumer.processors.transcode import SAMPLE_RATE, read_pcm_wav
from uploads_consumer.processors.transcribe import Segment, Transcript

if TYPE_CHECKING:
    import numpy as np

    from uploads_consumer.processors.transcribe import TranscribeSettings

log = get_logger("uploads_consumer.processors.transcribe")
T = TypeVar("T")


class Stopped(Exception):
    """The transcription was cancelled; its thread gives up at the next segment."""


def model_reference(value: str) -> tuple[str, bool]:
    """(what to load, whether it is a local directory). A directory is checked here, so that a typo
    in a path is not sent to a model hub as a name."""
    path = Path(value).expanduser()
    if value.startswith(("/", ".", "~")) or path.exists():
        if not path.is_dir():
            raise ConfigError("TRANSCRIBE_MODEL", "no such directory")
        if not (path / "model.bin").is_file():
            raise ConfigError("TRANSCRIBE_MODEL", "the directory holds no CTranslate2 model (model.bin)")
        return str(path.resolve()), True
    return value, False  # tiny.en, large-v3, or a Hugging Face repository id: faster-whisper fetches it


async def in_daemon_thread(work: Callable[[], T], name: str) -> T:
    """Run `work` in a new daemon thread and wait for it. Cancelling the wait abandons the thread
    (unlike asyncio.to_thread, whose pool the interpreter joins at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], object]) -> None:
        if not future.done():  # not cancelled meanwhile
            outcome()

    def run() -> None:
        report: Callable[[], object]
        try:
            report = functools.partial(future.set_result, work())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            report = functools.partial(future.set_exception, exc)
        try:
            loop.call_soon_threadsafe(settle, report)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def _variable_for(problem: str) -> str:
    lowered = problem.lower()
    if "compute type" in lowered or "compute_type" in lowered:
        return "TRANSCRIBE_COMPUTE_TYPE"
    if "cuda" in lowered or "device" in lowered:
        return "TRANSCRIBE_DEVICE"
    return "TRANSCRIBE_MODEL"


def pcm_samples(path: Path) -> np.ndarray[Any, Any] | None:
    """A 16 kHz mono 16-bit WAV (what `transcode` makes) as float32 samples, read through a memory
    map: one array of 4 bytes a sample, no decoding. None for anything else."""
    import numpy as np

    wav = read_pcm_wav(path)
    if wav is None or (wav.sample_rate, wav.channels, wav.bits) != (SAMPLE_RATE, 1, 16):
        return None
    pcm = np.memmap(path, dtype="<i2", mode="r", offset=wav.data_offset, shape=(wav.frames,))
    samples: np.ndarray[Any, Any] = np.multiply(pcm, 1 / 32768, dtype=np.float32)
    return samples


class FasterWhisper:
    def __init__(self, settings: TranscribeSettings) -> None:
        self.settings = settings
        self._model: Any = None
        self._running: set[threading.Event] = set()

    async def start(self) -> None:
        s = self.settings
        try:
            import ctranslate2
            import faster_whisper  # noqa: F401
        except ImportError:
            raise ConfigError(
                "TRANSCRIBE_BACKEND", "faster-whisper is not installed: pip install 'uploads-consumer[transcribe]'"
            ) from None
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # Its per-file INFO lines repeat ours; CTranslate2 writes to stderr itself, outside our log format.
            logging.getLogger("faster_whisper").setLevel(logging.WARNING)
            ctranslate2.set_log_level(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a model fetched by name: no progress bars
        reference, local = model_reference(s.model)
        began = time.monotonic()
        try:
            self._model = await in_daemon_thread(lambda: self._load(reference), "transcribe-load")
        except Exception as exc:  # noqa: BLE001 - whatever stops the model from loading is a configuration problem
            problem = describe(exc).replace(s.model, "the model").replace(reference, "the model")
            raise ConfigError(_variable_for(problem), f"cannot load the model: {problem}") from None
        supported = list(self._model.supported_languages)
        if s.language and s.language not in supported:
            raise ConfigError(
                "TRANSCRIBE_LANGUAGE",
                "this model does not know that language"
                + (" (it is English-only: use en or leave it empty)" if supported == ["en"] else ""),
            )
        inner = self._model.model
        log.info(
            "transcription model loaded",
            model=reference if local else s.model,
            device=inner.device,
            compute_type=inner.compute_type,
            multilingual=inner.is_multilingual,
            concurrency=s.concurrency,
            took_s=round(time.monotonic() - began, 2),
        )

    def _load(self, reference: str) -> Any:
        from faster_whisper import WhisperModel

        s = self.settings
        return WhisperModel(
            reference,
            device=s.device,
            compute_type=s.compute_type,
            cpu_threads=s.cpu_threads,
            num_workers=s.concurrency,
        )

    async def transcribe(self, audio: Path, filename: str, content_type: str) -> Transcript:
        stop = threading.Event()
        self._running.add(stop)
        try:
            return await in_daemon_thread(lambda: self._transcribe(audio, filename, stop), "transcribe")
        except asyncio.CancelledError:
            stop.set()  # the thread cannot be killed; it stops at its next segment
            raise
        finally:
            self._running.discard(stop)

    def _transcribe(self, audio: Path, filename: str, stop: threading.Event) -> Transcript:
        samples = self._decode(audio, filename)
        s = self.settings
        try:
            pieces, info = self._model.transcribe(
                samples, language=s.language or None, beam_size=s.beam_size, vad_filter=s.vad
            )
            segments = []
            for piece in pieces:  # a generator: the work happens as it is consumed
                if stop.is_set():
                    raise Stopped()
                text = piece.text.strip()
                if text:
                    segments.append(Segment(float(piece.start), float(piece.end), text))
        except (Stopped, PermanentError):
            raise
        except Exception as exc:
            raise RetryableError(f"transcribe: {describe(exc)}") from exc
        text = " ".join(segment.text for segment in segments)
        return Transcript(text, info.language or "", float(info.duration), tuple(segments))

    def _decode(self, audio: Path, filename: str) -> Any:
        samples = pcm_samples(audio)
        if samples is not None:
            return samples
        import av
        from faster_whisper.audio import decode_audio

        try:
            return decode_audio(str(audio), sampling_rate=SAMPLE_RATE)
        except IndexError:  # PyAV: no audio stream to decode
            raise PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"transcribe: {filename} has no audio stream") from None
        except av.error.FFmpegError as exc:
            reason = one_line(str(exc).replace(str(audio), filename), 240)
            raise PermanentError(
                ErrorClass.UNSUPPORTED_MEDIA, f"transcribe: cannot decode {filename}: {reason}"
            ) from None

    async def close(self) -> None:
        for stop in self._running:
            stop.set()
