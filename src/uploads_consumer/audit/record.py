"""The record: its fields, its canonical form and its hash, and the chain each writer makes of its records.

Format and guarantees: docs/contract.md, "12. Audit trail".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

FORMAT = 1
ZERO_HASH = "0" * 64
FIELDS = (
    "format",
    "writer",
    "seq",
    "prev_hash",
    "recorded_at",
    "consumer",
    "host",
    "pid",
    "stream",
    "stream_seq",
    "deliveries",
    "event_id",
    "file_uuid",
    "email",
    "filename",
    "bucket",
    "size",
    "content_type",
    "sha256",
    "outcome",
    "error_class",
    "reason",
    "duration_ms",
    "processors",
    "skipped",
)
"""The fields a record's hash covers: every field but `hash` itself."""
COLUMNS = (*FIELDS, "hash")
LISTS = ("processors", "skipped")  # arrays of strings (JSON text in a store)

Record = dict[str, Any]


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is taken over: the FIELDS as one JSON object, keys sorted, no
    whitespace, non-ASCII as UTF-8 (for strings, integers, null and lists of strings: RFC 8785)."""
    return json.dumps(
        {k: record[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def chained(entries: Iterable[Mapping[str, Any]], writer: str, seq: int, prev_hash: str) -> list[Record]:
    """Entries as the records that follow (seq, prev_hash) in `writer`'s chain."""
    records = []
    for entry in entries:
        seq += 1
        record = {**entry, "writer": writer, "seq": seq, "prev_hash": prev_hash}
        record["hash"] = prev_hash = record_hash(record)
        records.append(record)
    return records
