"""The built-in `transcode` processor: any audio or video → 16 kHz mono 16-bit WAV for Whisper.

ffmpeg does the work as a child process (no shell, its own session, a minimal environment:
it parses untrusted media, so it never sees the daemon's secrets), reading the verified plaintext
from disk and writing the WAV into the message's private work directory. With TRANSCODE_NORMALIZE,
loudness is normalised with EBU R128 `loudnorm` in the same pass; the input's and the output's
levels are measured on the way (`volumedetect`), because one-pass `loudnorm` in older FFmpeg
releases (Debian 12's 5.1) turns some clips of about 3 s nearly silent. When normalising fails or
does that, the file is converted again without it and a warning says so. It is off by default:
`loudnorm` works at 192 kHz and cost as much CPU as half of a transcription with tiny.en, and
`transcribe` brings the speech it hears to one level itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from uploads_consumer.config import PositiveDuration
from uploads_consumer.errors import (
    ConfigError,
    ErrorClass,
    PermanentError,
    ProcessorTimeout,
    ResourceLimit,
    RetryableError,
    one_line,
)
from uploads_consumer.observability import get_logger
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    StepSkipped,
    matches_any,
    variable_prefix,
)

log = get_logger("uploads_consumer.processors.transcode")

SAMPLE_RATE = 16_000
LOUDNORM = "loudnorm=I=-16:TP=-1.5:LRA=11"
AUDIBLE_DB = -60.0  # an input whose peak is below this is silence; normalising it cannot make it worse
MAX_DROP_DB = 20.0  # loudnorm never lowers a real signal's peak this much: a drop this big is the bug
HEAD_LINES = 200  # ffmpeg's description of the input comes first ...
TAIL_LINES = 100  # ... its errors and the level measurements last; the middle may be any size
DESCRIBING_LINES = 64  # the lines naming the inputs' and outputs' streams, kept wherever they come
START_TIMEOUT = 30.0
# The demuxers ffmpeg may open an upload with (its names, `ffmpeg -demuxers`). Only these: a few
# demuxers open other files by what the upload says (concat, hls, dash, imf, image2, …), so a text
# file in disguise could have another upload's plaintext read into this one's transcript; and the
# hundreds of rare formats left out see little fuzzing. `video` opens only the containers.
VIDEO_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,asf,mpeg,mpegts,ogg,m4v,h264,hevc,mxf,dv,nut,rm,ivf"
AUDIO_DEMUXERS = (
    "mp3,wav,w64,flac,ogg,aac,loas,aiff,caf,amr,ac3,eac3,dts,dtshd,truehd,mlp,ape,wv,tta,tak,mpc,mpc8,au,voc,"
    "gsm,oma,xwma,dsf,qcp"
)
MEDIA_DEMUXERS = f"{AUDIO_DEMUXERS},{VIDEO_DEMUXERS}"
NOT_ON_WHITELIST = "Format not on whitelist"  # ffmpeg's words for an input no listed demuxer opens
# Lines of ffmpeg's stderr that say something went wrong on our side, not in the file.
RESOURCE_ERRORS = ("No space left on device", "Disk quota exceeded", "Cannot allocate memory", "Permission denied")
_BOILERPLATE = re.compile(
    r"^(Conversion failed!|Exiting normally.*|Error opening (input|output) file .*\.|size=.*|video:.*)$"
)
_LOG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\] ")
_LEVEL = re.compile(r"^\[volumedetect@(input|output) @ [^\]]+\] (n_samples|max_volume): (\S+)")
_AUDIO_STREAM = re.compile(r"^\s*Stream #0:\d+\S*: Audio: (.*)$")
# Older FFmpeg releases print the display matrix as `displaymatrix: rotation of …`, newer ones `Display Matrix: …`.
_DESCRIBING = re.compile(r"^(Input #|Output #|\s+Duration: |\s*Stream #\d+:\d+|\s+(?i:display ?matrix): )")
_CHANNEL_LAYOUTS = {"mono": 1, "stereo": 2, "downmix": 2, "quad": 4, "hexagonal": 6, "octagonal": 8}


class TranscodeSettings(ProcessorSettings):
    ffmpeg: str | None = Field(
        default=None, description="the ffmpeg binary (default: the one imageio-ffmpeg bundles, else ffmpeg on PATH)"
    )
    normalize: bool = Field(
        default=False, description="EBU R128 loudness normalisation (loudnorm); transcribe levels speech itself"
    )
    timeout: PositiveDuration = Field(
        default="10m",
        validate_default=True,
        description="longest conversion of one file; longer is retried PROCESSOR_TIMEOUT_RETRIES times, then processor_timeout",
    )
    cpu_limit: PositiveDuration = Field(
        default="10m",
        validate_default=True,
        description="CPU time one ffmpeg run may use, its threads together; more is resource_limit",
    )


@dataclass(frozen=True)
class InputAudio:
    """What ffmpeg says about the input's first audio stream."""

    codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass
