"""The `video` processor with the real ffmpeg: in-process for its behaviours, then through the daemon with
`transcode` and `transcribe` after it. Every clip is made here by ffmpeg (testsrc, sine, espeak-ng speech)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import pyvips
from helpers import (
    dead_letters,
    publish_uploads,
    read_stream,
    refused_setting,
    results_by_event,
    wait_ready,
    wait_settled,
)
from prometheus_client import CollectorRegistry
from speech import GO_FORWARD, context, ffmpeg, ffmpeg_children, heard, model_path, synthesise, wait_for_ffmpeg

from uploads_consumer.errors import (
    ConfigError,
    ErrorClass,
    PermanentError,
    ProcessorTimeout,
    ResourceLimit,
    RetryableError,
)
from uploads_consumer.processors import ProcessorEnvironment, StepSkipped, load_processor
from uploads_consumer.processors.transcode import run_ffmpeg
from uploads_consumer.processors.video import Video, VideoSettings, parse_probe, poster_time

VARIABLES = [f"VIDEO_{name.upper()}" for name in VideoSettings.model_fields]


def clip(
    path: Path, seconds: float = 2, size: str = "320x240", rate: int = 25, audio: str | Path | None = None
) -> Path:
    """testsrc as H.264 in MP4, its colours turning once round the wheel over the clip (so that every
    moment looks different); with `audio` "sine" (a 440 Hz tone, mono 44.1 kHz) or a WAV as its AAC track."""
    args = [ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error"]
    args += ["-f", "lavfi", "-i", f"testsrc=d={seconds}:s={size}:r={rate},hue=H=2*PI*t/{seconds}"]
    if audio == "sine":
        args += ["-f", "lavfi", "-i", f"sine=f=440:d={seconds}:sample_rate=44100"]
    elif audio is not None:
        args += ["-i", str(audio), "-shortest"]
    if audio is not None:
        args += ["-c:a", "aac"]
    args += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", "-y", str(path)]
    subprocess.run(args, check=True, capture_output=True)
    return path


def frame_at(video: Path, seconds: float, width: int, target: Path) -> pyvips.Image:
    """The frame ffmpeg itself decodes at `seconds`, as a PNG `width` wide, to compare posters with."""
    args = [ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-ss", str(seconds), "-i", str(video)]
    args += ["-frames:v", "1", "-vf", f"scale={width}:-1", "-y", str(target)]
    subprocess.run(args, check=True, capture_output=True)
    return pyvips.Image.new_from_file(str(target))


def difference(a: pyvips.Image, b: pyvips.Image) -> float:
    return float((a[:3].cast("float") - b[:3].cast("float")).abs().avg())


async def video_processor(monkeypatch, tmp_path: Path, **variables: str) -> Video:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = ProcessorEnvironment(tmp_path / "downloads", ("video",), 30, CollectorRegistry())
    loaded = load_processor("video", env)
    await loaded.start()
    assert isinstance(loaded.instance, Video)
    return loaded.instance


async def probe(processor: Video, path: Path, tmp_path: Path, content_type: str = "video/mp4", name: str | None = None):
    ctx = context(path, tmp_path / "work", name, content_type=content_type)
    ctx.download_path = tmp_path / "downloads"
    ctx.current = "video"
    await processor.run(ctx)
    return ctx.outputs["video"]


# ---- what ffmpeg says, parsed ----------------------------------------------------------------------

PHONE_CLIP = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from '/data/.incoming/plain-1.part':
  Duration: 00:01:02.53, start: 0.000000, bitrate: 17029 kb/s
  Stream #0:0[0x1](eng): Video: hevc (Main) (hvc1 / 0x31637668), yuv420p(tv, bt709), 1920x1080, 16864 kb/s, 29.97 fps, 29.97 tbr, 600 tbn (default)
      displaymatrix: rotation of -90.00 degrees
  Stream #0:1[0x2](eng): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 159 kb/s (default)
  Stream #0:2[0x3](und): Video: mjpeg (Baseline), yuvj420p(pc), 320x240, 90k tbr, 90k tbn (attached pic)
Output #0, webp, to 'poster.webp':
  Stream #0:0: Video: webp, yuv420p(tv, progressive), 1280x720, q=2-31, 200 kb/s, 29.97 fps"""


