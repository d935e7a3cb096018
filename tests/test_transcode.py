"""The `transcode` processor with the real ffmpeg: in-process for its behaviours, then through the daemon."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import structlog
from helpers import publish_uploads, read_stream, wait_ready, wait_settled
from prometheus_client import CollectorRegistry
from speech import (
    GO_FORWARD,
    context,
    encode,
    ffmpeg,
    ffmpeg_children,
    speech_mp3,
    synthesise,
    video,
    wait_for_ffmpeg,
    wav_seconds,
)

from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, RetryableError
from uploads_consumer.processors import ProcessorEnvironment, StepSkipped, load_processor
from uploads_consumer.processors.transcode import (
    Transcode,
    channel_count,
    find_ffmpeg,
    normalisation_problem,
    parse_audio_stream,
)

VARIABLES = ("TRANSCODE_FFMPEG", "TRANSCODE_NORMALIZE", "TRANSCODE_TIMEOUT", "TRANSCODE_CONTENT_TYPES")


async def transcoder(monkeypatch, **variables: str) -> Transcode:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = ProcessorEnvironment(
        download_path=Path("/nonexistent"), chain=("transcode",), max_retry_delay=30, registry=CollectorRegistry()
    )
    loaded = load_processor("transcode", env)
    await loaded.start()
    assert isinstance(loaded.instance, Transcode)
    return loaded.instance


async def transcode(
    processor: Transcode, plaintext: Path, work: Path, name: str | None = None, content_type: str = "audio/mpeg"
):
    ctx = context(plaintext, work, name, content_type=content_type)
    ctx.current = "transcode"
    await processor.run(ctx)
    return ctx


def wav_layout(path: Path) -> tuple[int, int, int]:
    with wave.open(str(path)) as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth()


def peak_db(path: Path) -> float:
    """The peak level of a 16-bit WAV in dBFS."""
    with wave.open(str(path)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return float(20 * np.log10(max(1, int(np.abs(samples.astype(np.int32)).max())) / 32768))


# ---- what ffmpeg says, parsed -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "codec", "rate", "channels"),
    [
        ("mp3 (mp3float), 22050 Hz, mono, fltp, 64 kb/s, start 0.050113", "mp3", 22050, 1),
        ("pcm_s16le ([1][0][0][0] / 0x0001), 44100 Hz, stereo, s16, 1411 kb/s", "pcm_s16le", 44100, 2),
        ("aac (LC) (mp4a / 0x6134706D), 48000 Hz, 5.1(side), fltp, 384 kb/s (default)", "aac", 48000, 6),
        ("opus, 48000 Hz, 3 channels, fltp", "opus", 48000, 3),
        ("vorbis, 44100 Hz, quad, fltp, 160 kb/s", "vorbis", 44100, 4),
    ],
)
def test_the_input_stream_description_gives_codec_rate_and_channels(description, codec, rate, channels):
    parsed = parse_audio_stream(description)
    assert (parsed.codec, parsed.sample_rate, parsed.channels) == (codec, rate, channels)


def test_an_unknown_channel_layout_is_no_count_rather_than_a_guess():
    assert channel_count("ambisonic 1") is None
    assert channel_count("7.1(wide)") == 8


def test_normalisation_that_lowers_audible_speech_by_tens_of_decibels_is_refused():
    # The levels FFmpeg 5.1 (Debian 12) measured for a 2.8 s espeak-ng clip with one-pass loudnorm.
    levels = {"input": {"n_samples": 61_000, "max_volume": -1.8}, "output": {"n_samples": 44_555, "max_volume": -31.9}}
    assert "from -1.8 dB to -31.9 dB" in normalisation_problem(levels)


def test_normalisation_of_ordinary_speech_is_kept():
    levels = {"input": {"n_samples": 34_828, "max_volume": -2.5}, "output": {"n_samples": 25_272, "max_volume": -1.6}}
    assert normalisation_problem(levels) is None


def test_normalisation_that_produced_no_audio_from_audible_input_is_refused():
    assert normalisation_problem({"input": {"n_samples": 9000, "max_volume": -6.0}, "output": {"n_samples": 0}})


def test_silence_normalised_to_silence_is_not_a_problem():
    levels = {"input": {"n_samples": 48_000, "max_volume": -91.0}, "output": {"n_samples": 16_000, "max_volume": -91.0}}
    assert normalisation_problem(levels) is None


# ---- conversions with the real ffmpeg ------------------------------------------------------------


async def test_mp3_speech_becomes_16khz_mono_16bit_wav_with_the_input_described(tmp_path, monkeypatch):
    mp3 = speech_mp3(GO_FORWARD, tmp_path)
    ctx = await transcode(await transcoder(monkeypatch), mp3, tmp_path / "work")
    audio = ctx.files["audio"]
    assert audio.parent == tmp_path / "work"
    assert wav_layout(audio) == (16_000, 1, 2)
    out = ctx.outputs["transcode"]
    assert (out["codec"], out["sample_rate"], out["channels"], out["normalized"]) == ("mp3", 22050, 1, False)
    assert out["duration_seconds"] == round(wav_seconds(audio), 3), "what was written"
    # The spoken WAV the MP3 was made from, give or take the MP3 encoder's padding.
    assert out["duration_seconds"] == pytest.approx(wav_seconds(tmp_path / "synth" / "speech.mp3.wav"), abs=0.06)


async def test_stereo_aac_is_described_as_it_was_and_mixed_down_to_mono(tmp_path, monkeypatch):
    wav = synthesise(GO_FORWARD, tmp_path)
    m4a = encode(wav, tmp_path / "stereo.m4a", "-ac", "2", "-ar", "44100", "-c:a", "aac")
    ctx = await transcode(await transcoder(monkeypatch), m4a, tmp_path / "work")
    out = ctx.outputs["transcode"]
    assert (out["codec"], out["sample_rate"], out["channels"]) == ("aac", 44100, 2)
    assert wav_layout(ctx.files["audio"]) == (16_000, 1, 2)


async def test_the_audio_of_a_video_is_extracted(tmp_path, monkeypatch):
    wav = synthesise(GO_FORWARD, tmp_path)
    clip = video(tmp_path / "clip.mp4", audio=wav, seconds=2)
    ctx = await transcode(await transcoder(monkeypatch), clip, tmp_path / "work")
    assert ctx.outputs["transcode"]["codec"] == "aac"
    assert ctx.outputs["transcode"]["duration_seconds"] > 1.0


async def test_quiet_speech_is_normalised_to_a_useful_level(tmp_path, monkeypatch):
    quiet = encode(synthesise(GO_FORWARD, tmp_path), tmp_path / "quiet.wav", "-af", "volume=-35dB")
    assert peak_db(quiet) < -30
    ctx = await transcode(await transcoder(monkeypatch, TRANSCODE_NORMALIZE="true"), quiet, tmp_path / "work")
    assert peak_db(ctx.files["audio"]) > -12
    assert ctx.outputs["transcode"]["normalized"] is True


async def test_normalisation_is_off_unless_asked_for(tmp_path, monkeypatch):
    quiet = encode(synthesise(GO_FORWARD, tmp_path), tmp_path / "quiet.wav", "-af", "volume=-35dB")
    ctx = await transcode(await transcoder(monkeypatch), quiet, tmp_path / "work")
    assert abs(peak_db(ctx.files["audio"]) - peak_db(quiet)) < 2
    assert ctx.outputs["transcode"]["normalized"] is False


async def test_an_empty_upload_is_empty_audio_not_an_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    ctx = await transcode(await transcoder(monkeypatch), empty, tmp_path / "work")
    assert ctx.outputs["transcode"]["duration_seconds"] == 0
    with wave.open(str(ctx.files["audio"])) as w:
        assert (w.getnframes(), w.getframerate()) == (0, 16_000)


async def test_undecodable_input_is_unsupported_media_with_ffmpegs_reason(tmp_path, monkeypatch):
    garbage = tmp_path / "plain.part"
    garbage.write_bytes(np.random.default_rng(7).bytes(4000))
    with pytest.raises(PermanentError) as caught:
        await transcode(await transcoder(monkeypatch), garbage, tmp_path / "work", name="song.mp3")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert "Invalid data found" in caught.value.reason
    assert str(garbage) not in caught.value.reason, "the private file's path is not shown"


async def test_a_video_without_audio_is_skipped_not_unsupported_media(tmp_path, monkeypatch):
    silent = video(tmp_path / "silent-film.mp4")
    with pytest.raises(StepSkipped) as caught:
        await transcode(await transcoder(monkeypatch), silent, tmp_path / "work", content_type="video/mp4")
    assert caught.value.reason == "transcode: silent-film.mp4 has no audio stream"


async def test_audio_without_an_audio_stream_is_unsupported_media(tmp_path, monkeypatch):
    silent = video(tmp_path / "voice-note.m4a")
    with pytest.raises(PermanentError) as caught:
        await transcode(await transcoder(monkeypatch), silent, tmp_path / "work", content_type="audio/mp4")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason == "transcode: voice-note.m4a has no audio stream"


# ---- ffmpeg parses untrusted media: it gets no secrets and no network ------------------------------


async def test_ffmpeg_runs_with_no_secret_in_its_environment(tmp_path, monkeypatch):
    seen = tmp_path / "ffmpeg-environment"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(f'#!/bin/sh\nenv > {seen}\nexec {ffmpeg()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", "bWFzdGVyLWtleS10aGF0LW11c3Qtbm90LWxlYWsAAAA=")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-that-must-not-leak")
    processor = await transcoder(monkeypatch, TRANSCODE_FFMPEG=str(wrapper))
    await transcode(processor, speech_mp3(GO_FORWARD, tmp_path), tmp_path / "work")
    names = {line.split("=", 1)[0] for line in seen.read_text().splitlines() if "=" in line}
    assert "PATH" in names
    assert not names & {"ENCRYPTION_MASTER_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "NATS_URL"}, names
    assert "must-not-leak" not in seen.read_text()


async def test_a_playlist_in_disguise_cannot_make_ffmpeg_fetch_a_url(tmp_path, monkeypatch):
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # An HLS playlist, named so that ffmpeg probes it as one (the daemon names plaintext *.part, which
        # ffmpeg would not; the whitelist must hold on its own).
        playlist = tmp_path / "memo.m3u8"
        url = f"http://127.0.0.1:{server.server_address[1]}/exfiltrate"
        playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{url}/segment.ts\n#EXT-X-ENDLIST\n")
        with pytest.raises(PermanentError) as caught:
            await transcode(await transcoder(monkeypatch), playlist, tmp_path / "work")
    finally:
        server.shutdown()
        server.server_close()
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert asked == [], "ffmpeg reached out to the network"


# An ffconcat list is recognised by its content and names files beside it; the work folder holds
# other uploads' plaintext. A control character makes it binary to the sniffer, so its name decides.
CONCAT_LIST = "ffconcat version 1.0\n#\x01\nfile someone-elses.part\n"


async def test_a_list_of_other_files_is_not_opened(tmp_path, monkeypatch):
    shutil.copy(speech_mp3(GO_FORWARD, tmp_path), tmp_path / "someone-elses.part")
    listing = tmp_path / "plain-2.part"
    listing.write_text(CONCAT_LIST)
    with pytest.raises(PermanentError) as caught:
        await transcode(await transcoder(monkeypatch), listing, tmp_path / "work", name="memo.mp3")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason == "transcode: memo.mp3 is not in an audio or video format it opens"


# What a phone, a recorder or an editor writes still opens: each as the daemon names plaintext (*.part,
# so ffmpeg goes by the content alone), made by the bundled ffmpeg's encoders.
AUDIO_FORMATS = {
    "mp3": [],
    "wav": [],
    "flac": [],
    "ogg": ["-c:a", "libvorbis"],
    "opus": ["-c:a", "libopus"],
    "m4a": ["-c:a", "aac"],
    "aac": ["-c:a", "aac"],
    "aiff": [],
    "caf": ["-c:a", "alac"],
    "wv": [],
    "ac3": [],
    "amr": ["-ar", "8000"],
    "3gp": ["-c:a", "libopencore_amrnb", "-ar", "8000"],
    "mka": [],
    "webm": ["-c:a", "libopus"],
    "wma": ["-c:a", "wmav2"],
    "mp2": ["-c:a", "mp2"],
    "au": [],
}


@pytest.mark.parametrize("extension", AUDIO_FORMATS)
async def test_common_audio_formats_are_opened(tmp_path, monkeypatch, extension):
    made = tmp_path / f"tone.{extension}"
    args = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1"]
    subprocess.run([*args, "-ac", "1", *AUDIO_FORMATS[extension], "-y", str(made)], check=True, capture_output=True)
    plaintext = made.rename(tmp_path / "plain-1.part")
    ctx = await transcode(await transcoder(monkeypatch), plaintext, tmp_path / "work", name=made.name)
    assert ctx.outputs["transcode"]["duration_seconds"] == pytest.approx(1, abs=0.1)


# ---- ffmpeg stuck, killed, gone ---------------------------------------------------------------------
# A FIFO nobody writes to makes the real ffmpeg wait for its input for as long as we like.


def stuck_input(tmp_path: Path) -> Path:
    fifo = tmp_path / "stuck.mp3"
    os.mkfifo(fifo)
    return fifo


async def test_ffmpeg_over_its_timeout_is_killed_and_the_failure_is_transient(tmp_path, monkeypatch):
    processor = await transcoder(monkeypatch, TRANSCODE_TIMEOUT="1s")
    with pytest.raises(RetryableError) as caught:
        await transcode(processor, stuck_input(tmp_path), tmp_path / "work")
    assert "TRANSCODE_TIMEOUT (1s)" in caught.value.reason
    assert ffmpeg_children() == []


async def test_cancelling_a_transcode_kills_ffmpeg(tmp_path, monkeypatch):
    processor = await transcoder(monkeypatch)
    task = asyncio.ensure_future(transcode(processor, stuck_input(tmp_path), tmp_path / "work"))
    await wait_for_ffmpeg()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ffmpeg_children() == []


async def test_ffmpeg_killed_by_a_signal_is_transient(tmp_path, monkeypatch):
    processor = await transcoder(monkeypatch)
    task = asyncio.ensure_future(transcode(processor, stuck_input(tmp_path), tmp_path / "work"))
    os.kill(await wait_for_ffmpeg(), signal.SIGKILL)
    with pytest.raises(RetryableError, match="killed by SIGKILL"):
        await task


async def test_ffmpeg_gone_at_run_time_is_transient(tmp_path, monkeypatch):
    link = tmp_path / "bin" / "ffmpeg"
    link.parent.mkdir()
    link.symlink_to(ffmpeg())
    processor = await transcoder(monkeypatch, TRANSCODE_FFMPEG=str(link))
    link.unlink()  # e.g. a package upgrade in progress
    with pytest.raises(RetryableError, match="cannot run ffmpeg"):
        await transcode(processor, speech_mp3(GO_FORWARD, tmp_path), tmp_path / "work")


async def test_a_normalisation_that_silences_a_short_clip_is_dropped_with_a_warning(tmp_path, monkeypatch):
    """Needs an FFmpeg whose one-pass loudnorm has the fault (5.1, as Debian 12 ships it) on PATH."""
    system = shutil.which("ffmpeg")
    version = subprocess.run([system, "-version"], capture_output=True, text=True).stdout if system else ""
    if not re.match(r"ffmpeg version (\d+:)?5\.", version):
        pytest.skip("no FFmpeg 5.x on PATH (Debian 12: apt-get install ffmpeg) to show loudnorm's fault with")
    clip = synthesise("the quick brown fox jumps over the lazy dog", tmp_path)
    processor = await transcoder(monkeypatch, TRANSCODE_FFMPEG=system, TRANSCODE_NORMALIZE="true")
    with structlog.testing.capture_logs() as logs:
        ctx = await transcode(processor, clip, tmp_path / "work")
    assert ctx.outputs["transcode"]["normalized"] is False
    assert peak_db(ctx.files["audio"]) > -6, "the clip keeps its level"
    [warning] = [line for line in logs if line["log_level"] == "warning"]
    assert "normalisation dropped" in warning["event"] and "lowered the peak level" in warning["reason"]


# ---- finding ffmpeg ------------------------------------------------------------------------------------


def test_transcode_ffmpeg_that_does_not_exist_is_a_configuration_error():
    with pytest.raises(ConfigError) as caught:
        find_ffmpeg("/nonexistent/ffmpeg")
    assert caught.value.variable == "TRANSCODE_FFMPEG"


def test_without_transcode_ffmpeg_the_bundled_binary_is_used():
    import imageio_ffmpeg

    assert find_ffmpeg(None) == imageio_ffmpeg.get_ffmpeg_exe()


def test_no_ffmpeg_anywhere_is_a_configuration_error_that_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "missing"))  # imageio-ffmpeg's own override
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        find_ffmpeg(None)
    assert caught.value.variable == "TRANSCODE_FFMPEG"
    assert "uploads-consumer[media]" in caught.value.reason


async def test_a_binary_that_is_not_ffmpeg_is_refused_at_start(monkeypatch):
    with pytest.raises(ConfigError) as caught:
        await transcoder(monkeypatch, TRANSCODE_FFMPEG=shutil.which("true"))
    assert caught.value.variable == "TRANSCODE_FFMPEG"


# ---- through the daemon ----------------------------------------------------------------------------------


async def test_corrupt_audio_and_a_file_list_are_dead_lettered_unsupported_media_and_a_silent_video_skips_transcode(
    tmp_path, settings_for, start_daemon, nats_server
):
    from uploads_consumer.content_type import sniff

    corrupt = tmp_path / "in" / "voice note.mp3"
    corrupt.parent.mkdir()
    corrupt.write_bytes(np.random.default_rng(3).bytes(6000))
    assert sniff(corrupt, corrupt.name) == "audio/mpeg", "libmagic sees nothing; the name says audio"
    listing = tmp_path / "in" / "memo.mp3"
    listing.write_text(CONCAT_LIST)
    assert sniff(listing, listing.name) == "audio/mpeg"
    screen = video(tmp_path / "in" / "screen.mp4")
    daemon = start_daemon(PROCESSORS="save,transcode")
    await wait_ready(daemon)
    events = await publish_uploads(settings_for(), [corrupt, listing, screen])
    await wait_settled(nats_server.url, 3, daemon=daemon)
    skips = daemon.metric("uploads_consumer_processor_outcomes_total", 'outcome="skipped",processor="transcode"')
    assert daemon.terminate() == 0
    assert skips == 1
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")}
    assert set(dead) == {events[0].event_id, events[1].event_id}
    assert dead[events[0].event_id]["Uploads-Error-Class"] == "unsupported_media"
    assert "Invalid data found" in dead[events[0].event_id]["Uploads-Error"]
    assert dead[events[1].event_id]["Uploads-Error-Class"] == "unsupported_media"
    assert (
        dead[events[1].event_id]["Uploads-Error"] == "transcode: memo.mp3 is not in an audio or video format it opens"
    )
    [result] = [json.loads(m.data) for m in await read_stream(nats_server.url, "FILE_PROCESSED")]
    assert result["event_id"] == events[2].event_id
    assert (result["processors"], result["skipped"]) == (["save"], ["transcode"])


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"TRANSCODE_FFMPEG": "/nonexistent/ffmpeg"}, "TRANSCODE_FFMPEG: not found or not executable"),
        ({"TRANSCODE_FFMPEG": "/bin/true"}, "TRANSCODE_FFMPEG: the binary does not answer"),
        ({"IMAGEIO_FFMPEG_EXE": "/nonexistent/ffmpeg", "PATH": "/nonexistent"}, "TRANSCODE_FFMPEG: no ffmpeg found"),
        ({"TRANSCODE_TIMEOUT": "soon"}, "TRANSCODE_TIMEOUT: expected a duration"),
        ({"TRANSCODE_NORMALIZE": "perhaps"}, "TRANSCODE_NORMALIZE: "),
    ],
    ids=["missing", "not-ffmpeg", "none-anywhere", "bad-timeout", "bad-normalize"],
)
async def test_a_bad_transcode_setting_exits_2_with_one_line_naming_the_variable(start_daemon, variables, expected):
    daemon = start_daemon(PROCESSORS="save,transcode", **variables)
    assert daemon.proc.wait(60) == 2
    lines = daemon.log_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uploads-consumer: configuration error: " + expected), lines