class FfmpegRun:
    returncode: int = 0
    head: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    opened: bool = False
    """ffmpeg could read the container and list its streams."""
    audio_stream: str | None = None
    """ffmpeg's description of the first audio stream, wherever it came in its output."""
    described: list[str] = field(default_factory=list)
    """The lines that describe the inputs and outputs (`Input #0`, `Duration:`, `Stream #0:1: …`),
    wherever they came: the first DESCRIBING_LINES of them."""

    @property
    def lines(self) -> list[str]:
        return self.head + self.tail

    @property
    def audio(self) -> InputAudio | None:
        """The first audio stream, or None when the input has none."""
        return parse_audio_stream(self.audio_stream) if self.audio_stream is not None else None

    def levels(self) -> dict[str, dict[str, float]]:
        """`volumedetect` results: {"input"|"output": {"n_samples": …, "max_volume": dB}}; the last report wins
        (ffmpeg configures a filter graph more than once and the early instances report nothing)."""
        found: dict[str, dict[str, float]] = {}
        for line in self.lines:
            match = _LEVEL.match(line)
            if match:
                with contextlib.suppress(ValueError):
                    found.setdefault(match.group(1), {})[match.group(2)] = float(match.group(3))
        return found

    def reason(self, path: Path, name: str) -> str:
        """ffmpeg's own explanation, in one line, with the private file's path replaced by the upload's name."""
        lines = [_LOG_PREFIX.sub("", line).strip() for line in self.lines[-TAIL_LINES:]]
        useful = [line for line in lines if line and not _BOILERPLATE.match(line) and not _LEVEL.match(line)]
        text = useful[-1] if useful else f"exit code {self.returncode}"
        return one_line(text.replace(str(path), name), 240)

    def says(self, *needles: str) -> bool:
        return any(needle in line for line in self.lines[-TAIL_LINES:] for needle in needles)


def parse_audio_stream(description: str) -> InputAudio:
    """`mp3 (mp3float), 22050 Hz, mono, fltp, 64 kb/s` → codec mp3, 22050 Hz, 1 channel."""
    parts = [part.strip() for part in description.split(",")]
    codec = parts[0].split(" ", 1)[0] or None
    rate = channels = None
    for i, part in enumerate(parts):
        hz = re.fullmatch(r"(\d+) Hz", part)
        if hz:
            rate = int(hz.group(1))
            if i + 1 < len(parts):
                channels = channel_count(parts[i + 1])
            break
    return InputAudio(codec, rate, channels)


def channel_count(layout: str) -> int | None:
    """ffmpeg's channel layout names: `mono`, `stereo`, `5.1(side)`, `7.1`, `3 channels` → a count."""
    name = layout.split("(", 1)[0].strip()
    if name in _CHANNEL_LAYOUTS:
        return _CHANNEL_LAYOUTS[name]
    if match := re.fullmatch(r"(\d+)\.(\d+)", name):
        return int(match.group(1)) + int(match.group(2))
    if match := re.fullmatch(r"(\d+) channels?", name):
        return int(match.group(1))
    return None


def normalisation_problem(levels: dict[str, dict[str, float]]) -> str | None:
    """Why a normalised output cannot be used (audible input made silent or nearly so), or None."""
    before = levels.get("input", {}).get("max_volume")
    after = levels.get("output", {})
    if before is None or before <= AUDIBLE_DB:
        return None  # silence in, silence out: nothing was lost
    if not after.get("n_samples") or "max_volume" not in after:
        return "it produced no audio"
    if after["max_volume"] < before - MAX_DROP_DB:
        return f"it lowered the peak level from {before:g} dB to {after['max_volume']:g} dB"
    return None


NO_AUDIO_STREAM = "has no audio stream"


