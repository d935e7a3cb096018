"""Media benchmark: the daemon's `image` and `video` processors against libvips and ffmpeg called directly.

    python bench/media.py                          # 8 × 12 MP and 4 × 50 MP JPEGs, 6 posters of a 1080p clip, 3 rounds
    python bench/media.py --rounds 5 --variant IMAGE_CONCURRENCY=1
    python bench/media.py --skip-video

Images: photo-like JPEGs (textured noise, quality 90) of 12 MP (4000×3000) and 50 MP (8160×6120),
renditions at the default sizes (320 and 1280, WebP quality 80, metadata stripped, sRGB). Against:
- "vips thumbnail": libvips' thumbnail called directly, once per file and size, through pyvips in a
  process of its own (pyvips-binary ships the library, not the `vips` command line), the way
  `vipsthumbnail` works: shrink-on-load from the file for each size;
- "libvips as the processor calls it": the processor's own render() in a process of its own, on the
  same files: what the daemon adds to it is the daemon's overhead (download, decryption, messaging,
  the worker threads, the durable writes);
- Pillow (draft mode, thumbnail, WebP), when it is installed, for comparison.
Video: poster frames of a 1080p H.264 clip (30 s, 30 fps): the daemon (PROCESSORS=video, which
probes and then takes the poster: two ffmpeg runs) against the poster's ffmpeg command run directly.

The daemon runs against real servers (nats-server, moto's S3 server), measured from its first
delivery to its last acknowledgement: wall time, CPU time of the daemon and of the ffmpeg processes
it ran, peak RSS. Each direct run is a process of its own, timed the same way. The rounds are
interleaved; the table gives medians. Machines here are shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uploads_consumer.config import Settings
from uploads_consumer.embedded import DaemonProcess, NatsServer, S3Server, clean_environment
from uploads_consumer.processors.transcode import find_ffmpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Run, median_run  # the bench folder is not a package
from transcribe import measure, peak_rss, publish

MiB = 1 << 20
SIZES = (320, 1280)
QUALITY = 80
SHAPES = {"12 MP": (4000, 3000), "50 MP": (8160, 6120)}


def make_jpegs(folder: Path, shape: tuple[int, int], count: int) -> list[Path]:
    """Photo-like JPEGs: noise blurred to a camera's texture, quality 90; each one different."""
    import pyvips

    folder.mkdir(parents=True, exist_ok=True)
    width, height = shape
    files = []
    for i in range(count):
        bands = [pyvips.Image.gaussnoise(width, height, sigma=50, mean=128 + 10 * (i + b)) for b in range(3)]
        image = bands[0].bandjoin(bands[1:]).gaussblur(1.2).cast("uchar").copy(interpretation="srgb")
        path = folder / f"photo-{width}x{height}-{i}.jpg"
        image.jpegsave(str(path), Q=90)
        files.append(path)
    return files


