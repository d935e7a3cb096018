"""What the processors that announce an upload to people (`webhook`'s Slack and Discord lines, `email`,
`sms`) say about it, and when: its name, its size in human units, the transcript an earlier step made;
the fields their templates and conditions may use (the upload's, and the outputs of the steps before
them), checked at start; and the pace at which they send.

A template is Python's `string.Template`: a value is substituted as text and never read as a template
itself, no expression runs. A condition (`SMS_WHEN`) is a list of `field=glob` / `field!=glob` tests
over the same fields, all of which must hold.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from uploads_consumer.errors import ConfigError

if TYPE_CHECKING:
    from uploads_consumer.processors import ProcessingContext, ProcessorEnvironment

UNKNOWN = "unknown"
# What a template or condition may use. A fact that this consumer's chain did not fetch reads as
# `unknown`; `transcript` and `language` are empty when no earlier step transcribed the upload.
FIELDS = {
    "event_id": "the upload event's event_id",
    "file_uuid": "the upload's file_uuid",
    "email": "the uploader's address, from the event",
    "uploaded_at": "the event's timestamp, RFC 3339 UTC",
    "consumer": "NATS_CONSUMER_NAME",
    "fetched": "what the chain read of the upload: event, object or plaintext",
    "filename": "the clean file name; with the event alone, the stored name",
    "size": "the size in bytes (from object on)",
    "size_human": "the size as 47.1 KiB (from object on)",
    "sha256": "the plaintext's SHA-256 (plaintext only)",
    "content_type": "the detected content type (plaintext only)",
    "transcript": "the text of an earlier transcribe step",
    "language": "the language of that transcript",
}
TRANSCRIPT_FIELDS = frozenset({"transcript", "language"})
_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(!=|=)(.*)$")


def upload_name(ctx: ProcessingContext) -> str:
    """The clean file name when the metadata was read; with the event alone, the stored name (the last
    part of `s3_data_key`, less `.enc`)."""
    name = ctx.facts()["original_filename"]
    return str(name) if name else ctx.event.stored_name


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} byte{'s' if size != 1 else ''}"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def transcription(ctx: ProcessingContext) -> dict[str, Any]:
    """What the first earlier `transcribe` step (or instance of it, `transcribe:fr`), here or in a
    stage before this consumer, with some text reported (`text`, `language`, …); empty when there is none."""
    for step, out in ctx.earlier_outputs().items():
        if step.partition(":")[0] == "transcribe" and isinstance(out.get("text"), str) and out["text"].strip():
            return dict(out)
    return {}


def rfc3339(epoch_ms: int) -> str:
    try:
        when = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return UNKNOWN
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def step_fields(earlier: Sequence[str]) -> dict[str, str]:
    """The prefix of each earlier step's outputs as template fields: `archive` → `archive_`,
    `webhook:ops` → `webhook_ops_` (a character an identifier cannot hold becomes `_`)."""
    return {re.sub(r"\W", "_", step) + "_": step for step in earlier}


def step_output(name: str, prefixes: Mapping[str, str]) -> tuple[str, str] | None:
    """`archive_key` → (`archive`, `key`): the step (the longest prefix that fits) and its output."""
    fits = [prefix for prefix in prefixes if name.startswith(prefix) and len(name) > len(prefix)]
    if not fits:
        return None
    prefix = max(fits, key=len)
    return prefixes[prefix], name[len(prefix) :]


def output_text(value: Any) -> str:
    """An earlier step's output as text: a string as it is, anything else as JSON, nothing as empty."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def earlier_steps(name: str, chain: Sequence[str]) -> tuple[str, ...]:
    """The steps of the chain before step `name` (none when it is not in the chain)."""
    return tuple(chain[: chain.index(name)]) if name in chain else ()


@dataclass(frozen=True)
class Clause:
    field: str
    equal: bool
    """`field=glob` when True, `field!=glob` when False."""
    glob: str

    def holds(self, value: str) -> bool:
        return fnmatch.fnmatchcase(value, self.glob) == self.equal

    def __str__(self) -> str:
        return f"{self.field}{'=' if self.equal else '!='}{self.glob}"


@dataclass(frozen=True)
class Condition:
    """All of its clauses must hold; none holds always."""

    clauses: tuple[Clause, ...]

    def failing(self, values: Mapping[str, str]) -> Clause | None:
        """The first clause that does not hold for these field values, or None when all do."""
        return next((c for c in self.clauses if not c.holds(values[c.field])), None)

    @property
    def fields(self) -> set[str]:
        return {c.field for c in self.clauses}