class NoAudioStream(PermanentError):
    """ffmpeg opened the file and found no audio stream in it (`unsupported_media` unless caught)."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorClass.UNSUPPORTED_MEDIA, reason)


@dataclass(frozen=True)
class PcmWav:
    sample_rate: int
    channels: int
    bits: int
    data_offset: int
    frames: int


def read_pcm_wav(path: Path) -> PcmWav | None:
    """The layout of a plain PCM WAV file (header only), or None when `path` is not one."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        fmt: tuple[int, int, int, int] | None = None
        while len(chunk := f.read(8)) == 8:
            kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if kind == b"fmt ":
                body = f.read(size + (size & 1))
                if len(body) < 16:
                    return None
                tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                fmt = (tag, channels, rate, bits)
            elif kind == b"data":
                if fmt is None or fmt[0] != 1 or not fmt[1] or fmt[3] % 8:
                    return None
                offset = f.tell()
                available = os.fstat(f.fileno()).st_size - offset
                frames = min(size, available) // (fmt[1] * fmt[3] // 8)
                return PcmWav(fmt[2], fmt[1], fmt[3], offset, frames)
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)
    return None


def write_empty_wav(path: Path) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)


def find_ffmpeg(configured: str | None, variable: str = "TRANSCODE_FFMPEG") -> str:
    """`configured` (the processor's `variable`) if set; else the binary imageio-ffmpeg bundles;
    else `ffmpeg` on PATH."""
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise ConfigError(variable, "not found or not executable")
        return found
    try:
        import imageio_ffmpeg

        bundled: str | None = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        bundled = None
    if bundled and (found := shutil.which(bundled)):
        return found
    if found := shutil.which("ffmpeg"):
        return found
    raise ConfigError(
        variable,
        "no ffmpeg found: pip install 'uploads-consumer[media]' (it bundles one), install ffmpeg, "
        f"or set {variable} to the binary",
    )


async def ask_ffmpeg(binary: str, args: list[str], variable: str) -> str:
    """What ffmpeg prints for `args` (`-version`, `-h encoder=libwebp`, …); at start, so a problem
    is a ConfigError naming `variable`, the setting that chose the binary."""
    loop = asyncio.get_running_loop()
    try:
        run = await run_ffmpeg(binary, ["-hide_banner", *args], loop.time() + START_TIMEOUT, START_TIMEOUT, stdout=True)
    except RetryableError as exc:
        raise ConfigError(variable, exc.reason.removeprefix("transcode: ")) from None
    return "\n".join(run.lines)


async def ffmpeg_version(binary: str, variable: str) -> str:
    """The version `binary` reports; a binary that does not answer as ffmpeg does is a ConfigError."""
    version = re.match(r"ffmpeg version (\S+)", await ask_ffmpeg(binary, ["-version"], variable))
    if version is None:
        raise ConfigError(variable, "the binary does not answer `-version` as ffmpeg does")
    return version.group(1)


def _child_environment() -> dict[str, str]:
    """ffmpeg parses untrusted media: it gets no variable of ours (keys, credentials), only these."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


async def _collect(stream: asyncio.StreamReader, run: FfmpegRun, tail: deque[str]) -> None:
    """Keep the first and the last lines of a stream of any length (bounded memory), and the lines
    that describe the input wherever they come (a long metadata tag can push them far down)."""
    pending = b""
    while chunk := await stream.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        pending = pending[-8192:]  # one absurdly long line must not grow without bound
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.startswith("Input #0"):
                run.opened = True
            elif run.audio_stream is None and (match := _AUDIO_STREAM.match(line)):
                run.audio_stream = match.group(1)
            if len(run.described) < DESCRIBING_LINES and _DESCRIBING.match(line):
                run.described.append(line)
            (run.head.append if len(run.head) < HEAD_LINES else tail.append)(line)
    if pending:
        tail.append(pending.decode("utf-8", "replace"))


async def run_ffmpeg(
    binary: str,
    args: list[str],
    deadline: float,
    timeout: float,
    stdout: bool = False,
    who: str = "transcode",
    timeout_variable: str = "TRANSCODE_TIMEOUT",
    cpu_limit: float | None = None,
    cpu_variable: str = "",
) -> FfmpegRun:
    """Run ffmpeg until it exits or the loop time `deadline` passes; killed when cancelled or late.

    Its stderr (and its stdout too when `stdout`, for `-version` and `-h`) is collected in a bounded way.
    With `cpu_limit`, the kernel stops it after that many seconds of CPU time (RLIMIT_CPU, all its
    threads together; `cpu_variable` names the setting).
    Raises ResourceLimit when it used up `cpu_limit` (the file's doing), ProcessorTimeout when it ran
    out of time (`timeout_variable`; perhaps a busy host), RetryableError when it cannot be started
    or another signal killed it; each reason starts with `who` (the processor that ran it).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout else subprocess.PIPE,
            env=_child_environment(),
            start_new_session=True,  # a Ctrl-C on the terminal is the daemon's to handle, not ffmpeg's
        )
    except OSError as exc:
        raise RetryableError(f"{who}: cannot run ffmpeg: {exc.strerror or exc}") from None
    if cpu_limit is not None:
        # Set from here, a moment after the start (a preexec_fn is unsafe in a process with threads).
        # Soft and hard limits equal: SIGKILL at the limit (ffmpeg takes SIGXCPU for a polite stop,
        # and can keep its encoder threads busy well past it).
        seconds = max(1, round(cpu_limit))
        with contextlib.suppress(ProcessLookupError):  # it may have ended already
            resource.prlimit(proc.pid, resource.RLIMIT_CPU, (seconds, seconds))
    run = FfmpegRun()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    began = time.monotonic()
    try:
        output = proc.stdout if stdout else proc.stderr
        assert output is not None
        async with asyncio.timeout_at(deadline):
            await _collect(output, run, tail)
            run.returncode = await proc.wait()
    except TimeoutError:
        raise ProcessorTimeout(
            timeout_variable, f"{who}: ffmpeg did not finish within {timeout_variable} ({timeout:g}s)"
        ) from None
    finally:
        if proc.returncode is None:  # cancelled (shutdown) or late: never leave it running
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if run.returncode < 0:
        killer = signal.Signals(-run.returncode).name
        if cpu_limit is not None and killer == "SIGKILL" and could_use(cpu_limit, time.monotonic() - began):
            raise ResourceLimit(
                cpu_variable,
                f"{who}: ffmpeg used all of {cpu_variable} ({cpu_limit:g}s of CPU time) on this file; "
                f"raise {cpu_variable} to process it",
            )
        raise RetryableError(f"{who}: ffmpeg was killed by {killer}")
    run.tail = list(tail)
    return run


