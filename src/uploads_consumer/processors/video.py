"""The built-in `video` processor: what a video is (probed), a poster frame, and optionally a short preview.

ffmpeg does the work, the same binary and the same sandbox as `transcode` (its run_ffmpeg: no shell,
a session of its own, none of the daemon's variables in its environment, only the `file` protocol,
a wall-clock limit), with limits of its own on top:
- only the demuxers of common video containers (VIDEO_DEMUXERS): a list such as `ffconcat` or a
  playlist in disguise cannot make it read other files, and rarer demuxers never see the upload;
- a frame over VIDEO_MAX_PIXELS is `too_large`, judged from the header before a frame is decoded,
  and the decoder is told the same limit;
- each ffmpeg run has VIDEO_CPU_LIMIT seconds of CPU time (RLIMIT_CPU) and VIDEO_TIMEOUT of wall
  time, and what it writes a size cap.

ffmpeg's own description of the input is the probe (the imageio-ffmpeg build has no ffprobe): the
container, duration, overall bit rate, and the first video stream's codec, size, frame rate and
rotation, and every audio track. A video with audio goes on to `transcode` and `transcribe` like
any other; one without is skipped by them. A file that is not a video at all (no video stream: an
MP4 holding only sound) is skipped here.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from uploads_consumer.config import PositiveDuration, parse_duration
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError
from uploads_consumer.observability import get_logger
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    StepSkipped,
    variable_prefix,
)
from uploads_consumer.processors.save import place_file
from uploads_consumer.processors.transcode import (
    NOT_ON_WHITELIST,
    RESOURCE_ERRORS,
    VIDEO_DEMUXERS,
    FfmpegRun,
    InputAudio,
    ask_ffmpeg,
    ffmpeg_version,
    find_ffmpeg,
    parse_audio_stream,
    run_ffmpeg,
)

log = get_logger("uploads_consumer.processors.video")

POSTER_AT_CAP = 10.0  # a poster time given as a share of the duration is at most this many seconds in
POSTER_MAX_BYTES = 16 << 20
PREVIEW_MAX_BYTES = 32 << 20
ENCODERS = {"webp": "libwebp", "jpeg": "mjpeg"}
EXTENSIONS = {"webp": "webp", "jpeg": "jpg"}
_INPUT = re.compile(r"^Input #0, (.+), from ")
_DURATION = re.compile(r"^\s+Duration: (?:N/A|(\d+):(\d\d):(\d\d(?:\.\d+)?)).*?, bitrate: (?:N/A|(\d+) kb/s)")
_STREAM = re.compile(r"^\s*Stream #0:\d+\S*: (Video|Audio): (.*)$")
_SIZE = re.compile(r"(?:^|, )(\d{1,6})x(\d{1,6})(?=[ ,]|$)")
_RATE = re.compile(r", (\d+(?:\.\d+)?)(k?) (fps|tbr)\b")
_ROTATION = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees")
UnreadableVideo = PermanentError | RetryableError


def _poster_at(value: Any) -> str:
    text = str(value).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise ValueError("expected a share of the duration such as 10% or a time such as 3s") from None
        if not 0 <= share <= 100:
            raise ValueError("a share of the duration is between 0% and 100%")
    else:
        parse_duration(text)
    return text


class VideoSettings(ProcessorSettings):
    ffmpeg: str | None = Field(
        default=None, description="the ffmpeg binary (default: the one imageio-ffmpeg bundles, else ffmpeg on PATH)"
    )
    poster_at: str = Field(
        default="10%",
        description=f"when the poster frame is taken: a share of the duration (at most {POSTER_AT_CAP:g}s in), or a time such as 3s",
    )
    poster_size: int = Field(default=1280, ge=16, le=8192, description="the poster's longest side (never enlarged)")
    poster_format: Literal["webp", "jpeg"] = Field(default="webp", description="webp or jpeg")
    preview: bool = Field(default=False, description="also make a short silent H.264 MP4 from the start")
    preview_seconds: PositiveDuration = Field(default="3s", validate_default=True, description="the preview's length")
    preview_size: int = Field(default=480, ge=16, le=4096, description="the preview's longest side (never enlarged)")
    max_pixels: int = Field(
        default=40_000_000, ge=1, description="larger frames (width × height from the header) are too_large, undecoded"
    )
    timeout: PositiveDuration = Field(
        default="2m",
        validate_default=True,
        description="longest one ffmpeg run may take; longer is retried PROCESSOR_TIMEOUT_RETRIES times, then processor_timeout",
    )
    cpu_limit: PositiveDuration = Field(
        default="60s", validate_default=True, description="CPU time one ffmpeg run may use; more is resource_limit"
    )

    @field_validator("poster_at", mode="before")
    @classmethod
    def _when(cls, value: Any) -> str:
        return _poster_at(value)


@dataclass(frozen=True)
class VideoStream:
    codec: str | None
    width: int | None
    height: int | None
    frame_rate: float | None
    rotation: float | None = None


@dataclass(frozen=True)
class Probe:
    """What ffmpeg says of the input: the first video stream (none for sound alone) and the audio tracks."""

    container: str | None = None
    duration: float | None = None
    bit_rate: int | None = None
    video: VideoStream | None = None
    audio: list[InputAudio] = field(default_factory=list)


def parse_video_stream(description: str) -> VideoStream:
    """`h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 320x240 [SAR 1:1 DAR 4:3], 47 kb/s, 25 fps, …`
    → h264, 320×240, 25 frames a second."""
    codec = description.split(" ", 1)[0].rstrip(",") or None
    size = _SIZE.search(description)
    rates = {kind: float(value) * (1000 if k else 1) for value, k, kind in _RATE.findall(description)}
    rate = rates.get("fps", rates.get("tbr"))
    return VideoStream(
        codec=codec,
        width=int(size.group(1)) if size else None,
        height=int(size.group(2)) if size else None,
        frame_rate=round(rate, 3) if rate else None,
    )


def parse_probe(lines: list[str]) -> Probe:
    """ffmpeg's description of input #0 (the lines FfmpegRun.described keeps) → a Probe."""
    container = duration = bit_rate = video = None
    audio: list[InputAudio] = []
    rotation: float | None = None
    in_input = False
    for line in lines:
        if match := _INPUT.match(line):
            container, in_input = match.group(1), True
        elif line.startswith(("Output #", "Input #")):
            in_input = False
        elif not in_input:
            continue
        elif match := _DURATION.match(line):
            if match.group(1) is not None:
                hours, minutes, seconds = match.group(1, 2, 3)
                duration = round(int(hours) * 3600 + int(minutes) * 60 + float(seconds), 3)
            bit_rate = int(match.group(4)) * 1000 if match.group(4) else None
        elif match := _STREAM.match(line):
            kind, description = match.groups()
            if kind == "Audio":
                audio.append(parse_audio_stream(description))
            elif video is None and "(attached pic)" not in description:  # cover art is not the video
                video = parse_video_stream(description)
        elif video is not None and rotation is None and (match := _ROTATION.search(line)):
            rotation = float(match.group(1))
    if video is not None and rotation is not None:
        video = VideoStream(video.codec, video.width, video.height, video.frame_rate, rotation)
    return Probe(container, duration, bit_rate, video, audio)


