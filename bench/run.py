"""Side-by-side benchmark: the seed's consumer (baseline), our daemon, the bare floor and the S3 ceiling, in one run.

    python bench/run.py                    # 600 × 4 KiB uploads, one 256 MiB upload, 20 ms S3 latency
    python bench/run.py --small 200 --large-mib 64 --latency 0.02
    python bench/run.py --rounds 3 --profile /tmp/ours.txt   # medians of 3 interleaved rounds; py-spy profiles
    python bench/run.py --same-work        # also the floor doing the daemon's per-file work (sniff, durable save)
    python bench/run.py --webhook-only     # also ours with PROCESSORS=webhook (the event only, no S3) to a local receiver
    python bench/run.py --audit            # also ours with an audit trail (anchors signed): AUDIT_URL=sqlite, and a PostgreSQL store
    python bench/run.py --tracing          # also ours with tracing on, exporting to a local OTLP/HTTP receiver

The floor (bench/floor_consumer.py) is the least a consumer can do per upload, with no guarantees;
our daemon's CPU per upload and throughput are reported as ratios to it.

Real servers: nats-server, moto's S3 server behind a latency-injecting TCP proxy (20 ms added to
every request, as a real object store is far away). Each consumer runs as its own process on a
fresh NATS server; figures come from the consumer process's own accounting (/proc: CPU time,
peak RSS) between its first delivery and its last acknowledgement. Machines here are shared and
noisy: read the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from uploads_consumer.audit.anchors import keygen
from uploads_consumer.config import Settings
from uploads_consumer.embedded import DaemonProcess, NatsServer, PostgresServer, S3Server, clean_environment, free_port
from uploads_consumer.envelope import MasterKeyRing, ObjectDecryptor, encrypt_stream
from uploads_consumer.producer import publish_event, upload_file
from uploads_consumer.provision import provision
from uploads_consumer.storage import ObjectStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor_consumer import SignedGetter  # the bench folder is not a package
from profile_table import tables

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILE: str | None = None
PROFILED = ("ours", "floor")  # with --profile: ours into FILE, the floor into FILE.floor


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_rss: int
    count: int
    loop_cpu_seconds: float = 0.0  # of cpu_seconds, the main thread's (the event loop's)
    switches: int = 0  # context switches of all its threads (voluntary and not)

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_ms_per_upload(self) -> float:
        return 1000 * self.cpu_seconds / self.count

    @property
    def loop_cpu_ms_per_upload(self) -> float:
        return 1000 * self.loop_cpu_seconds / self.count


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """utime + stime of the process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of the process, so far."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # a thread that just ended
            continue
        total += sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
    return total


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class LatencyProxy:
    """bench/latency_proxy.py in a process of its own, so its work is not charged to anyone measured."""

    def __init__(self, target_port: int, latency: float) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "latency_proxy.py"), str(target_port), str(self.port), str(latency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def publish_uploads(settings: Settings, files: list[Path], concurrency: int = 16) -> None:
    import nats

    current, _ = settings.master_keys()
    ring = MasterKeyRing(current)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream(timeout=30)
    await provision(js, settings)
    limit = asyncio.Semaphore(concurrency)
    async with ObjectStore(settings) as store:

        async def one(path: Path) -> None:
            async with limit:
                event = await upload_file(store, ring, path, "bench@example.com", settings.s3_bucket_name)
                await publish_event(js, settings.nats_subject, event)

        await asyncio.gather(*(one(f) for f in files))
    await nc.close()


async def measure_consumer(
    url: str, count: int, pid: int, proc: subprocess.Popen, timeout: float, on_first_delivery=None
) -> Run:
    """From the consumer's first delivery to its last acknowledgement."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=5)
    deadline = time.monotonic() + timeout
    t0 = c0 = l0 = s0 = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"consumer exited with {proc.returncode}")
            info = await js.consumer_info("FILE_UPLOADS", "file_processor")
            now = time.monotonic()
            if t0 is None and info.delivered.stream_seq > 0:
                t0, c0, l0, s0 = now, cpu_seconds(pid), cpu_seconds(pid, pid), context_switches(pid)
                if on_first_delivery is not None:
                    on_first_delivery()
            if info.ack_floor.stream_seq >= count and info.num_ack_pending == 0:
                assert t0 is not None and c0 is not None and l0 is not None and s0 is not None
                cpu, loop, switches = cpu_seconds(pid) - c0, cpu_seconds(pid, pid) - l0, context_switches(pid) - s0
                return Run(now - t0, cpu, peak_rss(pid), count, loop, switches)
            await asyncio.sleep(0.01)
        raise RuntimeError(f"not done within {timeout}s: {info}")
    finally:
        await nc.close()


class LocalServer:
    """An HTTP server on a free loopback port that answers POSTs to `path` at once, in a thread of its
    own: its CPU is not charged to the consumer measured. `received` says what a request was worth."""

    path = "/"

    def __init__(self) -> None:
        import threading

        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True, name=type(self).__name__).start()
        self._ready.wait(10)

    def received(self, body: bytes) -> int:
        """Count what a request brought; returns the status to answer."""
        raise NotImplementedError

    def _run(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            return web.Response(status=self.received(await request.read()))

        async def serve() -> None:
            app = web.Application()
            app.router.add_post(self.path, handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()

        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(serve())
        self._loop.run_forever()


class Receiver(LocalServer):
    """A webhook receiver that answers 204; counts what it gets."""

    path = "/hook"
    count = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def received(self, body: bytes) -> int:
        self.count += 1
        return 204


class OtlpSink(LocalServer):
    """An OTLP/HTTP trace receiver: counts the spans it is sent, so a run with tracing on shows that it
    really traced."""

    path = "/v1/traces"
    spans = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self, body: bytes) -> int:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        export = ExportTraceServiceRequest.FromString(body)
        self.spans += sum(len(s.spans) for r in export.resource_spans for s in r.scope_spans)
        return 200


def run_consumer(
    name: str,
    command: list[str] | None,
    s3: S3Server,
    proxy: LatencyProxy,
    work: Path,
    files: list[Path],
    master_key: str,
    timeout: float,
    round_no: int = 1,
    receiver: Receiver | None = None,
) -> Run:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())[:30].strip("-")
    bucket = f"bench-{slug}-{len(files)}-{os.getpid()}-r{round_no}"
    s3.client().create_bucket(Bucket=bucket)
    name = slug
    profile = None
    if PROFILE and name in PROFILED and round_no == 1:
        profile = PROFILE if name == "ours" else f"{PROFILE}.{name}"
    name = f"{slug}-r{round_no}"
    with NatsServer(work / f"nats-{name}-{len(files)}") as nats_server:
        env = {
            **clean_environment(),
            **s3.env(),
            "NATS_URL": nats_server.url,
            "S3_BUCKET_NAME": bucket,
            "ENCRYPTION_MASTER_KEY": master_key,
            "DECRYPT_DOWNLOAD_PATH": str(work / f"out-{name}-{len(files)}"),
            "HTTP_PORT": "0",
            "LOG_LEVEL": "WARNING",
        }
        settings = Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
        asyncio.run(publish_uploads(settings, files))  # straight to S3, not through the proxy
        env["S3_ENDPOINT_URL"] = proxy.url  # the consumer reads through the latency proxy
        daemon = DaemonProcess(env, work / f"{name}-{len(files)}.log", command=command)
        before = receiver.count if receiver is not None else 0
        daemon.start()
        spy: list[subprocess.Popen] = []

        def start_profile() -> None:
            # Sampled from outside, from first delivery to last ack: the CPU figures stay the consumer's own.
            if profile is not None:
                spy_command = [
                    "py-spy",
                    "record",
                    "--pid",
                    str(daemon.proc.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--threads",
                ]
                spy.append(subprocess.Popen([*spy_command, "--nonblocking", "-o", profile], stdout=subprocess.DEVNULL))

        try:
            run = asyncio.run(
                measure_consumer(nats_server.url, len(files), daemon.proc.pid, daemon.proc, timeout, start_profile)
            )
        finally:
            for p in spy:  # py-spy writes its file on SIGINT
                p.send_signal(signal.SIGINT)
                p.wait(60)
            daemon.terminate(60)
        if receiver is not None and command is not None and any(c.startswith("WEBHOOK_URL=") for c in command):
            if receiver.count - before != len(files):  # a chain of webhooks saves nothing: count what arrived
                raise RuntimeError(f"{name}: {receiver.count - before} webhooks, expected {len(files)}")
            return run
        saved = [
            p for p in (work / f"out-{name}-{len(files)}").rglob("*") if p.is_file() and ".incoming" not in p.parts
        ]
        if len(saved) != len(files):
            raise RuntimeError(f"{name}: {len(saved)} files saved, expected {len(files)}; see {daemon.log_path}")
        return run


async def measure_ceiling(s3: S3Server, proxy: LatencyProxy, seconds: float = 4.0, concurrency: int = 64) -> float:
    """GETs per second of a 4 KiB object through the proxy at high concurrency.

    The client is the floor's (a signed GET over aiohttp), the lightest there is, so that its own CPU,
    which it shares with the S3 server on this machine, lowers the ceiling as little as possible.
    """
    direct = s3.client()
    direct.create_bucket(Bucket="bench-ceiling")
    direct.put_object(Bucket="bench-ceiling", Key="k", Body=os.urandom(4096))
    client = SignedGetter(proxy.url, "us-east-1", s3.access_key, s3.secret_key)
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await client.get("bench-ceiling", "k")
            done += 1

    try:
        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - began)
    finally:
        await client.session.close()


def measure_crypto(size: int = 256 * MiB, chunk: int = MiB) -> tuple[float, float]:
    """MB/s of our streaming decrypt (1 MiB chunks) and of one-shot AESGCM.decrypt, in-process."""
    dek = os.urandom(32)
    plain = os.urandom(size)
    import io

    sink = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), sink, dek)
    blob = sink.getvalue()
    view = memoryview(blob)
    began = time.perf_counter()
    decryptor = ObjectDecryptor(dek)
    for i in range(0, len(blob), chunk):
        decryptor.feed(view[i : i + chunk])
    decryptor.finalize()
    streaming = size / (time.perf_counter() - began) / 1e6
    began = time.perf_counter()
    AESGCM(dek).decrypt(blob[:12], blob[12:], None)
    one_shot = size / (time.perf_counter() - began) / 1e6
    return streaming, one_shot


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"upload-{i}.bin"
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n
        files.append(path)
    return files


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.seconds for r in runs),
        statistics.median(r.cpu_seconds for r in runs),
        int(statistics.median(r.peak_rss for r in runs)),
        runs[0].count,
        statistics.median(r.loop_cpu_seconds for r in runs),
        int(statistics.median(r.switches for r in runs)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=600, help="number of small uploads (default 600)")
    parser.add_argument("--small-size", type=int, default=4096, help="bytes per small upload (default 4096)")
    parser.add_argument("--large-mib", type=int, default=256, help="size of the large upload in MiB (0 skips it)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every S3 request (default 0.02)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VAR=VALUE,...",
        help="also run ours with these settings, e.g. MAX_IN_FLIGHT=32,FETCH_BATCH=32 (repeatable)",
    )
    parser.add_argument(
        "--same-work",
        action="store_true",
        help="also run the floor doing the daemon's per-file work (libmagic sniff, durable save) and its "
        "confirmed NATS operations (lookup, result event, record, confirmed ack): ours over it is what our own "
        "code costs",
    )
    parser.add_argument(
        "--webhook-only",
        action="store_true",
        help="also run ours with PROCESSORS=webhook (signed, to a local receiver answering at once): a chain "
        "that needs only the event, so no S3 request; its CPU and throughput against ours with the defaults",
    )
    parser.add_argument(
        "--audit",
        action="store_true",
        help="also run ours with AUDIT_URL=sqlite:///… and with AUDIT_URL=postgresql://… (a private server started "
        "with initdb and pg_ctl, Debian's postgresql): what the audit trail costs per upload, against ours without",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also run ours with tracing on (OTEL_EXPORTER_OTLP_ENDPOINT at a local OTLP/HTTP receiver, every "
        "upload sampled): its CPU per upload beside ours with tracing off, in the same rounds",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="leave out the seed's consumer (one upload at a time: the slowest part of a round)",
    )
    parser.add_argument(
        "--compare-loops", action="store_true", help="also run ours on asyncio's own event loop (default: uvloop)"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record our daemon with py-spy (collapsed stacks) into FILE, the floor into FILE.floor (first round)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the small uploads this many times per consumer, interleaved; report medians (default 1)",
    )
    args = parser.parse_args()

    master_key = base64.b64encode(os.urandom(32)).decode()
    consumers = {
        "baseline": [sys.executable, str(HERE / "baseline_consumer.py")],
        "ours": None,
        "floor": [sys.executable, str(HERE / "floor_consumer.py")],
    }
    if args.no_baseline:
        del consumers["baseline"]
    if args.same_work:
        consumers["floor+work"] = [sys.executable, str(HERE / "floor_consumer.py"), "--same-work"]
    if args.compare_loops:
        consumers["ours-asyncio"] = ["env", "UPLOADS_CONSUMER_LOOP=asyncio", sys.executable, "-m", "uploads_consumer"]
    for variant in args.variant:  # e.g. MAX_IN_FLIGHT=32,FETCH_BATCH=32
        consumers[f"ours {variant}"] = ["env", *variant.split(","), sys.executable, "-m", "uploads_consumer"]
    receiver = Receiver() if args.webhook_only else None
    if receiver is not None:
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        webhook = ["PROCESSORS=webhook", f"WEBHOOK_URL={receiver.url}", f"WEBHOOK_SECRET={secret}"]
        consumers["ours webhook-only"] = ["env", *webhook, sys.executable, "-m", "uploads_consumer"]
    sink = OtlpSink() if args.tracing else None
    if sink is not None:
        # Batches leave every 200 ms rather than 5 s, so that their export falls inside the measured
        # window (first delivery to last ack) instead of after it: if anything, this costs more.
        tracing = [f"OTEL_EXPORTER_OTLP_ENDPOINT={sink.endpoint}", "OTEL_BSP_SCHEDULE_DELAY=200"]
        consumers["ours tracing"] = ["env", *tracing, sys.executable, "-m", "uploads_consumer"]
        # What an operator would do on a busy consumer: keep one trace in ten (the uploads here carry
        # no traceparent, so each is a new trace and the ratio applies).
        ratio = ["OTEL_TRACES_SAMPLER=parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG=0.1"]
        consumers["ours tracing 10%"] = ["env", *tracing, *ratio, sys.executable, "-m", "uploads_consumer"]
    global PROFILE
    PROFILE = args.profile
    rounds: dict[str, list[Run]] = {name: [] for name in consumers}
    spans: dict[str, int] = {}
    large_runs: dict[str, Run] = {}
    ceilings: list[float] = []
    audit_db = PostgresServer() if args.audit else None
    with tempfile.TemporaryDirectory(prefix="uploads-bench-") as tmp:
        work = Path(tmp)
        if audit_db is not None:  # one store for every round, as a deployment has (records only add up)
            audit_db.start()
            ours = [sys.executable, "-m", "uploads_consumer"]
            signed = f"AUDIT_SIGNING_KEY={keygen()[0]}"  # anchors signed, as a deployment that wants them trusted
            consumers["ours audit=sqlite"] = ["env", f"AUDIT_URL=sqlite:///{work}/audit.db", signed, *ours]
            spool = f"AUDIT_SPOOL_DIR={work}/audit-spool"
            consumers["ours audit=postgresql"] = ["env", f"AUDIT_URL={audit_db.url()}", spool, signed, *ours]
            rounds.update({name: [] for name in consumers if name not in rounds})
        small = make_files(work / "small", args.small, args.small_size)
        large = make_files(work / "large", 1, args.large_mib * MiB) if args.large_mib else []
        with S3Server(log_path=work / "s3.log") as s3:
            proxy = LatencyProxy(s3.port, args.latency)
            try:
                for round_no in range(1, args.rounds + 1):
                    ceilings.append(asyncio.run(measure_ceiling(s3, proxy)) / 2)
                    print(
                        f"round {round_no}: ceiling {ceilings[-1]:.0f} uploads/s "
                        "(S3 GETs/s through the proxy at concurrency 64, / 2)",
                        flush=True,
                    )
                    for name, command in consumers.items():
                        before = sink.spans if sink is not None else 0
                        run = run_consumer(name, command, s3, proxy, work, small, master_key, 900, round_no, receiver)
                        rounds[name].append(run)
                        if sink is not None:  # the daemon has stopped, its last spans sent
                            spans[name] = spans.get(name, 0) + sink.spans - before
                        print(
                            f"round {round_no}: {name}: {run.per_second:.1f} uploads/s, "
                            f"{run.cpu_ms_per_upload:.2f} CPU ms/upload ({run.loop_cpu_ms_per_upload:.2f} on the loop), "
                            f"{run.switches / run.count:.1f} context switches/upload",
                            flush=True,
                        )
                for name in ("baseline", "ours"):  # the large upload: baseline and ours only
                    if large and name in consumers:
                        large_runs[name] = run_consumer(  # round 0: not profiled
                            name, consumers[name], s3, proxy, work, large, master_key, timeout=900, round_no=0
                        )
                        print(f"{name}: {args.large_mib} MiB in {large_runs[name].seconds:.1f}s", flush=True)
            finally:
                proxy.stop()
                if audit_db is not None:
                    audit_db.stop()
                    shutil.rmtree(audit_db.base_dir, ignore_errors=True)
    streaming, one_shot = measure_crypto()

    results = {name: median_run(runs) for name, runs in rounds.items()}
    ceiling = statistics.median(ceilings)
    b, o, f = results.get("baseline"), results["ours"], results["floor"]
    print()
    print(
        f"{args.small} uploads of {args.small_size} B, S3 latency {args.latency * 1000:.0f} ms per request, "
        f"{os.cpu_count()} cores" + (f", medians of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
    )
    print(
        f"| consumer | uploads/s | CPU ms/upload | of which event loop | context switches/upload | peak RSS (small) | {args.large_mib} MiB upload | peak RSS (large) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    labels = {
        "baseline": "baseline (seed)",
        "ours": "ours (defaults)",
        "floor": "floor (bare, no guarantees)",
        "floor+work": "floor + sniff + durable save + NATS guarantees",
    }
    for name, r in results.items():
        big = large_runs.get(name)
        print(
            f"| {labels.get(name, name)} | {r.per_second:.1f} | {r.cpu_ms_per_upload:.2f} | {r.loop_cpu_ms_per_upload:.2f} | "
            f"{r.switches / r.count:.1f} | {r.peak_rss / MiB:.0f} MiB | "
            f"{f'{big.seconds:.1f} s' if big else '-'} | {f'{big.peak_rss / MiB:.0f} MiB' if big else '-'} |"
        )
    print(f"| ceiling (S3 GETs/s ÷ 2) | {ceiling:.1f} | | | | | | |")
    print()
    cpu_ratios = [
        r.cpu_ms_per_upload / fl.cpu_ms_per_upload for r, fl in zip(rounds["ours"], rounds["floor"], strict=True)
    ]
    speed_ratios = [r.per_second / fl.per_second for r, fl in zip(rounds["ours"], rounds["floor"], strict=True)]
    each = " (per round: " if args.rounds > 1 else ""
    print(
        f"CPU per upload: ours / floor = {statistics.median(cpu_ratios):.2f}× (target ≤ 1.5×)"
        + (each + ", ".join(f"{x:.2f}×" for x in cpu_ratios) + ")" if each else "")
    )
    print(
        f"throughput: ours / floor = {100 * statistics.median(speed_ratios):.0f}% (target ≥ 90%)"
        + (each + ", ".join(f"{100 * x:.0f}%" for x in speed_ratios) + ")" if each else "")
    )
    if "floor+work" in rounds:
        work_ratios = [
            r.cpu_ms_per_upload / fw.cpu_ms_per_upload
            for r, fw in zip(rounds["ours"], rounds["floor+work"], strict=True)
        ]
        work_alone = [
            fw.cpu_ms_per_upload / fl.cpu_ms_per_upload
            for fw, fl in zip(rounds["floor+work"], rounds["floor"], strict=True)
        ]
        print(
            f"CPU per upload: (floor + same work) / floor = {statistics.median(work_alone):.2f}×: "
            "the per-file work and the confirmed NATS operations alone"
            + (each + ", ".join(f"{x:.2f}×" for x in work_alone) + ")" if each else "")
        )
        print(
            f"CPU per upload: ours / (floor + same work) = {statistics.median(work_ratios):.2f}× (target ≤ 1.15×): "
            "our own code, the work every correct consumer does taken out"
            + (each + ", ".join(f"{x:.2f}×" for x in work_ratios) + ")" if each else "")
        )
    for name in rounds:
        if name.startswith("ours "):  # a --variant, against ours with the defaults in the same rounds
            ratios = [
                v.cpu_ms_per_upload / r.cpu_ms_per_upload for v, r in zip(rounds[name], rounds["ours"], strict=True)
            ]
            print(
                f"CPU per upload: {name} / ours = {statistics.median(ratios):.2f}×"
                + (each + ", ".join(f"{x:.2f}×" for x in ratios) + ")" if each else "")
            )
            speeds = [v.per_second / r.per_second for v, r in zip(rounds[name], rounds["ours"], strict=True)]
            print(
                f"throughput: {name} / ours = {statistics.median(speeds):.2f}×"
                + (each + ", ".join(f"{x:.2f}×" for x in speeds) + ")" if each else "")
            )
    if sink is not None:
        print("tracing, CPU ms per upload (median; per round):")
        print(f"  off: {o.cpu_ms_per_upload:.2f}; " + ", ".join(f"{r.cpu_ms_per_upload:.2f}" for r in rounds["ours"]))
        for name in ("ours tracing", "ours tracing 10%"):
            on = results[name]
            print(
                f"  {name.removeprefix('ours tracing').strip() or 'on'}: {on.cpu_ms_per_upload:.2f} "
                f"(+{on.cpu_ms_per_upload - o.cpu_ms_per_upload:.2f}); "
                + ", ".join(f"{r.cpu_ms_per_upload:.2f}" for r in rounds[name])
                + f"; {spans.get(name, 0) / (args.small * args.rounds):.1f} spans received per upload"
            )
    if "ours" in large_runs and "baseline" in large_runs:
        print(
            f"peak RSS on the {args.large_mib} MiB upload: ours {large_runs['ours'].peak_rss / MiB:.0f} MiB "
            f"(target ≤ 160 MiB), baseline {large_runs['baseline'].peak_rss / MiB:.0f} MiB"
        )
    if b is not None:
        print(
            f"ours / baseline: throughput {o.per_second / b.per_second:.1f}×, CPU per upload "
            f"{o.cpu_ms_per_upload / b.cpu_ms_per_upload:.2f}×"
        )
    print(f"ours / ceiling {100 * o.per_second / ceiling:.0f}%, floor / ceiling {100 * f.per_second / ceiling:.0f}%")
    print(
        f"AES-256-GCM decrypt in-process: streaming {streaming:.0f} MB/s (target ≥ 1000), one-shot {one_shot:.0f} MB/s"
    )
    if PROFILE:
        for name in PROFILED:
            path = Path(PROFILE if name == "ours" else f"{PROFILE}.{name}")
            if path.exists():
                print()
                print(f"profile of {name} (py-spy, from first delivery to last ack):")
                print(tables(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
