"""The client-side CPU of each NATS operation the daemon does per upload, side by side in one run.

    python bench/nats_ops.py [--ops 3000] [--concurrency 16] [--rounds 3]

Against a real nats-server (a free port, its own store), with nats-py on uvloop as the daemon runs
it, and MAX_IN_FLIGHT (16) operations in flight: the idempotency lookup (`kv.get`, a miss), the
result event (`js.publish` with a Nats-Msg-Id, waiting for the stream's acknowledgement), the
idempotency record (`kv.put`), the confirmed ack (a request to the message's reply subject), and
what the floor does instead: a bare ack (`msg.ack()`, no confirmation). Prints microseconds of this
process's CPU (user + system) per operation, the median of the rounds, and what the daemon's three
extra round trips and its confirmed ack cost per upload over the floor's bare ack. The server's
own CPU is not counted (it is another process), as in bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StreamConfig
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from uploads_consumer.embedded import NatsServer

LOOKUP = "idempotency lookup (kv.get, a miss)"
BARE_ACK = "bare ack (msg.ack(), the floor's)"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def per_op(count: int, concurrency: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Microseconds of CPU per call of `op`, `concurrency` calls in flight."""
    room = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with room:
            await op(i)

    began = cpu_seconds()
    await asyncio.gather(*(one(i) for i in range(count)))
    return 1e6 * (cpu_seconds() - began) / count


async def deliveries(js: JetStreamContext, subject: str, durable: str, count: int) -> list[Msg]:
    """`count` messages delivered to a durable pull consumer, none of them acknowledged yet."""
    config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1)
    sub = await js.pull_subscribe(subject, durable=durable, stream="UPLOADS", config=config)
    msgs: list[Msg] = []
    while len(msgs) < count:
        msgs += await sub.fetch(min(256, count - len(msgs)), timeout=10)
    return msgs


async def one_round(
    nc: Client, js: JetStreamContext, kv: KeyValue, r: int, count: int, concurrency: int
) -> dict[str, float]:
    subject = f"up.{r}"
    for _ in range(count):
        await js.publish(subject, b"x")
    confirmed = await deliveries(js, subject, f"confirmed{r}", count)
    bare = await deliveries(js, subject, f"bare{r}", count)
    body = b'{"event_id": "e", "status": "processed", "sha256": "' + b"0" * 64 + b'", "outputs": {}}'

    async def lookup(i: int) -> None:
        try:
            await kv.get(f"r{r}.k{i}")
        except KeyNotFoundError:
            pass

    async def result_event(i: int) -> None:
        await js.publish("done.x", body, headers={"Nats-Msg-Id": f"r{r}.{i}:processed"})

    async def record(i: int) -> None:
        await kv.put(f"r{r}.k{i}", b"1")

    async def confirmed_ack(i: int) -> None:
        await nc.request(confirmed[i].reply, b"+ACK", timeout=10)

    async def bare_ack(i: int) -> None:
        await bare[i].ack()

    ops = {
        LOOKUP: lookup,
        "result event (js.publish, acknowledged)": result_event,
        "idempotency record (kv.put)": record,
        "confirmed ack (a request to the reply subject)": confirmed_ack,
        BARE_ACK: bare_ack,
    }
    results = {name: await per_op(count, concurrency, op) for name, op in ops.items()}
    await nc.flush()
    return results


async def measure(url: str, count: int, concurrency: int, rounds: int) -> dict[str, list[float]]:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    await js.add_stream(StreamConfig(name="UPLOADS", subjects=["up.>"]))
    await js.add_stream(StreamConfig(name="RESULTS", subjects=["done.>"]))
    kv = await js.create_key_value(KeyValueConfig(bucket="SEEN"))
    results: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            for name, value in (await one_round(nc, js, kv, r, count, concurrency)).items():
                results.setdefault(name, []).append(value)
    finally:
        await nc.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=3000, help="operations of each kind per round (default 3000)")
    parser.add_argument("--concurrency", type=int, default=16, help="operations in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    args = parser.parse_args()
    try:
        from uvloop import run
    except ImportError:
        from asyncio import run
    began = time.monotonic()
    with NatsServer() as server:
        results = run(measure(server.url, args.ops, args.concurrency, args.rounds))
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"{args.ops} operations of each kind, {args.concurrency} in flight, medians of {args.rounds} rounds")
    print("| operation | µs of client CPU per operation |")
    print("|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.0f} |")
    extra = sum(value for name, value in medians.items() if name != BARE_ACK) - medians[BARE_ACK]
    print()
    print(
        f"the daemon's NATS work per upload over the floor's: {extra:.0f} µs "
        "(lookup + result event + record + confirmed ack, less a bare ack)"
    )
    print(f"({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
