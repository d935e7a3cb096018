"""The console and `trace` at size: 10 consumers, a stream of 100 000 uploads, a million audit records.

    python bench/console.py                                   # the issue's size
    python bench/console.py --messages 20000 --audit-records 100000 --rounds 10   # a quick look

What is built (a real nats-server, the real console process, the audit trail in SQLite): FILE_UPLOADS
with --messages upload events; ten consumers made by `setup` — six on the uploads, four stages after
them — each having processed all but the newest 200 uploads (its idempotency bucket holds each one's
record and its file_uuid index, as a daemon writes them), with the result events of the last hour
(100 uploads a minute each) on FILE_PROCESSED; 1 000 dead letters across consumers and classes; and
--audit-records records in the audit trail (bench/audit.py's loader: a year of three consumers'
traffic), plus the traced uploads' own.

What is measured, each the median and the 95th percentile of --rounds:
- the overview's server time (`Server-Timing`, the handler alone) and how long one background read of
  NATS takes (the overview renders what the last one read);
- an upload's timeline: its page's server time, for a processed upload, one pending everywhere and a
  dead-lettered one, with the audit trail. A dead letter's upload is an old one: the first look at it
  makes the NATS server load, from disk, the block of each consumer's bucket that holds its record
  (about 4 MiB each), and the page is measured then and once more;
- the console's resident memory (VmRSS, and its peak VmHWM) after all of it;
- `uploads-consumer trace FILE_UUID --json` without an audit store, the whole command's wall time: an
  upload the consumers' records name, one pending (found by reading what follows the ack floors), and
  one no record names (found by reading the stream from its start); and Python's start with the
  command's imports alone, for scale: a round of each at a time, and each case's median as a multiple
  of that one's. The package's bytecode is compiled first, as `pip install` does
  (the Dockerfile's image has it): a checkout run with PYTHONDONTWRITEBYTECODE=1 would compile its
  modules from source at every start, about 30 ms more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import nats
from nats.js.api import DeliverPolicy

import uploads_consumer
from uploads_consumer.config import Settings
from uploads_consumer.dedupe import Where, file_key
from uploads_consumer.embedded import DaemonProcess, NatsServer, clean_environment, free_port
from uploads_consumer.stages import role_of, setup

HERE = Path(__file__).resolve().parent
UPLOAD_STREAM = ["c0", "c1", "c2", "c3", "c4", "c5"]
STAGES = {"c6": "c0", "c7": "c6", "c8": "c1", "c9": "c2"}
RECENT = 200  # the newest uploads, pending for every consumer
RESULTS_PER_MINUTE = 100
CLASSES = ["not_found", "decrypt_failed", "infected", "unsupported_media", "processor_failed"]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f}, p95 {quantile(values, 0.95):.1f}"


def event(rng: random.Random, n: int, bucket: str = "uploads") -> dict:
    file_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    email = f"user{n % 5000}@example.com"
    prefix = f"uploads/{email}/{file_uuid}/"
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "email": email,
        "file_uuid": file_uuid,
        "s3_data_key": prefix + f"IMG_{n:06d}.jpg.enc",
        "s3_metadata_key": prefix + "metadata.json",
        "bucket_name": bucket,
        "timestamp": int(time.time() * 1000),
    }


async def publish_all(js, items, batch: int = 4000) -> list[int]:
    """(subject, body, headers) in order; their sequences."""
    seqs: list[int] = []
    pending = []
    for subject, body, headers in items:
        pending.append(await js.publish_async(subject, body, headers=headers))
        if len(pending) >= batch:
            seqs += [ack.seq for ack in await asyncio.gather(*pending)]
            pending = []
    seqs += [ack.seq for ack in await asyncio.gather(*pending)]
    return seqs


def result_body(e: dict, consumer: str, after: str | None) -> bytes:
    return json.dumps(
        {
            "event_id": e["event_id"],
            "file_uuid": e["file_uuid"],
            "email": e["email"],
            "status": "processed",
            "consumer": consumer,
            "fetched": "plaintext",
            "original_filename": e["s3_data_key"].rsplit("/", 1)[1][:-4],
            "size": 1_800_000,
            "sha256": "0" * 64,
            "content_type": "image/jpeg",
            "processors": ["save"],
            "skipped": [],
            "outputs": {"save": {"path": f"/data/downloads/{e['email']}/{e['file_uuid']}/x.jpg"}},
            "processed_at": int(time.time() * 1000),
            "after": after,
            "upload": e,
            "upstream": {},
        }
    ).encode()


async def build(url: str, messages: int, rng: random.Random) -> dict:
    """The streams, consumers, records, results and dead letters; returns what the measurements need."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=60)
    base = Settings(nats_url=url)  # type: ignore[call-arg]
    began = time.monotonic()
    await setup(js, base, role_of(base))  # the streams, and consumer file_processor (removed below)
    await js.delete_consumer("FILE_UPLOADS", "file_processor")
    events = [event(rng, n) for n in range(messages)]
    old, recent = events[:-RECENT], events[-RECENT:]
    seqs = await publish_all(
        js, (("file.uploads", json.dumps(e).encode(), {"Nats-Msg-Id": e["event_id"]}) for e in old)
    )
    print(f"  {len(old)} uploads published ({time.monotonic() - began:.0f} s)", flush=True)
    # Ten consumers, made now: they start after the old uploads, which their records say they processed.
    for name in [*UPLOAD_STREAM, *STAGES]:
        settings = Settings(nats_url=url, nats_consumer_name=name, after=STAGES.get(name))  # type: ignore[call-arg]
        await setup(js, settings, role_of(settings), deliver=DeliverPolicy.NEW)
    seqs += await publish_all(
        js, (("file.uploads", json.dumps(e).encode(), {"Nats-Msg-Id": e["event_id"]}) for e in recent)
    )
    # The last hour's results: each consumer's newest uploads, 100 a minute, stages after their upstreams.
    hour = min(len(old), 60 * RESULTS_PER_MINUTE)
    results: dict[str, dict[int, int]] = {}  # consumer: upload index → result seq
    for name in [*UPLOAD_STREAM, *STAGES]:
        after = STAGES.get(name)
        items = [
            (
                f"file.processed.{name}",
                result_body(old[i], name, after),
                {"Nats-Msg-Id": f"{old[i]['event_id']}:{name}:processed"},
            )
            for i in range(len(old) - hour, len(old))
        ]
        results[name] = dict(zip(range(len(old) - hour, len(old)), await publish_all(js, items), strict=True))
    print(f"  {hour} results per consumer ({time.monotonic() - began:.0f} s)", flush=True)
    # Each consumer's records: where each old upload was (its message, its result), and the file_uuid index.
    blind = len(old) // 2  # this one's records are removed: trace finds it only by reading the stream
    for name in [*UPLOAD_STREAM, *STAGES]:
        after = STAGES.get(name)
        items = []
        for i, e in enumerate(old):
            if i == blind:
                continue
            stream, seq = ("FILE_UPLOADS", seqs[i]) if after is None else ("FILE_PROCESSED", results[after].get(i, 0))
            where = Where(stream, seq, results[name].get(i), int(time.time() * 1000), e["event_id"]).value()
            key = f"{e['event_id']}.{'0' * 20}"
            items.append((f"$KV.{name}_done.{key}", where, None))
            items.append((f"$KV.{name}_done.{file_key(e['file_uuid'])}", where, None))
        await publish_all(js, items)
        print(f"  {name}'s records ({time.monotonic() - began:.0f} s)", flush=True)
    # Dead letters: a thousand, of the old uploads, across consumers and classes.
    letters = []
    for n in range(1000):
        i = rng.choice([j for j in (rng.randrange(len(old)), rng.randrange(len(old))) if j != blind])
        consumer = UPLOAD_STREAM[n % len(UPLOAD_STREAM)]
        headers = {
            "Nats-Msg-Id": f"FILE_UPLOADS:{seqs[i]}:{consumer}:{n}",
            "Uploads-Consumer": consumer,
            "Uploads-Error-Class": CLASSES[n % len(CLASSES)],
            "Uploads-Error": f"bench letter {n}",
            "Uploads-Stream": "FILE_UPLOADS",
            "Uploads-Stream-Seq": str(seqs[i]),
            "Uploads-Subject": "file.uploads",
            "Uploads-Deliveries": "1",
            "Uploads-Failed-At": "2026-01-26T10:30:00.123Z",
        }
        letters.append(("file.uploads.dlq", json.dumps(old[i]).encode(), headers))
    await publish_all(js, letters)
    await nc.close()
    print(f"  built in {time.monotonic() - began:.0f} s", flush=True)
    processed = [old[i] for i in sorted(results["c9"])[-50:]]  # every consumer has their results
    return {"processed": processed, "pending": recent[:20], "blind": old[blind], "events": events}


