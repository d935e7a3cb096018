"""`audit verify`'s check of the chains, one record at a time in (writer, seq) order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uploads_consumer.audit.record import FORMAT, LISTS, ZERO_HASH, record_hash


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


@dataclass(frozen=True)
class Break:
    """The first record of a chain that does not verify."""

    writer: str
    seq: int
    problem: str


@dataclass
class ChainCheck:
    """Walks records in (writer, seq) order, as `audit verify` reads them, and notes each chain's
    first break: an edited record (its hash), records missing before it (its seq), or one that does
    not follow the record before it (its prev_hash: reordered, or a neighbour removed or rewritten)."""

    records: int = 0
    chains: int = 0
    breaks: list[Break] = field(default_factory=list)
    _writer: str | None = None
    _seq: int = 0
    _hash: str = ZERO_HASH
    _broken: bool = False

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        if record["writer"] != self._writer:
            self.chains += 1
            self._writer, self._seq, self._hash, self._broken = record["writer"], 0, ZERO_HASH, False
        if self._broken:
            return
        problem = None
        expected = self._seq + 1
        unreadable = [name for name in LISTS if not _strings(record[name])]
        if record.get("format") != FORMAT:
            problem = f"unknown record format {record.get('format')!r}"
        elif unreadable:
            problem = f"its {unreadable[0]} column is not a JSON array of strings (edited)"
        elif record_hash(record) != record["hash"]:
            problem = "its content does not match its hash (edited)"
        elif record["seq"] != expected:
            missing = (
                f"record {expected}" if record["seq"] == expected + 1 else f"records {expected}-{record['seq'] - 1}"
            )
            problem = (
                f"{missing} of this chain missing before it (deleted)" if record["seq"] > expected else "out of order"
            )
        elif record["prev_hash"] != self._hash:
            problem = "its prev_hash is not the hash of the record before it (reordered or rewritten)"
        if problem is not None:
            self.breaks.append(Break(record["writer"], record["seq"], problem))
            self._broken = True
        self._seq, self._hash = record["seq"], record["hash"]