def test_ffmpegs_description_of_a_phone_clip_is_the_probe():
    found = parse_probe(PHONE_CLIP.splitlines())
    assert (found.container, found.duration, found.bit_rate) == ("mov,mp4,m4a,3gp,3g2,mj2", 62.53, 17_029_000)
    video = found.video
    assert video is not None
    assert (video.codec, video.width, video.height, video.frame_rate, video.rotation) == (
        "hevc",
        1920,
        1080,
        29.97,
        -90,
    )
    assert [(a.codec, a.sample_rate, a.channels) for a in found.audio] == [("aac", 48000, 2)]


def test_a_stream_without_duration_or_bitrate_is_probed_without_them():
    found = parse_probe(
        [
            "Input #0, h264, from 'x':",
            "  Duration: N/A, bitrate: N/A",
            "  Stream #0:0: Video: h264 (High), yuv420p(progressive), 640x360, 25 fps, 1200k tbr, 1200k tbn",
        ]
    )
    assert (found.duration, found.bit_rate, found.video.frame_rate, found.audio) == (None, None, 25.0, [])


@pytest.mark.parametrize(
    ("setting", "duration", "rate", "at"),
    [
        ("10%", 4.0, 25, 0.4),
        ("10%", 600.0, 25, 10.0),  # a share is at most 10 s in
        ("50%", 60.0, 25, 10.0),
        ("3s", 60.0, 25, 3.0),
        ("3s", 2.0, 25, 1.96),  # past the end: the last frame
        ("10%", None, 25, 0.0),  # unknown duration: the first frame
    ],
)
def test_the_poster_time(setting, duration, rate, at):
    assert poster_time(setting, duration, rate) == at


# ---- the processor, in-process -----------------------------------------------------------------------


async def test_probe_figures_are_exact_and_the_poster_is_the_frame_at_its_time(tmp_path, monkeypatch):
    video = clip(tmp_path / "talk.mp4", seconds=4, audio="sine")
    processor = await video_processor(monkeypatch, tmp_path, VIDEO_POSTER_SIZE="160")
    out = await probe(processor, video, tmp_path)
    expected_rate = video.stat().st_size * 8 // 4 // 1000 * 1000  # ffmpeg: size over duration, in whole kb/s
    assert {k: v for k, v in out.items() if not k.startswith("poster")} == {
        "container": "mov,mp4,m4a,3gp,3g2,mj2",
        "duration_seconds": 4.0,
        "bit_rate": expected_rate,
        "video_codec": "h264",
        "width": 320,
        "height": 240,
        "frame_rate": 25.0,
        "audio_tracks": [{"codec": "aac", "sample_rate": 44100, "channels": 1}],
    }
    assert (out["poster_at"], out["poster_width"], out["poster_height"]) == (0.4, 160, 120)
    poster = Path(out["poster_path"])
    assert poster.name == "talk.mp4.poster.webp" and poster.parent.parent == tmp_path / "downloads" / "user@example.com"
    image = pyvips.Image.new_from_file(str(poster))
    assert (image.width, image.height, image.get("vips-loader")) == (160, 120, "webpload")
    at_its_time = difference(image, frame_at(video, 0.4, 160, tmp_path / "at.png"))
    elsewhere = [difference(image, frame_at(video, t, 160, tmp_path / f"{t}.png")) for t in (0.0, 0.8, 2.0)]
    print(f"poster against the frame at 0.4 s: {at_its_time:.1f}; at 0, 0.8 and 2 s: {elsewhere}")
    assert at_its_time < min(elsewhere) / 2, (at_its_time, elsewhere)


