"""Stages (`AFTER=NAME`): a consumer that takes an upload only once consumer NAME has completed it.

A stage reads NAME's result events, not the upload stream: its durable lives on the result stream
(`NATS_RESULT_STREAM_NAME`) with the filters `{NATS_RESULT_SUBJECT}.{NAME}` and its own replay subject
`{NATS_RESULT_SUBJECT}.replay.{consumer}`. NAME publishes a result event only once it has processed an
upload, so an upload NAME dead-lettered never reaches the stage, and one NAME completes after a replay
reaches it once. Each result event carries the upload event itself (`upload`) and what the stages before
NAME produced (`upstream`): the stage works on the same upload, with the same idempotency key, as a
consumer of the upload stream, and sees what came before it.

Every consumer also records what it does in its durable's metadata: where its results go, the consumer it
follows, what its chain fetches and whether it removes the stored upload. Setup reads them back to refuse
a stage after a consumer that publishes no results, a cycle, and an upload removed while a consumer that
reads it is not done with it (ARCHIVE_DELETE_SOURCE).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from uploads_consumer.config import Settings, default_dedupe_bucket, result_subject
from uploads_consumer.events import Incoming, parse_event, parse_result
from uploads_consumer.provision import ProvisionError, ProvisionReport, consumer_filters, provision

META_RESULTS = "uploads_consumer_results"
"""The subject its result events go to; empty: it publishes none."""
META_AFTER = "uploads_consumer_after"
"""The consumer it follows (a stage); empty: it reads the upload stream."""
META_FETCHES = "uploads_consumer_fetches"
"""What its chain reads of an upload: event, object or plaintext."""
META_REMOVES = "uploads_consumer_removes_upload"
"""`true` when a step of its chain deletes the stored upload (ARCHIVE_DELETE_SOURCE)."""
META_BUCKET = "uploads_consumer_bucket"
"""Its idempotency bucket (DEDUPE_BUCKET), where `trace` finds what it processed; empty: none."""


class UpstreamMissing(ProvisionError):
    """The consumer AFTER names does not exist (yet): the daemon waits for it, `setup` refuses."""


@dataclass(frozen=True)
class Role:
    """What a consumer does, as the other consumers' setup needs to know it (its durable's metadata).
    `fetches` and `removes_upload` are None when unknown (setup run without the processors' settings)."""

    results: str | None
    after: str | None
    fetches: str | None = None
    removes_upload: bool | None = None
    bucket: str | None = None

    def metadata(self) -> dict[str, str]:
        out = {META_RESULTS: self.results or "", META_AFTER: self.after or "", META_BUCKET: self.bucket or ""}
        if self.fetches is not None:
            out[META_FETCHES] = self.fetches
        if self.removes_upload is not None:
            out[META_REMOVES] = "true" if self.removes_upload else "false"
        return out


def role_of(settings: Settings, fetches: str | None = None, removes_upload: bool | None = None) -> Role:
    return Role(settings.result_subject, settings.after, fetches, removes_upload, settings.dedupe_bucket or None)


# -- what a stage reads


def parser_for(settings: Settings) -> Callable[[bytes], Incoming]:
    """How this consumer reads a message body: an upload event, or (a stage) its upstream's result."""
    after = settings.after
    if after is None:
        return lambda body: Incoming(parse_event(body))
    return lambda body: parse_result(body, after)


# -- the consumers of a stream, as a graph


@dataclass
class Node:
    """One consumer of the pipeline: on the upload stream, or a stage on the result stream."""

    name: str
    stream: str
    info: ConsumerInfo
    after: str | None = None
    results: str | None = None
    """Where its results go; None when its metadata does not say (made by another tool or version)."""
    results_known: bool = False
    fetches: str | None = None
    removes_upload: bool = False
    bucket: str | None = None
    """Its idempotency bucket: as its metadata says, else `{name}_done` (the default); None: it has none."""

    @property
    def pending(self) -> int:
        return self.info.num_pending or 0


@dataclass
class Topology:
    """Every consumer of the upload stream and every stage, by name (a stage wins over a consumer of the
    same name left behind on the upload stream, which `lingering` lists)."""

    nodes: dict[str, Node] = field(default_factory=dict)
    lingering: list[Node] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)
    """Streams whose consumers could not be listed (no answer: this user may not list them)."""

    def upstream_chain(self, name: str) -> list[str]:
        """The consumers before `name`, nearest first; stops at a cycle (the name seen again)."""
        chain: list[str] = []
        node = self.nodes.get(name)
        while node is not None and node.after is not None and node.after not in chain and node.after != name:
            chain.append(node.after)
            node = self.nodes.get(node.after)
        return chain

    def order(self) -> list[Node]:
        """Consumers of the upload stream first, then each stage after what it follows."""
        return sorted(self.nodes.values(), key=lambda n: (len(self.upstream_chain(n.name)), n.name))