def make_clip(path: Path, seconds: int = 30) -> Path:
    ffmpeg = find_ffmpeg(None)
    source = f"testsrc2=d={seconds}:s=1920x1080:r=30"
    args = [ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", source]
    subprocess.run(
        [*args, "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-y", str(path)], check=True
    )
    return path


# ---- direct: each in a process of its own --------------------------------------------------------------


def _timed(work) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = usage.ru_utime + usage.ru_stime, time.monotonic()
    count = work()
    seconds = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - c0 + children.ru_utime + children.ru_stime
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so this process would report the
    # benchmark's own peak (it made the JPEGs). The children (ffmpeg) have only ru_maxrss: the largest.
    rss = max(peak_rss(os.getpid()), children.ru_maxrss * 1024)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss": rss, "count": count}))


def direct_vips(files: list[str], out: Path) -> int:
    import pyvips

    pyvips.cache_set_max(0)
    for path in files:
        for size in SIZES:
            image = pyvips.Image.thumbnail(path, size, height=size, size="down")  # no profile in these files
            image.webpsave(str(out / f"{Path(path).name}.{size}.webp"), Q=QUALITY, keep=pyvips.enums.ForeignKeep.NONE)
    return len(files)


def direct_processor(files: list[str], out: Path) -> int:
    import pyvips

    from uploads_consumer.processors.image import Recipe, Watch, render

    pyvips.cache_set_max(0)
    pyvips.block_untrusted_set(True)
    recipe = Recipe(SIZES, "webp", QUALITY, 100_000_000, False, 60.0, "IMAGE_TIMEOUT", "IMAGE_MAX_PIXELS")
    for path in files:
        for rendition in render(Path(path), Path(path).name, "image/jpeg", recipe, Watch(60.0)).renditions:
            (out / f"{Path(path).name}.{rendition.size}.webp").write_bytes(rendition.data)
    return len(files)


def direct_pillow(files: list[str], out: Path) -> int:
    from PIL import Image, ImageOps

    for path in files:
        with Image.open(path) as image:
            image.draft("RGB", (max(SIZES), max(SIZES)))  # Pillow's shrink-on-load: DCT scaling
            upright = ImageOps.exif_transpose(image)
            for size in sorted(SIZES, reverse=True):
                upright.thumbnail((size, size), Image.Resampling.LANCZOS)
                upright.save(out / f"{Path(path).name}.{size}.webp", quality=QUALITY)
    return len(files)


def direct_posters(files: list[str], out: Path) -> int:
    from uploads_consumer.processors.video import VIDEO_DEMUXERS, fit

    ffmpeg = find_ffmpeg(None)
    for i, path in enumerate(files):
        args = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-protocol_whitelist", "file"]
        args += ["-format_whitelist", VIDEO_DEMUXERS, "-ss", "3", "-i", path, "-map", "0:v:0", "-frames:v", "1"]
        args += ["-vf", fit(1280), "-c:v", "libwebp", "-quality", "80", "-f", "webp", "-y", str(out / f"{i}.webp")]
        subprocess.run(args, check=True)
    return len(files)


DIRECT = {"vips": direct_vips, "processor": direct_processor, "pillow": direct_pillow, "posters": direct_posters}


def run_direct(kind: str, files: list[Path], work: Path) -> Run:
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"direct-{kind}-"))
    command = [sys.executable, __file__, "--direct", kind, "--out", str(out), *map(str, files)]
    result = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return Run(**json.loads(result.strip().splitlines()[-1]))


# ---- the daemon, on real servers ---------------------------------------------------------------------------