def output_size(lines: list[str]) -> tuple[int | None, int | None]:
    """The size ffmpeg says it wrote (its `Output #0` video stream)."""
    in_output = False
    for line in lines:
        if line.startswith("Output #0"):
            in_output = True
        elif in_output and (match := _STREAM.match(line)) and match.group(1) == "Video":
            stream = parse_video_stream(match.group(2))
            return stream.width, stream.height
    return None, None


def poster_time(setting: str, duration: float | None, frame_rate: float | None) -> float:
    """Seconds into the video for the poster: a share of the duration (at most POSTER_AT_CAP) or a time,
    kept before the last frame; 0 when the duration is unknown."""
    if not duration:
        return 0.0
    at = min(duration * float(setting[:-1]) / 100, POSTER_AT_CAP) if setting.endswith("%") else parse_duration(setting)
    last = duration - (1 / frame_rate if frame_rate else 0.1)
    return round(max(0.0, min(at, last)), 3)


def fit(longest: int, even: bool = False) -> str:
    """Square pixels, then at most `longest` on the longer side, never enlarged (the filters for -vf)."""
    return (
        f"scale=iw*sar:ih,setsar=1,scale=w='min({longest},iw)':h='min({longest},ih)'"
        f":force_original_aspect_ratio=decrease{':force_divisible_by=2' if even else ''}"
    )


