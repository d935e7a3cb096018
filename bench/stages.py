"""Stages (AFTER=) against consumers side by side, measured in one run.

    python bench/stages.py                       # 400 uploads per run, 3 interleaved rounds
    python bench/stages.py --uploads 600 --rounds 5 --latency 0.02

Three daemons in each topology, the same chains: `first` (PROCESSORS=save: download, decrypt, save),
then two event-only consumers (`second`, `third`: a signed webhook each, to a local receiver that
answers at once). Side by side, all three read FILE_UPLOADS; as stages, `second` runs AFTER=first and
`third` AFTER=second. Real servers: nats-server, moto's S3 server (behind a latency-injecting proxy
with --latency).

What it reports, each the median of the rounds:
- the first stage's capacity: `first` alone on a backlog, uploads per second;
- end-to-end latency at 50% and 90% of that capacity (uploads published at a steady rate), from
  each publish to the last result of that upload (as stages: `third`'s; side by side: the last of
  the three), p50 and p99 — and what each added stage costs: the time from one stage's result to
  the next stage's result for the same upload (the hand-over and the stage's own, event-only, work);
- throughput of the pipeline with an event-only stage after `first`, on a backlog, against `first`
  alone: the share of the first stage's throughput the pipeline keeps;
- no stage downloads what it does not need: the event-only stages get an S3 endpoint that refuses
  every connection, so any request they made would fail their uploads;
- the CPU of every process during each run (/proc/PID/stat: moto, nats-server, each daemon, and this
  process, which publishes and receives the webhooks): how many of the machine's cores the run kept
  busy, and the CPU each upload cost. All of them share the machine: a load that needs more cores than
  it has queues, whatever the daemons do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

from uploads_consumer.config import Settings
from uploads_consumer.embedded import DaemonProcess, NatsServer, S3Server, clean_environment, free_port
from uploads_consumer.envelope import MasterKeyRing
from uploads_consumer.producer import event_json, upload_file
from uploads_consumer.storage import ObjectStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LatencyProxy, Receiver, cpu_seconds, make_files  # the bench folder is not a package

SECRET = "whsec_" + base64.b64encode(b"b" * 32).decode()
DEAD_S3 = "http://127.0.0.1:1"  # nothing listens: an event-only stage that made a request would fail
PROCESSES = ("moto", "nats-server", "first", "second", "third", "bench")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Topology:
    """Three daemons on a fresh nats-server: side by side, or as stages."""

    def __init__(
        self, work: Path, s3: S3Server, proxy: LatencyProxy | None, receiver: Receiver, master_key: str, name: str
    ) -> None:
        self.work, self.s3, self.proxy, self.receiver, self.master_key, self.name = (
            work,
            s3,
            proxy,
            receiver,
            master_key,
            name,
        )
        self.bucket = f"stages-{name}-{os.getpid()}"
        s3.client().create_bucket(Bucket=self.bucket)
        self.nats = NatsServer(work / f"nats-{name}")
        self.daemons: list[DaemonProcess] = []

    def env(self, consumer: str, **extra: str) -> dict[str, str]:
        return {
            **clean_environment(),
            **self.s3.env(),
            "NATS_URL": self.nats.url,
            "S3_BUCKET_NAME": self.bucket,
            "ENCRYPTION_MASTER_KEY": self.master_key,
            "DECRYPT_DOWNLOAD_PATH": str(self.work / f"out-{self.name}"),
            "HTTP_PORT": str(free_port()),
            "LOG_LEVEL": "WARNING",
            "NATS_CONSUMER_NAME": consumer,
            **extra,
        }

    def settings(self) -> Settings:
        env = self.env("first")
        return Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})

    def start(self, consumer: str, **extra: str) -> None:
        env = self.env(consumer, **extra)
        if self.proxy is not None and "S3_ENDPOINT_URL" not in extra:
            env["S3_ENDPOINT_URL"] = self.proxy.url
        daemon = DaemonProcess(env, self.work / f"{self.name}-{consumer}.log")
        daemon.start()
        self.daemons.append(daemon)

    def start_first(self) -> None:
        self.start("first")

    def start_event_only(self, consumer: str, after: str | None) -> None:
        extra = {
            "PROCESSORS": "webhook",
            "WEBHOOK_URL": self.receiver.url,
            "WEBHOOK_SECRET": SECRET,
            "S3_ENDPOINT_URL": DEAD_S3,
        }
        if after:
            extra["AFTER"] = after
        self.start(consumer, **extra)

    def ready(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        for daemon in self.daemons:
            while True:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"{daemon.log_path.name} exited: {daemon.log_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{daemon.log_path.name} not ready: {daemon.log_text()[-2000:]}")
                time.sleep(0.05)

    def __enter__(self) -> Topology:
        self.nats.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for daemon in self.daemons:
            daemon.terminate(60)
        self.nats.__exit__(*exc)


async def upload_all(settings: Settings, files: list[Path]) -> list:
    """Put every object in S3 first (the backend's part, not measured); returns the events."""
    ring = MasterKeyRing(settings.master_keys()[0])
    limit = asyncio.Semaphore(16)
    async with ObjectStore(settings) as store:

        async def one(path: Path):
            async with limit:
                return await upload_file(store, ring, path, "bench@example.com", settings.s3_bucket_name)

        return list(await asyncio.gather(*(one(f) for f in files)))


async def provision_stream(url: str) -> None:
    from uploads_consumer.provision import provision

    nc = await nats.connect(url)
    try:
        await provision(nc.jetstream(timeout=10), Settings(nats_url=url, nats_consumer_name="first"))
    finally:
        await nc.close()


async def run_load(
    url: str, events: list, rate: float | None, last: set[str], timeout: float
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Publish every event (at `rate` per second; None: all at once) and wait for each upload's results
    from every consumer in `last`. Returns, per event_id, the seconds from its publish to the last of
    them, and the time each consumer's result arrived (time.monotonic())."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    published: dict[str, float] = {}
    arrived: dict[str, dict[str, float]] = {}
    finished: dict[str, float] = {}
    done = asyncio.Event()

    async def on_result(msg) -> None:
        data = json.loads(msg.data)
        times = arrived.setdefault(data["event_id"], {})
        times.setdefault(data["consumer"], time.monotonic())
        if set(times) >= last and data["event_id"] not in finished:
            finished[data["event_id"]] = max(times[c] for c in last)
            if len(finished) == len(events):
                done.set()

    sub = await nc.subscribe("file.processed.*", cb=on_result)
    try:
        began = time.monotonic()
        for i, event in enumerate(events):
            if rate is not None:
                pause = began + i / rate - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
            published[event.event_id] = time.monotonic()
            await js.publish("file.uploads", event_json(event), headers={"Nats-Msg-Id": event.event_id})
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
        await nc.close()
    return {e: finished[e] - published[e] for e in finished}, arrived


def busy(processes: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, and of this one (the publisher and the webhook receiver)."""
    return {**{name: cpu_seconds(pid) for name, pid in processes.items()}, "bench": time.process_time()}


def one_topology(
    kind: str, work: Path, s3: S3Server, proxy, receiver, key: str, files: list[Path], rate: float | None, tag: str
) -> tuple[dict[str, float], dict[str, dict[str, float]], float, dict[str, float]]:
    """Run one topology on the uploads; returns per-upload latency, when each result arrived, the seconds
    the whole batch took, and the CPU seconds each process used meanwhile."""
    with Topology(work, s3, proxy, receiver, key, f"{kind}-{tag}") as top:
        events = asyncio.run(upload_all(top.settings(), files))
        asyncio.run(provision_stream(top.nats.url))
        top.start_first()
        consumers = {"first"}
        if kind == "stages":
            top.start_event_only("second", "first")
            top.start_event_only("third", "second")
            consumers = {"third"}
        elif kind == "side":
            top.start_event_only("second", None)
            top.start_event_only("third", None)
            consumers = {"first", "second", "third"}
        elif kind == "pipeline":  # throughput: first, and one event-only stage after it
            top.start_event_only("second", "first")
            consumers = {"second"}
        top.ready()
        processes = {"nats-server": top.nats.proc.pid, "moto": s3.proc.pid}
        processes |= {daemon.log_path.stem.rsplit("-", 1)[-1]: daemon.proc.pid for daemon in top.daemons}
        before = busy(processes)
        began = time.monotonic()
        latencies, arrived = asyncio.run(run_load(top.nats.url, events, rate, consumers, timeout=300))
        took = time.monotonic() - began
        after = busy(processes)
        return latencies, arrived, took, {name: after[name] - before[name] for name in after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=400, help="uploads per run (default 400)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per upload (default 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every S3 request (default 0)")
    parser.add_argument(
        "--loads", default="0.5,0.9", help="shares of the first stage's capacity to publish at (default 0.5,0.9)"
    )
    args = parser.parse_args()
    loads = [float(share) for share in args.loads.split(",")]

    key = base64.b64encode(os.urandom(32)).decode()
    with tempfile.TemporaryDirectory(prefix="uc-bench-stages-") as tmp:
        work = Path(tmp)
        files = make_files(work / "in", args.uploads, args.size)
        receiver = Receiver()
        with S3Server(log_path=work / "moto.log") as s3:
            proxy = LatencyProxy(s3.port, args.latency) if args.latency else None
            try:
                figures: dict[str, list[float]] = {}

                def add(name: str, value: float) -> None:
                    figures.setdefault(name, []).append(value)

                def cores(name: str, cpu: dict[str, float], took: float) -> None:
                    """How many of the machine's cores the run kept busy, and the CPU each upload cost."""
                    add(f"{name} cores", sum(cpu.values()) / took)
                    add(f"{name} cpu ms", 1000 * sum(cpu.values()) / args.uploads)
                    for process, seconds in cpu.items():
                        add(f"{name} cpu ms {process}", 1000 * seconds / args.uploads)

                for r in range(1, args.rounds + 1):
                    _, _, alone, cpu = one_topology("first", work, s3, proxy, receiver, key, files, None, f"cap{r}")
                    capacity = args.uploads / alone
                    add("capacity", capacity)
                    cores("first alone", cpu, alone)
                    _, _, piped, cpu = one_topology("pipeline", work, s3, proxy, receiver, key, files, None, f"pipe{r}")
                    add("pipeline share", alone / piped)
                    cores("pipeline", cpu, piped)
                    for load in loads:
                        for kind in ("side", "stages"):
                            lat, arrived, took, cpu = one_topology(
                                kind, work, s3, proxy, receiver, key, files, capacity * load, f"{kind}{load}-{r}"
                            )
                            cores(f"{kind} {load:.0%}", cpu, took)
                            ms = [v * 1000 for v in lat.values()]
                            add(f"{kind} {load:.0%} p50", quantile(ms, 0.5))
                            add(f"{kind} {load:.0%} p99", quantile(ms, 0.99))
                            if kind == "stages":  # each added stage: its result after the one before it
                                hops = [
                                    1000 * (t[later] - t[earlier])
                                    for t in arrived.values()
                                    for earlier, later in (("first", "second"), ("second", "third"))
                                ]
                                add(f"hop {load:.0%} p50", quantile(hops, 0.5))
                                add(f"hop {load:.0%} p99", quantile(hops, 0.99))
                    print(
                        f"round {r}: capacity {capacity:.0f}/s, pipeline keeps {alone / piped:.0%}, "
                        + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items() if "p" in k.split()[-1]),
                        file=sys.stderr,
                    )
            finally:
                if proxy is not None:
                    proxy.stop()
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(
        f"uploads per run {args.uploads} × {args.size} B, S3 latency {args.latency * 1000:g} ms, {args.rounds} rounds"
    )
    print(f"first stage alone: {med['capacity']:.0f} uploads/s")
    print(
        f"first → one event-only stage, on a backlog: {med['pipeline share']:.0%} of the first stage's throughput "
        f"(rounds {', '.join(f'{v:.0%}' for v in figures['pipeline share'])})"
    )
    print(
        "| load | side by side: publish → last result, p50 / p99 (ms) | stages: publish → last stage's result | each added stage: its result after the previous stage's, p50 / p99 |"
    )
    print("|---|---|---|---|")
    for load in (f"{share:.0%}" for share in loads):
        print(
            f"| {load} | {med[f'side {load} p50']:.1f} / {med[f'side {load} p99']:.1f} | "
            f"{med[f'stages {load} p50']:.1f} / {med[f'stages {load} p99']:.1f} | "
            f"{med[f'hop {load} p50']:.1f} / {med[f'hop {load} p99']:.1f} |"
        )
    print("the event-only stages ran with an S3 endpoint that refuses connections: they fetched nothing")
    cpus = os.cpu_count() or 1
    print(f"\nCPU, every process of the run (this machine has {cpus} cores): cores kept busy; CPU per upload (ms)")
    print("| run | cores busy | CPU per upload | of which: " + ", ".join(PROCESSES) + " |")
    print("|---|---|---|---|")
    runs = ["first alone", "pipeline"] + [f"{kind} {share:.0%}" for share in loads for kind in ("side", "stages")]
    for run in runs:
        parts = " / ".join(f"{med.get(f'{run} cpu ms {p}', 0.0):.2f}" for p in PROCESSES)
        print(f"| {run} | {med[f'{run} cores']:.2f} | {med[f'{run} cpu ms']:.2f} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
