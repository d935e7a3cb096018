"""`setup`: create what the daemon needs, accept what exists, never delete or narrow anything."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    ReplayPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from uploads_consumer.config import Settings, default_dedupe_bucket
from uploads_consumer.errors import UploadsError, describe

UPLOADS_MAX_AGE = 7 * 86400.0  # the seed document's table: limits retention, 7 days, file storage, discard old
RESULTS_MAX_AGE = 30 * 86400.0  # config.STAGE_DEDUPE_TTL follows it


class ProvisionError(UploadsError):
    """Something exists in a shape the daemon cannot work with; an operator must decide."""


@dataclass
class ProvisionReport:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def found(self, what: str) -> None:
        self.lines.append(f"found   {what}")

    def created(self, what: str) -> None:
        self.lines.append(f"created {what}")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching with `*` and `>` wildcards."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def replay_subjects(settings: Settings) -> str:
    """What the upload stream captures besides the upload subject: every consumer's replay subject."""
    return f"{settings.nats_subject}.replay.>"


def consumer_config(
    settings: Settings, deliver: DeliverPolicy = DeliverPolicy.ALL, metadata: dict[str, str] | None = None
) -> ConsumerConfig:
    # No server-side BackOff list: it silently replaces ACK_WAIT. Delays come from nak(delay).
    # No server-side max_deliver: once reached, the server drops a message silently (a nak or a
    # crash on the last delivery would lose it). MAX_DELIVER is enforced by the daemon, which
    # dead-letters the message instead (settler.decide).
    # Two filters: what it processes (the uploads, or a stage's upstream's results), and this consumer's
    # own replay subject, where `dlq replay` puts back what this consumer dead-lettered without the other
    # consumers of the stream seeing it again.
    return ConsumerConfig(
        durable_name=settings.nats_consumer_name,
        name=settings.nats_consumer_name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=deliver,
        replay_policy=ReplayPolicy.INSTANT,
        ack_wait=settings.ack_wait,
        max_deliver=-1,
        max_ack_pending=settings.max_ack_pending,
        filter_subjects=settings.source.filters,
        metadata=metadata or None,
    )


def consumer_filters(config: ConsumerConfig) -> list[str]:
    return [*([config.filter_subject] if config.filter_subject else []), *(config.filter_subjects or [])]