def run_daemon(name: str, s3: S3Server, work: Path, files: list[Path], extra: dict[str, str]) -> Run:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60]
    bucket = f"bench-media-{hashlib.sha256(slug.encode()).hexdigest()[:12]}-{os.getpid()}"
    s3.client().create_bucket(Bucket=bucket)
    out = work / f"out-{slug}"
    with NatsServer(work / f"nats-{slug}") as nats_server:
        env = {
            **{k: v for k, v in clean_environment().items() if not k.startswith(("IMAGE_", "VIDEO_"))},
            **s3.env(),
            "NATS_URL": nats_server.url,
            "S3_BUCKET_NAME": bucket,
            "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            "DECRYPT_DOWNLOAD_PATH": str(out),
            "HTTP_PORT": "0",
            "LOG_LEVEL": "WARNING",
            **extra,
        }
        settings = Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
        asyncio.run(publish(settings, files))
        daemon = DaemonProcess(env, work / f"{slug}.log")
        daemon.start()
        try:
            seconds, cpu = asyncio.run(measure(nats_server.url, len(files), daemon, timeout=1800))
            rss = peak_rss(daemon.proc.pid) if daemon.proc is not None else 0
        finally:
            daemon.terminate(60)
    made = [p for p in out.rglob("*") if p.suffix == ".webp"]
    expected = len(files) * (len(SIZES) if "image" in extra["PROCESSORS"] else 1)
    if len(made) != expected:
        raise RuntimeError(f"{name}: {len(made)} outputs for {len(files)} files; see {daemon.log_path}")
    return Run(seconds, cpu, rss, len(files))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=8, help="12 MP JPEGs per round (default 8)")
    parser.add_argument("--large", type=int, default=4, help="50 MP JPEGs per round (default 4)")
    parser.add_argument("--posters", type=int, default=6, help="uploads of the 1080p clip per round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--skip-video", action="store_true", help="images only")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VAR=VALUE,...",
        help="also run the image daemon with these settings, e.g. IMAGE_CONCURRENCY=1",
    )
    parser.add_argument("--direct", choices=sorted(DIRECT), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        _timed(lambda: DIRECT[args.direct](args.files, args.out))
        return 0
    try:
        import PIL  # noqa: F401

        pillow = True
    except ImportError:
        pillow = False

    daemons = {"daemon": {"PROCESSORS": "image"}}
    for variant in args.variant:
        daemons[f"daemon {variant}"] = {"PROCESSORS": "image", **dict(i.split("=", 1) for i in variant.split(","))}
    rows: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="uploads-bench-media-") as tmp:
        work = Path(tmp)
        sets = {
            "12 MP": make_jpegs(work / "small", SHAPES["12 MP"], args.small),
            "50 MP": make_jpegs(work / "large", SHAPES["50 MP"], args.large),
        }
        for label, files in sets.items():
            sizes = sorted(f.stat().st_size for f in files)
            print(f"{len(files)} JPEGs of {label}, {sizes[len(sizes) // 2] / MiB:.1f} MiB each (median)", flush=True)
        clip = None if args.skip_video else make_clip(work / "clip-1080p.mp4")
        with S3Server(log_path=work / "s3.log") as s3:
            for round_no in range(1, args.rounds + 1):
                for label, files in sets.items():
                    kinds = ["vips", "processor", *(["pillow"] if pillow else [])]
                    for kind in kinds:
                        rows.setdefault((label, kind), []).append(run_direct(kind, files, work))
                    for name, extra in daemons.items():
                        run = run_daemon(f"{round_no}-{label}-{name}", s3, work, files, extra)
                        rows.setdefault((label, name), []).append(run)
                    print(f"round {round_no}, {label}: done", flush=True)
                if clip is not None:
                    copies = [clip] * args.posters
                    rows.setdefault(("1080p clip", "ffmpeg poster command"), []).append(
                        run_direct("posters", copies, work)
                    )
                    run = run_daemon(f"{round_no}-posters", s3, work, copies, {"PROCESSORS": "video"})
                    rows.setdefault(("1080p clip", "daemon"), []).append(run)
                    print(f"round {round_no}, posters: done", flush=True)

    print()
    print(f"medians of {args.rounds} interleaved rounds, {os.cpu_count()} cores")
    print("| input | run | per second | CPU ms each | peak RSS |")
    print("|---|---|---|---|---|")
    for (label, name), runs in rows.items():
        m = median_run(runs)
        print(f"| {label} | {name} | {m.per_second:.2f} | {m.cpu_ms_per_upload:.0f} | {m.peak_rss / MiB:.0f} MiB |")
    print()
    pairs = [(label, name, base) for label in ("12 MP", "50 MP") for name in daemons for base in ("vips", "processor")]
    if not args.skip_video:
        pairs.append(("1080p clip", "daemon", "ffmpeg poster command"))
    for label, name, base in pairs:
        ours, theirs = rows[(label, name)], rows[(label, base)]
        speed = [o.per_second / b.per_second for o, b in zip(ours, theirs, strict=True)]
        cpu = [o.cpu_seconds / b.cpu_seconds for o, b in zip(ours, theirs, strict=True)]
        print(
            f"{label}: {name} / {base}: {statistics.median(speed):.2f} per second "
            f"(rounds {', '.join(f'{r:.2f}' for r in speed)}), {statistics.median(cpu):.2f} CPU each "
            f"(rounds {', '.join(f'{r:.2f}' for r in cpu)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
