"""Least privilege: what each role needs of NATS and S3, computed from the settings and the chain.

Three roles (`uploads-consumer setup --print-permissions --role ROLE`):

- `daemon`: the daemon with `AUTO_SETUP=false` (an admin ran `setup`): read its consumer, pull, settle,
  its idempotency bucket, publish its results, dead letters and what its processors publish;
- `operator`: `status`, `trace`, `dlq list`, `dlq replay`, `keys check` and the console (what an operator
  runs), and with `AUDIT_URL` the anchors `audit verify` reads;
- `admin`: `setup` (and a daemon with `AUTO_SETUP=true`, which needs `daemon` and `admin` together).

Each set was measured: the daemon and every command run against a nats-server that allows exactly it
(tests/test_permissions.py). Subjects are NATS permission subjects (`*` one token, `>` the rest).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uploads_consumer.config import Settings

ROLES = ("daemon", "operator", "admin")
FORMATS = ("nats-conf", "nsc", "json")
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


@dataclass(frozen=True)
class AwsGrant:
    """AWS actions on resources (ARNs), and why: one statement of an IAM policy (S3's, or another
    service's a processor uses: SNS for `sms`)."""

    actions: tuple[str, ...]
    resources: tuple[str, ...]
    why: str


@dataclass
class Permissions:
    role: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    aws: list[AwsGrant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def allow(self, *subjects: str) -> None:
        self.publish += [s for s in subjects if s not in self.publish]

    def iam_policy(self) -> dict[str, Any]:
        return {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": f"S{i}", "Effect": "Allow", "Action": list(g.actions), "Resource": list(g.resources)}
                for i, g in enumerate(self.aws, 1)
            ],
        }


def _buckets(settings: Settings) -> list[str]:
    return sorted(settings.allowed_buckets) or ["*"]


def _reads_uploads(settings: Settings, actions: tuple[str, ...], why: str) -> list[AwsGrant]:
    buckets = _buckets(settings)
    return [
        AwsGrant(actions, tuple(f"arn:aws:s3:::{b}/uploads/*" for b in buckets), why),
        # Without ListBucket, S3 answers 403 instead of 404 for a missing key: an upload whose
        # object is gone would be retried as a refusal instead of dead-lettered not_found.
        AwsGrant(("s3:ListBucket",), tuple(f"arn:aws:s3:::{b}" for b in buckets), "a missing object is 404, not 403"),
    ]


def _anchors(settings: Settings) -> str | None:
    """The audit anchor stream, when this consumer is audited and anchors are on (contract 12.5)."""
    return settings.audit_anchor_stream if settings.audit_url is not None and settings.audit_anchor_stream else None


def daemon(
    settings: Settings,
    streams: Sequence[tuple[str, str]] = (),
    fetches: str | None = "plaintext",
    grants: Sequence[AwsGrant] = (),
) -> Permissions:
    """What the daemon of this consumer and chain does, with AUTO_SETUP=false. `streams`: what its
    processors publish to; `fetches`: what its chain reads of an upload (event, object, plaintext);
    `grants`: what its processors need of S3 besides."""
    s = settings
    source = s.source
    p = Permissions("daemon")
    consumer = f"{source.stream}.{s.nats_consumer_name}"
    p.allow(
        f"$JS.API.STREAM.INFO.{source.stream}",  # its retention against DEDUPE_TTL, at start
        f"$JS.API.CONSUMER.INFO.{consumer}",  # its consumer's ack_wait and max_deliver, kept fresh
        f"$JS.API.CONSUMER.MSG.NEXT.{consumer}",  # pull
        f"$JS.ACK.{consumer}.>",  # ack, nak, progress, term
        f"$JS.API.STREAM.MSG.GET.{source.stream}",  # copy a message the server stopped delivering
        f"$JS.API.CONSUMER.LIST.{s.nats_stream_name}",  # the checks across consumers (stages, deletions)
    )
    if s.nats_result_subject:
        p.allow(f"$JS.API.CONSUMER.LIST.{s.nats_result_stream_name}")
    if s.dedupe_bucket:
        bucket = s.dedupe_bucket
        p.allow(f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.MSG.GET.KV_{bucket}", f"$KV.{bucket}.>")
    if s.result_subject:
        p.allow(s.result_subject)
    p.allow(s.dlq_subject)
    p.allow(*(subject for _, subject in streams))
    if _anchors(s):
        p.allow(s.own_anchor_subject)  # its audit chains' heads; nothing else there
    p.subscribe = [f"{s.nats_inbox_prefix}.>", f"{ADVISORY}.{consumer}"]
    if fetches in ("object", "plaintext"):
        p.aws += _reads_uploads(s, ("s3:GetObject",), "the upload's object and metadata.json")
    p.aws += list(grants)
    if s.auto_setup:
        p.notes.append("AUTO_SETUP=true: this daemon also needs the admin role's set (or set AUTO_SETUP=false)")
    return p


def operator(settings: Settings) -> Permissions:
    """`status`, `trace`, `dlq list`, `dlq replay`, `keys check` and the console: reads, and giving dead
    letters back."""
    s = settings
    p = Permissions("operator")
    streams = [s.nats_stream_name, *([s.nats_result_stream_name] if s.nats_result_subject else [])]
    # Any stream's figures and messages: the upload, result and dead-letter streams, and every consumer's
    # bucket (what it processed and where, for trace; what its replicas say of themselves, for status). A
    # bucket's stream is KV_{its name}, and a subject wildcard cannot match part of a token.
    p.allow("$JS.API.STREAM.INFO.*", "$JS.API.STREAM.MSG.GET.*")
    for stream in streams:  # status, trace, the console: every consumer and stage, where each stands
        p.allow(f"$JS.API.CONSUMER.LIST.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.*")
    for stream in [*streams, s.dlq_stream_name]:
        # trace and the console read a stretch of a stream through an ephemeral consumer of their own
        # (stream_reader.py): one the server names, acknowledgements off, gone 10 s after its last use.
        p.allow(f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*")
    p.allow(  # dlq replay, and the console's
        f"$JS.API.STREAM.MSG.DELETE.{s.dlq_stream_name}",
        f"{s.nats_subject}.replay.>",
    )
    if s.nats_result_subject:
        p.allow(f"{s.nats_result_subject}.replay.>")
    if anchors := _anchors(s):  # audit verify: the anchors, through an ordered consumer
        p.allow(
            f"$JS.API.STREAM.INFO.{anchors}",
            f"$JS.API.CONSUMER.CREATE.{anchors}",
            f"$JS.API.CONSUMER.CREATE.{anchors}.>",
            f"$JS.FC.{anchors}.>",  # its flow control's replies, once the stream holds more than a batch
        )
    p.subscribe = [f"{s.nats_inbox_prefix}.>"]
    p.aws += [
        AwsGrant(
            ("s3:GetObject",),
            tuple(f"arn:aws:s3:::{b}/uploads/*/metadata.json" for b in _buckets(s)),
            "keys check: the newest uploads' metadata.json",
        )
    ]
    p.notes.append(
        "dlq replay on a stream or consumer without replay subjects puts a dead letter back on "
        f"{s.nats_subject} itself, which needs publishing there too: run `setup --enable-replay` instead"
    )
    return p


def admin(settings: Settings, streams: Sequence[tuple[str, str]] = ()) -> Permissions:
    """`setup`: make the streams, the consumer and the bucket, or find them; widen what it may widen."""
    s = settings
    source = s.source
    p = Permissions("admin")
    made = [source.stream, s.dlq_stream_name, *(name for name, _ in streams)]
    if source.after is None:
        made.append(s.nats_stream_name)
    if anchors := _anchors(s):
        made.append(anchors)
    if s.nats_result_subject:
        made.append(s.nats_result_stream_name)
    for stream in dict.fromkeys(made):
        p.allow(f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}")
    p.allow(f"$JS.API.STREAM.UPDATE.{source.stream}")  # --enable-replay; an old result stream widened
    if s.nats_result_subject:
        p.allow(f"$JS.API.STREAM.UPDATE.{s.nats_result_stream_name}")
    consumer = f"{source.stream}.{s.nats_consumer_name}"
    p.allow(
        f"$JS.API.CONSUMER.INFO.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{consumer}.>",  # a consumer with one filter names it in the subject
        f"$JS.API.CONSUMER.LIST.{s.nats_stream_name}",
    )
    if s.nats_result_subject:
        p.allow(f"$JS.API.CONSUMER.LIST.{s.nats_result_stream_name}")
    if s.dedupe_bucket:
        p.allow(f"$JS.API.STREAM.INFO.KV_{s.dedupe_bucket}", f"$JS.API.STREAM.CREATE.KV_{s.dedupe_bucket}")
        p.allow("$JS.API.STREAM.INFO.KV_file_processor_done")  # the upgrade check of a new bucket
    p.subscribe = [f"{s.nats_inbox_prefix}.>"]
    return p


def render(p: Permissions, fmt: str) -> str:
    """The sets in a server's configuration (`nats-conf`), as `nsc` flags, or as JSON with the IAM policy."""
    if fmt == "json":
        return json.dumps(
            {
                "role": p.role,
                "nats": {"publish": p.publish, "subscribe": p.subscribe},
                "aws_policy": p.iam_policy(),
                "notes": p.notes,
            },
            indent=2,
        )
    lines: list[str] = [f"# role {p.role}: NATS permissions"]
    lines += [f"# note: {note}" for note in p.notes]
    if fmt == "nsc":
        lines.append(
            f"nsc edit user --name USER --allow-pub {','.join(p.publish)!r} --allow-sub {','.join(p.subscribe)!r}"
        )
    else:

        def block(subjects: list[str]) -> str:
            return "\n".join(f"      {json.dumps(subject)}" for subject in subjects)

        lines += [
            "permissions: {",
            "  publish: {",
            "    allow: [",
            block(p.publish),
            "    ]",
            "  }",
            "  subscribe: {",
            "    allow: [",
            block(p.subscribe),
            "    ]",
            "  }",
            "}",
        ]
    if p.aws:
        lines.append(f"# role {p.role}: AWS, S3 first (an IAM policy; --format json prints it as JSON)")
        lines += [f"#   {', '.join(g.actions)} on {', '.join(g.resources)}: {g.why}" for g in p.aws]
    return "\n".join(lines)