def _node(info: ConsumerInfo, stream: str, results_base: str | None) -> Node:
    meta = info.config.metadata or {}
    node = Node(info.name, stream, info, bucket=default_dedupe_bucket(info.name))
    if META_BUCKET in meta:
        node.bucket = meta[META_BUCKET] or None
    if META_RESULTS in meta:
        node.results_known = True
        node.results = meta[META_RESULTS] or None
        node.after = meta.get(META_AFTER) or None
        node.fetches = meta.get(META_FETCHES) or None
        node.removes_upload = meta.get(META_REMOVES) == "true"
    elif results_base is not None:  # a stage made without metadata: its filter says what it follows
        for subject in consumer_filters(info.config):
            rest = subject.removeprefix(results_base + ".")
            if rest != subject and rest and "." not in rest and rest not in ("*", ">"):
                node.after = rest
    return node


async def read_pipeline(js: JetStreamContext, settings: Settings) -> Topology:
    """The consumers of the upload stream, and the stages on the result stream (a reader of the results
    that follows no consumer, such as another service's durable, is not part of it)."""
    found = Topology()
    base = settings.nats_result_subject or None
    for stream, base_for in ((settings.nats_stream_name, None), (settings.nats_result_stream_name, base)):
        try:
            infos = await js.consumers_info(stream)
        except NotFoundError:
            continue
        except (TimeoutError, nats.errors.TimeoutError):  # NATS does not answer a request it refuses
            found.unread.append(stream)
            continue
        for info in infos:
            if not info.config.durable_name:  # an ephemeral reader (trace's, `nats sub`'s): no job of the pipeline
                continue
            node = _node(info, stream, base_for)
            if stream != settings.nats_stream_name and node.after is None:
                continue
            if node.name in found.nodes:  # a consumer that became a stage: the stage is the one that runs
                found.lingering.append(found.nodes[node.name])
            found.nodes[node.name] = node
    return found


async def oldest_pending_age(js: JetStreamContext, stream: str, consumer: ConsumerInfo) -> float | None:
    """Age in seconds of the first message after the consumer's ack floor that its filters take in; None
    when nothing is pending or unacknowledged. (Another consumer's messages past the floor — a replay
    aimed at it — are not this consumer's.)"""
    if not (consumer.num_pending or consumer.num_ack_pending):
        return None
    start = (consumer.ack_floor.stream_seq or 0 if consumer.ack_floor else 0) + 1
    oldest: float | None = None
    filters: list[str | None] = [*consumer_filters(consumer.config)] or [None]
    for subject in filters:
        try:
            msg = await js.get_msg(stream, seq=start, next=True, subject=subject)
        except Exception:  # noqa: BLE001 - none left on that subject, deleted or expired
            continue
        if msg.time is not None:
            published = msg.time.timestamp()
            oldest = published if oldest is None else min(oldest, published)
    return None if oldest is None else max(0.0, time.time() - oldest)


