"""`setup`: create what the daemon needs, accept what exists, never delete or narrow anything."""

from __future__ import annotations

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


def consumer_config(settings: Settings) -> ConsumerConfig:
    # No server-side BackOff list: it silently replaces ACK_WAIT. Delays come from nak(delay).
    return ConsumerConfig(
        durable_name=settings.nats_consumer_name,
        name=settings.nats_consumer_name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        replay_policy=ReplayPolicy.INSTANT,
        ack_wait=settings.ack_wait,
        max_deliver=settings.max_deliver,
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


async def _ensure_consumer(js: JetStreamContext, report: ProvisionReport, settings: Settings) -> None:
    stream, name = settings.nats_stream_name, settings.nats_consumer_name
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        await js.add_consumer(stream, config=consumer_config(settings))
        report.created(
            f"consumer {name} on {stream} (pull, ack explicit, ack_wait {settings.ack_wait:g}s, "
            f"max_deliver {settings.max_deliver}, max_ack_pending {settings.max_ack_pending})"
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


async def provision(js: JetStreamContext, settings: Settings) -> ProvisionReport:
    """Idempotently make sure the streams, the consumer and the bucket exist."""
    report = ProvisionReport()
    r = settings.nats_replicas
    await _ensure_stream(js, report, settings.nats_stream_name, settings.nats_subject, r)
    await _ensure_consumer(js, report, settings)
    await _ensure_stream(js, report, settings.dlq_stream_name, settings.dlq_subject, r)
    if settings.nats_result_subject:
        await _ensure_stream(
            js, report, settings.nats_result_stream_name, settings.nats_result_subject, r, RESULTS_MAX_AGE
        )
    if settings.dedupe_bucket:
        await _ensure_bucket(js, report, settings)
    return report
