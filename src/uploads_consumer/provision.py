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

from uploads_consumer.config import Settings
from uploads_consumer.errors import UploadsError

UPLOADS_MAX_AGE = 7 * 86400.0  # the seed document's table: limits retention, 7 days, file storage, discard old
RESULTS_MAX_AGE = 30 * 86400.0


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


def consumer_config(settings: Settings, deliver: DeliverPolicy = DeliverPolicy.ALL) -> ConsumerConfig:
    # No server-side BackOff list: it silently replaces ACK_WAIT. Delays come from nak(delay).
    # No server-side max_deliver: once reached, the server drops a message silently (a nak or a
    # crash on the last delivery would lose it). MAX_DELIVER is enforced by the daemon, which
    # dead-letters the message instead (settler.decide).
    return ConsumerConfig(
        durable_name=settings.nats_consumer_name,
        name=settings.nats_consumer_name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=deliver,
        replay_policy=ReplayPolicy.INSTANT,
        ack_wait=settings.ack_wait,
        max_deliver=-1,
        max_ack_pending=settings.max_ack_pending,
        filter_subject=settings.nats_subject,
    )


async def _ensure_stream(
    js: JetStreamContext, report: ProvisionReport, name: str, subject: str, replicas: int, max_age: float | None = None
) -> None:
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=max_age,
            )
        )
        report.created(f"stream {name} (subject {subject}, {replicas} replica{'s' if replicas > 1 else ''})")
        return
    subjects = info.config.subjects or []
    if not any(subject_matches(p, subject) for p in subjects):
        raise ProvisionError(
            f"stream {name} exists but does not capture subject {subject} (it has {', '.join(subjects) or 'none'}); "
            f"add the subject to the stream or set the right NATS_*/DLQ_* variables"
        )
    report.found(f"stream {name} ({info.state.messages} messages, subjects {', '.join(subjects)})")


async def _ensure_consumer(
    js: JetStreamContext, report: ProvisionReport, settings: Settings, deliver: DeliverPolicy
) -> None:
    stream, name = settings.nats_stream_name, settings.nats_consumer_name
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        await js.add_consumer(stream, config=consumer_config(settings, deliver))
        report.created(
            f"consumer {name} on {stream} (pull, ack explicit, deliver {deliver.value}, ack_wait {settings.ack_wait:g}s, "
            f"max_ack_pending {settings.max_ack_pending}; MAX_DELIVER {settings.max_deliver} is enforced by the daemon)"
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
    filters = [*([cfg.filter_subject] if cfg.filter_subject else []), *(cfg.filter_subjects or [])]
    if filters and not any(subject_matches(f, settings.nats_subject) for f in filters):
        report.warnings.append(
            f"consumer {name} filters {', '.join(filters)}, which does not include {settings.nats_subject}"
        )
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


async def provision(
    js: JetStreamContext,
    settings: Settings,
    extra_streams: Sequence[tuple[str, str]] = (),
    deliver: DeliverPolicy = DeliverPolicy.ALL,
) -> ProvisionReport:
    """Idempotently make sure the streams, the consumer and the bucket exist.

    `extra_streams` are (name, subject) pairs that processors publish to (e.g. transcriptions).
    `deliver` applies only when the consumer is created: ALL (the default) or NEW (from now on).
    """
    report = ProvisionReport()
    r = settings.nats_replicas
    await _ensure_stream(js, report, settings.nats_stream_name, settings.nats_subject, r, UPLOADS_MAX_AGE)
    await _ensure_consumer(js, report, settings, deliver)
    await _ensure_stream(js, report, settings.dlq_stream_name, settings.dlq_subject, r)
    if settings.nats_result_subject:
        await _ensure_stream(
            js, report, settings.nats_result_stream_name, settings.nats_result_subject, r, RESULTS_MAX_AGE
        )
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
    info = await js.stream_info(settings.nats_stream_name)
    max_age = info.config.max_age or 0
    if max_age and max_age <= settings.dedupe_ttl:
        return []
    kept = f"{max_age / 86400:g} days" if max_age else "for ever (no max age)"
    return [
        f"stream {settings.nats_stream_name} keeps messages {kept} but DEDUPE_TTL is {settings.dedupe_ttl / 86400:g} days: "
        "a message older than DEDUPE_TTL that is delivered again (e.g. after the consumer is re-created) is "
        "processed again; raise DEDUPE_TTL or the stream's max age"
    ]