class UploadFields:
    """The fields the templates and conditions of step `name` may use: FIELDS, and the outputs of the
    steps before it in the chain (`{step}_{output}`). Checked when a template or condition is made, so a
    name that is not there is a ConfigError at start, never an error at the first upload."""

    def __init__(self, name: str, env: ProcessorEnvironment) -> None:
        self.consumer = env.consumer
        self.earlier = earlier_steps(name, env.chain)
        self.prefixes = step_fields(self.earlier)
        self._used: dict[str, tuple[str, str]] = {}
        # In a stage (AFTER), the steps of the stages before it are known only per upload: a field that
        # names no step of this chain is looked up among theirs when the values are made.
        self._stage = env.after is not None
        self._upstream: set[str] = set()

    def _check(self, names: Sequence[str], variable: str, shown: str) -> None:
        later = {n for n in names if self._stage and n not in FIELDS and step_output(n, self.prefixes) is None}
        self._upstream |= {n for n in later if "_" in n.strip("_")}
        unknown = [
            n for n in names if n not in FIELDS and step_output(n, self.prefixes) is None and n not in self._upstream
        ]
        if unknown:
            outputs = ", ".join(f"{prefix}OUTPUT" for prefix in self.prefixes) or "none: no step comes before this one"
            raise ConfigError(
                variable,
                f"uses {shown.format(unknown[0])}, which is not a field ({', '.join(FIELDS)}) nor an output of an "
                f"earlier step ({outputs})",
            )
        for n in names:
            if n not in FIELDS and (out := step_output(n, self.prefixes)) is not None:
                self._used[n] = out

    def template(self, text: str, variable: str) -> string.Template:
        """A template that uses only these fields; ConfigError naming the variable and the field otherwise."""
        parsed = string.Template(text)
        if not parsed.is_valid():
            raise ConfigError(variable, "has a $ that is neither ${field} nor $field; write $$ for a dollar sign")
        self._check(parsed.get_identifiers(), variable, "${{{}}}")
        return parsed

    def condition(self, text: str | None, variable: str) -> Condition:
        """`field=glob,field!=glob,…` (fnmatch globs: `*`, `?`, `[…]`; case matters) → a Condition over
        these fields; empty or None holds always. ConfigError naming the variable otherwise."""
        clauses = []
        for part in (text or "").split(","):
            if not part.strip():
                continue
            match = _CLAUSE.match(part)
            if match is None:
                raise ConfigError(variable, f"{part.strip()!r} is not field=glob or field!=glob")
            clauses.append(Clause(match.group(1), match.group(2) == "=", match.group(3).strip()))
        self._check([c.field for c in clauses], variable, "{}")
        return Condition(tuple(clauses))

    def values(self, ctx: ProcessingContext) -> dict[str, str]:
        """Every field of FIELDS, and the earlier steps' outputs the templates and conditions made so far
        use, for this upload."""
        facts = ctx.facts()
        said = transcription(ctx)

        def shown(value: Any) -> str:
            return UNKNOWN if value is None else str(value)

        return {
            "event_id": ctx.event.event_id,
            "file_uuid": ctx.event.file_uuid,
            "email": ctx.event.email,
            "uploaded_at": rfc3339(ctx.event.timestamp),
            "consumer": self.consumer,
            "fetched": facts["fetched"],
            "filename": upload_name(ctx),
            "size": shown(facts["size"]),
            "size_human": human_size(facts["size"]) if facts["size"] is not None else UNKNOWN,
            "sha256": shown(facts["sha256"]),
            "content_type": shown(facts["content_type"]),
            "transcript": str(said.get("text") or ""),
            "language": str(said.get("language") or ""),
            **{n: output_text(ctx.outputs.get(step, {}).get(key)) for n, (step, key) in self._used.items()},
            **self._upstream_values(ctx),
        }

    def _upstream_values(self, ctx: ProcessingContext) -> dict[str, str]:
        """A stage's fields taken from the steps of the stages before it (empty when none reported it)."""
        if not self._upstream:
            return {}
        earlier = ctx.earlier_outputs()
        prefixes = step_fields(list(earlier))
        found = {n: step_output(n, prefixes) for n in self._upstream}
        return {n: output_text(earlier[hit[0]].get(hit[1])) if hit else "" for n, hit in found.items()}

    def transcribed_before(self) -> bool:
        """Whether a `transcribe` step (or instance of it) comes before this one."""
        return any(step.partition(":")[0] == "transcribe" for step in self.earlier)


class RateLimit:
    """At most `per_second` sends from this process, evenly spaced: a backlog is sent at that pace
    instead of in a burst that gets the sender throttled or blocked."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0

    async def wait(self, count: int = 1) -> None:
        """Wait for this process's turn to send `count` (an SMS of several segments counts each)."""
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval * max(count, 1)  # reserved before sleeping: concurrent callers queue up
        if slot > now:
            await asyncio.sleep(slot - now)
