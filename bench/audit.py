"""The audit trail at a year of traffic: load, report, show, verify, size, export; and the daemon's CPU with it.

    python bench/audit.py                                 # 10 M records on PostgreSQL, 1 M on SQLite
    python bench/audit.py --records 2000000 --sqlite-records 200000 --daemon-rounds 0
    python bench/audit.py --daemon-only --daemon-rounds 3  # only the daemon's CPU per upload, trail on vs off

Records are made as the daemons make them (format 2: salted commitments, real hashes, one chain per
process) for a year of uploads: three consumers of one stream (file_processor, notify, archive),
two replicas each, a replica restarting every three days (a new writer, so a few hundred chains),
uploaders drawn from a Zipf law over --users, a dozen content types, log-normal sizes, a few
percent retried, duplicated and dead-lettered. They go in with COPY in slices (the rollups' trigger
runs once per slice, as it does per batch from a spool); the lookup indexes are built after the load,
as one restores a dump. PostgreSQL is a private server (initdb + pg_ctl, Debian's postgresql),
fsync off, default shared_buffers (128 MB).

Measured on each store: `audit report --since 365d` by day, user and type (the store's query, median
of 5 after one warm-up; the CLI's own start, ~0.4 s of Python imports, is not in it), `audit show
FILE_UUID` (the lookup, median over 200 random uploads), `audit verify` (records per second; and
from each chain's last anchor, see --help), the database's size per million records, and the peak
RSS of `audit export` for 30 days against 365 (constant memory: the same). Then, with
--daemon-rounds, bench/run.py's measurement of the daemon's CPU per upload with the trail on
(SQLite and PostgreSQL, anchors signed) against off, in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from uploads_consumer.audit.anchors import Anchor, Signer, keygen, verify_keys
from uploads_consumer.audit.record import COLUMNS, LISTS, PERSONAL, ZERO_HASH, commitment, record_hash
from uploads_consumer.audit.schema import DAY_MS
from uploads_consumer.audit.store import PostgresStore, SqliteStore, Store
from uploads_consumer.audit.verify import verify
from uploads_consumer.embedded import PostgresServer, clean_environment

HERE = Path(__file__).resolve().parent
CONSUMERS = {  # consumer: (the steps it runs, its records per upload)
    "file_processor": (["scan", "save"], 1.0),
    "notify": (["email"], 1.0),
    "archive": (["archive"], 1.0),
}
TYPES = [
    ("image/jpeg", 30, 1_800_000),
    ("image/png", 12, 600_000),
    ("application/pdf", 18, 400_000),
    ("video/mp4", 6, 60_000_000),
    ("audio/mpeg", 5, 5_000_000),
    ("text/plain", 6, 8_000),
    ("application/zip", 4, 12_000_000),
    ("image/heic", 6, 2_500_000),
    ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", 5, 150_000),
    ("audio/wav", 2, 20_000_000),
    ("video/quicktime", 3, 90_000_000),
    ("application/octet-stream", 3, 1_000_000),
]
NAMES = ["IMG_{n:04d}", "scan-{n}", "report-Q{q}-{y}", "Screenshot {y}-0{q}-1{q}", "invoice_{n}", "voice-memo-{n}"]
REPLICAS, RESTART_DAYS, SLICE = 2, 3, 20_000
BEHIND = 150  # records between an anchor and its chain's head, for verify --incremental
SECONDARY = ["audit_records_event_id", "audit_records_file_uuid", "audit_records_email"]


class Writers:
    """Which process writes a consumer's record at a given time: each replica restarts every few days."""

    def __init__(self, start_ms: int, rng: random.Random) -> None:
        self._start = start_ms
        self._rng = rng
        self.chains: dict[str, tuple[int, str]] = {}  # writer: (its last seq, its last hash)
        self._names: dict[tuple[str, int, int], tuple[str, str]] = {}

    def pick(self, consumer: str, at_ms: int) -> tuple[str, str]:
        """(writer, host) for a record of `consumer` at `at_ms`."""
        replica = self._rng.randrange(REPLICAS)
        generation = (at_ms - self._start) // (RESTART_DAYS * DAY_MS)
        key = (consumer, replica, generation)
        if key not in self._names:
            host = f"uploads-{consumer.replace('_', '-')}-{secrets.token_hex(4)}-{secrets.token_hex(2)}"
            self._names[key] = (f"{host}/1/{secrets.token_hex(4)}", host)
        return self._names[key]


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    total = 0.0
    cumulative = []
    for rank in range(1, n + 1):
        total += 1 / rank**s
        cumulative.append(total)
    return cumulative