async def _ensure_stream(
    js: JetStreamContext,
    report: ProvisionReport,
    name: str,
    subject: str,
    replicas: int,
    max_age: float | None = None,
    also: str | None = None,
    widen: str | None = None,
) -> StreamConfig:
    """The stream capturing `subject` (and `also`, when it creates it); returns its configuration.
    `widen`: a subject pattern to add to an existing stream that does not capture `subject` (only for
    streams that hold the daemon's own output), instead of refusing it."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        subjects = [subject, *([also] if also else [])]
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age,
        )
        await js.add_stream(config)
        report.created(
            f"stream {name} (subject{'s' if also else ''} {', '.join(subjects)}, "
            f"{replicas} replica{'s' if replicas > 1 else ''})"
        )
        return config
    subjects = info.config.subjects or []
    if widen is not None and not any(subject_matches(p, subject) for p in subjects):
        info.config.subjects = subjects = [*subjects, widen]
        await js.update_stream(info.config)
        report.lines.append(f"added   subject {widen} to stream {name}")
    if not any(subject_matches(p, subject) for p in subjects):
        raise ProvisionError(
            f"stream {name} exists but does not capture subject {subject} (it has {', '.join(subjects) or 'none'}); "
            f"add the subject to the stream or set the right NATS_*/DLQ_* variables"
        )
    report.found(f"stream {name} ({info.state.messages} messages, subjects {', '.join(subjects)})")
    return info.config


async def _ensure_consumer(
    js: JetStreamContext,
    report: ProvisionReport,
    settings: Settings,
    deliver: DeliverPolicy,
    replayable: bool,
    enable_replay: bool,
    metadata: dict[str, str] | None,
) -> None:
    source = settings.source
    stream, name = source.stream, settings.nats_consumer_name
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        config = consumer_config(settings, deliver, metadata)
        if not replayable:  # the stream cannot hold the replay subject: a filter on it would be refused
            config.filter_subjects = [source.subject]
        await js.add_consumer(stream, config=config)
        report.created(
            f"consumer {name} on {stream} (pull, ack explicit, deliver {deliver.value}, filter "
            f"{', '.join(config.filter_subjects or [])}, ack_wait {settings.ack_wait:g}s, max_ack_pending "
            f"{settings.max_ack_pending}; MAX_DELIVER {settings.max_deliver} is enforced by the daemon)"
        )
        return
    cfg = info.config
    if cfg.deliver_subject:
        raise ProvisionError(
            f"consumer {name} on {stream} is a push consumer; the daemon needs a pull consumer (delete it or set NATS_CONSUMER_NAME)"
        )
    if cfg.ack_policy not in (AckPolicy.EXPLICIT, "explicit"):
        raise ProvisionError(
            f"consumer {name} on {stream} has ack policy {cfg.ack_policy}; the daemon needs explicit acks"
        )
    filters = consumer_filters(cfg)
    if replayable and filters and settings.replay_subject not in filters:
        if enable_replay:
            cfg.filter_subjects, cfg.filter_subject = [*filters, settings.replay_subject], None
            info = await js.add_consumer(stream, config=cfg)  # no action given: create or update
            cfg = info.config
            report.lines.append(f"added   filter {settings.replay_subject} to consumer {name}")
        else:
            report.warnings.append(
                f"consumer {name} does not read its replay subject {settings.replay_subject}: `dlq replay` cannot "
                f"give it back a dead letter without the stream's other consumers seeing it again; run "
                f"`uploads-consumer setup --enable-replay` to add that filter"
            )
    if filters and not any(subject_matches(f, source.subject) for f in filters):
        report.warnings.append(f"consumer {name} filters {', '.join(filters)}, which does not include {source.subject}")
    if cfg.max_deliver and cfg.max_deliver > 0:
        report.warnings.append(
            f"consumer {name} has max_deliver {cfg.max_deliver}: the server gives up on a message after that many "
            "deliveries; the daemon dead-letters it on its last delivery instead of retrying (set it to -1 with "
            "`nats consumer edit` and use MAX_DELIVER to let the daemon decide)"
        )
    if cfg.backoff:
        report.warnings.append(
            f"consumer {name} has a server-side BackOff list, which replaces ACK_WAIT for redeliveries; "
            "recreate it without one (the daemon naks with RETRY_BACKOFF delays itself)"
        )
    if metadata is not None and any((cfg.metadata or {}).get(k) != v for k, v in metadata.items()):
        # What this consumer does, for the other consumers' setup (stages): the one field setup keeps current.
        cfg.metadata = {**(cfg.metadata or {}), **metadata}
        try:
            info = await js.add_consumer(stream, config=cfg)
            cfg = info.config
        except Exception as exc:  # noqa: BLE001 - a user that may not edit consumers: the rest still works
            report.warnings.append(
                f"consumer {name}: could not record what it does in its metadata ({describe(exc)}); stages "
                "and ARCHIVE_DELETE_SOURCE checks of other consumers cannot see it: run `uploads-consumer setup` "
                "with this consumer's settings as a user that may edit consumers"
            )
    report.found(
        f"consumer {name} on {stream} (ack_wait {cfg.ack_wait or 0:g}s, max_deliver {cfg.max_deliver}, "
        f"max_ack_pending {cfg.max_ack_pending}, pending {info.num_pending}, ack pending {info.num_ack_pending})"
    )


async def _ensure_bucket(js: JetStreamContext, report: ProvisionReport, settings: Settings) -> None:
    bucket = settings.dedupe_bucket
    try:
        await js.key_value(bucket)
        report.found(f"key-value bucket {bucket}")
    except BucketNotFoundError:
        await js.create_key_value(bucket=bucket, ttl=settings.dedupe_ttl, history=1, replicas=settings.nats_replicas)
        report.created(f"key-value bucket {bucket} (ttl {settings.dedupe_ttl:g}s)")
        if warning := await _records_left_behind(js, settings):
            report.warnings.append(warning)


async def _records_left_behind(js: JetStreamContext, settings: Settings) -> str | None:
    """A consumer that has delivered messages before, now given a bucket of its own: until
    DEDUPE_BUCKET followed NATS_CONSUMER_NAME, every consumer recorded its uploads in the shared
    `file_processor_done`, and a redelivery would no longer find them (an email or webhook again)."""
    shared = default_dedupe_bucket(Settings.model_fields["nats_consumer_name"].default)
    if settings.dedupe_bucket == shared:
        return None
    try:
        delivered = (await js.consumer_info(settings.source.stream, settings.nats_consumer_name)).delivered
        await js.key_value(shared)
    except (NotFoundError, BucketNotFoundError):
        return None
    # The consumer's own count of deliveries, not the stream sequence: a consumer created with
    # `--deliver new` starts at the stream's last sequence without having delivered anything.
    if not delivered or not delivered.consumer_seq:
        return None
    return (
        f"key-value bucket {settings.dedupe_bucket} is new, but consumer {settings.nats_consumer_name} has delivered "
        f"messages before and {shared} exists: if it ran a version that recorded its uploads in {shared}, set "
        f"DEDUPE_BUCKET={shared} to keep those records (a redelivered upload would otherwise run its steps again)"
    )


async def _ensure_replay_subjects(
    js: JetStreamContext, report: ProvisionReport, settings: Settings, config: StreamConfig, enable_replay: bool
) -> bool:
    """Whether the upload stream captures the consumers' replay subjects (adding them when asked)."""
    subjects = config.subjects or []
    if any(subject_matches(p, settings.replay_subject) for p in subjects):
        return True
    wanted = replay_subjects(settings)
    if enable_replay:
        config.subjects = [*subjects, wanted]
        await js.update_stream(config)
        report.lines.append(f"added   subject {wanted} to stream {settings.nats_stream_name}")
        return True
    report.warnings.append(
        f"stream {settings.nats_stream_name} does not capture {wanted}: `dlq replay` can put a dead letter "
        f"back only on {settings.nats_subject}, which every consumer of the stream reads (it refuses while "
        f"there are others); run `uploads-consumer setup --enable-replay` to add the subject"
    )
    return False