def fill_audit(path: Path, records: int, traced: list[dict]) -> None:
    """A year of three consumers' records (bench/audit.py's loader), then the traced uploads' own."""
    sys.path.insert(0, str(HERE))
    from audit import load_sqlite  # the bench folder is not a package

    load_sqlite(path, records, users=20_000)


def get(url: str) -> tuple[float, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        timing = r.headers.get("Server-Timing", "")
        body = r.read().decode()
    return float(re.search(r"dur=([0-9.]+)", timing).group(1)), body


def rss(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {k: int(v.split()[0]) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
    return values["VmRSS"], values["VmHWM"]


async def in_process(url: str, key: str, rounds: int) -> list[float]:
    from uploads_consumer.trace import read_timeline

    settings = Settings(nats_url=url)  # type: ignore[call-arg]
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        assert await read_timeline(settings, key, None) is not None
        times.append((time.perf_counter() - began) * 1000)
    return times


def wall(command: list[str], env: dict[str, str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        times.append((time.perf_counter() - began) * 1000)
        assert done.returncode == 0, done.stderr
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--audit-records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--trace-rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(30)
    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    with NatsServer(work / "nats") as server:
        print(f"building: {args.messages} uploads, 10 consumers, {args.audit_records} audit records", flush=True)
        world = asyncio.run(build(server.url, args.messages, rng))
        audit = work / "audit.db"
        if args.audit_records:
            fill_audit(audit, args.audit_records, world["processed"])
        port = free_port()
        env = clean_environment(NATS_URL=server.url, LOG_FORMAT="json")
        # A read of NATS a second (5 s by default), so that the rounds see many of them.
        console_env = {**env, "CONSOLE_PORT": str(port), "HTTP_PORT": str(port), "CONSOLE_REFRESH": "1s"}
        if args.audit_records:
            console_env["AUDIT_URL"] = f"sqlite:///{audit}"
        console = DaemonProcess(console_env, work / "console.log", args=["console"])
        console.start()
        try:
            console.wait_http(60)
            deadline = time.monotonic() + 300
            while console.http_get("/healthz")[0] != 200:
                assert time.monotonic() < deadline, console.log_text()[-2000:]
                time.sleep(0.2)
            base = f"http://127.0.0.1:{port}"
            time.sleep(3)  # past the first read, which goes an hour back in the results
            overview, reads = [], {}
            for _ in range(args.rounds):
                took, body = get(base + "/")
                overview.append(took)
                at = re.search(r'id="refreshed">([^<]+)</span> \(in (\d+) ms\)', body)
                reads[at.group(1)] = float(at.group(2))
                assert body.count('<td class="name">') == 10, "ten consumers"
                time.sleep(0.3)
            timelines: dict[str, list[float]] = {
                "processed": [],
                "pending": [],
                "dead-lettered, a first look": [],
                "dead-lettered, again": [],
            }
            _, letters_page = get(base + "/dead-letters")
            dead = list(dict.fromkeys(re.findall(r'href="/upload/([0-9a-f-]{36})"', letters_page)))
            for n in range(args.rounds):
                # A dead letter's upload is an old one, nobody looked at before: the NATS server reads each
                # consumer's record from a block on disk it has not loaded (a first look); then once more.
                letter = dead[n % len(dead)]
                for kind, key in (
                    ("processed", world["processed"][n % len(world["processed"])]["file_uuid"]),
                    ("pending", world["pending"][n % len(world["pending"])]["file_uuid"]),
                    ("dead-lettered, a first look", letter),
                    ("dead-lettered, again", letter),
                ):
                    took, body = get(f"{base}/upload/{key}")
                    timelines[kind].append(took)
            now, peak = rss(console.proc.pid)
            print(f"\nconsole ({args.rounds} rounds), server time in ms (Server-Timing):")
            print(f"  overview                               {figures(overview)}")
            print(f"  its background read of NATS            {figures(list(reads.values()))} ({len(reads)} reads)")
            for kind, values in timelines.items():
                print(f"  timeline, {kind:<28} {figures(values)}")
            print(f"  resident memory                        {now:.0f} MiB now, {peak:.0f} MiB at most (VmRSS, VmHWM)")
        finally:
            console.terminate()
        trace_env = {**env}
        trace = [sys.executable, "-m", "uploads_consumer", "trace", "--json"]
        # As installed: `pip install` compiles the package's bytecode (even with PYTHONDONTWRITEBYTECODE=1,
        # which the Dockerfile sets); a checkout run with that variable compiles its modules at every start.
        package = Path(uploads_consumer.__file__).parent
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
        print(f"\ntrace, the whole command without an audit store ({args.trace_rounds} rounds, ms; bytecode compiled):")
        keys = {
            "found by the consumers' records": world["processed"][0]["file_uuid"],
            "pending (a read of the unsettled)": world["pending"][0]["file_uuid"],
            "no record names it (a read of the stream)": world["blind"]["file_uuid"],
        }
        found_by = {
            kind: json.loads(subprocess.run([*trace, key], env=trace_env, capture_output=True, timeout=300).stdout)
            for kind, key in keys.items()
        }
        commands = {kind: [*trace, key] for kind, key in keys.items()}
        imports = [sys.executable, "-c", "import uploads_consumer.cli, uploads_consumer.trace"]
        commands["Python start and the imports alone"] = imports
        # Interleaved, a round of each at a time: the machine's slow moments fall on all of them alike.
        took: dict[str, list[float]] = {kind: [] for kind in commands}
        for _ in range(args.trace_rounds):
            for kind, command in commands.items():
                took[kind] += wall(command, trace_env, 1)
        floor = statistics.median(took["Python start and the imports alone"])
        for kind, values in took.items():
            ratio = statistics.median(values) / floor
            how = f"  [{found_by[kind]['found_by']}]" if kind in found_by else ""
            print(f"  {kind:<44} {figures(values)}  ({ratio:.2f}× the imports){how}")
        print("  the lookup alone, in one process (connect, find, read the timeline):")
        for kind, key in (
            ("found by the consumers' records", world["processed"][1]["file_uuid"]),
            ("pending", world["pending"][1]["file_uuid"]),
            ("no record names it", world["blind"]["file_uuid"]),
        ):
            print(f"    {kind:<42} {figures(asyncio.run(in_process(server.url, key, args.trace_rounds)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
