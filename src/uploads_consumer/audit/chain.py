"""`audit verify`'s check of the chains, one record at a time in (writer, seq) order.

A chain starts at seq 1, or just after its retention marker (the last record `audit prune` removed,
and its hash). A record whose personal fields `audit forget` removed verifies through their
commitments (format 2); a forgotten format 1 record can only be checked for its place in the chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uploads_consumer.audit.record import LISTS, PERSONAL, ZERO_HASH, commitment, record_hash


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


@dataclass(frozen=True)
class Break:
    """The first record of a chain that does not verify (or, for an anchor, the seq it names)."""

    writer: str
    seq: int
    problem: str
    kind: str = "broken"


@dataclass(frozen=True)
class Head:
    """A place in a writer's chain: a seq and the hash of the record there."""

    seq: int
    hash: str


def content_problem(record: Mapping[str, Any], erasures: set[int]) -> str | None:
    """What is wrong with a record taken alone (its fields against its hash), or None."""
    unreadable = [name for name in LISTS if not _strings(record[name])]
    if unreadable:
        return f"its {unreadable[0]} column is not a JSON array of strings (edited)"
    forgotten = record.get("erasure_id") is not None
    if forgotten and record["erasure_id"] not in erasures:
        return f"it names erasure {record['erasure_id']}, which no erasure record has (edited)"
    if record.get("format") == 1:
        if forgotten:  # its hash covered the fields forgotten: only its place in the chain is left to check
            return None
    elif record.get("format") != 2:
        return f"unknown record format {record.get('format')!r}"
    if record_hash(record) != record["hash"]:
        return "its content does not match its hash (edited)"
    if record.get("format") == 1:
        return None
    salt = record.get("salt")
    for name in PERSONAL:
        value = record[name]
        if salt is None:
            if not forgotten:
                return "its personal fields were removed outside `audit forget` (edited)"
            if value is not None:
                return f"its {name} is set on a forgotten record (edited)"
        elif commitment(salt, name, value) != record[f"{name}_commitment"]:
            return f"its {name} does not match its commitment (edited)"
    return None


@dataclass
class ChainCheck:
    """Walks records in (writer, seq) order, as `audit verify` reads them, and notes each chain's
    first break: an edited record (its hash), records missing before it (its seq), or one that does
    not follow the record before it (its prev_hash: reordered, or a neighbour removed or rewritten).
    `starts` are the retention markers; `erasures`, the ids of the erasures recorded."""

    starts: Mapping[str, Head] = field(default_factory=dict)
    erasures: set[int] = field(default_factory=set)
    records: int = 0
    chains: int = 0
    forgotten_v1: int = 0
    breaks: list[Break] = field(default_factory=list)
    heads: dict[str, Head] = field(default_factory=dict)
    """Each chain's last record."""
    at: dict[str, set[int]] = field(default_factory=dict)
    """Per writer, seqs whose hash to note in `seen` as it is read (the anchored ones)."""
    seen: dict[str, dict[int, str]] = field(default_factory=dict)
    _writer: str | None = None
    _seq: int = 0
    _hash: str = ZERO_HASH
    _broken: bool = False

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        writer = record["writer"]
        if writer != self._writer:
            self.chains += 1
            start = self.starts.get(writer, Head(0, ZERO_HASH))
            self._writer, self._seq, self._hash, self._broken = writer, start.seq, start.hash, False
        seq = record["seq"]
        self.heads[writer] = Head(seq, record["hash"])
        if seq in self.at.get(writer, ()):
            self.seen.setdefault(writer, {})[seq] = record["hash"]
        if self._broken:
            return
        problem = content_problem(record, self.erasures) or self._link_problem(seq, record["prev_hash"])
        if problem is not None:
            self.breaks.append(Break(writer, seq, problem))
            self._broken = True
        elif record.get("format") == 1 and record.get("erasure_id") is not None:
            self.forgotten_v1 += 1
        self._seq, self._hash = seq, record["hash"]

    def resume_at(self, record: Mapping[str, Any]) -> None:
        """Begin a chain at `record` rather than at its start (verify --incremental: at its last anchor).
        Its content is checked; its link to the records before it, which are not read, is not."""
        writer = record["writer"]
        self.records += 1
        self.chains += 1
        self.heads[writer] = Head(record["seq"], record["hash"])
        self.seen.setdefault(writer, {})[record["seq"]] = record["hash"]
        self._writer, self._seq, self._hash, self._broken = writer, record["seq"], record["hash"], False
        problem = content_problem(record, self.erasures)
        if problem is not None:
            self.breaks.append(Break(writer, record["seq"], problem))
            self._broken = True

    def _link_problem(self, seq: int, prev_hash: str) -> str | None:
        expected = self._seq + 1
        if seq != expected:
            missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
            return f"{missing} of this chain missing before it (deleted)" if seq > expected else "out of order"
        if prev_hash != self._hash:
            return "its prev_hash is not the hash of the record before it (reordered or rewritten)"
        return None
