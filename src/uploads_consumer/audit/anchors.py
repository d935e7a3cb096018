"""Anchors: each writer's chain head (writer, seq, hash, time), published to a JetStream stream of
their own, kept apart from the database, so that `audit verify` sees a chain whose last records
were removed (it ends before its anchor: `truncated`) or whose hashes were all recomputed from some
record on (they no longer reach the anchored hash: `rewritten`). After CloudTrail's digest files.

The stream (AUDIT_ANCHOR_STREAM, `AUDIT_ANCHORS`) refuses deletes and purges. A daemon publishes
the head of what its store holds at most every AUDIT_ANCHOR_INTERVAL, when it has moved, and once
more at a clean stop; signed with Ed25519 when AUDIT_SIGNING_KEY is set, so that whoever can publish
to the subject (or write to the database) cannot make an anchor `audit verify` accepts with the key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from uploads_consumer.audit.chain import Head
from uploads_consumer.config import Settings
from uploads_consumer.errors import ConfigError, describe
from uploads_consumer.messages import AuditAnchor
from uploads_consumer.observability import Metrics, get_logger

log = get_logger("uploads_consumer.audit")

SIGNED_PREFIX = b"uploads-consumer audit anchor 1\n"
PUBLISH_TIMEOUT = 5.0
SEAL_TIMEOUT = 2.0  # at a clean stop, the last anchors' publication (the connection is about to close)
RETENTION_MARGIN = 7 * 86400.0  # anchors outlive AUDIT_RETENTION by this: `audit prune` must run that often


@dataclass(frozen=True)
class Anchor:
    writer: str
    consumer: str
    seq: int
    hash: str
    at: int
    """Epoch milliseconds when it was published."""
    key: str | None = None
    """The fingerprint of the key it is signed with (`key_id`), when signed."""
    signature: str | None = None

    def signed_bytes(self) -> bytes:
        fields = {"at": self.at, "consumer": self.consumer, "hash": self.hash, "seq": self.seq, "writer": self.writer}
        return SIGNED_PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def body(self) -> bytes:
        """The message, as the AsyncAPI document describes it (`messages.AuditAnchor`)."""
        message = AuditAnchor(
            writer=self.writer,
            consumer=self.consumer,
            seq=self.seq,
            hash=self.hash,
            at=self.at,
            key=self.key if self.signature is not None else None,
            signature=self.signature,
        )
        return message.model_dump_json(exclude_none=True).encode()

    @classmethod
    def parse(cls, body: bytes) -> Anchor:
        """ValueError when the body is not an anchor."""
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            anchor = cls(
                str(data["writer"]),
                str(data["consumer"]),
                int(data["seq"]),
                str(data["hash"]),
                int(data["at"]),
                data.get("key"),
                data.get("signature"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed {exc}") from None
        return anchor


def _key_bytes(text: str, variable: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            variable, f"not valid base64 (expected {what}; `uploads-consumer audit keygen` makes a pair)"
        ) from None
    if len(raw) != 32:
        raise ConfigError(variable, f"must decode to 32 bytes ({what}), got {len(raw)}")
    return raw


def key_id(public: Ed25519PublicKey) -> str:
    """A short name of a public key, carried by the anchors it signs: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


class Signer:
    def __init__(self, private_key_b64: str) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(
            _key_bytes(private_key_b64, "AUDIT_SIGNING_KEY", "an Ed25519 private key")
        )
        self.key_id = key_id(self._key.public_key())

    def sign(self, anchor: Anchor) -> Anchor:
        signature = base64.b64encode(self._key.sign(anchor.signed_bytes())).decode()
        return Anchor(anchor.writer, anchor.consumer, anchor.seq, anchor.hash, anchor.at, self.key_id, signature)


def verify_keys(texts: list[str], variable: str) -> list[Ed25519PublicKey]:
    """Public keys (base64 of 32 bytes each, comma-separated in one text or given one by one)."""
    parts = [part for text in texts for part in text.split(",") if part.strip()]
    return [Ed25519PublicKey.from_public_bytes(_key_bytes(p, variable, "an Ed25519 public key")) for p in parts]


def signature_problem(anchor: Anchor, keys: list[Ed25519PublicKey]) -> str | None:
    """Why `keys` do not accept the anchor, or None."""
    if anchor.signature is None:
        return "it is not signed"
    try:
        signature = base64.b64decode(anchor.signature, validate=True)
    except (binascii.Error, ValueError):
        return "its signature is not base64"
    for key in keys:
        with contextlib.suppress(InvalidSignature):
            key.verify(signature, anchor.signed_bytes())
            return None
    return "its signature does not verify with the key given"


def keygen() -> tuple[str, str]:
    """A new pair: (private, public), each base64 of its 32 raw bytes."""
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes_raw()
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


# -- the stream