class Video(Processor):
    """Probes videos with ffmpeg (container, duration, codecs, size, frame rate, bit rate, audio tracks),
    and writes a poster frame (and with VIDEO_PREVIEW a short H.264 preview) beside the saved upload.

    Corrupt or unreadable video is unsupported_media; frames over VIDEO_MAX_PIXELS are too_large; a
    file without a video stream is skipped.
    """

    settings_class = VideoSettings
    needs = Need.PLAINTEXT
    content_types = ("video/*",)
    settings: VideoSettings

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        self.prefix = variable_prefix(name)
        self.ffmpeg = ""

    async def start(self) -> None:
        variable = f"{self.prefix}FFMPEG"
        self.ffmpeg = find_ffmpeg(self.settings.ffmpeg, variable)
        version = await ffmpeg_version(self.ffmpeg, variable)
        needed = [(f"{self.prefix}POSTER_FORMAT", ENCODERS[self.settings.poster_format])]
        if self.settings.preview:
            needed.append((f"{self.prefix}PREVIEW", "libx264"))
        for setting, encoder in needed:
            if "is not recognized" in await ask_ffmpeg(self.ffmpeg, ["-h", f"encoder={encoder}"], variable):
                raise ConfigError(setting, f"the ffmpeg at {variable} has no {encoder} encoder")
        log.info("video: using ffmpeg", path=self.ffmpeg, version=version, preview=self.settings.preview)

    async def run(self, ctx: ProcessingContext) -> None:
        name = ctx.metadata.clean_filename
        probe = await self._probe(ctx.plaintext_path, name)
        if probe.video is None:
            raise StepSkipped(f"video: {name} has no video stream")
        stream = probe.video
        if stream.width and stream.height and stream.width * stream.height > self.settings.max_pixels:
            raise PermanentError(
                ErrorClass.TOO_LARGE,
                f"video: {name} has {stream.width}×{stream.height} frames, over {self.prefix}MAX_PIXELS "
                f"({self.settings.max_pixels} pixels)",
            )
        ctx.report("container", probe.container)
        ctx.report("duration_seconds", probe.duration)
        ctx.report("bit_rate", probe.bit_rate)
        ctx.report("video_codec", stream.codec)
        ctx.report("width", stream.width)
        ctx.report("height", stream.height)
        ctx.report("frame_rate", stream.frame_rate)
        if stream.rotation is not None:
            ctx.report("rotation", stream.rotation)
        ctx.report(
            "audio_tracks",
            [{"codec": a.codec, "sample_rate": a.sample_rate, "channels": a.channels} for a in probe.audio],
        )
        at = poster_time(self.settings.poster_at, probe.duration, stream.frame_rate)
        poster, at, (width, height) = await self._poster(ctx, name, at)
        ctx.report("poster_path", str(poster))
        ctx.report("poster_at", at)
        ctx.report("poster_width", width)
        ctx.report("poster_height", height)
        if self.settings.preview:
            preview, seconds = await self._preview(ctx, name, probe.duration)
            ctx.report("preview_path", str(preview))
            ctx.report("preview_seconds", seconds)

    async def _ffmpeg(self, args: list[str]) -> FfmpegRun:
        deadline = asyncio.get_running_loop().time() + self.settings.timeout
        return await run_ffmpeg(
            self.ffmpeg,
            ["-hide_banner", "-nostdin", "-nostats", *args],
            deadline,
            self.settings.timeout,
            who="video",
            timeout_variable=f"{self.prefix}TIMEOUT",
            cpu_limit=self.settings.cpu_limit,
            cpu_variable=f"{self.prefix}CPU_LIMIT",
        )

    def _input(self, source: Path, at: float = 0.0, seconds: float | None = None) -> list[str]:
        """The sandboxed input: local files only, known video demuxers only, frames within the pixel limit."""
        args = ["-protocol_whitelist", "file", "-format_whitelist", VIDEO_DEMUXERS]
        args += ["-max_pixels", str(min(self.settings.max_pixels, 2**31 - 1))]
        if at:
            args += ["-ss", f"{at:.3f}"]
        if seconds is not None:
            args += ["-t", f"{seconds:.3f}"]
        return [*args, "-i", str(source)]

    async def _probe(self, source: Path, name: str) -> Probe:
        run = await self._ffmpeg(self._input(source))  # no output: ffmpeg describes the input and stops
        if not run.opened:
            raise self._unreadable(run, source, name)
        return parse_probe(run.described)

    def _unreadable(self, run: FfmpegRun, source: Path, name: str) -> UnreadableVideo:
        if run.says(*RESOURCE_ERRORS):
            return RetryableError(f"video: {run.reason(source, name)}")
        if run.says(NOT_ON_WHITELIST):
            return PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"video: {name} is not in a video container it opens")
        return PermanentError(
            ErrorClass.UNSUPPORTED_MEDIA, f"video: ffmpeg cannot read {name}: {run.reason(source, name)}"
        )

    async def _poster(self, ctx: ProcessingContext, name: str, at: float) -> tuple[Path, float, tuple[Any, Any]]:
        kind = self.settings.poster_format
        target = ctx.work_dir / f"poster.{EXTENSIONS[kind]}"
        quality = ["-quality", "80"] if kind == "webp" else ["-q:v", "3"]
        run = FfmpegRun()
        for when in (at, 0.0) if at else (0.0,):  # past the last decodable frame: the first one instead
            args = [*self._input(ctx.plaintext_path, at=when), "-map", "0:v:0", "-frames:v", "1"]
            args += ["-vf", fit(self.settings.poster_size), "-map_metadata", "-1", "-fs", str(POSTER_MAX_BYTES)]
            args += ["-c:v", ENCODERS[kind], *quality, "-f", "webp" if kind == "webp" else "mjpeg", "-y", str(target)]
            run = await self._ffmpeg(args)
            if run.returncode == 0 and _size(target):
                placed = await self._place(ctx, target, f"{name}.poster.{EXTENSIONS[kind]}")
                return placed, when, output_size(run.described)
            if run.says(*RESOURCE_ERRORS):
                break
        if run.returncode:
            raise self._unreadable(run, ctx.plaintext_path, name)
        raise PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"video: ffmpeg decoded no frame of {name}")

    async def _preview(self, ctx: ProcessingContext, name: str, duration: float | None) -> tuple[Path, float]:
        seconds = min(self.settings.preview_seconds, duration) if duration else self.settings.preview_seconds
        target = ctx.work_dir / "preview.mp4"
        args = [*self._input(ctx.plaintext_path, seconds=seconds), "-map", "0:v:0", "-an", "-sn", "-dn"]
        args += ["-vf", fit(self.settings.preview_size, even=True), "-c:v", "libx264", "-preset", "veryfast"]
        args += ["-crf", "28", "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-map_metadata", "-1"]
        args += ["-fs", str(PREVIEW_MAX_BYTES), "-f", "mp4", "-y", str(target)]
        run = await self._ffmpeg(args)
        if run.returncode != 0 or not _size(target):
            raise self._unreadable(run, ctx.plaintext_path, name)
        return await self._place(ctx, target, f"{name}.preview.mp4"), round(seconds, 3)

    async def _place(self, ctx: ProcessingContext, made: Path, filename: str) -> Path:
        return await asyncio.to_thread(
            place_file, ctx.download_path, ctx.event.email, ctx.event.file_uuid, filename, made, _size(made)
        )


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