async def test_a_phone_clip_says_its_rotation_and_its_poster_is_upright(tmp_path, monkeypatch):
    stored = clip(tmp_path / "stored.mp4", seconds=1)
    turned = tmp_path / "phone.mp4"  # the same frames, with a display matrix saying "turn by 90°", as a phone writes
    args = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-display_rotation", "90", "-i", str(stored)]
    subprocess.run([*args, "-c", "copy", "-y", str(turned)], check=True, capture_output=True)
    out = await probe(await video_processor(monkeypatch, tmp_path, VIDEO_POSTER_SIZE="160"), turned, tmp_path)
    assert (out["width"], out["height"], out["rotation"]) == (320, 240, 90.0)
    assert (out["poster_width"], out["poster_height"]) == (120, 160)


async def test_a_preview_is_a_short_small_silent_h264_mp4(tmp_path, monkeypatch):
    video = clip(tmp_path / "talk.mp4", seconds=3, audio="sine")
    processor = await video_processor(
        monkeypatch,
        tmp_path,
        VIDEO_PREVIEW="true",
        VIDEO_PREVIEW_SECONDS="1s",
        VIDEO_PREVIEW_SIZE="100",
        VIDEO_POSTER_FORMAT="jpeg",
    )
    out = await probe(processor, video, tmp_path)
    assert Path(out["poster_path"]).name == "talk.mp4.poster.jpg"
    assert pyvips.Image.new_from_file(out["poster_path"]).get("vips-loader") == "jpegload"
    assert out["preview_seconds"] == 1.0 and Path(out["preview_path"]).name == "talk.mp4.preview.mp4"
    preview = await probe(await video_processor(monkeypatch, tmp_path), Path(out["preview_path"]), tmp_path)
    assert (preview["video_codec"], preview["width"], preview["height"]) == ("h264", 100, 76)
    assert preview["audio_tracks"] == [] and 0.9 <= preview["duration_seconds"] <= 1.1


async def test_a_file_with_sound_and_no_picture_is_skipped(tmp_path, monkeypatch):
    sound = tmp_path / "voice.mp4"
    args = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac"]
    subprocess.run([*args, "-y", str(sound)], check=True, capture_output=True)
    with pytest.raises(StepSkipped) as caught:
        await probe(await video_processor(monkeypatch, tmp_path), sound, tmp_path)
    assert caught.value.reason == "video: voice.mp4 has no video stream"


async def test_frames_over_the_pixel_limit_are_too_large_before_decoding(tmp_path, monkeypatch):
    processor = await video_processor(monkeypatch, tmp_path, VIDEO_MAX_PIXELS="76799")
    with pytest.raises(PermanentError) as caught:
        await probe(processor, clip(tmp_path / "hd.mp4"), tmp_path)
    assert caught.value.error_class is ErrorClass.TOO_LARGE
    assert caught.value.reason == "video: hd.mp4 has 320×240 frames, over VIDEO_MAX_PIXELS (76799 pixels)"
    assert not (tmp_path / "downloads").exists()