def check(pipeline: Topology, settings: Settings, role: Role) -> list[str]:
    """Refuse (ProvisionError) what cannot work; return warnings. For a stage: its upstream exists and
    publishes its results where the stage reads them, and AFTER makes no cycle. For every consumer: an
    upload is removed (ARCHIVE_DELETE_SOURCE) only after every consumer that reads it is done with it."""
    warnings: list[str] = []
    me = settings.nats_consumer_name
    after = settings.after
    if pipeline.unread:
        listing = ", ".join(f"$JS.API.CONSUMER.LIST.{stream}" for stream in pipeline.unread)
        return [
            f"the checks across consumers (a stage's upstream, cycles, ARCHIVE_DELETE_SOURCE) were not made: "
            f"no answer to listing the consumers of {', '.join(pipeline.unread)} (allow publishing to {listing})"
        ]
    if after is not None:
        upstream = pipeline.nodes.get(after)
        if upstream is None:
            raise UpstreamMissing(
                f"consumer {after} (AFTER) does not exist on {settings.nats_stream_name} or "
                f"{settings.nats_result_stream_name}: set it up first (its daemon with AUTO_SETUP, or "
                f"`uploads-consumer setup` with its settings)"
            )
        expected = result_subject(settings.nats_result_subject, after)
        if upstream.results_known and upstream.results is None:
            raise ProvisionError(
                f"consumer {after} (AFTER) publishes no result events (its NATS_RESULT_SUBJECT is empty): a stage "
                f"after it would never get an upload; give it NATS_RESULT_SUBJECT={settings.nats_result_subject}"
            )
        if upstream.results_known and upstream.results != expected:
            raise ProvisionError(
                f"consumer {after} (AFTER) publishes its results on {upstream.results}, but this stage reads "
                f"{expected}: give both the same NATS_RESULT_SUBJECT"
            )
        if not upstream.results_known:
            warnings.append(
                f"consumer {after} (AFTER) does not say where its results go (made by another tool or a version "
                f"before stages): this stage reads {expected}; run `uploads-consumer setup` with {after}'s settings"
            )
        cycle = [after, *pipeline.upstream_chain(after)]
        if me in cycle:
            path = " → ".join([me, *cycle[: cycle.index(me) + 1]])
            raise ProvisionError(f"AFTER={after} makes a cycle: {path}; a stage cannot follow itself")
    for node in pipeline.lingering:
        if node.name == me:
            warnings.append(
                f"consumer {me} also exists on {node.stream} (from before it was a stage): it keeps collecting "
                f"every upload (pending {node.pending}); delete it with `nats consumer rm {node.stream} {me}`"
            )
    warnings += _check_removal(pipeline, settings, role)
    return warnings


def _check_removal(pipeline: Topology, settings: Settings, role: Role) -> list[str]:
    """The stored upload may be removed only once every consumer that reads it is done with it: each
    other consumer either comes before the one that removes it (its stages, AFTER) or reads only the event."""
    me = settings.nats_consumer_name
    mine = set() if settings.after is None else {settings.after, *pipeline.upstream_chain(settings.after)}
    if role.removes_upload:
        readers = sorted(
            n.name for n in pipeline.nodes.values() if n.name != me and n.name not in mine and n.fetches != "event"
        )
        if readers:
            raise ProvisionError(
                f"a step of this chain deletes the stored upload after it (ARCHIVE_DELETE_SOURCE), but consumer(s) "
                f"{', '.join(readers)} may still read it: every other consumer that reads uploads must come before "
                f"this one in its stages (AFTER)"
            )
        return []
    warnings: list[str] = []
    for node in pipeline.nodes.values():
        if node.name == me or not node.removes_upload or me in pipeline.upstream_chain(node.name):
            continue
        problem = (
            f"consumer {node.name} deletes the stored upload after its step (ARCHIVE_DELETE_SOURCE), and this "
            f"consumer does not come before it: make {node.name} a stage after this one (AFTER), or turn its "
            "deletion off"
        )
        if role.fetches is None:
            warnings.append(
                problem + " (unless this chain reads only the event: its processors are not configured here)"
            )
        elif role.fetches != "event":
            raise ProvisionError(problem)
    return warnings


async def setup(
    js: JetStreamContext,
    settings: Settings,
    role: Role,
    extra_streams: Sequence[tuple[str, str]] = (),
    deliver: DeliverPolicy = DeliverPolicy.ALL,
    enable_replay: bool = False,
) -> ProvisionReport:
    """`provision` with the checks that span consumers: a stage's upstream, cycles, removing the upload.
    The checks come first, so nothing is created for a configuration that is refused."""
    pipeline = await read_pipeline(js, settings)
    warnings = check(pipeline, settings, role)
    report = await provision(js, settings, extra_streams, deliver, enable_replay, role.metadata())
    report.warnings += warnings
    return report


async def verify(js: JetStreamContext, settings: Settings, role: Role) -> list[str]:
    """The same checks without creating anything (AUTO_SETUP=false)."""
    return check(await read_pipeline(js, settings), settings, role)