def could_use(cpu_seconds: float, wall_seconds: float) -> bool:
    """Whether a process could have used `cpu_seconds` of CPU time in `wall_seconds` on the cores this
    one may use: a SIGKILL sooner than that was not the CPU limit's (the OOM killer, an operator)."""
    cores = len(os.sched_getaffinity(0))
    return wall_seconds * cores >= max(1, round(cpu_seconds)) * 0.9


def filter_graph(normalize: bool) -> str:
    """The first audio stream → mono 16 kHz s16, normalised and measured on the way when `normalize`."""
    whisper = f"aresample={SAMPLE_RATE},aformat=sample_fmts=s16:sample_rates={SAMPLE_RATE}:channel_layouts=mono"
    if not normalize:
        return f"[0:a:0]{whisper}[out]"
    return (
        "[0:a:0]asplit=2[measure][main];[measure]volumedetect@input,anullsink;"
        f"[main]aformat=channel_layouts=mono,{LOUDNORM},{whisper},volumedetect@output[out]"
    )


def ffmpeg_arguments(source: Path, target: Path, normalize: bool) -> list[str]:
    return [
        "-hide_banner",
        "-nostdin",
        "-nostats",
        # Only local files, and only media demuxers: a playlist or reference file in disguise can make
        # ffmpeg neither fetch URLs nor read other files.
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        MEDIA_DEMUXERS,
        "-i",
        str(source),
        "-filter_complex",
        filter_graph(normalize),
        "-map",
        "[out]",
        "-map_metadata",
        "-1",
        "-fflags",
        "+bitexact",
        "-flags:a",
        "+bitexact",
        "-c:a",
        "pcm_s16le",
        "-f",
        "wav",
        "-y",
        str(target),
    ]