def cut_short(video: Path, target: Path) -> Path:
    """The first half of an MP4: its index (the moov atom, written last) is gone."""
    whole = video.read_bytes()
    target.write_bytes(whole[: len(whole) // 2])
    return target


async def test_a_corrupt_file_is_unsupported_media_with_ffmpegs_reason(tmp_path, monkeypatch):
    corrupt = cut_short(clip(tmp_path / "holiday.mp4"), tmp_path / "plain.part")
    with pytest.raises(PermanentError) as caught:
        await probe(await video_processor(monkeypatch, tmp_path), corrupt, tmp_path, name="holiday.mp4")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason.startswith("video: ffmpeg cannot read holiday.mp4: ")
    assert "Invalid data found" in caught.value.reason and str(corrupt) not in caught.value.reason


async def test_a_list_of_other_files_is_not_opened(tmp_path, monkeypatch):
    # An ffconcat list is recognised by its content, and names files beside it: the work folder holds
    # other uploads' plaintext. Only the demuxers of video containers may read an upload.
    clip(tmp_path / "someone-elses.part")
    playlist = tmp_path / "plain-2.part"
    playlist.write_text("ffconcat version 1.0\nfile someone-elses.part\n")
    with pytest.raises(PermanentError) as caught:
        await probe(await video_processor(monkeypatch, tmp_path), playlist, tmp_path, name="clip.mp4")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason == "video: clip.mp4 is not in a video container it opens"


async def test_each_ffmpeg_run_gets_the_cpu_time_limit(tmp_path, monkeypatch):
    fifo = tmp_path / "stuck.mp4"  # ffmpeg waits on it for as long as we like
    os.mkfifo(fifo)
    processor = await video_processor(monkeypatch, tmp_path, VIDEO_CPU_LIMIT="7s")
    task = asyncio.ensure_future(probe(processor, fifo, tmp_path))
    pid = await wait_for_ffmpeg()
    cpu = await cpu_time_limit_once_set(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cpu == ["7", "7"]
    assert ffmpeg_children() == []


async def cpu_time_limit_once_set(pid: int, timeout: float = 10) -> list[str]:
    """The soft and hard RLIMIT_CPU of a process, once they are no longer unlimited (or when `timeout` ends).

    The limit is set a moment after the start, and the child shows in /proc before the start returns."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + timeout
    while True:
        limits = Path(f"/proc/{pid}/limits").read_text()
        [cpu] = [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max cpu time")]
        if cpu != ["unlimited", "unlimited"] or loop.time() > ends:
            return cpu
        await asyncio.sleep(0.01)


async def test_ffmpeg_over_its_cpu_time_limit_is_stopped_and_the_upload_is_a_resource_limit_naming_it():
    loop = asyncio.get_running_loop()
    busy = ["-f", "lavfi", "-i", "testsrc2=s=1920x1080:d=600", "-f", "null", "-"]
    began = loop.time()
    with pytest.raises(ResourceLimit) as caught:
        await run_ffmpeg(ffmpeg(), busy, began + 60, 60, who="video", cpu_limit=1, cpu_variable="VIDEO_CPU_LIMIT")
    assert caught.value.error_class is ErrorClass.RESOURCE_LIMIT
    assert caught.value.reason == (
        "video: ffmpeg used all of VIDEO_CPU_LIMIT (1s of CPU time) on this file; raise VIDEO_CPU_LIMIT to process it"
    )
    assert loop.time() - began < 10


async def test_ffmpeg_killed_sooner_than_it_could_use_its_cpu_time_is_transient_not_the_files_fault():
    # The OOM killer, or an operator: nothing says the file would do it again.
    loop = asyncio.get_running_loop()
    busy = ["-f", "lavfi", "-i", "testsrc2=s=1920x1080:d=600", "-f", "null", "-"]
    task = asyncio.ensure_future(
        run_ffmpeg(ffmpeg(), busy, loop.time() + 60, 60, who="video", cpu_limit=60, cpu_variable="VIDEO_CPU_LIMIT")
    )
    os.kill(await wait_for_ffmpeg(), signal.SIGKILL)
    with pytest.raises(RetryableError) as caught:
        await task
    assert not isinstance(caught.value, ResourceLimit)
    assert caught.value.reason == "video: ffmpeg was killed by SIGKILL"


async def test_ffmpeg_over_its_wall_clock_time_is_a_processor_timeout_naming_the_variable(tmp_path, monkeypatch):
    fifo = tmp_path / "stuck.mp4"  # ffmpeg waits on it: no CPU used, only time
    os.mkfifo(fifo)
    processor = await video_processor(monkeypatch, tmp_path, VIDEO_TIMEOUT="1s")
    with pytest.raises(ProcessorTimeout) as caught:
        await probe(processor, fifo, tmp_path)
    assert caught.value.variable == "VIDEO_TIMEOUT"
    assert caught.value.reason == "video: ffmpeg did not finish within VIDEO_TIMEOUT (1s)"
    assert ffmpeg_children() == []


@pytest.mark.parametrize(
    ("variables", "variable", "words"),
    [
        ({"VIDEO_POSTER_AT": "soon"}, "VIDEO_POSTER_AT", "expected a duration"),
        ({"VIDEO_POSTER_AT": "120%"}, "VIDEO_POSTER_AT", "between 0% and 100%"),
        ({"VIDEO_POSTER_FORMAT": "gif"}, "VIDEO_POSTER_FORMAT", "'webp' or 'jpeg'"),
        ({"VIDEO_POSTER_SIZE": "0"}, "VIDEO_POSTER_SIZE", "greater than or equal to 16"),
        ({"VIDEO_CPU_LIMIT": "0"}, "VIDEO_CPU_LIMIT", "greater than zero"),
    ],
)
def test_each_invalid_setting_is_a_configuration_error_naming_its_variable(monkeypatch, variables, variable, words):
    refused = refused_setting(monkeypatch, "video", VideoSettings, **variables)
    assert refused.variable == variable
    assert words in refused.reason


async def test_video_ffmpeg_that_does_not_exist_is_refused_at_start(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        await video_processor(monkeypatch, tmp_path, VIDEO_FFMPEG="/nonexistent/ffmpeg")
    assert caught.value.variable == "VIDEO_FFMPEG"


# ---- through the daemon, with transcode and transcribe after it -------------------------------------


async def test_a_meeting_gets_its_transcript_a_silent_film_skips_the_audio_steps_and_a_liar_its_sniffed_type(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    made = tmp_path / "in"
    made.mkdir()
    meeting = clip(made / "meeting.mp4", seconds=3, audio=synthesise(GO_FORWARD, tmp_path / "speech"))
    silent = clip(made / "screen.mp4", seconds=2)
    corrupt = cut_short(clip(tmp_path / "whole.mp4"), made / "broken.mp4")
    liar = made / "holiday.mp4"  # a PNG, whatever its name says
    pyvips.Image.black(64, 48, bands=3).pngsave(str(liar))
    daemon = start_daemon(PROCESSORS="save,image,video,transcode,transcribe", TRANSCRIBE_MODEL=model_path())
    await wait_ready(daemon, nats_server.url)
    events = await publish_uploads(settings_for(), [meeting, silent, corrupt, liar])
    await wait_settled(nats_server.url, len(events), daemon=daemon, timeout=120)
    assert daemon.terminate() == 0
    results = {e: r[0] for e, r in results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED")).items()}
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    talk, film, broken, png = (e.event_id for e in events)

    assert results[talk]["processors"] == ["save", "video", "transcode", "transcribe"]
    out = results[talk]["outputs"]
    assert (out["video"]["width"], out["video"]["height"], out["video"]["video_codec"]) == (320, 240, "h264")
    assert [a["codec"] for a in out["video"]["audio_tracks"]] == ["aac"]
    assert Path(out["video"]["poster_path"]).exists()
    assert heard(out["transcribe"]["text"], GO_FORWARD), out["transcribe"]["text"]
    assert (downloads / "user@example.com" / events[0].file_uuid / "meeting.mp4.txt").exists()

    assert film not in dead, "a video without sound is not unsupported media"
    assert results[film]["processors"] == ["save", "video"]
    assert results[film]["skipped"] == ["image", "transcode", "transcribe"]
    assert results[film]["outputs"]["video"]["audio_tracks"] == []
    reasons = [json.loads(line)["reason"] for line in daemon.log_text().splitlines() if '"step skipped"' in line]
    assert reasons == [
        "transcode: screen.mp4 has no audio stream",
        "no audio to transcribe (transcode: screen.mp4 has no audio stream)",
    ]

    assert set(dead) == {broken}
    assert dead[broken]["Uploads-Error-Class"] == "unsupported_media"
    assert "video: ffmpeg cannot read broken.mp4" in dead[broken]["Uploads-Error"]

    assert results[png]["content_type"] == "image/png"
    assert (results[png]["processors"], results[png]["skipped"]) == (
        ["save", "image"],
        ["video", "transcode", "transcribe"],
    )
    assert [r["width"] for r in results[png]["outputs"]["image"]["renditions"]] == [64, 64]