async def provision(
    js: JetStreamContext,
    settings: Settings,
    extra_streams: Sequence[tuple[str, str]] = (),
    deliver: DeliverPolicy = DeliverPolicy.ALL,
    enable_replay: bool = False,
    metadata: dict[str, str] | None = None,
) -> ProvisionReport:
    """Idempotently make sure the streams, the consumer and the bucket exist.

    The consumer is made where it reads (`settings.source`): on the upload stream, or for a stage
    (AFTER) on the result stream. `extra_streams` are (name, subject) pairs that processors publish to
    (e.g. transcriptions). `deliver` applies only when the consumer is created: ALL (the default) or NEW
    (from now on). `enable_replay` widens an existing upload stream and consumer by the replay subjects
    (the one change to what exists that setup makes, and only when asked). `metadata`: what this
    consumer does, recorded on its durable (and kept current) for the other consumers' setup.
    """
    report = ProvisionReport()
    r = settings.nats_replicas
    source = settings.source
    replayable = True
    if source.after is None:
        uploads = await _ensure_stream(
            js, report, settings.nats_stream_name, settings.nats_subject, r, UPLOADS_MAX_AGE, replay_subjects(settings)
        )
        replayable = await _ensure_replay_subjects(js, report, settings, uploads, enable_replay)
    if settings.nats_result_subject:
        # Each consumer's results go to `{NATS_RESULT_SUBJECT}.{consumer}` and a stage's replays to
        # `{NATS_RESULT_SUBJECT}.replay.{consumer}`: the stream captures `{NATS_RESULT_SUBJECT}.>`. One made by
        # an earlier version for the bare subject is widened: the daemon could not publish its results otherwise.
        wanted = f"{settings.nats_result_subject}.>"
        results = await _ensure_stream(
            js, report, settings.nats_result_stream_name, wanted, r, RESULTS_MAX_AGE, widen=wanted
        )
        if source.after is not None:
            replayable = any(subject_matches(p, source.replay_subject) for p in results.subjects or [])
    await _ensure_consumer(js, report, settings, deliver, replayable, enable_replay, metadata)
    await _ensure_stream(js, report, settings.dlq_stream_name, settings.dlq_subject, r)
    for name, subject in extra_streams:
        await _ensure_stream(js, report, name, subject, r, RESULTS_MAX_AGE)
    if settings.dedupe_bucket:
        await _ensure_bucket(js, report, settings)
    return report


async def retention_warnings(js: JetStreamContext, settings: Settings) -> list[str]:
    """What the upload stream keeps versus what the idempotency bucket remembers.

    A message older than DEDUPE_TTL that is delivered again (a consumer re-created with "deliver
    all", a replay) is processed again: say so when the stream can hold messages that old.
    """
    if not settings.dedupe_bucket:
        return []
    stream = settings.source.stream  # the upload stream, or a stage's upstream's results
    info = await js.stream_info(stream)
    max_age = info.config.max_age or 0
    if max_age and max_age <= settings.dedupe_ttl:
        return []
    kept = f"{max_age / 86400:g} days" if max_age else "for ever (no max age)"
    return [
        f"stream {stream} keeps messages {kept} but DEDUPE_TTL is {settings.dedupe_ttl / 86400:g} days: "
        "a message older than DEDUPE_TTL that is delivered again (e.g. after the consumer is re-created) is "
        "processed again; raise DEDUPE_TTL or the stream's max age"
    ]