def anchor_stream_config(settings: Settings) -> StreamConfig:
    retention = settings.audit_retention
    return StreamConfig(
        name=settings.audit_anchor_stream,
        subjects=[f"{settings.audit_anchor_subject}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
        max_age=retention + RETENTION_MARGIN if retention else None,
        discard=DiscardPolicy.OLD,
        deny_delete=True,
        deny_purge=True,
        duplicate_window=120.0,
    )


def permissions(settings: Settings) -> str:
    return (
        f"a daemon of consumer {settings.nats_consumer_name} needs to publish to {settings.own_anchor_subject} "
        "(with its replies, _INBOX.>), and nothing more on this stream"
    )


async def ensure_anchor_stream(js: JetStreamContext, settings: Settings) -> tuple[list[str], list[str]]:
    """The anchor stream, created when missing (never changed when found); (report lines, warnings)."""
    name = settings.audit_anchor_stream
    if settings.audit_url is None or not name:
        return [], []
    config = anchor_stream_config(settings)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        kept = f"{config.max_age / 86400:g} days" if config.max_age else "for ever"
        return [
            f"created stream {name} (subject {settings.audit_anchor_subject}.>, deny delete, deny purge, anchors kept {kept}): "
            + permissions(settings)
        ], []
    warnings = []
    if not (info.config.deny_delete and info.config.deny_purge):
        warnings.append(
            f"stream {name} lets its anchors be deleted or purged (deny_delete {info.config.deny_delete}, "
            f"deny_purge {info.config.deny_purge}): whoever may delete them can hide a truncated audit chain; "
            "recreate it with both set (`uploads-consumer setup` does)"
        )
    subjects = info.config.subjects or []
    if settings.own_anchor_subject not in subjects and not any(
        s.endswith(">") and settings.own_anchor_subject.startswith(s[:-1]) for s in subjects
    ):
        warnings.append(f"stream {name} does not capture {settings.own_anchor_subject}: anchors would not be kept")
    return [f"found   stream {name} ({info.state.messages} anchors): " + permissions(settings)], warnings


async def read_anchors(js: JetStreamContext, stream: str, idle: float = 5.0) -> AsyncIterator[tuple[int, bytes]]:
    """Every message the anchor stream holds, (stream sequence, body), oldest first, through an
    ordered consumer. NotFoundError when the stream does not exist."""
    info = await js.stream_info(stream)
    if not info.state.messages:
        return
    subjects = info.config.subjects or [">"]
    sub = await js.subscribe(
        subjects[0] if len(subjects) == 1 else ">",
        stream=stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=idle)
            yield msg.metadata.sequence.stream, msg.data
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# -- publishing


class AnchorPublisher:
    """Publishes the heads a journal reports stored (its own chain, and the chains of spools it took
    over) when they have moved since their last anchor."""

    def __init__(
        self,
        settings: Settings,
        stored: Callable[[], Mapping[str, Head]],
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.interval = settings.audit_anchor_interval
        self.subject = settings.own_anchor_subject
        self._consumer = settings.nats_consumer_name
        key = settings.audit_signing_key
        self._signer = Signer(key.get_secret_value()) if key is not None else None
        self._stored = stored
        self._metrics = metrics
        self._clock = clock
        self._published: dict[str, Head] = {}
        self._js: JetStreamContext | None = None
        self._said: str | None = None

    async def run(self, js: JetStreamContext) -> None:
        """Every interval, until cancelled."""
        self._js = js
        while True:
            await asyncio.sleep(self.interval)
            await self.publish()

    async def publish(self) -> None:
        """One anchor per chain whose stored head moved. A failure is logged (once per new problem) and
        counted; the next round tries again. Never raises."""
        if self._js is None:
            return
        for writer, head in list(self._stored().items()):
            if self._published.get(writer) == head:
                continue
            if not self._js._nc.is_connected:  # reconnecting, or a stop with NATS away: not worth a wait
                self._failed("not connected to NATS")
                return
            anchor = Anchor(writer, self._consumer, head.seq, head.hash, int(self._clock() * 1000))
            if self._signer is not None:
                anchor = self._signer.sign(anchor)
            try:
                await self._js.publish(
                    self.subject,
                    anchor.body(),
                    timeout=PUBLISH_TIMEOUT,
                    headers={"Nats-Msg-Id": f"{writer}:{head.seq}"},
                )
            except Exception as exc:  # noqa: BLE001 - an anchor missed is a gap in the evidence, not in the trail
                self._failed(describe(exc))
                return
            self._published[writer] = head
            self._metrics.audit_anchors.inc()
            if self._said is not None:
                self._said = None
                log.info("audit anchors published again", subject=self.subject)

    def _failed(self, problem: str) -> None:
        self._metrics.audit_anchor_errors.inc()
        if problem != self._said:
            self._said = problem
            log.error("audit anchor not published; trying again", subject=self.subject, error=problem)


def decode_anchors(raw: list[tuple[int, bytes]]) -> tuple[dict[str, list[tuple[int, Anchor]]], list[str]]:
    """Anchors by writer (stream sequence, anchor), and a line per message that is not one."""
    anchors: dict[str, list[tuple[int, Anchor]]] = {}
    unreadable = []
    for seq, body in raw:
        try:
            anchor = Anchor.parse(body)
        except ValueError as exc:
            unreadable.append(f"anchor message {seq} is not an anchor ({exc})")
            continue
        anchors.setdefault(anchor.writer, []).append((seq, anchor))
    return anchors, unreadable