def generate(total: int, users: int, seed: int = 7) -> Iterator[tuple]:
    """`total` records, as rows of COLUMNS, in the order their writers made them (time order)."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    start = now - 365 * DAY_MS
    writers = Writers(start, rng)
    people = zipf_weights(users)
    kinds = [t for t, _, _ in TYPES]
    kind_weights = [w for _, w, _ in TYPES]
    medians = {t: m for t, _, m in TYPES}
    made, upload = 0, 0
    # Uploads spread over the year, more by day than by night; each reaches the three consumers.
    per_upload = sum(n for _, n in CONSUMERS.values()) * 1.05
    uploads = int(total / per_upload) + 1
    step = (now - start) / uploads
    while made < total:
        upload += 1
        at = int(start + upload * step + rng.uniform(-step / 2, step / 2))
        hour = (at // 3_600_000) % 24
        if hour < 6 and rng.random() < 0.6:  # nights are quieter: most of their uploads come at 9 instead
            at += (9 - hour) * 3_600_000
        user = rng.choices(range(users), cum_weights=people)[0]
        email = f"user{user}@example{user % 97}.com"
        kind = rng.choices(kinds, weights=kind_weights)[0]
        size = max(1, int(rng.lognormvariate(math.log(medians[kind]), 1.0)))
        name = rng.choice(NAMES).format(n=rng.randrange(10_000), q=rng.randrange(1, 5), y=2026)
        event = (
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        )
        sha = f"{rng.getrandbits(256):064x}"
        for consumer, (steps, _) in CONSUMERS.items():
            outcomes = []
            roll = rng.random()
            if roll < 0.03:
                outcomes = ["retried", "processed"]
            elif roll < 0.035:
                outcomes = ["dead_lettered"]
            elif roll < 0.045:
                outcomes = ["processed", "duplicate"]
            else:
                outcomes = ["processed"]
            for delivery, outcome in enumerate(outcomes, 1):
                if made >= total:
                    return
                writer, host = writers.pick(consumer, at)
                seq, prev = writers.chains.get(writer, (0, ZERO_HASH))
                failed = outcome in ("retried", "dead_lettered")
                reason = None
                if outcome == "retried":
                    reason = f"{steps[-1]}: connection reset by peer; will retry"
                elif outcome == "dead_lettered":
                    reason = f"{steps[-1]}: {name} is not in a format it opens"
                salt = secrets.token_hex(16)
                record = {
                    "format": 2,
                    "writer": writer,
                    "seq": seq + 1,
                    "prev_hash": prev,
                    "recorded_at": at + delivery * 1000 + rng.randrange(2000),
                    "consumer": consumer,
                    "host": host,
                    "pid": 1,
                    "stream": "FILE_UPLOADS",
                    "stream_seq": upload,
                    "deliveries": delivery,
                    "event_id": event[0],
                    "file_uuid": event[1],
                    "email": email,
                    "filename": f"{name}.{kind.rsplit('/', 1)[1][:4]}",
                    "bucket": "uploads",
                    "size": size,
                    "content_type": kind,
                    "sha256": sha,
                    "outcome": outcome,
                    "error_class": "unsupported_media" if outcome == "dead_lettered" else None,
                    "reason": reason,
                    "duration_ms": rng.randrange(20, 4000),
                    "processors": steps if not failed else steps[:-1],
                    "skipped": [],
                    "salt": salt,
                }
                for field in PERSONAL:
                    record[f"{field}_commitment"] = commitment(salt, field, record[field])
                record["hash"] = record_hash(record)
                writers.chains[writer] = (seq + 1, record["hash"])
                made += 1
                yield tuple(json.dumps(record[c]) if c in LISTS else record[c] for c in COLUMNS)


def timed(label: str, started: float) -> float:
    took = time.monotonic() - started
    print(f"  {label}: {took:.1f} s", flush=True)
    return took


async def load_postgres(url: str, total: int, users: int) -> float:
    import asyncpg

    store = PostgresStore(url)
    await store.open()  # the schema, as the daemon makes it
    await store.close()
    conn = await asyncpg.connect(url)
    try:
        for index in SECONDARY:
            await conn.execute(f"DROP INDEX {index}")
        started = time.monotonic()
        rows = generate(total, users)
        loaded = 0
        while True:
            batch = [row for _, row in zip(range(SLICE), rows, strict=False)]
            if not batch:
                break
            await conn.copy_records_to_table("audit_records", records=batch, columns=list(COLUMNS))
            loaded += len(batch)
            if loaded % 1_000_000 < SLICE:
                print(f"  {loaded:,} records loaded ({time.monotonic() - started:.0f} s)", flush=True)
        took = timed(f"COPY of {total:,} records (generated and hashed in Python as it goes)", started)
        started = time.monotonic()
        await conn.execute("CREATE INDEX audit_records_event_id ON audit_records (event_id)")
        await conn.execute("CREATE INDEX audit_records_file_uuid ON audit_records (file_uuid)")
        await conn.execute("CREATE INDEX audit_records_email ON audit_records (email)")
        timed("the lookup indexes built", started)
        started = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        timed("VACUUM ANALYZE", started)
    finally:
        await conn.close()
    return took


def load_sqlite(path: Path, total: int, users: int) -> float:
    import sqlite3

    asyncio.run(_open_sqlite(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    started = time.monotonic()
    rows = generate(total, users)
    marks = ", ".join("?" * len(COLUMNS))
    while True:
        batch = [row for _, row in zip(range(SLICE), rows, strict=False)]
        if not batch:
            break
        conn.execute("BEGIN")
        conn.executemany(f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({marks})", batch)
        conn.execute("COMMIT")
    took = timed(f"SQLite: {total:,} records inserted (indexes and rollup trigger live)", started)
    conn.execute("ANALYZE")
    conn.close()
    return took


async def _open_sqlite(path: Path) -> None:
    store = SqliteStore(path)
    await store.open()
    await store.close()


async def median_ms(call, runs: int = 5) -> tuple[float, float]:
    """(first run, median of the next `runs`) in milliseconds."""
    started = time.perf_counter()
    await call()
    first = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return first, statistics.median(times)


async def sample_uploads(store: Store, n: int) -> list[str]:
    rows = await store._fetch(  # a few pages' worth, chosen at random from the whole table
        "SELECT file_uuid FROM audit_records WHERE id % 997 = 3 LIMIT 5000"
    )
    rng = random.Random(3)
    return [str(r[0]) for r in rng.sample(rows, min(n, len(rows)))]


async def measure(store: Store, label: str, records: int, verify_records: bool = True) -> dict:
    await store.open(create=False)
    since_day = (int(time.time() * 1000) - 365 * DAY_MS) // DAY_MS
    figures: dict = {}
    try:
        for by in (["day"], ["user"], ["type"], ["user", "day"]):
            result: list = []

            async def report(by=by, result=result) -> None:
                result[:] = await store.report(since_day, by, "file_processor")

            first, median = await median_ms(report)
            figures[f"report by {','.join(by)}"] = median
            print(
                f"  {label}: audit report --since 365d --by {','.join(by)}: {median:.1f} ms "
                f"(first run {first:.1f} ms), {len(result):,} groups, {sum(g['records'] for g in result):,} records",
                flush=True,
            )
        uploads = await sample_uploads(store, 200)
        times = []
        for file_uuid in uploads:
            started = time.perf_counter()
            found = await store.lookup(file_uuid)
            times.append((time.perf_counter() - started) * 1000)
            assert found, file_uuid
        figures["show"] = statistics.median(times)
        print(
            f"  {label}: audit show FILE_UUID: median {statistics.median(times):.2f} ms, p95 "
            f"{sorted(times)[int(len(times) * 0.95)]:.2f} ms over {len(times)} uploads",
            flush=True,
        )
        # verify --incremental, against anchors BEHIND records short of each chain's head (about an
        # hour of a busy writer's records), signed and checked with the key, as a deployment runs it.
        private, public = keygen()
        signer = Signer(private)
        anchors = []
        for n, writer in enumerate(await store.writers(), 1):
            [head] = await store.chain_slice(writer, max(0, await store.last_seq(writer) - BEHIND - 1), 1 << 62, 1)
            anchors.append((n, signer.sign(Anchor(writer, head["consumer"], head["seq"], head["hash"], 0)).body()))
        started = time.monotonic()
        checked = await verify(store, anchors, verify_keys([public], "key"), incremental=True)
        took = time.monotonic() - started
        assert checked.ok, checked.breaks[:3]
        figures["incremental"] = took
        print(
            f"  {label}: audit verify --incremental ({len(anchors)} signed anchors, {BEHIND} records behind each "
            f"head): {checked.check.records:,} records read in {took:.1f} s ({checked.not_reread:,} not read again)",
            flush=True,
        )
        if verify_records:
            started = time.monotonic()
            checked = await verify(store, None, None)
            took = time.monotonic() - started
            assert checked.ok and checked.check.records == records, (checked.breaks[:3], checked.check.records)
            figures["verify"] = records / took
            print(
                f"  {label}: audit verify: {records:,} records in {checked.check.chains} chains, {took:.0f} s: "
                f"{records / took:,.0f} records/s",
                flush=True,
            )
    finally:
        await store.close()
    return figures


async def postgres_size(url: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = relnamespace "
            "WHERE nspname = 'public' AND relkind = 'r' ORDER BY 2 DESC"
        )
        return {r[0]: r[1] for r in rows}
    finally:
        await conn.close()


def export_rss(url: str, since: str) -> tuple[int, float, int]:
    """(records, seconds, peak RSS bytes) of `audit export --since` to /dev/null, in a process of its own."""
    env = clean_environment(AUDIT_URL=url)
    started = time.monotonic()
    script = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-m', 'uploads_consumer', 'audit', 'export', '--since', sys.argv[1]], "
        "stdout=subprocess.PIPE, env=None)\n"
        "print(p.returncode, p.stdout.count(b'\\n'), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, since], env=env, capture_output=True, text=True, check=True)
    code, lines, rss_kib = (int(x) for x in done.stdout.split())
    assert code == 0
    return lines, time.monotonic() - started, rss_kib * 1024


def daemon_cpu(rounds: int, uploads: int) -> None:
    """bench/run.py's measurement, with its --audit consumers (anchors signed): CPU per upload on vs off."""
    command = [
        sys.executable,
        str(HERE / "run.py"),
        "--no-baseline",
        "--audit",
        "--large-mib",
        "0",
        "--small",
        str(uploads),
        "--rounds",
        str(rounds),
    ]
    env = {**os.environ}
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    for line in done.stdout.splitlines():
        if "audit" in line or line.startswith(("round", "| ours", "| floor")):
            print("  " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000_000, help="records in PostgreSQL (10 M)")
    parser.add_argument("--sqlite-records", type=int, default=1_000_000, help="records in SQLite (1 M; 0 skips)")
    parser.add_argument("--users", type=int, default=20_000, help="uploaders, drawn from a Zipf law (20 000)")
    parser.add_argument("--no-verify", action="store_true", help="leave out the full verify (minutes at 10 M)")
    parser.add_argument("--no-export", action="store_true", help="leave out the exports (minutes at 10 M)")
    parser.add_argument("--daemon-rounds", type=int, default=3, help="rounds of bench/run.py --audit (0 skips)")
    parser.add_argument("--daemon-uploads", type=int, default=400, help="uploads per round of bench/run.py")
    parser.add_argument("--daemon-only", action="store_true", help="only the daemon's CPU per upload")
    parser.add_argument("--keep", metavar="DIR", help="keep the PostgreSQL cluster in DIR (reuse it with --reuse)")
    parser.add_argument("--reuse", action="store_true", help="measure the cluster in --keep without loading it")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; python {sys.version.split()[0]}", flush=True)
    if not args.daemon_only:
        base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="uploads-audit-bench-"))
        server = PostgresServer(base_dir=base)
        server.start()
        try:
            url = server.url(database="audit")
            if not args.reuse:
                subprocess.run(
                    [
                        str(server.bin_dir / "createdb"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(server.port),
                        "-U",
                        "postgres",
                        "audit",
                    ],
                    check=True,
                )
                print(f"PostgreSQL: loading {args.records:,} records, {args.users:,} uploaders", flush=True)
                asyncio.run(load_postgres(url, args.records, args.users))
            sizes = asyncio.run(postgres_size(url))
            total = sum(sizes.values())
            print(
                f"  PostgreSQL size: {total / 2**30:.2f} GiB, {total / 2**20 / (args.records / 1e6):.0f} MiB per million "
                "records (" + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in sizes.items() if v > 2**20) + ")",
                flush=True,
            )
            asyncio.run(measure(PostgresStore(url), "PostgreSQL", args.records, not args.no_verify))
            for since in () if args.no_export else ("30d", "365d"):
                lines, took, rss = export_rss(url, since)
                print(
                    f"  PostgreSQL: audit export --since {since}: {lines:,} records in {took:.0f} s, "
                    f"peak RSS {rss / 2**20:.0f} MiB",
                    flush=True,
                )
        finally:
            server.stop()
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
        if args.sqlite_records:
            folder = Path(tempfile.mkdtemp(prefix="uploads-audit-sqlite-"))
            try:
                path = folder / "audit.db"
                print(f"SQLite: loading {args.sqlite_records:,} records", flush=True)
                load_sqlite(path, args.sqlite_records, args.users)
                size = sum(p.stat().st_size for p in folder.iterdir())
                print(
                    f"  SQLite size: {size / 2**20 / (args.sqlite_records / 1e6):.0f} MiB per million records",
                    flush=True,
                )
                asyncio.run(measure(SqliteStore(path), "SQLite", args.sqlite_records, not args.no_verify))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    if args.daemon_rounds:
        daemon_cpu(args.daemon_rounds, args.daemon_uploads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