class Transcode(Processor):
    """Converts audio and video to 16 kHz mono 16-bit WAV with ffmpeg, loudness-normalised (EBU R128) if asked.

    The WAV goes to the message's work directory as `files["audio"]`, for `transcribe`. Reports
    the duration and the input's codec, sample rate and channels. Undecodable media, or audio
    without an audio stream, is dead-lettered `unsupported_media`; a video without one is skipped.
    """

    settings_class = TranscodeSettings
    needs = Need.PLAINTEXT
    content_types = ("audio/*", "video/*")
    settings: TranscodeSettings

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        self.ffmpeg = ""
        self.normalize = self.settings.normalize
        self.prefix = variable_prefix(name)

    async def start(self) -> None:
        self.ffmpeg = find_ffmpeg(self.settings.ffmpeg, f"{self.prefix}FFMPEG")
        version = await ffmpeg_version(self.ffmpeg, f"{self.prefix}FFMPEG")
        if self.normalize and "Unknown filter" in await ask_ffmpeg(
            self.ffmpeg, ["-h", "filter=loudnorm"], f"{self.prefix}FFMPEG"
        ):
            log.warning("this ffmpeg has no loudnorm filter: audio is transcoded without loudness normalisation")
            self.normalize = False
        log.info("transcode: using ffmpeg", path=self.ffmpeg, version=version, normalize=self.normalize)

    async def run(self, ctx: ProcessingContext) -> None:
        target = ctx.work_dir / "audio.wav"
        normalized = False
        source = InputAudio()
        if ctx.size == 0:  # an empty upload is empty audio: a success with nothing in it
            await asyncio.to_thread(write_empty_wav, target)
        else:
            try:
                source, normalized = await self._convert(ctx, target)
            except NoAudioStream as exc:
                raise skipped_if_video(ctx, exc) from None
        wav = read_pcm_wav(target)
        if wav is None:
            raise RetryableError("transcode: ffmpeg reported success but its WAV output is unreadable")
        if wav.frames == 0 and ctx.size:
            raise PermanentError(
                ErrorClass.UNSUPPORTED_MEDIA, f"transcode: ffmpeg decoded no audio from {ctx.metadata.clean_filename}"
            )
        ctx.files["audio"] = target
        ctx.report("duration_seconds", round(wav.frames / wav.sample_rate, 3))
        ctx.report("codec", source.codec)
        ctx.report("sample_rate", source.sample_rate)
        ctx.report("channels", source.channels)
        ctx.report("normalized", normalized)

    async def _convert(self, ctx: ProcessingContext, target: Path) -> tuple[InputAudio, bool]:
        return await to_wav(
            self.ffmpeg,
            ctx.plaintext_path,
            target,
            ctx.metadata.clean_filename,
            self.normalize,
            self.settings.timeout,
            ctx.log,
            timeout_variable=f"{self.prefix}TIMEOUT",
            cpu_limit=self.settings.cpu_limit,
            cpu_variable=f"{self.prefix}CPU_LIMIT",
        )


async def to_wav(
    ffmpeg: str,
    source: Path,
    target: Path,
    name: str,
    normalize: bool,
    timeout: float,
    logger: Any,
    who: str = "transcode",
    timeout_variable: str = "TRANSCODE_TIMEOUT",
    cpu_limit: float | None = None,
    cpu_variable: str = "TRANSCODE_CPU_LIMIT",
) -> tuple[InputAudio, bool]:
    """`source` (an upload called `name`) → 16 kHz mono 16-bit WAV at `target`; returns the input's
    description and whether it was normalised. Undecodable input is `unsupported_media`; `timeout`
    bounds the whole conversion, `cpu_limit` each ffmpeg run (see run_ffmpeg)."""
    deadline = asyncio.get_running_loop().time() + timeout

    async def run_it(normalizing: bool) -> FfmpegRun:
        args = ffmpeg_arguments(source, target, normalizing)
        return await run_ffmpeg(
            ffmpeg,
            args,
            deadline,
            timeout,
            who=who,
            timeout_variable=timeout_variable,
            cpu_limit=cpu_limit,
            cpu_variable=cpu_variable,
        )

    run = await run_it(normalize)
    normalized = normalize
    if normalize and run.audio is not None and not run.says(*RESOURCE_ERRORS):
        if run.returncode != 0:
            problem: str | None = f"ffmpeg failed with it ({run.reason(source, name)})"
        else:
            problem = normalisation_problem(run.levels())
        if problem is not None:
            logger.warning("transcode: loudness normalisation dropped for this file", reason=problem)
            run = await run_it(False)
            normalized = False
    if run.returncode == 0:
        return run.audio or InputAudio(), normalized
    if run.says(*RESOURCE_ERRORS):
        raise RetryableError(f"{who}: {run.reason(source, name)}")
    if run.opened and run.audio is None:
        raise NoAudioStream(f"{who}: {name} {NO_AUDIO_STREAM}")
    if run.says(NOT_ON_WHITELIST):
        raise PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"{who}: {name} is not in an audio or video format it opens")
    raise PermanentError(
        ErrorClass.UNSUPPORTED_MEDIA, f"{who}: ffmpeg cannot decode {name}: {run.reason(source, name)}"
    )


def skipped_if_video(ctx: ProcessingContext, exc: NoAudioStream) -> PermanentError | StepSkipped:
    """A video without sound is a video, and not for a step that wants its audio: that step is
    skipped. Audio without an audio stream is broken: it stays `unsupported_media`."""
    return StepSkipped(exc.reason) if matches_any(ctx.content_type, ("video/*",)) else exc


def found_no_audio(ctx: ProcessingContext) -> str | None:
    """Why an earlier step skipped this upload for want of an audio stream, if one did."""
    return next((reason for reason in ctx.skipped.values() if reason.endswith(NO_AUDIO_STREAM)), None)
